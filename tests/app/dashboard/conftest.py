"""Dashboard page tests: the API fixtures of tests/app (a migrated SQLite service, no worker),
a succeeded job with a known report and stored artifact, and a small HTML reader."""

from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import dataclass, field
from html.parser import HTMLParser

import pytest

from app.artifact_store import store_for
from app.models import JobStatus, utcnow

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

# Relative errors 10^(-SQNR/20): 20 dB is 10 %, 40 dB 1 %, 26.0206 dB 5 %.
LAYERS = [
    {"name": "model.layers.0.self_attn.q_proj", "sqnr_db": 20.0},
    {"name": "model.layers.0.self_attn.k_proj", "sqnr_db": 40.0},
    {"name": "model.layers.0.mlp.down_proj", "sqnr_db": 26.0206},
]
REPORT = {
    "format": "qforge-report/1",
    "model": {"ref": "bundled:smollm2-135m", "class": "LlamaForCausalLM", "kind": "causal_lm"},
    "recipe": {"name": "w4a16-rtn-g64", "stages": []},
    "metrics": {"baseline": {"perplexity": 11.5, "cached": True}, "quantized": {"perplexity": 13.8},
                "delta": {"perplexity_increase_pct": 20.0}},
    "layers": LAYERS,
    "sizes": {"float32_parameter_bytes": 4000, "float16_parameter_bytes": 2000, "artifact_parameter_bytes": 1250,
              "compression_vs_float32": 3.2, "linear": {"layers": 3, "float16_bytes": 1600, "quantized_bytes": 400,
                                                        "ratio_to_float16": 0.25}},
    "timings": {"load_s": 1.5, "quantize_s": 2.25, "total_s": 10.0},
    "versions": {"python": "3.11"},
}


@pytest.fixture
def succeeded_job(submit, set_job, settings, tmp_path):
    """succeeded_job(report changes) -> (job id, artifact bytes): a job that succeeded with
    REPORT (updated by the changes) and its artifact in the store."""

    def make(body: dict | None = None, **changes) -> tuple[str, bytes]:
        job_id = submit(body).json()["id"]
        payload = os.urandom(50_000)
        name = f"{job_id}.tar"
        staged = tmp_path / name
        staged.write_bytes(payload)
        store_for(settings).put(name, staged)
        entry = {"format": "qforge", "folder": "artifact", "file": name, "sha256": hashlib.sha256(payload).hexdigest(),
                 "bytes": len(payload)}
        report = {**copy.deepcopy(REPORT), **changes, "artifacts": [entry]}
        set_job(job_id, status=JobStatus.SUCCEEDED, finished_at=utcnow(), report=report, artifact_path=name,
                artifact_sha256=entry["sha256"], artifact_bytes=entry["bytes"], progress_percent=100.0,
                progress_stage="export", progress_current=1, progress_total=1, progress_message="done")
        return job_id, payload

    return make


@dataclass
class Node:
    tag: str
    attrs: dict[str, str | None]
    children: list = field(default_factory=list)

    @property
    def raw(self) -> str:
        """The text as written (a textarea's value)."""
        return "".join(c if isinstance(c, str) else c.raw for c in self.children)

    @property
    def text(self) -> str:
        return " ".join("".join(c if isinstance(c, str) else f" {c.text} " for c in self.children).split())

    def walk(self):
        for child in self.children:
            if isinstance(child, Node):
                yield child
                yield from child.walk()

    def find_all(self, tag: str | None = None, **attrs: str) -> list[Node]:
        attrs = {k.rstrip("_").replace("_", "-"): v for k, v in attrs.items()}
        return [n for n in self.walk() if (tag is None or n.tag == tag) and all(n.attrs.get(k) == v for k, v in attrs.items())]

    def by_id(self, id_: str) -> Node:
        found = self.find_all(id=id_)
        assert len(found) == 1, f"{len(found)} elements with id {id_!r}"
        return found[0]


class _Reader(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs))
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        for index in range(len(self.stack) - 1, 0, -1):  # close up to the matching tag
            if self.stack[index].tag == tag:
                del self.stack[index:]
                return

    def handle_data(self, data):
        self.stack[-1].children.append(data)


def parse_html(text: str) -> Node:
    reader = _Reader()
    reader.feed(text)
    return reader.root


@pytest.fixture
def html():
    """html(text) -> the page as a tree of Nodes."""
    return parse_html


@pytest.fixture
def known_report() -> dict:
    return copy.deepcopy(REPORT)
