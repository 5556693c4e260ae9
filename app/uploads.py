"""Uploaded datasets and models: receive the file, check it, store it where the worker finds
it, record it.

An upload is streamed into `<id>.partial/` beside its final folder, checked there, synced to
disk, renamed to `<id>/` in one step, and only then recorded. A crash at any point leaves at
most an unreferenced folder, never a row that points at a half-written or unchecked file.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, TypeVar

from fastapi import Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app import archives, crud, dataset_files, gguf_files, model_files, model_folders, upload_stream
from app.core.config import Settings
from app.core.db import run_db
from app.errors import validation_problem
from app.models import Dataset, ModelFormat, UploadedModel
from app.upload_stream import Upload

# The model classes an uploaded checkpoint may name: name -> "module:Class", resolved by the
# worker when it builds the model (the API only checks the name).
ARCHITECTURES: dict[str, str] = {
    "digits-cnn": "quantcore.models.digits_cnn:DigitsCNN",
}
MAX_NAME = 255
# PostgreSQL text cannot hold NUL, and no name needs a control character
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
Row = TypeVar("Row", Dataset, UploadedModel)
CONFIG_EXAMPLE = '{"architecture": "digits-cnn", "width": 16}'


async def receive_dataset(request: Request, session: Session, settings: Settings, tenant_id: str) -> Dataset:
    return await _receive(request, session, settings, settings.datasets_dir, frozenset({"name"}),
                          lambda upload_id, upload: _store_dataset(settings, upload_id, upload, tenant_id))


def _store_dataset(settings: Settings, dataset_id: str, upload: Upload, tenant_id: str) -> Dataset:
    name = _name(upload)
    summary = dataset_files.inspect(upload.path, settings.max_dataset_samples, settings.max_upload_bytes)
    path = _publish(upload, settings.datasets_dir / dataset_id, f"data.{summary.format.value}")
    row = Dataset(
        id=dataset_id,
        tenant_id=tenant_id,
        name=name,
        format=summary.format,
        kind=summary.kind,
        samples=summary.samples,
        x_shape=summary.x_shape,
        has_labels=summary.has_labels,
        classes=summary.classes,
        path=path.relative_to(settings.data_dir).as_posix(),
        bytes=upload.bytes,
        sha256=upload.sha256,
    )
    return row


async def receive_model(request: Request, session: Session, settings: Settings, tenant_id: str) -> UploadedModel:
    return await _receive(request, session, settings, settings.models_dir, frozenset({"name", "config"}),
                          lambda upload_id, upload: _store_model(settings, upload_id, upload, tenant_id),
                          check_filename=model_files.check_filename)


async def _receive(request: Request, session: Session, settings: Settings, folder: Path, fields: frozenset[str],
                   store: Callable[[str, Upload], Row], check_filename: Callable[[str], None] | None = None) -> Row:
    """Stream the upload into `<folder>/<id>.partial`, check and publish it with `store` (in a
    thread: it reads the file), then record its row; the staging folder never outlives the request."""
    upload_id = uuid.uuid4().hex
    staging = folder / f"{upload_id}.partial"
    try:
        upload = await upload_stream.receive(request, staging / "upload", settings.max_upload_bytes, fields,
                                             check_filename)
        row = await run_in_threadpool(store, upload_id, upload)
        return await run_db(_record, session, row, _folder_of(settings, row))
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once published


def _store_model(settings: Settings, model_id: str, upload: Upload, tenant_id: str) -> UploadedModel:
    """Check the upload by what its bytes are (a pickle is refused whatever its name or
    config), then publish it as the folder the worker loads: `model.safetensors` with
    `config.json`, `model.gguf`, or the archive's model folder."""
    name = _name(upload)
    kind = model_files.detect(upload.path)
    values = {"id": model_id, "tenant_id": tenant_id, "name": name, "bytes": upload.bytes, "sha256": upload.sha256}
    if kind == "gguf":
        gguf = gguf_files.inspect(upload.path)
        _no_config(upload, kind)
        path = _publish(upload, settings.models_dir / model_id, "model.gguf")
        row = UploadedModel(**values, format=ModelFormat.GGUF, architecture=gguf.architecture, config=gguf.metadata,
                            tensors=gguf.tensors, parameters=gguf.parameters)
    elif kind != "safetensors":
        unpacked = upload.path.parent / "folder"
        archives.extract(upload.path, kind, unpacked, settings.max_upload_bytes, model_folders.check_member)
        root = model_folders.find_root(unpacked, kind)
        folder = model_folders.inspect(root)
        _no_config(upload, kind)
        path = _publish_folder(root, settings.models_dir / model_id) / "config.json"
        row = UploadedModel(**values, format=ModelFormat.HF_FOLDER, architecture=folder.architecture,
                            config=folder.config, tensors=folder.tensors, parameters=folder.parameters)
    else:
        summary = model_files.inspect(upload.path)
        config = parse_config(upload.fields.get("config"))
        # Beside the weights, as quantcore's loader reads a model folder (model.safetensors + config.json)
        (upload.path.parent / "config.json").write_text(json.dumps(config))
        path = _publish(upload, settings.models_dir / model_id, "model.safetensors")
        row = UploadedModel(**values, format=ModelFormat.SAFETENSORS, architecture=config["architecture"],
                            config=config, tensors=summary.tensors, parameters=summary.parameters)
    row.path = path.relative_to(settings.data_dir).as_posix()
    return row


def _no_config(upload: Upload, kind: str) -> None:
    if "config" in upload.fields:
        msg = f"only for a classic safetensors file; a {kind} upload carries its own config"
        raise validation_problem([{"loc": ["body", "config"], "msg": msg, "type": "extra_forbidden"}])


def parse_config(text: str | None) -> dict[str, Any]:
    """The `config` form field: a JSON object naming a known architecture; its other keys are
    the architecture's arguments, checked by the worker when it builds the model."""
    known = ", ".join(sorted(ARCHITECTURES))

    def bad(msg: str, *loc: str, slug: str = "validation-error", title: str = "Invalid request"):
        return validation_problem([{"loc": ["body", "config", *loc], "msg": msg}], slug=slug, title=title)

    if text is None:
        raise bad(f"required with a safetensors file: a JSON object naming the architecture, e.g. {CONFIG_EXAMPLE}")
    try:
        config = json.loads(text, parse_constant=_refuse_constant)
    except (json.JSONDecodeError, ValueError) as exc:
        raise bad(f"not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise bad(f"must be a JSON object, e.g. {CONFIG_EXAMPLE}")
    architecture = config.get("architecture")
    if not isinstance(architecture, str):
        raise bad(f"required: the name of the model's architecture, one of: {known}", "architecture")
    if architecture not in ARCHITECTURES:
        msg = f"unknown architecture '{architecture}'; known: {known}"
        raise bad(msg, "architecture", slug="unknown-architecture", title="Unknown architecture")
    return config


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


async def receive_within_quota(kind: str, request: Request, session: Session, settings: Settings, tenant_id: str) -> Row:
    """receive_dataset / receive_model, inside the tenant's storage quota (app.quotas): refused
    from the request's Content-Length before the body is read, else once it is in (and removed)."""
    from app import quotas

    await run_db(quotas.check_upload, session, tenant_id, settings, int(request.headers.get("content-length") or 0))
    receive = receive_dataset if kind == "dataset" else receive_model
    row = await receive(request, session, settings, tenant_id)
    try:
        await run_db(quotas.check_upload, session, tenant_id, settings, 0)  # the new row counts now
    except Exception:
        await delete(session, settings, row)
        raise
    return row


async def delete(session: Session, settings: Settings, row: Dataset | UploadedModel) -> None:
    """Forget the row, then remove its folder (a crash in between leaves only an unreferenced folder)."""
    folder = _folder_of(settings, row)
    await run_db(crud.delete_upload, session, row)
    await run_in_threadpool(functools.partial(shutil.rmtree, folder, ignore_errors=True))


def _folder_of(settings: Settings, row: Dataset | UploadedModel) -> Path:
    """The published folder an upload's row points into (its path is relative to the data folder)."""
    return settings.data_dir / Path(row.path).parent


def _name(upload: Upload) -> str:
    """The `name` field, or else the file's name."""
    if "name" not in upload.fields:
        return CONTROL_CHARACTERS.sub("", upload.filename)[:MAX_NAME] or "upload"
    name = upload.fields["name"].strip()
    if not 1 <= len(name) <= MAX_NAME:
        raise validation_problem([{"loc": ["body", "name"], "msg": f"must be 1 to {MAX_NAME} characters"}])
    if CONTROL_CHARACTERS.search(name):
        raise validation_problem([{"loc": ["body", "name"], "msg": "must not contain control characters"}])
    return name


def _publish(upload: Upload, folder: Path, filename: str) -> Path:
    """Move the checked upload to `folder/filename`: its staging folder is renamed in one step."""
    staged = upload.path.parent
    upload.path.rename(staged / filename)
    staged.rename(folder)
    _fsync_dir(folder)
    _fsync_dir(folder.parent)  # the rename itself is durable before the row is written
    return folder / filename


def _publish_folder(root: Path, folder: Path) -> Path:
    """Move a checked, unpacked model folder (its files synced as written) to `folder` in one step."""
    root.rename(folder)
    _fsync_dir(folder)
    _fsync_dir(folder.parent)
    return folder


def _record(session: Session, row: Row, folder: Path) -> Row:
    try:
        return crud.add_upload(session, row)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync there
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
