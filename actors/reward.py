"""The reward model on Ray: M single-device `actors.worker.ModelWorker` actors with the reward role, each a
frozen, unsharded `ggro.reward.RewardModel`.

A batch of RewardQuery is split across the M actors by sequence id, scored in parallel and reassembled.
Only rewards and k candidate scores per query cross the wire, never gradients. Actors restart
when they die and Ray retries their calls (their only state is a prefix cache, rebuilt on demand),
so a lost actor costs time only. When the policy is its own judge or guide (tp == 1), the pool's actors
are the policy replicas' workers, which hold both roles on one copy of the weights (`owned=False`: the
replicas own them).
"""
from __future__ import annotations

import uuid
import zlib

import ray

from actors.worker import ModelWorker, threads_for
from ggro.config import ModelConfig
from ggro.seam import RewardQuery, RewardResult


class RewardPool:
    def __init__(self, workers, owned: bool = True):
        self.workers, self.owned = list(workers), owned

    def score(self, queries: list[RewardQuery]) -> list[RewardResult]:
        """Each sequence always goes to the same actor, so its cached x + y prefix is found there."""
        if not queries:
            return []
        m = len(self.workers)
        groups: dict[int, list[int]] = {}
        for i, q in enumerate(queries):
            w = zlib.crc32(q.seq_id.encode()) % m if q.seq_id is not None else i % m
            groups.setdefault(w, []).append(i)
        parts = ray.get([self.workers[w].score.remote([queries[i] for i in idx]) for w, idx in groups.items()])
        out: list[RewardResult | None] = [None] * len(queries)
        for idx, part in zip(groups.values(), parts):
            for i, r in zip(idx, part):
                out[i] = r
        return out

    def ready(self) -> RewardPool:
        """Wait until every actor has loaded: load errors surface here."""
        ray.get([w.pid.remote() for w in self.workers])
        return self

    def shutdown(self) -> None:
        if not self.owned:      # the policy replicas' workers: their replica shuts them down
            return
        for w in self.workers:
            ray.kill(w)


def start_reward_pool(mcfg: ModelConfig, replicas: int = 1, gpus: float = 0, cpus: float = 0.5) -> RewardPool:
    return launch_reward_pool(mcfg, replicas, gpus, cpus).ready()


def launch_reward_pool(mcfg: ModelConfig, replicas: int = 1, gpus: float = 0, cpus: float = 0.5) -> RewardPool:
    """Start the actors without waiting for them to load (`RewardPool.ready` does)."""
    cls = ray.remote(ModelWorker)
    opts = dict(num_cpus=cpus, num_gpus=gpus, max_restarts=-1, max_task_retries=-1)
    tag = uuid.uuid4().hex[:8]   # named (ggro-reward-TAG-i) so operators and tests can find them
    return RewardPool([cls.options(**opts, name=f"ggro-reward-{tag}-{i}").remote(mcfg, ("reward",),
                                                                                 threads=threads_for(cpus))
                       for i in range(replicas)])
