"""Greedy text generation with timings: what `qforge generate` and the API's try endpoint
report. Greedy decoding, so the tokens are reproducible and two paths (a quantized model's
fast path, its reference path, the float model) can be compared token for token.

The loop is written out (prefill, then one token at a time on the KV cache) rather than
calling `model.generate`, so prefill and decode are timed apart: decode tokens/s is the
figure a weight-only quantized model is meant to improve.
"""

from __future__ import annotations

import inspect
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class Generation:
    text: str  # the new tokens, decoded
    token_ids: list[int]
    prompt_tokens: int
    prefill_s: float
    decode_s: float  # the tokens after the first

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def decode_tokens_per_s(self) -> float:
        decoded = self.new_tokens - 1
        return decoded / self.decode_s if decoded > 0 and self.decode_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "new_tokens": self.new_tokens, "decode_tokens_per_s": round(self.decode_tokens_per_s, 2)}


@torch.inference_mode()
def generate(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 32, stop_at_eos: bool = True) -> Generation:
    """Greedy: the prompt's forward (prefill) gives the first token, each next token one
    forward on the cache."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.numel() == 0:
        ids = torch.tensor([[tokenizer.bos_token_id or 0]])
    eos = tokenizer.eos_token_id if stop_at_eos else None
    # transformers 5 names the KV cache `cache` (argument and output), 4.x `past_key_values`
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
    prefill_s = time.perf_counter() - start
    tokens = [int(token)]
    start = time.perf_counter()
    while len(tokens) < max_new_tokens and tokens[-1] != eos:
        out = model(input_ids=token, use_cache=True, **{cache_name: getattr(out, cache_name)})
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        tokens.append(int(token))
    decode_s = time.perf_counter() - start
    return Generation(tokenizer.decode(tokens, skip_special_tokens=True), tokens, ids.shape[1], prefill_s, decode_s)


def open_artifact(path: str | Path, workdir: Path | None = None) -> Path:
    """An artifact folder as given, or a downloaded `.tar` unpacked (data members only) into
    `workdir` (a new temporary folder when None)."""
    path = Path(path)
    if path.is_dir():
        return path
    if not tarfile.is_tarfile(path):
        raise ValueError(f"{path}: neither an artifact folder nor a .tar of one")
    target = workdir or Path(tempfile.mkdtemp(prefix="qforge-artifact-"))
    with tarfile.open(path) as tar:
        tar.extractall(target, filter="data")  # no absolute paths, links out, devices
    inner = [p for p in target.iterdir() if p.is_dir()]
    return inner[0] if len(inner) == 1 else target


def try_artifact(path: str | Path, prompt: str, max_new_tokens: int = 32, compare_float: bool = False) -> dict[str, Any]:
    """Load an LLM artifact with its fast CPU paths and generate; with `compare_float`, also
    the source model in float (from the artifact's report) on the same prompt."""
    from quantcore.export import load_quantized

    loaded = load_quantized(open_artifact(path))
    float_model = load_float_source(loaded) if compare_float else None
    return try_loaded(loaded, prompt, max_new_tokens, float_model)


def load_float_source(loaded: Any) -> tuple[str, nn.Module]:
    """The float model an artifact was quantized from (its report names it)."""
    from quantcore.models import load_model

    source = ((loaded.report or {}).get("model") or {}).get("ref")
    if not source:
        raise ValueError("the artifact's report does not name its source model")
    return source, load_model(source).model.eval()


def try_loaded(loaded: Any, prompt: str, max_new_tokens: int = 32, float_model: tuple[str, nn.Module] | None = None) -> dict[str, Any]:
    """Generate with a loaded artifact (`quantcore.export.load_quantized`) and, when given,
    with its float source model on the same prompt."""
    if loaded.kind != "causal_lm" or loaded.tokenizer is None:
        raise ValueError(f"generation needs a causal language model artifact with a tokenizer; this one is '{loaded.kind}'")
    quantized = generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens)
    result: dict[str, Any] = {"quantized": quantized.as_dict(), "float": None}
    if float_model is not None:
        source, model = float_model
        result["float"] = {**generate(model, loaded.tokenizer, prompt, max_new_tokens).as_dict(), "model": source}
        if result["float"]["decode_tokens_per_s"]:
            result["speedup"] = round(quantized.decode_tokens_per_s / result["float"]["decode_tokens_per_s"], 3)
    return result
