"""POST /v1/models against a hostile-upload corpus built here: path traversal, absolute paths,
links and devices in archives, bombs, oversized bodies, pickles with a payload, truncated
safetensors, GGUF files whose header lies, remote code. Every one is refused with a problem
of a stable type, and leaves no row, no folder and no file anywhere outside the data folder."""

from __future__ import annotations

import asyncio
import io
import json
import os
import pickle
import stat
import struct
import tarfile
import zipfile

import pytest
import torch

from app.core.config import get_settings
from bench.model_builders import folder_files, tar_bytes, tiny_hf_folder, zip_bytes

PROBLEM = "https://qforge.dev/problems/"
MB = 2**20


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory) -> dict[str, bytes]:
    return folder_files(tiny_hf_folder(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture
def upload(client):
    def post(content: bytes, filename: str, **fields):
        return client.post("/v1/models", files={"file": (filename, content)}, data=fields)

    return post


@pytest.fixture
def refused(client, settings, tmp_path):
    """Assert the answer is the problem expected and that nothing of the upload is left."""

    def check(response, status: int, slug: str, *words: str) -> dict:
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["type"] == PROBLEM + slug, problem
        for word in words:
            assert word in problem["detail"], problem["detail"]
        assert client.get("/v1/models").json()["total"] == 0
        assert not settings.models_dir.exists() or list(settings.models_dir.iterdir()) == []
        assert [p for p in tmp_path.rglob("*evil*")] == []  # nothing written outside, wherever it aimed
        return problem

    return check


def with_member(files: dict[str, bytes], name: str, content: bytes = b"evil") -> dict[str, bytes]:
    return {**files, name: content}


# --- paths ------------------------------------------------------------------------------------
@pytest.mark.parametrize("pack", ["tar.gz", "zip"])
@pytest.mark.parametrize("name", ["../../../../evil.txt", "model/../../../../evil.txt", "a/../../evil.txt"])
def test_a_member_climbing_out_of_the_folder_is_refused(upload, refused, hf_files, pack, name):
    files = with_member(hf_files, name)
    content = tar_bytes(files) if pack == "tar.gz" else zip_bytes(files)
    problem = refused(upload(content, f"model.{pack}"), 422, "unsafe-archive-member", name, "'..'")
    assert problem["member"] == name


@pytest.mark.parametrize("pack", ["tar", "zip"])
def test_an_absolute_member_is_refused(upload, refused, hf_files, tmp_path, pack):
    target = str(tmp_path / "evil-absolute.txt")
    files = with_member(hf_files, target)
    content = tar_bytes(files, mode="w") if pack == "tar" else zip_bytes(files)
    refused(upload(content, f"model.{pack}"), 422, "unsafe-archive-member", target, "absolute path")


def test_a_backslash_path_is_refused(upload, refused, hf_files):
    files = with_member(hf_files, "..\\..\\evil.txt")
    refused(upload(zip_bytes(files), "model.zip"), 422, "unsafe-archive-member", "backslash")


# --- links and special files ------------------------------------------------------------------
def tar_with(files: dict[str, bytes], *special: tarfile.TarInfo) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info in special:  # first: a later member could otherwise write through a link
            tar.addfile(info)
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def link(name: str, kind: bytes, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize(
    "member, words",
    [
        (link("tokenizer.json", tarfile.SYMTYPE, "/etc/passwd"), ["symlink", "/etc/passwd"]),
        (link("evil-dir", tarfile.SYMTYPE, "../../../.."), ["symlink"]),
        (link("vocab.txt", tarfile.LNKTYPE, "/etc/passwd"), ["hardlink"]),
        (link("evil-device", tarfile.CHRTYPE, ""), ["not a regular file"]),
        (link("evil-fifo", tarfile.FIFOTYPE, ""), ["not a regular file"]),
    ],
    ids=["symlink to a file", "symlink to a folder", "hardlink", "character device", "fifo"],
)
def test_links_and_devices_in_a_tar_are_refused(upload, refused, hf_files, member, words):
    files = {k: v for k, v in hf_files.items() if k != member.name}
    refused(upload(tar_with(files, member), "model.tar.gz"), 422, "unsafe-archive-member", member.name, *words)


def test_a_symlink_in_a_zip_is_refused(upload, refused, hf_files):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        info = zipfile.ZipInfo("evil-link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
        for name, content in hf_files.items():
            zf.writestr(name, content)
    refused(upload(buffer.getvalue(), "model.zip"), 422, "unsafe-archive-member", "evil-link", "symlink")


def test_a_member_given_twice_is_refused(upload, refused, hf_files):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in [*hf_files.items(), ("config.json", b'{"model_type": "llama", "auto_map": {}}')]:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    refused(upload(buffer.getvalue(), "model.tar.gz"), 422, "unsafe-archive-member", "config.json", "twice")


@pytest.mark.parametrize("pack", ["tar.gz", "zip"])
def test_too_many_members_are_refused(upload, refused, hf_files, monkeypatch, pack):
    monkeypatch.setattr("app.archives.MAX_MEMBERS", 20)
    files = hf_files | {f"extra/{i}.txt": b"x" for i in range(20)}
    content = tar_bytes(files) if pack == "tar.gz" else zip_bytes(files)
    refused(upload(content, f"model.{pack}"), 413, "archive-too-many-members", "more than 20")


# --- size: over the limit, bombs ----------------------------------------------------------------
class Zeros(io.RawIOBase):
    """`size` zero bytes, read without ever holding them all."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


BOMB = 64 * MB  # compresses about 1000:1; refused after MAX_RATIO x its size + the slack


def zip_bomb(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in files.items():
            zf.writestr(name, content)
        with zf.open("model-00002.safetensors", "w") as member:
            zeros = Zeros(BOMB)
            while chunk := zeros.read(MB):
                member.write(chunk)
    return buffer.getvalue()


def tar_bomb(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        info = tarfile.TarInfo("model-00002.safetensors")
        info.size = BOMB
        tar.addfile(info, Zeros(BOMB))
    return buffer.getvalue()


@pytest.mark.parametrize("make, filename", [(zip_bomb, "model.zip"), (tar_bomb, "model.tar.gz")], ids=["zip", "tar.gz"])
def test_a_decompression_bomb_is_stopped(upload, refused, hf_files, make, filename):
    content = make({"config.json": hf_files["config.json"]})
    assert len(content) * 100 + 16 * MB < BOMB  # the ratio, not the upload limit, must be what stops it
    refused(upload(content, filename), 413, "archive-bomb", "decompression bomb")


def test_a_tar_gz_whose_content_is_over_the_limit_is_refused(upload, refused, hf_files, monkeypatch):
    """Not a bomb (it compresses about 2:1), just more than the limit once unpacked."""
    monkeypatch.setenv("QFORGE_MAX_UPLOAD_BYTES", str(2 * MB))
    get_settings.cache_clear()
    content = tar_bytes({"config.json": hf_files["config.json"], "big.txt": os.urandom(MB + MB // 2).hex().encode()})
    assert len(content) < 2 * MB
    refused(upload(content, "model.tar.gz"), 413, "upload-too-large", "2,097,152")


def test_an_oversized_body_is_refused_while_it_streams(tmp_path):
    """No Content-Length: the limit holds on the bytes read, and reading stops there. (Driven
    below the TestClient, which reads a request body whole before the app sees it.)"""
    from starlette.requests import Request

    from app import upload_stream
    from app.errors import Problem

    boundary = "hostile-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"model.tar\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    chunks = [head, *(bytes(MB) for _ in range(100)), f"\r\n--{boundary}--\r\n".encode()]  # 100 MiB in all
    pulled = []

    async def receive():
        pulled.append(1)
        return {"type": "http.request", "body": chunks[len(pulled) - 1], "more_body": len(pulled) < len(chunks)}

    scope = {"type": "http", "method": "POST", "path": "/v1/models", "query_string": b"",
             "headers": [(b"content-type", f"multipart/form-data; boundary={boundary}".encode())]}
    dest = tmp_path / "staging" / "upload"
    with pytest.raises(Problem) as refusal:
        asyncio.run(upload_stream.receive(Request(scope, receive), dest, MB, frozenset()))
    assert (refusal.value.status, refusal.value.slug) == (413, "upload-too-large")
    assert len(pulled) <= 3  # the head and one MiB, perhaps the next: not the 100 MiB sent
    assert dest.stat().st_size <= MB


# --- pickles -----------------------------------------------------------------------------------
class Payload:
    """Unpickling this calls open(path, "w"): the file exists if and only if it was unpickled."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_with_a_payload_is_refused_without_running_it(upload, refused, tmp_path):
    marker = tmp_path / "pwned"
    content = pickle.dumps({"weight": Payload(marker)})
    for filename in ("model.safetensors", "model.gguf", "model.tar.gz", "model.zip", "weights"):
        refused(upload(content, filename), 415, "unsafe-model-format", "pickle")
    refused(upload(content, "payload.pkl"), 415, "unsafe-model-format", "payload.pkl")
    assert not marker.exists()
    pickle.loads(content)["weight"].close()  # the corpus is real: unpickling it does create the file
    assert marker.exists()


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "training_args.bin", "optimizer.pth", "weights.npy"])
def test_a_pickle_inside_an_archive_is_refused_by_its_name(upload, refused, hf_files, tmp_path, name):
    marker = tmp_path / "pwned"
    files = with_member(hf_files, name, pickle.dumps(Payload(marker)))
    refused(upload(tar_bytes(files), "model.tar.gz"), 415, "unsafe-model-format", name)
    assert not marker.exists()


def test_a_pickle_inside_an_archive_is_refused_by_its_content(upload, refused, hf_files, tmp_path):
    marker = tmp_path / "pwned"
    files = with_member(hf_files, "model-00002.safetensors", pickle.dumps(Payload(marker)))
    refused(upload(zip_bytes(files), "model.zip"), 415, "unsafe-model-format", "model-00002.safetensors", "pickle")
    assert not marker.exists()


def test_a_torch_save_checkpoint_is_refused(upload, refused, hf_files):
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buffer)
    refused(upload(buffer.getvalue(), "model.pt"), 415, "unsafe-model-format", "model.pt")
    refused(upload(buffer.getvalue(), "model.zip"), 415, "unsafe-model-format", "torch.save")
    files = with_member(hf_files, "extra.safetensors", buffer.getvalue())  # a zip under a harmless name
    refused(upload(tar_bytes(files), "model.tar.gz"), 415, "unsafe-model-format", "extra.safetensors", "zip")


# --- the folder's content ----------------------------------------------------------------------
def test_a_truncated_safetensors_in_an_archive_is_422(upload, refused, hf_files):
    files = hf_files | {"model.safetensors": hf_files["model.safetensors"][:-100]}
    refused(upload(tar_bytes(files), "model.tar.gz"), 422, "invalid-model", "model.safetensors", "header")


def test_a_folder_without_safetensors_weights_is_422(upload, refused, hf_files):
    files = {k: v for k, v in hf_files.items() if not k.endswith(".safetensors")}
    refused(upload(zip_bytes(files), "model.zip"), 422, "invalid-model", "no *.safetensors")


def test_an_archive_without_config_json_is_refused(upload, refused, hf_files):
    files = {k: v for k, v in hf_files.items() if k != "config.json"}
    refused(upload(tar_bytes(files), "model.tar.gz"), 415, "unsupported-model-format", "config.json")


def test_a_config_asking_for_remote_code_is_refused(upload, refused, hf_files):
    config = json.loads(hf_files["config.json"]) | {"auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}
    files = hf_files | {"config.json": json.dumps(config).encode()}
    refused(upload(tar_bytes(files), "model.tar.gz"), 422, "remote-code-refused", "auto_map", "trust_remote_code")
    tokenizer = json.loads(hf_files["tokenizer_config.json"]) | {"auto_map": {"AutoTokenizer": ["evil.Tok", None]}}
    files = hf_files | {"tokenizer_config.json": json.dumps(tokenizer).encode()}
    refused(upload(zip_bytes(files), "model.zip"), 422, "remote-code-refused", "tokenizer_config.json")


def test_python_code_in_an_archive_is_refused(upload, refused, hf_files):
    files = with_member(hf_files, "modeling_evil.py", b"open('evil', 'w')")
    refused(upload(tar_bytes(files), "model.tar.gz"), 422, "remote-code-refused", "modeling_evil.py")


def test_an_architecture_transformers_does_not_know_is_refused(upload, refused, hf_files):
    config = json.loads(hf_files["config.json"]) | {"model_type": "evil-net", "architectures": ["EvilForCausalLM"]}
    files = hf_files | {"config.json": json.dumps(config).encode()}
    refused(upload(tar_bytes(files), "model.tar.gz"), 422, "unsupported-architecture", "evil-net")


def test_a_corrupt_archive_is_refused(upload, refused, hf_files):
    content = tar_bytes(hf_files)
    refused(upload(content[: len(content) // 2], "model.tar.gz"), 422, "invalid-archive")


# --- GGUF whose header lies ---------------------------------------------------------------------
def gguf_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def gguf_bytes(tensors=None, kv=None, tensor_count=None, data: bytes | None = None) -> bytes:
    """A GGUF v3 file written field by field, so any field can lie. Honest by default: llama
    metadata, a tokenizer name and one 4x8 f32 tensor."""
    kv = kv if kv is not None else [
        gguf_string("general.architecture") + struct.pack("<I", 8) + gguf_string("llama"),
        gguf_string("tokenizer.ggml.model") + struct.pack("<I", 8) + gguf_string("gpt2"),
    ]
    tensors = tensors if tensors is not None else [("token_embd.weight", [8, 4], 0, 0)]
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if tensor_count is None else tensor_count, len(kv))
    body = b"".join(kv)
    for name, dims, ggml_type, offset in tensors:
        body += gguf_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        body += struct.pack("<IQ", ggml_type, offset)
    header = head + body
    header += bytes(-len(header) % 32)
    return header + (data if data is not None else bytes(4 * 8 * 4))


def test_the_honest_gguf_of_the_corpus_is_accepted(upload):
    """The control: each lie below is what gets the file refused, not the way it is written."""
    response = upload(gguf_bytes(), "tiny.gguf")
    assert response.status_code == 201, response.text
    assert (response.json()["format"], response.json()["tensors"], response.json()["parameters"]) == ("gguf", 1, 32)


ARRAY_OF_2_60 = gguf_string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 0, 2**60)
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


@pytest.mark.timeout(60)  # the gguf package's own reader loops forever on the 2^60 array
@pytest.mark.parametrize("fields, words", LYING_GGUF.values(), ids=LYING_GGUF.keys())
def test_a_gguf_whose_header_lies_is_422_before_it_is_stored(upload, refused, fields, words):
    refused(upload(gguf_bytes(**fields), "model.gguf"), 422, "invalid-model", "GGUF", words)


def test_a_gguf_of_an_architecture_transformers_cannot_read_is_refused(upload, refused):
    kv = [gguf_string("general.architecture") + struct.pack("<I", 8) + gguf_string("evilnet"),
          gguf_string("tokenizer.ggml.model") + struct.pack("<I", 8) + gguf_string("gpt2")]
    refused(upload(gguf_bytes(kv=kv), "model.gguf"), 422, "unsupported-architecture", "evilnet")
