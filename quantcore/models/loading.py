"""Loading a resolved model reference into a float model on CPU.

Only formats that cannot execute code are read: safetensors (`use_safetensors=True`) and
GGUF. `trust_remote_code` is never set, so only architectures that transformers itself
implements load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from quantcore.models.refs import ModelNotFoundError, ModelRef, resolve_model_ref

ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "deberta", "deberta-v2", "camembert"}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    kind: Literal["causal_lm", "encoder"]
    ref: ModelRef
    config: Any


def model_kind(config) -> Literal["causal_lm", "encoder"]:
    architectures = config.architectures or []
    if any(a.endswith("ForCausalLM") for a in architectures):
        return "causal_lm"
    if config.model_type in ENCODER_TYPES:
        return "encoder"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not architectures and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal_lm"  # configs read from GGUF name no architecture
    raise ModelNotFoundError(
        f"unsupported architecture {architectures or config.model_type}: qforge handles causal language models "
        f"(*ForCausalLM) and BERT-style encoders ({', '.join(sorted(ENCODER_TYPES))})"
    )


def _auto_class(kind: str):
    import transformers

    return transformers.AutoModelForCausalLM if kind == "causal_lm" else transformers.AutoModel


def _plain(model: nn.Module) -> nn.Module:
    """Forget that weights came from a quantized file, so the model saves as plain float."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def load_gguf(folder: Path, gguf_file: str | None):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(str(folder), gguf_file=gguf_file)
    model = _auto_class(model_kind(config)).from_pretrained(str(folder), gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    return _plain(model).eval(), tokenizer


def _load_folder(folder: Path):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    model = _auto_class(model_kind(config)).from_pretrained(
        str(folder), dtype=torch.float32, use_safetensors=True, trust_remote_code=False
    )
    return model.eval(), AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)


def _load_safetensors_file(path: Path):
    """A single safetensors file with config.json (and tokenizer files) beside it."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(str(path.parent), trust_remote_code=False)
    model = _auto_class(model_kind(config)).from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    if unexpected or set(missing) - tied:
        raise ModelNotFoundError(
            f"'{path}' does not match its config.json: missing {sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]}"
        )
    model.tie_weights()
    return model.eval(), AutoTokenizer.from_pretrained(str(path.parent), trust_remote_code=False)


def load_model(ref: str | ModelRef, allow_local_paths: bool = True, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a model reference (see `resolve_model_ref`) as an eval-mode float model on CPU."""
    from quantcore.models.bundled import converted_folder

    if isinstance(ref, str):
        ref = resolve_model_ref(ref, allow_local_paths=allow_local_paths)
    if ref.source == "bundled" and ref.gguf_file:
        model, tokenizer = _load_folder(converted_folder(ref))
    elif ref.gguf_file:
        model, tokenizer = load_gguf(ref.path, ref.gguf_file)
    elif ref.path.is_file():
        model, tokenizer = _load_safetensors_file(ref.path)
    else:
        model, tokenizer = _load_folder(ref.path)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs one; never attended to
    model = model.to(dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, kind=model_kind(model.config), ref=ref, config=model.config)
