"""Model loading: bundled demo models, hub ids (local cache only), HF folders, safetensors, GGUF.

    resolve_model_ref("bundled:smollm2-135m")  -> ModelRef, without reading weights
    load_model("bundled:minilm-l6")            -> LoadedModel(model, tokenizer, kind, ref, config)
"""

from quantcore.models.bundled import bundled_models
from quantcore.models.loading import LoadedModel, load_model, model_kind
from quantcore.models.refs import (
    ModelNotFoundError,
    ModelRef,
    UnsafeModelError,
    UnsupportedModelError,
    is_hub_id,
    resolve_model_ref,
)

__all__ = [
    "LoadedModel",
    "ModelNotFoundError",
    "ModelRef",
    "UnsafeModelError",
    "UnsupportedModelError",
    "bundled_models",
    "is_hub_id",
    "load_model",
    "model_kind",
    "resolve_model_ref",
]
