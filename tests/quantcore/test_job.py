"""run_job end to end on small real inputs: progress, report, artifact, reload, cancellation."""

import math

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from quantcore.eval import evaluate_perplexity
from quantcore.export import load_quantized
from quantcore.job import EvaluationSpec, JobCancelled, JobRequest, run_job
from quantcore.models import resolve_model_ref


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """A small random llama with a real tokenizer, saved as a local HF folder."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_ref("bundled:minilm-l6").path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    folder = tmp_path_factory.mktemp("tiny-llm")
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def test_job_writes_report_and_reloadable_artifact(tiny_llm, tmp_path):
    events = []
    request = JobRequest(model=str(tiny_llm), recipe="w4a16-rtn-g64", evaluation={"perplexity_tokens": 1024})
    report = run_job(request, tmp_path, lambda stage, current, total, message="": events.append((stage, current, total)))

    stages = [e[0] for e in events]
    assert stages.index("load") < stages.index("baseline") < stages.index("quantize") < stages.index("evaluate") < stages.index("export")
    quantize_events = [e for e in events if e[0] == "quantize"]
    assert quantize_events[-1][1:] == (14, 14)  # 2 blocks x 7 linears, lm_head ignored

    metrics = report["metrics"]
    assert metrics["baseline"]["perplexity"] > 1 and metrics["quantized"]["perplexity"] > 1
    assert len(report["layers"]) == 14 and all(math.isfinite(layer["sqnr_db"]) for layer in report["layers"])
    assert report["recipe"]["name"] == "w4a16-rtn-g64" and report["versions"]["torch"].startswith("2.13")
    assert report["sizes"]["linear"]["ratio_to_float16"] <= 0.30

    reloaded = load_quantized(tmp_path / "artifact")
    assert reloaded.report["metrics"] == metrics
    ppl = evaluate_perplexity(reloaded.model, reloaded.tokenizer, EvaluationSpec(perplexity_tokens=1024))
    assert ppl == pytest.approx(metrics["quantized"]["perplexity"], rel=1e-6)


def test_job_exports_compressed_tensors_that_transformers_reloads(tiny_llm, tmp_path):
    from transformers import AutoModelForCausalLM

    pytest.importorskip("compressed_tensors")
    request = JobRequest(model=str(tiny_llm), recipe="w4a16-gptq-g64", export=["compressed-tensors", "qforge"],
                         evaluation={"perplexity_tokens": 1024}, calibration={"num_samples": 4, "seq_len": 64})
    report = run_job(request, tmp_path)

    assert [(a["format"], a["folder"]) for a in report["artifacts"]] == [
        ("compressed-tensors", "artifact-compressed-tensors"), ("qforge", "artifact")]
    folder = tmp_path / "artifact-compressed-tensors"
    assert (folder / "manifest.json").is_file() and (folder / "report.json").is_file()
    # the main artifact's sizes: int4 codes packed in int32 plus one fp32 scale per 64 weights
    assert 0.25 < report["sizes"]["linear"]["ratio_to_float16"] <= 0.30
    reloaded = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ppl = evaluate_perplexity(reloaded, tokenizer, EvaluationSpec(perplexity_tokens=1024))
    assert ppl == pytest.approx(report["metrics"]["quantized"]["perplexity"], rel=1e-5)


def test_job_exports_gguf_with_a_model_card_in_every_artifact(tmp_path):
    """A job asking for GGUF Q8_0 with a recipe on Q8_0's own grid (symmetric int8, groups
    of 32): the file holds the codes as they are; every artifact explains itself."""
    from gguf import GGUFReader
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = [chr(c) for c in range(33, 126)] + ["Ġ", "<|endoftext|>"]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    source = tmp_path / "source"
    LlamaForCausalLM(config).save_pretrained(source, safe_serialization=True)
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=tokens[-1]).save_pretrained(source)
    weights = {"bits": 8, "symmetric": True, "granularity": "group", "group_size": 32}
    recipe = {"name": "w8-g32", "stages": [{"algorithm": "rtn", "weights": weights}]}
    request = JobRequest(model=str(source), recipe=recipe, export=["gguf-q8_0", "qforge", "gptq"], evaluation={"enabled": False})

    report = run_job(request, tmp_path / "job")

    gguf_entry = report["artifacts"][0]
    assert gguf_entry["format"] == "gguf-q8_0" and gguf_entry["folder"] == "artifact-gguf"
    assert gguf_entry["gguf"]["exact_layers"] == 14 and gguf_entry["gguf"]["requantized_layers"] == []
    path = tmp_path / "job" / "artifact-gguf" / gguf_entry["gguf"]["file"]
    assert {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}["blk.1.ffn_up.weight"] == "Q8_0"
    assert report["artifacts"][2]["sizes"]["linear"]["layers"] == 14  # the GPTQ layout's qweight/scales/...
    assert "gptqmodel" in (tmp_path / "job" / "artifact-gptq" / "README.md").read_text()
    for folder in ("artifact-gguf", "artifact", "artifact-gptq"):
        card = (tmp_path / "job" / folder / "README.md").read_text()
        assert "w8-g32" in card and '"group_size": 32' in card and str(source) in card
    assert "llama-cli -m artifact-gguf/" in (tmp_path / "job" / "artifact-gguf" / "README.md").read_text()
    assert load_quantized(tmp_path / "job" / "artifact").report["artifacts"][0]["format"] == "gguf-q8_0"


def test_export_formats_are_checked_at_submission():
    with pytest.raises(ValueError, match="low-rank"):
        JobRequest(model="bundled:smollm2-135m", recipe="w4a4-svdquant-r32", export=["compressed-tensors"])
    with pytest.raises(ValueError, match="once"):
        JobRequest(model="bundled:smollm2-135m", recipe="w8a16-rtn", export=["qforge", "qforge"])
    with pytest.raises(ValueError):
        JobRequest(model="bundled:smollm2-135m", recipe="w8a16-rtn", export=["onnx"])
    with pytest.raises(ValueError, match="weight-only"):
        JobRequest(model="bundled:smollm2-135m", recipe="w8a8-rtn", export=["gptq"])
    with pytest.raises(ValueError, match="not 3-bit"):
        JobRequest(model="bundled:smollm2-135m", recipe="w3a16-gptq-g64", export=["awq"])
    with pytest.raises(ValueError, match="one GGUF type"):
        JobRequest(model="bundled:smollm2-135m", recipe="w8a16-rtn", export=["gguf-q8_0", "gguf-q4_0"])
    assert JobRequest(model="bundled:smollm2-135m", recipe="w4a16-gptq-g64", export=["gguf"]).gguf_type() == "Q4_0"
    assert JobRequest(model="bundled:smollm2-135m", recipe="w8a8-smoothquant", export=["gguf"]).gguf_type() == "Q8_0"


def test_cancellation_stops_between_layers(tiny_llm, tmp_path):
    def progress(stage, current, total, message=""):
        if stage == "quantize" and current == 3:
            raise JobCancelled()

    request = JobRequest(model=str(tiny_llm), recipe="w8a16-rtn", evaluation={"enabled": False})
    with pytest.raises(JobCancelled):
        run_job(request, tmp_path, progress)
    assert not (tmp_path / "artifact").exists()


def test_group_size_that_does_not_divide_fails_with_reason(tiny_llm, tmp_path):
    recipe = {"stages": [{"algorithm": "rtn", "weights": {"bits": 4, "granularity": "group", "group_size": 48}}]}
    request = JobRequest(model=str(tiny_llm), recipe=recipe, evaluation={"enabled": False})
    with pytest.raises(ValueError, match="group_size 48 does not divide the input dimension 64"):
        run_job(request, tmp_path)


def test_request_validation():
    with pytest.raises(ValueError, match="unknown preset"):
        JobRequest(model="bundled:smollm2-135m", recipe="w5-magic")
    with pytest.raises(ValueError, match="perplexity_tokens"):
        JobRequest(model="bundled:smollm2-135m", recipe="w8a16-rtn", evaluation={"perplexity_tokens": 10})


@pytest.mark.slow
def test_encoder_job_reports_embedding_cosine(tmp_path):
    request = JobRequest(model="bundled:minilm-l6", recipe="w8a16-rtn", evaluation={"embedding_paragraphs": 32})
    report = run_job(request, tmp_path)
    cosine = report["metrics"]["quantized"]["embedding_cosine"]
    assert 0.99 < cosine < 1.0  # int8 per-channel weights barely move a sentence embedding
    assert report["model"]["kind"] == "encoder" and len(report["layers"]) == 37  # 6 layers x 6 linears + pooler
    loaded = load_quantized(tmp_path / "artifact")
    assert loaded.kind == "encoder"


@pytest.mark.slow
def test_encoder_gptq_job_calibrates_on_paragraphs_and_beats_round_to_nearest(tmp_path):
    """A calibrated encoder job end to end: GPTQ's Hessians come from whole calibration
    paragraphs (as many tokens as 32 windows of 64), and its W4 embeddings are closer to the
    float ones than round-to-nearest's on the same evaluation paragraphs."""
    weights = {"bits": 4, "granularity": "group", "group_size": 64}
    cosines = {}
    for algorithm in ("rtn", "gptq"):
        request = JobRequest(
            model="bundled:minilm-l6",
            recipe={"name": algorithm, "stages": [{"algorithm": algorithm, "weights": weights, "ignore": ["pooler.dense"]}]},
            calibration={"num_samples": 32, "seq_len": 64},
            evaluation={"embedding_paragraphs": 64},
        )
        report = run_job(request, tmp_path / algorithm)
        cosines[algorithm] = report["metrics"]["quantized"]["embedding_cosine"]
    assert cosines["rtn"] < cosines["gptq"] < 1.0, cosines
