"""GGRO: gradient-guided inference-time alignment (the algorithm; no Ray in this package)."""
from .config import GGROConfig, ModelConfig
from .search import Prompt, Result, ggro, baseline, run

__all__ = ["GGROConfig", "ModelConfig", "Prompt", "Result", "ggro", "baseline", "run"]
