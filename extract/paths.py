"""Where the tool caches things (converted weights, ONNX engines)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``$TRANSFERKIT_CACHE`` or ``~/.cache/transferkit``, created on demand."""
    root = Path(os.environ.get("TRANSFERKIT_CACHE") or Path.home() / ".cache" / "transferkit")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def keras_models_dir() -> Path:
    """The Keras download cache for application weights (``$KERAS_HOME/models`` or ``~/.keras/models``)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"
