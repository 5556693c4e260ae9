"""Model loading: bundled demo models, hub ids (local cache only), HF folders, safetensors, GGUF."""

from quantcore.models.bundled import bundled_models
from quantcore.models.loading import LoadedModel, load_model, model_kind
from quantcore.models.refs import ModelNotFoundError, ModelRef, UnsafeModelError, is_hub_id, resolve_model_ref

__all__ = [
    "LoadedModel",
    "ModelNotFoundError",
    "ModelRef",
    "UnsafeModelError",
    "bundled_models",
    "is_hub_id",
    "load_model",
    "model_kind",
    "resolve_model_ref",
]
