"""Loading a resolved model reference into an eval-mode float model on CPU.

Only formats that cannot execute code are read: safetensors (`use_safetensors=True`) and
GGUF. `trust_remote_code` is never set, so only architectures transformers itself implements
load, and `local_files_only` is set everywhere, so nothing here ever reaches the network.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from quantcore.models.bundled import converted_folder, is_complete, publish_atomically
from quantcore.models.refs import Locate, ModelNotFoundError, ModelRef, UnsupportedModelError, resolve_model_ref

Kind = Literal["causal_lm", "encoder"]
# BERT-like encoders: their checkpoints often name a task head (BertForMaskedLM), but what we
# quantize and evaluate is the backbone's hidden states.
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "deberta", "deberta-v2", "camembert"}
OFFLINE = {"local_files_only": True, "trust_remote_code": False}


@dataclass
class LoadedModel:
    model: nn.Module  # eval mode, on CPU, in the dtype asked for (fp32 by default)
    tokenizer: Any
    kind: Kind
    ref: ModelRef
    config: Any  # the transformers config


def load_model(ref: str | ModelRef, allow_local_paths: bool = True, dtype: torch.dtype = torch.float32,
               locate: Locate | None = None) -> LoadedModel:
    """Load a model reference (see `resolve_model_ref`) as an eval-mode model on CPU."""
    if isinstance(ref, str):
        ref = resolve_model_ref(ref, allow_local_paths=allow_local_paths, locate=locate)
    if ref.source == "bundled" and ref.gguf_file:
        model, tokenizer = _load_bundled_gguf(ref, dtype)
    elif ref.gguf_file:
        model, tokenizer = load_gguf(ref.path, ref.gguf_file, dtype)
    elif ref.path.is_file():
        model, tokenizer = _load_safetensors_file(ref.path, dtype)
    else:
        model, tokenizer = _load_folder(ref.path, dtype)
    kind = model_kind(model.config)
    if kind == "causal_lm" and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Batching needs a pad token; padded positions are masked out, so which token it is does not matter.
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, kind=kind, ref=ref, config=model.config)


def model_kind(config) -> Kind:
    """causal_lm for `*ForCausalLM`; encoder for BERT-like models and bare text backbones (`*Model`)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = list(config.architectures or [])
    if any(a.endswith("ForCausalLM") for a in architectures):
        return "causal_lm"
    # A text model (it has a vocabulary) that is neither seq2seq nor vision.
    text_backbone = getattr(config, "vocab_size", None) and not getattr(config, "is_encoder_decoder", False)
    if text_backbone and (config.model_type in ENCODER_TYPES or any(a.endswith("Model") for a in architectures)):
        return "encoder"
    if not architectures and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal_lm"  # configs read from GGUF name no architecture, only a model type
    raise UnsupportedModelError(
        f"unsupported architecture {architectures or config.model_type}: qforge handles causal language models "
        f"(*ForCausalLM) and BERT-style text encoders ({', '.join(sorted(ENCODER_TYPES))}, or a bare *Model)"
    )


def check_loadable(folder: Path, gguf_file: str | None = None) -> tuple[Any, Kind]:
    """The config and kind of a model folder (or a GGUF file in it), with its tokenizer loaded
    to prove it usable, without reading any weights: what a service checks an upload against."""
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    config = _load_config(folder, **extra)
    kind = model_kind(config)
    _load_tokenizer(folder, **extra)
    return config, kind


def _auto_class(kind: Kind):
    import transformers

    return transformers.AutoModelForCausalLM if kind == "causal_lm" else transformers.AutoModel


def _load_config(folder: Path, **kwargs):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder), **OFFLINE, **kwargs)
    except (ValueError, KeyError) as exc:  # unknown model_type, or code it would have to run
        raise UnsupportedModelError(f"cannot read the model config in '{folder}': {exc}") from None


def _load_tokenizer(folder: Path, **kwargs):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), **OFFLINE, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"no usable tokenizer in '{folder}': keep the model's tokenizer files (tokenizer.json, "
            f"tokenizer_config.json, vocab files) beside its weights ({str(exc).splitlines()[0]})"
        ) from None


def _load_folder(folder: Path, dtype: torch.dtype):
    return _load_weights(folder, dtype), _load_tokenizer(folder)


def _load_weights(folder: Path, dtype: torch.dtype) -> nn.Module:
    config = _load_config(folder)
    model, info = _auto_class(model_kind(config)).from_pretrained(
        str(folder), config=config, dtype=dtype, use_safetensors=True, output_loading_info=True, **OFFLINE
    )
    # transformers fills missing weights with random values and only warns: refuse instead, as a
    # quantized random model would pass for a bad recipe. (Unexpected keys are fine: a task head
    # stored beside an encoder backbone.)
    broken = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
    if broken:
        raise ModelNotFoundError(f"'{folder}': weights missing or of the wrong shape for its config.json: {broken[:5]}")
    return model


def _load_safetensors_file(path: Path, dtype: torch.dtype):
    """A single safetensors file with config.json (and tokenizer files) beside it.

    from_pretrained reads a folder's `model.safetensors`, so it is given a temporary folder that
    links that name to the file: transformers' own loader then maps the keys and ties weights.
    """
    with tempfile.TemporaryDirectory(prefix="qforge-safetensors-") as tmp:
        for name in ("config.json", "generation_config.json"):
            if (path.parent / name).is_file():
                (Path(tmp) / name).symlink_to((path.parent / name).resolve())
        (Path(tmp) / "model.safetensors").symlink_to(path.resolve())
        model = _load_weights(Path(tmp), dtype)
    model.config._name_or_path = str(path)  # not the temporary folder
    return model, _load_tokenizer(path.parent)


def load_gguf(folder: Path, gguf_file: str, dtype: torch.dtype = torch.float32):
    """Model and tokenizer from a GGUF file; quantized tensors are dequantized to `dtype`."""
    config = _load_config(folder, gguf_file=gguf_file)
    model = _auto_class(model_kind(config)).from_pretrained(str(folder), gguf_file=gguf_file, dtype=dtype, **OFFLINE)
    # The loader marks the model as quantized by GGUF; its weights are plain floats now, and the
    # mark makes save_pretrained refuse ("quantized with gguf and is not serializable").
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, _load_tokenizer(folder, gguf_file=gguf_file)


def _load_bundled_gguf(ref: ModelRef, dtype: torch.dtype):
    """A bundled GGUF model, read from its plain-safetensors conversion (made on first use)."""
    folder = converted_folder(ref)
    if not is_complete(folder):
        model, tokenizer = load_gguf(ref.path, ref.gguf_file, torch.float32)

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp)  # safetensors; the tied lm_head is stored once, as the embedding
            tokenizer.save_pretrained(tmp)

        try:
            publish_atomically(folder, write)
        except OSError as exc:
            raise OSError(
                f"cannot write the converted model to '{folder}' ({exc}); set QFORGE_MODEL_CACHE to a writable folder"
            ) from exc
        del model  # free the GGUF-loaded copy (0.5 GB for SmolLM2) before reading the folder
    return _load_folder(folder, dtype)
