"""Resolving model references: bundled names, hub ids (local cache only), paths, refusals."""

import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from quantcore.models import (
    ModelNotFoundError,
    UnsafeModelError,
    bundled_models,
    is_hub_id,
    load_model,
    resolve_model_ref,
)


def test_bundled_refs_resolve_to_package_files():
    assert set(bundled_models()) == {"smollm2-135m", "minilm-l6"}
    smol = resolve_model_ref("bundled:smollm2-135m")
    assert smol.source == "bundled" and (smol.path / smol.gguf_file).is_file()
    minilm = resolve_model_ref("bundled:minilm-l6")
    assert minilm.gguf_file is None and (minilm.path / "model.safetensors").is_file()


@pytest.mark.parametrize("ref", ["bundled:nope", "not a ref", ""])
def test_unknown_refs_list_the_bundled_models(ref):
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model_ref(ref)
    assert "bundled:smollm2-135m" in str(err.value) and "bundled:minilm-l6" in str(err.value)


@pytest.mark.parametrize("ref", ["HuggingFaceTB/SmolLM2-135M", "a/b", "org_1/name.v2-x", "o/" + "n" * 96])
def test_valid_hub_ids(ref):
    assert is_hub_id(ref)


@pytest.mark.parametrize(
    "ref", ["org/bad--name", "org/bad..name", "-org/name", "org/name-", "org/.name", "org/name.", "org/" + "n" * 97,
            "org/na me", "org/na$me", "org/", "/name", "a/b/c", "name"],
)
def test_invalid_hub_ids(ref):
    assert not is_hub_id(ref)
    with pytest.raises(ModelNotFoundError):
        resolve_model_ref(ref, allow_local_paths=False)


def test_invalid_hub_id_message_gives_the_rules():
    with pytest.raises(ModelNotFoundError, match="not a valid hub id.*'--'"):
        resolve_model_ref("org/bad--name")


def test_uncached_hub_id_fails_fast_without_network(tmp_path):
    """In a fresh process with HF_HUB_OFFLINE unset, where a network lookup would hang or fail slowly."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hub"))
    code = textwrap.dedent("""
        import time
        from quantcore.models import ModelNotFoundError, load_model
        start = time.monotonic()
        try:
            load_model("HuggingFaceTB/SmolLM2-360M", allow_local_paths=False)
        except ModelNotFoundError as exc:
            print(f"{time.monotonic() - start:.3f}")
            print(exc)
    """)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    seconds, message = run.stdout.split("\n", 1)
    assert float(seconds) < 10
    assert "HuggingFaceTB/SmolLM2-360M" in message and "cache" in message and "offline" in message


def _fake_hub_cache(root, repo_id, files_from):
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(files_from, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_cached_hub_id_loads_from_the_cache(tiny_llama, tiny_folder, tmp_path, monkeypatch):
    _fake_hub_cache(tmp_path, "qforge-test/tiny-llama", tiny_folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    loaded = load_model("qforge-test/tiny-llama", allow_local_paths=False)  # hub ids stay allowed
    assert loaded.ref.source == "hub" and loaded.ref.name == "qforge-test/tiny-llama"
    ids = torch.randint(0, tiny_llama.config.vocab_size, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, tiny_llama(ids).logits, rtol=0, atol=0)


def test_local_paths_can_be_refused(tiny_folder, tiny_gguf):
    for ref in (str(tiny_folder), str(tiny_folder / "model.safetensors"), str(tiny_gguf), "./missing.gguf"):
        with pytest.raises(ModelNotFoundError, match="local paths are not accepted"):
            resolve_model_ref(ref, allow_local_paths=False)


def test_path_refs_resolve(tiny_folder, tiny_gguf):
    folder = resolve_model_ref(str(tiny_folder))
    assert (folder.source, folder.path, folder.gguf_file) == ("path", tiny_folder, None)
    gguf_file = resolve_model_ref(str(tiny_gguf))
    assert (gguf_file.path, gguf_file.gguf_file) == (tiny_gguf.parent, tiny_gguf.name)
    assert resolve_model_ref(str(tiny_gguf.parent)).gguf_file == tiny_gguf.name  # a folder holding one GGUF
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model_ref(str(tiny_folder / "nope"))


def test_pickles_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    for ref in (tmp_path, tmp_path / "pytorch_model.bin"):
        with pytest.raises(UnsafeModelError, match="pickled checkpoints can execute code.*convert to safetensors"):
            resolve_model_ref(str(ref))
    for suffix in (".pt", ".pth", ".ckpt"):
        (tmp_path / f"model{suffix}").write_bytes(b"")
        with pytest.raises(UnsafeModelError):
            resolve_model_ref(str(tmp_path / f"model{suffix}"))


class _Tripwire:
    """Unpickling this creates a file: proof that something unpickled it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickle_beside_safetensors_is_never_read(tiny_llama, tiny_folder, tmp_path):
    folder = tmp_path / "both"
    shutil.copytree(tiny_folder, folder)
    tripwire = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Tripwire(tripwire)))
    loaded = load_model(str(folder))
    assert loaded.kind == "causal_lm" and not tripwire.exists()


def test_single_safetensors_needs_its_config(tiny_folder, tmp_path):
    shutil.copy(tiny_folder / "model.safetensors", tmp_path / "weights.safetensors")
    with pytest.raises(ModelNotFoundError, match="config.json beside it"):
        resolve_model_ref(str(tmp_path / "weights.safetensors"))


def test_folders_that_are_not_models(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a model folder"):
        resolve_model_ref(str(tmp_path))
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="several GGUF files.*a.gguf, b.gguf"):
        resolve_model_ref(str(tmp_path))
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(ModelNotFoundError, match="unsupported file type"):
        resolve_model_ref(str(tmp_path / "notes.txt"))
