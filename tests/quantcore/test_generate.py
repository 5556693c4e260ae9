"""Generation from an artifact, as `qforge generate` runs it: our greedy loop against
transformers' own `generate`, and the fast CPU paths against the dequantize reference,
token for token on real SmolLM2 (the kernel issue's correctness criterion: 32 tokens)."""

import json
import tarfile

import pytest
import torch

from quantcore import quantize
from quantcore.export import archive_artifact, load_quantized, save_artifact, write_manifest
from quantcore.generate import generate, open_artifact
from quantcore.models import load_model

pytestmark = pytest.mark.slow

PROMPT = "The Python language reference says that"


@pytest.fixture(scope="module")
def w4_artifact(tmp_path_factory):
    loaded = load_model("bundled:smollm2-135m")
    quantize(loaded.model, "w4a16-rtn-g64")
    folder = tmp_path_factory.mktemp("artifact") / "artifact"
    report = {"model": {"ref": "bundled:smollm2-135m"}}
    save_artifact(loaded.model, loaded.tokenizer, folder, "causal_lm", {"report.json": report})
    write_manifest(folder)
    archive_artifact(folder, folder.parent / "job.tar")
    return folder


def test_the_greedy_loop_matches_transformers_generate(w4_artifact):
    loaded = load_quantized(w4_artifact, fast_path=False)
    ours = generate(loaded.model, loaded.tokenizer, PROMPT, max_new_tokens=12, stop_at_eos=False)
    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        theirs = loaded.model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    assert ours.token_ids == theirs[0, ids.shape[1]:].tolist()
    assert ours.prompt_tokens == ids.shape[1] and ours.new_tokens == 12


def test_fast_paths_generate_the_reference_tokens_for_32_tokens(w4_artifact):
    reference = load_quantized(w4_artifact, fast_path=False)
    fast = load_quantized(w4_artifact)
    layers = [m for m in fast.model.modules() if getattr(m, "fast_path", "off") != "off" and m.has_fast_path]
    assert layers, "no layer of the W4 artifact took the int4 kernel"
    expect = generate(reference.model, reference.tokenizer, PROMPT, 32, stop_at_eos=False)
    got = generate(fast.model, fast.tokenizer, PROMPT, 32, stop_at_eos=False)
    assert got.token_ids == expect.token_ids
    assert got.decode_tokens_per_s > 0


def test_qforge_generate_reads_the_downloaded_tar(w4_artifact, tmp_path, capsys):
    from qforge.cli import main

    folder = open_artifact(w4_artifact.parent / "job.tar", tmp_path / "unpacked")
    assert (folder / "quantization.json").is_file()
    assert main(["generate", str(w4_artifact.parent / "job.tar"), "--max-new-tokens", "4", "--compare", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["quantized"]["new_tokens"] >= 1 and result["float"]["model"] == "bundled:smollm2-135m"
    assert result["speedup"] > 0


def test_a_tar_with_an_escaping_member_is_refused(tmp_path):
    bad = tmp_path / "bad.tar"
    payload = tmp_path / "x"
    payload.write_text("x")
    with tarfile.open(bad, "w") as tar:
        tar.add(payload, arcname="../outside")
    with pytest.raises(tarfile.OutsideDestinationError):
        open_artifact(bad, tmp_path / "unpacked")
