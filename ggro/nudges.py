"""Choosing nudges: the token(s) to force at the insertion offset, from the guide's candidate scores
(ALGORITHM.md's sigma_c). Every search mode asks these two; nothing else decides a nudge."""
from __future__ import annotations

import torch

from .config import GGROConfig


def _sigma(scores: list[float], candidates: list[int], current: int, cfg: GGROConfig) -> torch.Tensor:
    """sigma_c from raw candidate scores g_q . E[c] (the last score is the current token's)."""
    dots = torch.tensor(scores, dtype=torch.float64)
    cur = dots[-1]
    sigma = dots[:-1] - cur if cfg.scoring == "taylor" else dots[:-1].clone()
    sigma[torch.tensor(candidates) == current] = 0.0
    return sigma / cfg.nudge_temperature


def propose(scores: list[float], candidates: list[int], current: int, cfg: GGROConfig,
            gen: torch.Generator | None) -> int:
    """Pick the nudge from raw candidate scores g_q . E[c] (the last score is the current token's)."""
    sigma = _sigma(scores, candidates, current, cfg)
    if cfg.selection == "sample":
        return candidates[int(torch.multinomial(torch.softmax(sigma, dim=0), 1, generator=gen))]
    return candidates[int(torch.argmax(sigma))]


def propose_many(scores: list[float], candidates: list[int], current: int, cfg: GGROConfig,
                 gen: torch.Generator | None, n: int) -> list[int]:
    """`parallel` mode: the n best (or n sampled, without replacement) candidates other than the current token."""
    sigma = _sigma(scores, candidates, current, cfg)
    others = [i for i, c in enumerate(candidates) if c != current]
    n = min(n, len(others))
    if not n:
        return []
    sub = sigma[others]
    if cfg.selection == "sample":
        picks = torch.multinomial(torch.softmax(sub, dim=0), n, replacement=False, generator=gen).tolist()
    else:
        picks = sorted(range(len(others)), key=lambda i: (-float(sub[i]), i))[:n]   # stable: first wins ties
    return [candidates[others[i]] for i in picks]
