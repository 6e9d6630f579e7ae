"""The process that holds model weights on Ray, in batch and in Serve: `ModelWorker` (one process, --local,
holds them in its `ggro.engine.Engine`, loaded the same way: `load_policy`, `load_reward`).

A worker has one or both roles:
    policy  a `ggro.policy.SegmentDecoder` (decode, release); for tp > 1 one tensor-parallel rank of it
    reward  a `ggro.reward.RewardModel` (score), via `ggro.engine.load_reward`
With both roles and `ModelConfig.shares_policy_weights` the reward runs on the policy's weights: one copy
in memory. Batch runs workers as Ray actors (a policy replica's ranks, the reward pool); a Serve model
replica constructs one in its own process. Both paths therefore load, cache and score the same way.
"""
from __future__ import annotations

import os
import socket

from ggro.config import ModelConfig, cached_prefixes
from ggro.seam import RewardQuery, RewardResult, SegmentRequest, SegmentResult

ROLES = ("policy", "reward")


def class_path(obj) -> str:
    """`module.Class` of `obj` as it runs (for a Ray actor: the class Ray instantiated in its process)."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def threads_for(cpus: float) -> float:
    """torch threads for an actor with a fractional CPU share: GGRO_THREADS, else at least 1."""
    from ggro.threads import env_threads
    return float(env_threads()) or max(1.0, cpus)


def check_roles(roles: tuple[str, ...], tp: int) -> None:
    if not roles or set(roles) - set(ROLES):
        raise ValueError(f"roles must be a non-empty subset of {ROLES}, got {roles}")
    if "reward" in roles and tp > 1:
        # AutoTP has no backward and the reward needs input gradients: a sharded policy cannot judge
        raise ValueError("a tensor-parallel worker (tp > 1) cannot hold the reward role")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _set_threads(threads: float | None) -> None:
    import torch
    from ggro.threads import torch_threads
    if threads is None:      # in-process (a Serve replica): every core the process was given
        torch_threads()
    else:                    # a Ray actor: its fractional CPU share, rounded
        torch.set_num_threads(max(1, int(round(threads))))


def shm_buffer(rank: int, master_addr: str, master_port: int) -> str:
    """The /dev/shm file DeepSpeed's CPU all-reduce creates for `rank` of the world at master_addr:port
    (shm_initialize in its csrc/cpu/comm/shm.cpp: `deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`)."""
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{master_addr}_{master_port}_{rank}"


def _unlink_shm_buffer(rank: int, master_addr: str, master_port: int) -> None:
    """Remove this rank's all-reduce buffer name once every rank has mapped every buffer.

    DeepSpeed never unlinks it, and our ranks end by ray.kill: each tp > 1 start on a CPU host left ~66 MB a
    rank in /dev/shm (RAM) for good. A mapping outlives its name, so the world keeps its buffers; the barrier
    makes sure no rank still waits to open ours. On CUDA no rank has the file, so none waits at the barrier."""
    import torch.distributed as dist
    path = shm_buffer(rank, master_addr, master_port)
    if os.path.exists(path):
        dist.barrier()
        os.unlink(path)


def _shard(model, mcfg: ModelConfig, rank: int, tp: int, master_addr: str, master_port: int):
    """Join the replica's torch.distributed world and keep this rank's DeepSpeed AutoTP shard of `model`."""
    from ggro import models
    # On CUDA, Ray's CUDA_VISIBLE_DEVICES shows each rank only its own GPU, as cuda:0, and DeepSpeed
    # calls set_device(LOCAL_RANK): any other value is an invalid device ordinal there.
    local = 0 if mcfg.device.startswith("cuda") else rank
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(tp), LOCAL_RANK=str(local),
                      # STRICT_PACK puts every rank on one node; without LOCAL_SIZE DeepSpeed's
                      # CPU shm all-reduce runs on uninitialized buffers and segfaults
                      LOCAL_SIZE=str(tp))
    import deepspeed
    # GGRO_DIST_BACKEND=gloo: two ranks on one GPU (benchmarks/gpu_tp2.py), where NCCL refuses to run
    backend = os.environ.get("GGRO_DIST_BACKEND") or ("nccl" if mcfg.device.startswith("cuda") else "gloo")
    deepspeed.init_distributed(dist_backend=backend, rank=rank, world_size=tp)
    _unlink_shm_buffer(rank, master_addr, master_port)
    engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": tp}, replace_with_kernel_inject=False,
                                      dtype=models.DTYPES[mcfg.dtype])
    engine.module.requires_grad_(False)
    return engine.module


class ModelWorker:
    """Holds the weights for `roles`. Loads in the constructor, so a restarted tp == 1 actor (Ray re-runs
    only the constructor) serves again at once; a tp > 1 rank also needs `setup`, with every rank together.

    `shared`: several aligners call this policy (a batch job's rank), not one search (Serve's replica): the
    prefix cache's larger floor (the rule: ggro.config.cached_prefixes).
    """

    def __init__(self, mcfg: ModelConfig, roles: tuple[str, ...] = ("policy",), rank: int = 0, tp: int = 1,
                 threads: float | None = None, shared: bool = True):
        check_roles(roles, tp)
        from ggro import models
        from ggro.engine import load_reward
        from ggro.modelset import ModelSet
        mcfg = models.here(mcfg)     # `auto` dtype and device against this actor's own hardware
        self.mcfg, self.roles, self.rank, self.tp = mcfg, tuple(roles), rank, tp
        self.max_cached = cached_prefixes(mcfg, shared)
        self.model = self.decoder = self.reward = self.context = None
        _set_threads(threads)
        self.models = ModelSet(mcfg)
        self.tok = self.models.tokenizer
        if "policy" in roles:
            self._load_policy()
        if "reward" in roles:   # on self.model when the config shares weights (load_reward decides)
            # queried in its own ids: with another vocabulary its callers translate (ModelSet.reward_seam)
            self.reward = load_reward(mcfg, self.tok, self.model, policy_ids=False, model_set=self.models)

    def _load_policy(self) -> None:
        from ggro.engine import load_policy
        # A tp > 1 rank loads on the host and sharding moves only its shard to the GPU: loading the whole
        # model on every GPU first would need P*B per GPU, not the P*B/tp the planner promises.
        self.model, self.decoder = load_policy(self.mcfg, self.models, self.max_cached, on_host=self.tp > 1)
        self.context = self.models.context(self.model)

    def address(self) -> tuple[str, int]:
        import ray
        return ray.util.get_node_ip_address(), _free_port()

    def setup(self, master_addr: str | None = None, master_port: int | None = None) -> int | None:
        """Shard the policy across the replica's ranks (tp > 1; all ranks call it together, with rank 0's
        `address`); returns the policy's context window (None for a reward-only worker)."""
        if self.tp > 1 and self.decoder is None:
            from ggro.engine import decoder
            self.model = _shard(self.model, self.mcfg, self.rank, self.tp, master_addr, master_port)
            self.decoder = decoder(self.model, self.models, self.max_cached, self.mcfg.compile)
        return self.context

    def decode(self, requests: list[SegmentRequest]) -> list[SegmentResult] | None:
        out = self.decoder.decode(requests)
        return out if self.rank == 0 else None    # every rank computes; rank 0 answers

    def release(self, seq_ids: list[str]) -> None:
        self.decoder.release(seq_ids)

    def cancel(self, seq_ids: list[str]) -> None:
        """Drop `seq_ids` from a running decode at its next step (SegmentDecoder.cancel; thread-safe, so a
        caller in another thread reaches it while `decode` runs)."""
        self.decoder.cancel(seq_ids)

    def score(self, queries: list[RewardQuery]) -> list[RewardResult]:
        return self.reward.score(queries)

    def pid(self) -> int:
        return os.getpid()
