"""The search of a GGROConfig, written against the Policy/Reward seam: the one entry point (`run`) that the
Engine, Serve's loops and the benchmarks call. The searches themselves: ggro/faithful.py (faithful, adaptive,
parallel), ggro/lookahead.py, ggro/baselines.py (greedy, best-of-n); what they share: ggro/rounds.py.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

from .baselines import baseline
from .cohorts import overlapped
from .config import GGROConfig
from .faithful import ggro
from .lookahead import lookahead
from .rounds import Result
from .seam import Policy, Prompt, Reward

__all__ = ["Prompt", "Result", "baseline", "ggro", "lookahead", "run", "search"]


def search(prompts: Iterable[Prompt], policy: Policy, reward: Reward, cfg: GGROConfig,
           batch_size: int = 8, withdrawn: Callable[[str], bool] | None = None) -> Iterator[Result]:
    """The search of `cfg` in this thread. `withdrawn`: see rounds.withdraw (the baselines' one-call batches
    ignore it: a prompt withdrawn during their decode comes back "cancelled" and is not scored)."""
    if cfg.method != "ggro":
        return baseline(prompts, policy, reward, cfg, batch_size)
    return (lookahead if cfg.search_mode == "lookahead" else ggro)(prompts, policy, reward, cfg, batch_size,
                                                                    withdrawn)


def run(prompts: Iterable[Prompt], policy: Policy, reward: Reward, cfg: GGROConfig,
        batch_size: int = 8, cohorts: int = 1, withdrawn: Callable[[str], bool] | None = None) -> Iterator[Result]:
    if cfg.method == "ggro" and cohorts > 1:
        return overlapped(search, prompts, policy, reward, cfg, batch_size, cohorts, withdrawn)
    return search(prompts, policy, reward, cfg, batch_size, withdrawn)
