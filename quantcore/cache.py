"""Where quantcore keeps what it can recompute: converted bundled models, float baselines."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`QFORGE_CACHE_DIR`, else ~/.cache/qforge."""
    return Path(os.environ.get("QFORGE_CACHE_DIR", Path.home() / ".cache" / "qforge"))
