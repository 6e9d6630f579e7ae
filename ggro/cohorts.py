"""Cohorts: one search in several threads over one Policy and one Reward, so their calls overlap."""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator

from .config import GGROConfig
from .seam import Policy, Prompt, Reward


class _Locked:
    """One call at a time into a model (its prefix cache is not thread-safe); other threads use the other model."""

    def __init__(self, inner):
        self.inner, self.lock = inner, threading.Lock()

    def decode(self, requests):
        with self.lock:
            return self.inner.decode(requests)

    def release(self, seq_ids):
        with self.lock:
            return self.inner.release(seq_ids)

    def score(self, queries):
        with self.lock:
            return self.inner.score(queries)


def overlapped(search, prompts: Iterable[Prompt], policy: Policy, reward: Reward, cfg: GGROConfig,
               batch_size: int = 8, cohorts: int = 2, withdrawn: Callable[[str], bool] | None = None) -> Iterator:
    """`search(prompts, policy, reward, cfg, size)` in `cohorts` threads of batch_size / cohorts prompts each,
    over one Policy and one Reward: while one cohort's reward call runs, another's policy decodes, so two cores
    (or a GPU's two engines) stay busy.

    Each prompt's search does not depend on what shares its batch, so the results are the same as one thread's.
    """
    source, take = iter(prompts), threading.Lock()
    pol, rew = _Locked(policy), _Locked(reward)
    out: queue.Queue = queue.Queue()

    def feed():
        while True:
            with take:
                p = next(source, None)
            if p is None:
                return
            yield p

    def work(size):
        try:
            for res in search(feed(), pol, rew, cfg, size, withdrawn):
                out.put(res)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            out.put(e)
        finally:
            out.put(None)

    sizes = [batch_size // cohorts + (k < batch_size % cohorts) for k in range(min(cohorts, batch_size))]
    threads = [threading.Thread(target=work, args=(n,), daemon=True) for n in sizes]
    for t in threads:
        t.start()
    running = len(threads)
    while running:
        item = out.get()
        if item is None:
            running -= 1
        elif isinstance(item, BaseException):
            raise item
        else:
            yield item
