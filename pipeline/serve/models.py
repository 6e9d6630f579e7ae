"""The model side of `ggro serve`: the ModelServer deployment and the seam over its handles.

ModelServer is a thin Serve adapter over `actors.worker.ModelWorker`, the class batch runs as its Ray
actors: a replica constructs one worker in its own process (policy, reward, or both on one copy of the
weights), or, for a tp > 1 policy, starts an `actors.policy` rank group whose ranks are ModelWorkers.
What the adapter adds is Serve's: `@serve.batch` merges concurrent callers into one model call, and a
per-replica lock keeps one model computation running at a time.
"""
import asyncio
import dataclasses
import os
import uuid

import ray
from ray import serve

from actors.worker import ModelWorker, class_path
from ggro.config import ModelConfig

CALL_TIMEOUT_S = 600.0     # one policy/reward call; a dead replica must not hang a loop forever


@serve.deployment(max_ongoing_requests=256)
class ModelServer:
    """Holds the weights for `roles` in a ModelWorker: the policy, the reward, or both (shared judge)."""

    def __init__(self, mcfg: ModelConfig, roles: tuple[str, ...], tp: int = 1, rank_cpus: float = 0.5,
                 rank_gpus: float = 0.0):
        self.group = None
        if tp > 1:
            # the weights live in `tp` rank actors (DeepSpeed AutoTP), started and owned by this replica
            from actors.policy import start_policy_replica
            self.group = start_policy_replica(mcfg, tp=tp, gpus_per_rank=rank_gpus, cpus_per_rank=rank_cpus,
                                              name=f"ggro-serve-policy-{uuid.uuid4().hex[:8]}", roles=roles,
                                              shared=False)
            self.policy = self.group
        else:
            self.policy = self.reward = ModelWorker(mcfg, roles, shared=False)
        self._lock = asyncio.Lock()          # one model computation at a time per replica

    async def _compute(self, fn, arg):
        async with self._lock:
            return await asyncio.to_thread(fn, arg)

    async def _merged(self, fn, calls: list[list]) -> list[list]:
        """One model call for the requests of every caller Serve batched together, split back per caller."""
        out = await self._compute(fn, [item for c in calls for item in c])
        res, k = [], 0
        for c in calls:
            res.append(out[k:k + len(c)])
            k += len(c)
        return res

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.003)
    async def decode(self, calls: list[list]) -> list[list]:
        return await self._merged(self.policy.decode, calls)

    async def release(self, seq_ids: list[str]) -> None:
        await self._compute(self.policy.release, seq_ids)

    async def cancel(self, seq_ids: list[str]) -> None:
        """Drop `seq_ids` from the running decode at its next step. Not behind the lock: it must land while
        `decode` runs (in a worker thread; the replica takes up to max_ongoing_requests calls at once). A
        tensor-parallel group's ranks would have to drop a row at the same step (they meet in collectives
        every step), so there withdrawn prompts leave at the search's next round instead."""
        if self.group is None:
            self.policy.cancel(seq_ids)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.003)
    async def score(self, calls: list[list]) -> list[list]:
        return await self._merged(self.reward.score, calls)

    def ready(self) -> bool:
        return True

    def pid(self) -> int:
        """This replica's process (fault tests kill it)."""
        return os.getpid()

    def worker_class(self) -> str:
        """The class that holds this replica's weights, as it runs (tests check batch runs the same one)."""
        if self.group is not None:   # asked inside the rank actor: the class Ray instantiated there
            return ray.get(self.group.ranks[0].__ray_call__.remote(class_path))
        return class_path(self.policy)

    def __del__(self):
        if getattr(self, "group", None) is not None:
            try:
                self.group.shutdown()
            except Exception:
                pass


class HandlePolicy:
    """The Policy side of the seam over a ModelServer handle. Sequence ids are namespaced per search
    loop (`token/`) so loops never share prefix caches; `watch(seq_id, prefix)` sees every request,
    which is how streaming observes accepted segments (a segment's prefix grows by the accepted one)."""

    def __init__(self, handle, token: str, watch=None):
        self.handle, self.token, self.watch = handle, token, watch

    def decode(self, requests):
        if self.watch is not None:
            for r in requests:
                self.watch(r.seq_id, r.prefix)
        reqs = [dataclasses.replace(r, seq_id=f"{self.token}/{r.seq_id}") for r in requests]
        return self.handle.decode.remote(reqs).result(timeout_s=CALL_TIMEOUT_S)

    def release(self, seq_ids):
        self.handle.release.remote([f"{self.token}/{s}" for s in seq_ids]).result(timeout_s=CALL_TIMEOUT_S)

    def cancel(self, seq_ids):
        """Withdraw `seq_ids` from the replica's decode batch at its next step; returns the call without
        waiting for it (a DeploymentResponse)."""
        return self.handle.cancel.remote([f"{self.token}/{s}" for s in seq_ids])


class HandleReward:
    """The Reward side of the seam over a ModelServer handle; reward-side cache keys (RewardQuery.seq_id,
    where the seam has them) are namespaced per search loop like the policy's."""

    def __init__(self, handle, token: str = ""):
        self.handle, self.token = handle, token

    def score(self, queries):
        if self.token:
            queries = [dataclasses.replace(q, seq_id=f"{self.token}/{q.seq_id}")
                       if getattr(q, "seq_id", None) is not None else q for q in queries]
        return self.handle.score.remote(queries).result(timeout_s=CALL_TIMEOUT_S)
