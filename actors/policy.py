"""The policy on Ray: one replica = `tp` rank actors in a STRICT_PACK placement group.

Every rank is an `actors.worker.ModelWorker` (the class Serve's model replicas run in-process): it loads
the policy and, for tp > 1, joins one torch.distributed world per replica (gloo on CPU, NCCL on GPU) and
shards it with `deepspeed.init_inference(tensor_parallel={"tp_size": tp})`. Each rank wraps the same
`ggro.policy.SegmentDecoder` (prefix KV caches keyed by sequence id), gets the same requests, and rank 0's
SegmentResults are returned: the search cannot tell a replica from the in-process decoder. A tp == 1
replica may also hold the reward role on the same weights (the policy as its own judge or guide).
"""
from __future__ import annotations

import uuid

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.worker import ModelWorker, check_roles, threads_for
from ggro.config import ModelConfig, check_tp
from ggro.seam import SegmentRequest, SegmentResult
from actors.resources import ClusterTooSmall


class PolicyReplica:
    """Handles of one replica's ranks; `decode` sends every rank the same batch and returns rank 0's."""

    def __init__(self, ranks, pg, context: int):
        self.ranks, self.pg, self.context = ranks, pg, context

    def decode(self, requests: list[SegmentRequest]) -> list[SegmentResult]:
        # ray.get of the list raises as soon as one rank dies (its partner may still wait in a collective):
        # the caller then marks the replica dead (pipeline.batch.ray_align.Aligner) and moves on
        return ray.get([r.decode.remote(requests) for r in self.ranks])[0]

    def release(self, seq_ids: list[str]) -> None:
        ray.get([r.release.remote(seq_ids) for r in self.ranks])

    def shutdown(self) -> None:
        if self.pg is None:      # already shut down (a failed start shuts a replica down once, its caller again)
            return
        for r in self.ranks:
            ray.kill(r)
        remove_placement_group(self.pg)
        self.pg = None


def start_policy_replica(mcfg: ModelConfig, tp: int = 1, gpus_per_rank: float = 0, cpus_per_rank: float = 0.5,
                         timeout_s: float = 60, name: str | None = None,
                         roles: tuple[str, ...] = ("policy",), shared: bool = True) -> PolicyReplica:
    """Start one replica and wait until its ranks have loaded and wired their world."""
    return wire(launch_policy_replica(mcfg, tp, gpus_per_rank, cpus_per_rank, timeout_s, name, roles, shared))


def launch_policy_replica(mcfg: ModelConfig, tp: int = 1, gpus_per_rank: float = 0, cpus_per_rank: float = 0.5,
                          timeout_s: float = 60, name: str | None = None,
                          roles: tuple[str, ...] = ("policy",), shared: bool = True) -> PolicyReplica:
    """Reserve a STRICT_PACK placement group of `tp` bundles and start the ranks, without waiting for them to
    load (`wire` does): replicas and reward actors then load side by side instead of one after another.
    `roles=("policy", "reward")` (tp == 1 only) makes the rank the reward worker too, on the same weights.
    `shared` False: one search calls it (a Serve replica's ranks), not several aligners (ModelWorker).

    tp == 1 ranks restart on failure (their only state is a prefix cache, rebuilt on demand) and Ray
    retries their calls; a tp > 1 world cannot be rejoined by a single restarted rank.
    """
    check_tp(tp, mcfg)
    check_roles(roles, tp)
    name = name or f"ggro-policy-{uuid.uuid4().hex[:8]}"    # its ranks are the named actors NAME-rank<i>
    bundle = {"CPU": cpus_per_rank, **({"GPU": gpus_per_rank} if gpus_per_rank else {})}
    pg = placement_group([dict(bundle) for _ in range(tp)], strategy="STRICT_PACK", name=name)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise ClusterTooSmall(
            f"policy replica placement group ({tp} x {bundle}, STRICT_PACK on one node) was not ready "
            f"after {timeout_s:.0f}s: no node has room for it. Lower --tp / --policy-cpus / "
            f"--policy-gpus-per-replica, or add a node.") from None
    restarts = -1 if tp == 1 else 0
    opts = dict(num_cpus=cpus_per_rank, num_gpus=gpus_per_rank, max_restarts=restarts,
                max_task_retries=-1 if tp == 1 else 0)
    cls = ray.remote(ModelWorker)
    ranks = [cls.options(**opts, name=f"{name}-rank{i}", scheduling_strategy=PlacementGroupSchedulingStrategy(
        placement_group=pg, placement_group_bundle_index=i)).remote(mcfg, roles, i, tp, threads_for(cpus_per_rank),
                                                                    shared=shared)
        for i in range(tp)]
    return PolicyReplica(ranks, pg, 0)


def wire(replica: PolicyReplica) -> PolicyReplica:
    """Wait for a launched replica's ranks to load and join their world; load errors surface here."""
    ranks = replica.ranks
    try:
        addr, port = ray.get(ranks[0].address.remote())
        replica.context = ray.get([r.setup.remote(addr, port) for r in ranks])[0]
    except BaseException:   # a rank that failed to load: free the group's resources, not just raise
        replica.shutdown()
        raise
    return replica
