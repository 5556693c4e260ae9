"""Hostile uploads for POST /v1/models and /v1/datasets: path traversal, absolute paths,
links and devices in archives, too many members, bombs, bodies over the upload limit,
pickles whose payload would create a file, torch.save checkpoints, truncated safetensors,
GGUF files whose header lies, remote code. Each must be refused with the problem stated
here, leaving no row, no file under the data folder, no file anywhere it aimed, and no
marker file: a pickle payload in the corpus creates one if, and only if, it is unpickled.

Used by tests/app/test_hostile_uploads.py (TestClient) and bench/reliability.py (a live
service): both pass an httpx-compatible client that already sends an API key. Run it while
nothing else uploads: rows and folders are counted by their difference around each upload.

The corpus is built for the service's upload limit (QFORGE_MAX_UPLOAD_BYTES): some cases are
sized just over it. Contents are made when first sent, so listing the cases costs nothing.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import stat
import struct
import tarfile
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors.numpy import save as safetensors_save

from bench.model_builders import folder_files, gguf_bytes, gguf_string, tar_bytes, tiny_hf_folder, zip_bytes

if TYPE_CHECKING:
    import httpx

MODELS, DATASETS = "/v1/models", "/v1/datasets"
PROBLEM = "https://qforge.dev/problems/"
PROBLEM_MEDIA = "application/problem+json"
MB = 2**20
DEFAULT_MAX_UPLOAD_BYTES = 256 * MB  # the service's, QFORGE_MAX_UPLOAD_BYTES unset
# Stated here, not imported from app.archives: the corpus says what it expects of the service.
MAX_MEMBERS = 10_000
# Compresses about 1000:1, so the 100:1 ratio (plus 16 MiB of slack) stops it after about
# 22 MiB: the upload limit must be above that for the ratio, not the limit, to be what stops it.
BOMB = 64 * MB
MIN_LIMIT = 32 * MB


class Payload:
    """Unpickling this calls open(path, "w"): the file exists if and only if it was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@dataclass(frozen=True)
class HostileUpload:
    name: str  # what it is, unique in the corpus
    endpoint: str  # MODELS or DATASETS
    filename: str
    make: Callable[[], bytes] = field(repr=False, compare=False)  # the file part's content
    status: int
    slug: str  # the problem's type, after PROBLEM
    words: tuple[str, ...] = ()  # each in the problem's detail
    member: str | None = None  # the problem's `member`, where it names the archive member at fault
    marker: Path | None = None  # the file its pickle payload creates if it is ever unpickled
    # > 0: the file part is this many zero bytes, sent chunked with no Content-Length, so the
    # service meets the limit while reading; `make` is then not used.
    stream_bytes: int = 0
    data: dict[str, str] = field(default_factory=dict)  # text fields of the form

    @cached_property
    def content(self) -> bytes:
        return b"" if self.stream_bytes else self.make()

    @property
    def files(self) -> dict[str, tuple[str, bytes]]:
        return {"file": (self.filename, self.content)}

    @property
    def type(self) -> str:
        return PROBLEM + self.slug


# --- archive members no honest archiver writes -----------------------------------------------
def _tar_gz(members: list[tuple[str, bytes]], *special: tarfile.TarInfo) -> bytes:
    """Members in order, so that a name can come twice; `special` (links, devices, folders)
    first: a later member could otherwise write through a link."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info in special:
            tar.addfile(info)
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def _special(name: str, kind: bytes, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _zip_with_symlink(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        info = zipfile.ZipInfo("evil-link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
        for name, content in files.items():
            zf.writestr(name, content)
    return buffer.getvalue()


# --- size ----------------------------------------------------------------------------------------
class Filler(io.RawIOBase):
    """`size` bytes made a 64 KiB block at a time, never held whole: zeros, or blocks that each
    open with `noise` random bytes, so they compress about 64 KiB / noise to 1."""

    BLOCK = 64 * 1024

    def __init__(self, size: int, noise: int = 0) -> None:
        self.left, self.noise, self.rng, self.pending = size, noise, random.Random(0), b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if not self.pending and self.left:
            n = min(self.BLOCK, self.left)
            noise = min(self.noise, n)
            self.pending, self.left = self.rng.randbytes(noise) + bytes(n - noise), self.left - n
        n = min(len(buffer), len(self.pending))
        buffer[:n], self.pending = self.pending[:n], self.pending[n:]
        return n


def _filled(size: int, noise: int = 0) -> io.BufferedReader:
    return io.BufferedReader(Filler(size, noise), MB)  # full reads, as tarfile insists on


def _zip_bomb(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in files.items():
            zf.writestr(name, content)
        with zf.open("model-00002.safetensors", "w") as member, _filled(BOMB) as zeros:
            while chunk := zeros.read(MB):
                member.write(chunk)
    return buffer.getvalue()


def _tar_big(files: dict[str, bytes], name: str, size: int, noise: int = 0) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for member, content in files.items():
            info = tarfile.TarInfo(member)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        info = tarfile.TarInfo(name)
        info.size = size
        with _filled(size, noise) as source:
            tar.addfile(info, source)
    return buffer.getvalue()


def _npz_of_zeros(size: int) -> bytes:
    """An honest .npz (numpy.savez_compressed's layout) whose x unpacks to `size` bytes of zeros."""
    rows = size // 4
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (rows, 1)})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("x.npy", "w", force_zip64=True) as member, _filled(rows * 4) as zeros:
            member.write(header.getvalue())
            while chunk := zeros.read(MB):
                member.write(chunk)
    return buffer.getvalue()


# --- pickles -------------------------------------------------------------------------------------
def _torch_save(marker: Path) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2), "hook": Payload(marker)}, buffer)
    return buffer.getvalue()


def _npz_of_objects(marker: Path) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.array([Payload(marker)], dtype=object))
    return buffer.getvalue()


# --- GGUF whose header lies ----------------------------------------------------------------------
ARRAY_OF_2_60 = gguf_string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 0, 2**60)  # of strings
LYING_GGUF = {
    "tensor past the end": (dict(tensors=[("token_embd.weight", [8, 4], 0, 4096)]), "past the end"),
    "tensor larger than the file": (dict(tensors=[("token_embd.weight", [2**20, 2**20], 0, 0)]), "past the end"),
    "absurd tensor count": (dict(tensor_count=2**40), "tensors"),
    "tensor count beyond the entries": (dict(tensor_count=500), "tensor"),
    "array of 2^60 items": (dict(kv=[ARRAY_OF_2_60]), "1,152,921,504,606,846,976"),
    "absurd string": (dict(kv=[gguf_string("general.architecture") + struct.pack("<IQ", 8, 2**40)]),
                      "claims 1,099,511,627,776 bytes"),
    "string longer than the file": (dict(kv=[gguf_string("general.architecture") + struct.pack("<IQ", 8, MB)]),
                                    "past the end"),
    "overlapping tensors": (
        dict(tensors=[("a.weight", [8, 4], 0, 0), ("b.weight", [8, 4], 0, 64)], data=bytes(256)), "overlap"),
    "misaligned tensor": (dict(tensors=[("token_embd.weight", [8, 2], 0, 4)]), "misaligned"),
    "unknown tensor type": (dict(tensors=[("token_embd.weight", [8, 4], 999, 0)]), "type 999"),
    "too many dimensions": (dict(tensors=[("token_embd.weight", [1, 1, 1, 1, 32], 0, 0)]), "5 dimensions"),
    "no tensors": (dict(tensors=[]), "no tensors"),
    "no architecture": (dict(kv=[]), "general.architecture"),
}
UNKNOWN_ARCHITECTURE_KV = [gguf_string("general.architecture") + struct.pack("<I", 8) + gguf_string("evilnet"),
                           gguf_string("tokenizer.ggml.model") + struct.pack("<I", 8) + gguf_string("gpt2")]


# --- the corpus ----------------------------------------------------------------------------------
TRAVERSALS = ("../../../../evil.txt", "model/../../../../evil.txt", "a/../../evil.txt")
TAR_SPECIALS = {  # name: (member, words of the detail)
    "symlink to a file": (_special("tokenizer.json", tarfile.SYMTYPE, "/etc/passwd"), ("symlink", "/etc/passwd")),
    "symlink to a folder": (_special("evil-dir", tarfile.SYMTYPE, "../../../.."), ("symlink",)),
    "hardlink": (_special("vocab.txt", tarfile.LNKTYPE, "/etc/passwd"), ("hardlink",)),
    "character device": (_special("evil-device", tarfile.CHRTYPE), ("not a regular file",)),
    "fifo": (_special("evil-fifo", tarfile.FIFOTYPE), ("not a regular file",)),
}
PICKLE_NAMES_IN_ARCHIVE = ("pytorch_model.bin", "model.pt", "training_args.bin", "optimizer.pth", "weights.npy")


class _Materials:
    """What many cases share, made once and only when a case's content is first made."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @cached_property
    def hf(self) -> dict[str, bytes]:
        """The files of an honest HF folder: each case changes one thing in it."""
        return folder_files(tiny_hf_folder(self.folder / "tiny-llama"))

    def json_with(self, name: str, **changes) -> dict[str, bytes]:
        return self.hf | {name: json.dumps(json.loads(self.hf[name]) | changes).encode()}


def _pack(kind: str, files: dict[str, bytes]) -> bytes:
    return zip_bytes(files) if kind == "zip" else tar_bytes(files, mode="w:gz" if kind == "tar.gz" else "w")


def build_corpus(folder: Path, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> list[HostileUpload]:
    """The corpus, for a service whose upload limit is `max_upload_bytes`. `folder` receives
    the shared model folder and is where absolute members and pickle payloads aim."""
    if max_upload_bytes < MIN_LIMIT:
        raise ValueError(f"the bombs need an upload limit of at least {MIN_LIMIT:,} bytes to be stopped by their ratio")
    folder = folder.resolve()  # the absolute members aim into it
    m, limit, corpus = _Materials(folder), max_upload_bytes, []

    def add(name: str, endpoint: str, filename: str, make, status: int, slug: str, *words: str, **rest) -> None:
        corpus.append(HostileUpload(name, endpoint, filename, make, status, slug, words, **rest))

    def marker() -> Path:  # one per case, so that a payload that ran names its case
        return folder / f"pwned-{len(corpus)}"

    unsafe = (422, "unsafe-archive-member")
    # paths that leave the folder
    for kind in ("tar.gz", "zip"):
        for name in TRAVERSALS:
            add(f"{kind} member {name}", MODELS, f"model.{kind}", lambda k=kind, n=name: _pack(k, m.hf | {n: b"evil"}),
                *unsafe, name, "'..'", member=name)
    target = str(folder / "evil-absolute.txt")
    for kind in ("tar", "zip"):
        add(f"{kind} member with an absolute path", MODELS, f"model.{kind}",
            lambda k=kind: _pack(k, m.hf | {target: b"evil"}), *unsafe, target, "absolute path")
    add("zip member with backslashes", MODELS, "model.zip", lambda: zip_bytes(m.hf | {"..\\..\\evil.txt": b"evil"}),
        *unsafe, "backslash")
    # links, devices, names given twice, too many members
    for what, (info, words) in TAR_SPECIALS.items():
        add(f"tar.gz {what}", MODELS, "model.tar.gz",
            lambda i=info: _tar_gz([(k, v) for k, v in m.hf.items() if k != i.name], i), *unsafe, info.name, *words)
    add("zip symlink", MODELS, "model.zip", lambda: _zip_with_symlink(m.hf), *unsafe, "evil-link", "symlink")
    add("tar.gz member given twice", MODELS, "model.tar.gz",
        lambda: _tar_gz([*m.hf.items(), ("config.json", b'{"model_type": "llama", "auto_map": {}}')]),
        *unsafe, "config.json", "twice")
    # folders: the service makes each before it counts the next, and a folder costs it no fsync
    add("tar.gz of too many members", MODELS, "model.tar.gz",
        lambda: _tar_gz([], *(_special(f"d/{i:05}", tarfile.DIRTYPE) for i in range(MAX_MEMBERS + 1))),
        413, "archive-too-many-members", f"more than {MAX_MEMBERS:,}")
    add("zip of too many members", MODELS, "model.zip",
        lambda: zip_bytes({f"f/{i:05}.txt": b"" for i in range(MAX_MEMBERS + 1)}),
        413, "archive-too-many-members", f"more than {MAX_MEMBERS:,}")
    # size: bombs, content over the limit, bodies over the limit
    too_large = (413, "upload-too-large", f"{limit:,}")
    config = {"config.json": b'{"model_type": "llama"}'}
    add("zip bomb", MODELS, "model.zip", lambda: _zip_bomb(config), 413, "archive-bomb", "decompression bomb")
    add("tar.gz bomb", MODELS, "model.tar.gz", lambda: _tar_big(config, "model-00002.safetensors", BOMB),
        413, "archive-bomb", "decompression bomb")
    # about 30:1, far from a bomb: only the limit can stop it
    add("tar.gz whose content is over the limit", MODELS, "model.tar.gz",
        lambda: _tar_big(config, "big.txt", limit + MB, noise=2048), *too_large)
    add("model body over the limit", MODELS, "model.safetensors", lambda: bytes(limit + MB), *too_large)
    add("model body over the limit, streamed", MODELS, "model.tar", bytes, *too_large, stream_bytes=limit + MB)
    add("dataset body over the limit, streamed", DATASETS, "data.npz", bytes, *too_large, stream_bytes=limit + MB)
    add("npz unpacking to more than the limit", DATASETS, "data.npz", lambda: _npz_of_zeros(limit + MB),
        *too_large, "the .npz unpacked")
    # pickles: refused by what they are, whatever their name, and never unpickled
    pickled = (415, "unsafe-model-format")
    for filename in ("model.safetensors", "model.gguf", "model.tar.gz", "model.zip", "weights"):
        path = marker()
        add(f"pickle named {filename}", MODELS, filename, lambda p=path: pickle.dumps({"weight": Payload(p)}),
            *pickled, "pickle", marker=path)
    path = marker()
    add("pickle named payload.pkl", MODELS, "payload.pkl", lambda p=path: pickle.dumps({"weight": Payload(p)}),
        *pickled, "payload.pkl", marker=path)
    for name in PICKLE_NAMES_IN_ARCHIVE:
        path = marker()
        add(f"tar.gz holding a pickle named {name}", MODELS, "model.tar.gz",
            lambda n=name, p=path: tar_bytes(m.hf | {n: pickle.dumps(Payload(p))}), *pickled, name, marker=path)
    path = marker()
    add("zip holding a pickle named as safetensors", MODELS, "model.zip",
        lambda p=path: zip_bytes(m.hf | {"model-00002.safetensors": pickle.dumps(Payload(p))}),
        *pickled, "model-00002.safetensors", "pickle", marker=path)
    path = marker()
    add("torch.save checkpoint", MODELS, "model.pt", lambda p=path: _torch_save(p), *pickled, "model.pt", marker=path)
    path = marker()
    add("torch.save checkpoint named .zip", MODELS, "model.zip", lambda p=path: _torch_save(p),
        *pickled, "torch.save", marker=path)
    path = marker()
    add("tar.gz holding a torch.save named as safetensors", MODELS, "model.tar.gz",
        lambda p=path: tar_bytes(m.hf | {"extra.safetensors": _torch_save(p)}),
        *pickled, "extra.safetensors", "zip", marker=path)
    path = marker()
    add("pickle as a dataset", DATASETS, "data.npz", lambda p=path: pickle.dumps({"x": Payload(p)}),
        415, "unsupported-dataset-format", "pickle", marker=path)
    path = marker()
    add("npz of Python objects", DATASETS, "data.npz", lambda p=path: _npz_of_objects(p),
        422, "invalid-dataset", "dtype object", marker=path)
    # what the folder holds
    add("tar.gz with truncated safetensors", MODELS, "model.tar.gz",
        lambda: tar_bytes(m.hf | {"model.safetensors": m.hf["model.safetensors"][:-100]}),
        422, "invalid-model", "model.safetensors", "header")
    add("zip without safetensors weights", MODELS, "model.zip",
        lambda: zip_bytes({k: v for k, v in m.hf.items() if not k.endswith(".safetensors")}),
        422, "invalid-model", "no *.safetensors")
    add("tar.gz without config.json", MODELS, "model.tar.gz",
        lambda: tar_bytes({k: v for k, v in m.hf.items() if k != "config.json"}),
        415, "unsupported-model-format", "config.json")
    remote = (422, "remote-code-refused")
    add("config.json with auto_map", MODELS, "model.tar.gz",
        lambda: tar_bytes(m.json_with("config.json", auto_map={"AutoModelForCausalLM": "modeling_evil.Evil"})),
        *remote, "auto_map", "trust_remote_code")
    add("tokenizer_config.json with auto_map", MODELS, "model.zip",
        lambda: zip_bytes(m.json_with("tokenizer_config.json", auto_map={"AutoTokenizer": ["evil.Tok", None]})),
        *remote, "tokenizer_config.json")
    add("python code in the folder", MODELS, "model.tar.gz",
        lambda: tar_bytes(m.hf | {"modeling_evil.py": b"open('evil', 'w')"}), *remote, "modeling_evil.py")
    add("architecture transformers does not know", MODELS, "model.tar.gz",
        lambda: tar_bytes(m.json_with("config.json", model_type="evil-net", architectures=["EvilForCausalLM"])),
        422, "unsupported-architecture", "evil-net")
    # the worker builds a classic model from "module:Class" in a table; a config naming any other is refused
    add("safetensors whose config names an importable path", MODELS, "model.safetensors",
        lambda: safetensors_save({"w": np.zeros(2, np.float32)}), 422, "unknown-architecture", "os:system",
        data={"config": '{"architecture": "os:system"}'})
    add("truncated tar.gz", MODELS, "model.tar.gz", lambda: (t := tar_bytes(m.hf))[: len(t) // 2],
        422, "invalid-archive")
    # GGUF whose header lies
    for what, (fields, words) in LYING_GGUF.items():
        add(f"GGUF with {what}", MODELS, "model.gguf", lambda f=fields: gguf_bytes(**f),
            422, "invalid-model", "GGUF", words)
    add("GGUF of an architecture transformers cannot read", MODELS, "model.gguf",
        lambda: gguf_bytes(kv=UNKNOWN_ARCHITECTURE_KV), 422, "unsupported-architecture", "evilnet")
    return corpus


def case_names() -> list[str]:
    """The names of the cases, in order, without making any content (for test ids)."""
    return [upload.name for upload in build_corpus(Path("corpus"))]


# --- sending it ----------------------------------------------------------------------------------
def send(client, upload: HostileUpload):
    """POST one upload; the streamed ones as a chunked body the client never holds whole
    (a TestClient still does: it reads a body whole before the app sees it)."""
    if not upload.stream_bytes:
        return client.post(upload.endpoint, files=upload.files, data=upload.data)
    boundary = f"hostile-{uuid.uuid4().hex}"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{upload.filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()

    def body() -> Iterator[bytes]:
        yield head
        with _filled(upload.stream_bytes) as zeros:
            while chunk := zeros.read(MB):
                yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    media = f"multipart/form-data; boundary={boundary}"
    return client.post(upload.endpoint, content=body(), headers={"content-type": media})


def _entries(data_dir: Path) -> set[Path]:
    return {p for sub in ("models", "datasets") if (data_dir / sub).is_dir() for p in (data_dir / sub).iterdir()}


def _escapes(folder: Path, data_dir: Path) -> set[Path]:
    """Files named like the members that aim outside: anywhere under the corpus and data
    folders, and beside the data folder, where '../../../../evil.txt' from an upload's
    staging folder would land."""
    return {*folder.rglob("*evil*"), *data_dir.rglob("*evil*"), *data_dir.parent.glob("*evil*")}


def _total(client, endpoint: str) -> int:
    return client.get(endpoint, params={"limit": 1}).json()["total"]


@dataclass
class Outcome:
    upload: HostileUpload
    response: httpx.Response
    rows_added: int  # rows the upload's endpoint lists now that it did not before
    leftovers: list[Path]  # new entries under the data folder's models/ and datasets/
    escapes: list[Path]  # new files where an archive member aimed (see _escapes)

    @property
    def accepted(self) -> bool:
        return 200 <= self.response.status_code < 300

    @property
    def marker_appeared(self) -> bool:
        return self.upload.marker is not None and self.upload.marker.exists()

    def mismatch(self) -> str | None:
        """How the answer differs from the problem expected; None when it does not."""
        got, want = self.response, self.upload
        media = got.headers.get("content-type", "")
        problem = got.json() if media == PROBLEM_MEDIA else {}
        if (got.status_code, problem.get("type")) != (want.status, want.type):
            return f"{got.status_code} {problem.get('type') or media}, expected {want.status} {want.type}"
        missing = [w for w in want.words if w not in problem.get("detail", "")]
        if missing:
            return f"the detail lacks {missing}: {problem.get('detail')!r}"
        if want.member is not None and problem.get("member") != want.member:
            return f"member {problem.get('member')!r}, expected {want.member!r}"
        return None


def observe(client, upload: HostileUpload, folder: Path, data_dir: Path) -> Outcome:
    """Send one upload and look at what it left."""
    rows, entries, escapes = _total(client, upload.endpoint), _entries(data_dir), _escapes(folder, data_dir)
    response = send(client, upload)
    return Outcome(upload, response, _total(client, upload.endpoint) - rows, sorted(_entries(data_dir) - entries),
                   sorted(_escapes(folder, data_dir) - escapes))


@dataclass
class CorpusResult:
    sent: int = 0
    refused: int = 0  # with exactly the problem expected
    accepted: list[str] = field(default_factory=list)  # 2xx: the service took a hostile upload
    wrong: list[str] = field(default_factory=list)  # refused, but not with the problem expected
    markers: list[str] = field(default_factory=list)  # a pickle payload ran
    rows_left: list[str] = field(default_factory=list)  # a refused upload was recorded all the same
    leftovers: list[str] = field(default_factory=list)  # a refused upload left files under models/ or datasets/
    escapes: list[str] = field(default_factory=list)  # a member was written where it aimed

    def summary(self) -> str:
        return (f"hostile uploads {self.sent} / accepted {len(self.accepted)} / wrong problem {len(self.wrong)} / "
                f"payloads run {len(self.markers)} / rows left {len(self.rows_left)} / "
                f"leftovers {len(self.leftovers)} / escapes {len(self.escapes)}")


def run_corpus(client, folder: Path, data_dir: Path, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> CorpusResult:
    """Send the whole corpus (built in `folder`) to the service whose data folder is
    `data_dir`. An upload that is accepted is deleted again, after it is counted."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus, result = build_corpus(folder, max_upload_bytes), CorpusResult()
    for upload in corpus:  # a marker left by an earlier run in the same folder is not this run's
        if upload.marker is not None:
            upload.marker.unlink(missing_ok=True)
    for upload in corpus:
        outcome = observe(client, upload, folder, data_dir)
        result.sent += 1
        if outcome.accepted:
            result.accepted.append(upload.name)
            client.delete(f"{upload.endpoint}/{outcome.response.json()['id']}")
        elif (why := outcome.mismatch()) is not None:
            result.wrong.append(f"{upload.name}: {why}")
        else:
            result.refused += 1
        if outcome.marker_appeared:
            result.markers.append(f"{upload.name}: {upload.marker}")
        if not outcome.accepted:  # an accepted upload's row and folder are its own, and deleted
            if outcome.rows_added:
                result.rows_left.append(f"{upload.name}: {outcome.rows_added} row(s)")
            result.leftovers += [f"{upload.name}: {path.relative_to(data_dir)}" for path in outcome.leftovers]
        result.escapes += [f"{upload.name}: {path}" for path in outcome.escapes]
    return result
