"""GGRO: gradient-guided inference-time alignment (the algorithm; no Ray in this package).

Importing `ggro` (or `ggro.config`) is cheap: the torch-backed names below load on first use.
"""
from .config import GGROConfig, ModelConfig

__all__ = ["GGROConfig", "ModelConfig", "Prompt", "Result", "ggro", "baseline", "run"]


def __getattr__(name: str):
    if name in ("Prompt", "Result", "ggro", "baseline", "run"):
        from . import search
        return getattr(search, name)
    raise AttributeError(f"module 'ggro' has no attribute {name!r}")
