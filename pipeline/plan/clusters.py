"""The cluster a `--dry-run` plans for: one described by flags, the Ray cluster at --address / RAY_ADDRESS
(connects as a driver, starts nothing), or this machine. jobs/plan.py builds the ClusterQuery from flags."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ggro.config import ConfigError
from pipeline.plan.sizing import GiB

# Ray advertises `accelerator_type:<T>`; memory per device when --gpu-memory-gb is not given.
ACCELERATOR_GIB = {"H200": 141, "H100": 80, "A100-80G": 80, "A100-40G": 40, "A100": 40, "L40S": 48,
                   "L40": 48, "A10G": 24, "L4": 24, "T4": 16, "V100": 16, "A6000": 48}
ASSUMED_GPU_GIB = 80


@dataclass(frozen=True)
class ClusterQuery:
    gpus: int | None = None              # --cluster-gpus: plan for a described cluster
    cpus: float | None = None            # --cluster-cpus [8 per GPU, at least 8]
    gpus_per_node: int | None = None     # [all GPUs on one node]
    gpu_memory_gb: float | None = None   # [read from the device or the accelerator type]
    memory_gb: float | None = None       # host RAM [the connected cluster's or this machine's]
    address: str | None = None           # --address, else RAY_ADDRESS


@dataclass
class Cluster:
    source: str
    node_gpus: list[int]          # GPUs per node
    cpus: float
    gpu_gib: float
    gpu_gib_source: str
    memory_gib: float | None      # host RAM; None: unknown, so unchecked

    @property
    def gpus(self) -> int:
        return sum(self.node_gpus)


def gpu_gib(flag_gib: float | None, accelerator: str | None = None,
            device_gib: float | None = None) -> tuple[float, str]:
    """Memory per GPU and where it came from: the flag, else this machine's cuda:0, else the accelerator type."""
    if flag_gib:
        return float(flag_gib), "--gpu-memory-gb"
    if device_gib:
        return float(device_gib), "read from cuda:0"
    if accelerator:
        for name, gib in ACCELERATOR_GIB.items():      # longest names first in the table
            if name.lower() in accelerator.lower():
                return float(gib), f"accelerator type {accelerator}"
    return float(ASSUMED_GPU_GIB), "assumed; pass --gpu-memory-gb"


def described_cluster(q: ClusterQuery) -> Cluster:
    n = int(q.gpus)
    if n < 0:
        raise ConfigError("--cluster-gpus must be >= 0")
    per = int(q.gpus_per_node or n)
    if per <= 0 and n:
        raise ConfigError("--gpus-per-node must be >= 1")
    nodes = [per] * (n // per) + ([n % per] if n % per else []) if n else [0]
    cpus = q.cpus or max(8.0, 8.0 * n)
    gib, src = gpu_gib(q.gpu_memory_gb)
    return Cluster(f"described: {n} GPUs" + (f", {per} per node" if n else ""), nodes, float(cpus), gib, src,
                   q.memory_gb)


def connected_cluster(q: ClusterQuery, address: str) -> Cluster:
    """The resources of a running Ray cluster (connects as a driver; starts nothing)."""
    import ray
    already = ray.is_initialized()      # e.g. inside a Ray job, or a test's session: reuse, never shut down
    try:
        if not already:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        nodes = [n for n in ray.nodes() if n.get("Alive")]
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"cannot connect to the Ray cluster at {address!r} ({e.__class__.__name__}: {e}); "
                          "describe it instead with --cluster-gpus N") from None
    finally:
        if not already and ray.is_initialized():
            ray.shutdown()
    node_gpus = [int(n["Resources"].get("GPU", 0)) for n in nodes]
    cpus = sum(n["Resources"].get("CPU", 0) for n in nodes)
    mem = sum(n["Resources"].get("memory", 0) for n in nodes) / GiB
    acc = next((k.split(":", 1)[1] for n in nodes for k in n["Resources"] if k.startswith("accelerator_type:")),
               None)
    gib, src = gpu_gib(q.gpu_memory_gb, acc)
    return Cluster(f"connected: {address} ({len(nodes)} nodes)", node_gpus or [0], cpus, gib, src, mem)


def this_machine(q: ClusterQuery) -> Cluster:
    gpus, acc, device_gib = 0, None, None
    try:   # torch (seconds to import) only where an NVIDIA driver is present
        if not os.path.isdir("/proc/driver/nvidia"):
            raise ImportError
        import torch
        if torch.cuda.is_available():
            gpus = torch.cuda.device_count()
            acc = torch.cuda.get_device_name(0)
            device_gib = torch.cuda.get_device_properties(0).total_memory / GiB
    except ImportError:
        pass
    gib, src = gpu_gib(q.gpu_memory_gb, acc, device_gib)
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    except (ValueError, OSError, AttributeError):
        pass
    return Cluster("this machine (no --cluster-gpus, --address or RAY_ADDRESS)", [gpus],
                   float(os.cpu_count() or 1), gib, src, q.memory_gb or mem)


def find_cluster(q: ClusterQuery, mode: str) -> Cluster:
    """The described cluster, else the Ray cluster at --address / RAY_ADDRESS (never for a job whose
    `Resources.mode` is "local": it runs in this process), else this machine."""
    if q.gpus is not None:
        return described_cluster(q)
    address = q.address or os.environ.get("RAY_ADDRESS")
    if address and mode != "local":
        return connected_cluster(q, address)
    return this_machine(q)
