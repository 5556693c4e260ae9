"""Artifacts: the qforge folder format, its manifest, archive and loader."""

from quantcore.export.artifact import (
    ArtifactError,
    QuantizedModel,
    archive_artifact,
    load_quantized,
    save_artifact,
    verify_manifest,
    write_manifest,
)

__all__ = [
    "ArtifactError",
    "QuantizedModel",
    "archive_artifact",
    "load_quantized",
    "save_artifact",
    "verify_manifest",
    "write_manifest",
]
