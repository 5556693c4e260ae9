"""POST /v1/jobs/{id}/try: generate a few tokens with a finished LLM job's artifact, on the
fast CPU paths, with decode tokens/s (and, when asked, the float model's beside it).

This runs in the API process: the artifact is fetched once from the store into
`<data_dir>/try/<job id>/`, and the most recently tried model stays loaded, so trying the
same job again is quick. One generation runs at a time (they would share the same cores);
others wait. It is meant for a quick look at a demo-sized model, not for serving.
"""

from __future__ import annotations

import shutil
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from app.artifact_store import ArtifactStoreError, store_for
from app.artifacts import find_artifact, store_unavailable
from app.core.config import Settings
from app.errors import Problem
from app.models import Job

KEEP_LOADED = 1  # models held in memory (each is a whole model)
_lock = threading.Lock()
_loaded: OrderedDict[str, dict[str, Any]] = OrderedDict()


class TryRequest(BaseModel):
    prompt: str = Field("The Python language reference says that", min_length=1, max_length=4000)
    max_new_tokens: int = Field(32, ge=1, le=128)
    compare_float: bool = Field(False, description="also generate with the float source model, for tokens/s beside it")


def _qforge_artifact(job: Job):
    formats = [a for a in (job.report or {}).get("artifacts", []) if "file" in a]
    if formats and "qforge" not in {a["format"] for a in formats}:
        detail = f"job {job.id} exported {', '.join(a['format'] for a in formats)}; trying a model needs its 'qforge' artifact"
        raise Problem(409, "try-needs-qforge-artifact", "No qforge artifact", detail)
    return find_artifact(job, "qforge" if formats else None)


def _fetch(settings: Settings, job: Job) -> Path:
    """The artifact folder, unpacked under <data_dir>/try/<job id>/ (once)."""
    from quantcore.generate import open_artifact

    artifact = _qforge_artifact(job)
    root = settings.data_dir / "try" / job.id
    done = root / "unpacked"
    if not done.is_dir():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        archive = root / artifact.file
        try:
            with open(archive, "wb") as out:
                for chunk in store_for(settings).read(artifact.file):
                    out.write(chunk)
        except (ArtifactStoreError, FileNotFoundError) as exc:
            shutil.rmtree(root, ignore_errors=True)
            raise store_unavailable(exc) from None
        staging = root / "staging"
        open_artifact(archive, staging)
        archive.unlink()
        staging.rename(done)  # whole or absent: a crash midway is unpacked again next time
    inner = [p for p in done.iterdir() if p.is_dir()]
    return inner[0] if len(inner) == 1 else done


def try_job(settings: Settings, job: Job, request: TryRequest) -> dict[str, Any]:
    from quantcore.export import load_quantized
    from quantcore.generate import load_float_source, try_loaded

    with _lock:
        entry = _loaded.pop(job.id, None)
        if entry is None:
            folder = _fetch(settings, job)
            entry = {"quantized": load_quantized(folder), "float": None}
        _loaded[job.id] = entry
        while len(_loaded) > KEEP_LOADED:
            _loaded.popitem(last=False)
        try:
            if request.compare_float and entry["float"] is None:
                entry["float"] = load_float_source(entry["quantized"])
            result = try_loaded(entry["quantized"], request.prompt, request.max_new_tokens,
                                entry["float"] if request.compare_float else None)
        except ValueError as exc:  # not a language model, no source model named
            raise Problem(409, "cannot-try-artifact", "Cannot generate with this artifact", str(exc)) from None
    return {"job_id": job.id, "prompt": request.prompt, **result}
