"""The reward model on Ray: M single-device actors, each a frozen, unsharded `ggro.reward.RewardModel`.

A batch of RewardQuery is split into M contiguous chunks, scored in parallel and concatenated.
Only rewards and k candidate scores per query cross the wire, never gradients. Actors restart
when they die and Ray retries their calls (they are stateless), so a lost actor costs time only.
"""
from __future__ import annotations

import os
import uuid

import ray

from ggro.config import ModelConfig
from ggro.seam import RewardQuery, RewardResult


class RewardWorker:
    def __init__(self, mcfg: ModelConfig, threads: float):
        import torch
        from ggro import models
        from ggro.engine import load_reward
        torch.set_num_threads(max(1, int(round(threads))))
        tok = models.load_tokenizer(mcfg.policy)
        self.rm = load_reward(mcfg, tok)

    def score(self, queries: list[RewardQuery]) -> list[RewardResult]:
        return self.rm.score(queries)

    def pid(self) -> int:
        return os.getpid()


class RewardPool:
    def __init__(self, workers):
        self.workers = list(workers)

    def score(self, queries: list[RewardQuery]) -> list[RewardResult]:
        if not queries:
            return []
        m = min(len(self.workers), len(queries))
        size = -(-len(queries) // m)
        chunks = [queries[i:i + size] for i in range(0, len(queries), size)]
        parts = ray.get([w.score.remote(c) for w, c in zip(self.workers, chunks)])
        return [r for part in parts for r in part]

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)


def start_reward_pool(mcfg: ModelConfig, replicas: int = 1, gpus: float = 0, cpus: float = 0.5) -> RewardPool:
    from actors.policy import threads_for
    cls = ray.remote(RewardWorker)
    opts = dict(num_cpus=cpus, num_gpus=gpus, max_restarts=-1, max_task_retries=-1)
    tag = uuid.uuid4().hex[:8]   # named (ggro-reward-TAG-i) so operators and tests can find them
    workers = [cls.options(**opts, name=f"ggro-reward-{tag}-{i}").remote(mcfg, threads_for(cpus)) for i in range(replicas)]
    ray.get([w.pid.remote() for w in workers])   # wait until loaded: errors surface here
    return RewardPool(workers)
