"""The policy on Ray: one replica = `tp` rank actors in a STRICT_PACK placement group.

Every rank loads the policy, joins one torch.distributed world per replica (gloo on CPU, NCCL on
GPU) and, for tp > 1, shards it with `deepspeed.init_inference(tensor_parallel={"tp_size": tp})`.
Each rank wraps the same `ggro.policy.SegmentDecoder` (prefix KV caches keyed by sequence id), gets
the same requests, and rank 0's SegmentResults are returned: the search cannot tell a replica from
the in-process decoder.
"""
from __future__ import annotations

import os
import socket
import uuid

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ggro.config import ModelConfig, check_tp_dtype
from ggro.seam import SegmentRequest, SegmentResult
from pipeline.resources import ClusterTooSmall


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class PolicyRank:
    """One tensor-parallel rank (a Ray actor; see `policy_rank_actor`)."""

    def __init__(self, mcfg: ModelConfig, rank: int, tp: int, threads: float):
        self.mcfg, self.rank, self.tp = mcfg, rank, tp
        self.threads = max(1, int(round(threads)))
        self.decoder = None

    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), _free_port()

    def setup(self, master_addr: str, master_port: int) -> int:
        """Load (and shard) the policy; returns its context window. All ranks must call it together."""
        import torch
        from ggro import models
        from ggro.engine import context_window
        from ggro.policy import SegmentDecoder

        torch.set_num_threads(self.threads)
        # A tp > 1 rank loads on the host and init_inference moves only its shard to the GPU: loading the
        # whole model on every GPU first would need P*B per GPU, not the P*B/tp the planner promises.
        load_on = "cpu" if self.tp > 1 else self.mcfg.device
        model = models.load_model(self.mcfg.policy, "causal", self.mcfg.dtype, load_on,
                                  **self.mcfg.source(self.mcfg.policy))
        tok = models.load_tokenizer(self.mcfg.policy, **self.mcfg.source(self.mcfg.policy))
        eos = models.eos_ids(tok, model)
        context = context_window(model.config)
        if self.tp > 1:
            # On CUDA, Ray's CUDA_VISIBLE_DEVICES shows each rank only its own GPU, as cuda:0, and DeepSpeed
            # calls set_device(LOCAL_RANK): any other value is an invalid device ordinal there.
            local = 0 if self.mcfg.device.startswith("cuda") else self.rank
            os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                              WORLD_SIZE=str(self.tp), LOCAL_RANK=str(local),
                              # STRICT_PACK puts every rank on one node; without LOCAL_SIZE DeepSpeed's
                              # CPU shm all-reduce runs on uninitialized buffers and segfaults
                              LOCAL_SIZE=str(self.tp))
            import deepspeed
            backend = "nccl" if self.mcfg.device.startswith("cuda") else "gloo"
            deepspeed.init_distributed(dist_backend=backend, rank=self.rank, world_size=self.tp)
            engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": self.tp},
                                              replace_with_kernel_inject=False,
                                              dtype=models.DTYPES[self.mcfg.dtype])
            model = engine.module
            model.requires_grad_(False)
        self.decoder = SegmentDecoder(model, eos, max_cached=8 * self.mcfg.batch_size)
        return context

    def decode(self, requests: list[SegmentRequest]) -> list[SegmentResult] | None:
        out = self.decoder.decode(requests)
        return out if self.rank == 0 else None

    def release(self, seq_ids: list[str]) -> None:
        self.decoder.release(seq_ids)

    def pid(self) -> int:
        return os.getpid()


class PolicyReplica:
    """Handles of one replica's ranks; `decode` sends every rank the same batch and returns rank 0's."""

    def __init__(self, ranks, pg, context: int):
        self.ranks, self.pg, self.context = ranks, pg, context

    def decode(self, requests: list[SegmentRequest]) -> list[SegmentResult]:
        # ray.get of the list raises as soon as one rank dies (its partner may still wait in a collective):
        # the caller then marks the replica dead (pipeline.ray_align.Aligner) and moves on
        return ray.get([r.decode.remote(requests) for r in self.ranks])[0]

    def release(self, seq_ids: list[str]) -> None:
        ray.get([r.release.remote(seq_ids) for r in self.ranks])

    def shutdown(self) -> None:
        for r in self.ranks:
            ray.kill(r)
        remove_placement_group(self.pg)


def start_policy_replica(mcfg: ModelConfig, tp: int = 1, gpus_per_rank: float = 0, cpus_per_rank: float = 0.5,
                         timeout_s: float = 60, name: str | None = None) -> PolicyReplica:
    """Reserve a STRICT_PACK placement group of `tp` bundles, start the ranks and wire their world.

    tp == 1 ranks restart on failure (their only state is a prefix cache, rebuilt on demand) and Ray
    retries their calls; a tp > 1 world cannot be rejoined by a single restarted rank.
    """
    check_tp_dtype(tp, mcfg.dtype)
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
    cls = ray.remote(PolicyRank)
    ranks = [cls.options(**opts, name=f"{name}-rank{i}", scheduling_strategy=PlacementGroupSchedulingStrategy(
        placement_group=pg, placement_group_bundle_index=i)).remote(mcfg, i, tp, threads_for(cpus_per_rank))
        for i in range(tp)]
    addr, port = ray.get(ranks[0].address.remote())
    contexts = ray.get([r.setup.remote(addr, port) for r in ranks])
    return PolicyReplica(ranks, pg, contexts[0])


def threads_for(cpus: float) -> float:
    """torch threads for an actor with a fractional CPU share: GGRO_THREADS, else at least 1."""
    return float(os.environ.get("GGRO_THREADS", "0")) or max(1.0, cpus)
