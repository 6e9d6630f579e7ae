"""`--dry-run`: size a job before paying for it. Validates the configuration and the models' metadata
(never their weights), prints the resource plan and says whether the cluster can hold it.

Parameter counts come from, in order: safetensors headers (exact shapes, no tensor data read), the
model's config.json (shapes -> a parameter formula), GGUF tensor metadata, or the known size of the
embedded default. Memory per GPU follows the rule of thumb documented in docs/cluster.md ("The memory rule of thumb"):

    policy rank  = (weights + KV cache) / tp * 1.10 + 1 GiB
    reward actor = (weights + activations for the input-gradient backward) * 1.10 + 1 GiB

The resource flags (--tp, --policy-replicas, ...) belong to pipeline.ray_align; they are read with
getattr so the planner works whichever of them exist.

Exit status: 0 the plan fits, 1 it does not (the output says what to change), 2 bad configuration.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from ggro.config import ConfigError, GGROConfig, ModelConfig, check_tp_dtype

GiB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}
CONTEXT_OVERHEAD_GIB = 1.0      # CUDA context + allocator slack, per process on a GPU
HEADROOM = 0.10                 # fragmentation and transient buffers, on top of weights + cache
ACT_FACTOR = 18                 # bytes/(token*hidden*layer*dtype byte) kept for backward (SDPA, no attn matrix)
CACHED_BATCHES = 8              # a policy rank caches prefixes of 8 x batch_size sequences (actors/policy.py)
IN_PROCESS_CACHED_BATCHES = 4   # in-process decoders (--local, serve) cache 4 x batch_size
JUDGE_SUFFIX_TOKENS = 64        # the judge's rubric turn appended to every scored response
DEFAULT_PARAMS = 134_515_008    # SmolLM2-135M-Instruct (tied embeddings)
DEFAULT_SHAPE = dict(layers=30, hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536,
                     vocab=49152, context=8192)
# Ray advertises `accelerator_type:<T>`; memory per device when --gpu-memory-gb is not given.
ACCELERATOR_GIB = {"H200": 141, "H100": 80, "A100-80G": 80, "A100-40G": 40, "A100": 40, "L40S": 48,
                   "L40": 48, "A10G": 24, "L4": 24, "T4": 16, "V100": 16, "A6000": 48}
ASSUMED_GPU_GIB = 80
# The flag that sets each Resources field, per mode, so every message names a flag that mode's parser accepts.
# `ggro serve` sizes the policy and reward deployments with one set of replica flags and has a fixed ingress;
# --local runs one policy (+ reward) in-process. None: no flag sets it there, the message names the quantity.
ALIGN_FLAGS = {"tp": "--tp", "policy_replicas": "--policy-replicas", "reward_replicas": "--reward-replicas",
               "aligners": "--aligners", "policy_gpus": "--policy-gpus-per-replica", "reward_gpus": "--reward-gpus",
               "policy_cpus": "--policy-cpus", "reward_cpus": "--reward-cpus", "aligner_cpus": "--aligner-cpus"}
FLAGS = {"align": ALIGN_FLAGS,
         "local": {**ALIGN_FLAGS, "policy_replicas": None, "reward_replicas": None, "aligners": None},
         "serve": {**ALIGN_FLAGS, "policy_replicas": "--model-replicas", "reward_replicas": "--model-replicas",
                   "aligners": None, "policy_gpus": "--replica-gpus", "reward_gpus": "--replica-gpus",
                   "policy_cpus": "--replica-cpus", "reward_cpus": "--replica-cpus", "aligner_cpus": None}}


def add_plan_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("resource plan (--dry-run)")
    g.add_argument("--dry-run", action="store_true", default=False,
                   help="validate the configuration and models' metadata (no weights are loaded), print the "
                        "resource plan and whether the cluster fits it, then exit (0 fits, 1 does not)")
    g.add_argument("--cluster-gpus", type=int, help="plan for a described cluster with this many GPUs "
                   "instead of the connected one (--address / RAY_ADDRESS) or this machine")
    g.add_argument("--cluster-cpus", type=float, help="CPUs of the described cluster [8 per GPU, at least 8]")
    g.add_argument("--gpus-per-node", type=int, help="GPUs per node of the described cluster; a policy "
                   "replica's tp ranks must share one node [all GPUs on one node]")
    g.add_argument("--gpu-memory-gb", type=float, help="memory per GPU in GiB [from the connected cluster's "
                   f"accelerator type, else {ASSUMED_GPU_GIB}]")
    g.add_argument("--cluster-memory-gb", type=float, help="host RAM of the cluster in GiB, checked for "
                   "actors that run on CPU [the connected cluster's; unchecked for a described one]")
    g.add_argument("--plan-prompt-tokens", type=int, default=512,
                   help="typical prompt length in tokens, for the KV-cache and activation estimates")


# ---------------------------------------------------------------------------------------------
# model metadata
# ---------------------------------------------------------------------------------------------
@dataclass
class ModelInfo:
    spec: str
    params: int
    source: str                       # where the count came from
    layers: int | None = None
    hidden: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    intermediate: int | None = None
    vocab: int | None = None
    context: int | None = None
    classifier: bool | None = None    # a *ForSequenceClassification checkpoint
    num_labels: int | None = None
    missing_weights: bool = False     # a folder with config.json but no weight files


def _text_config(cfg: dict) -> dict:
    """Multimodal configs keep the language model's shapes under text_config."""
    sub = cfg.get("text_config")
    return {**cfg, **sub} if isinstance(sub, dict) else cfg


def _first(cfg: dict, *names, default=None):
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    return default


def shapes_from_config(cfg: dict) -> dict:
    cfg = _text_config(cfg)
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model")
    heads = _first(cfg, "num_attention_heads", "n_head", "num_heads")
    layers = _first(cfg, "num_hidden_layers", "n_layer", "num_layers")
    if not (hidden and heads and layers):
        return {}
    return dict(layers=layers, hidden=hidden, heads=heads,
                kv_heads=_first(cfg, "num_key_value_heads", "num_kv_heads", default=heads),
                head_dim=_first(cfg, "head_dim", default=hidden // heads),
                intermediate=_first(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
                vocab=_first(cfg, "vocab_size", default=0),
                context=_first(cfg, "max_position_embeddings", "n_positions", "max_seq_len"))


def params_from_config(cfg: dict) -> int:
    """Parameter count of a decoder-only transformer from its config's shapes (Llama-style by default:
    gated MLP, RMSNorm, optional biases, tied or separate LM head, MoE experts, classifier head)."""
    s = shapes_from_config(cfg)
    if not s:
        raise ConfigError("config.json lacks hidden_size / num_attention_heads / num_hidden_layers")
    cfg = _text_config(cfg)
    h, L, hd, inter, V = s["hidden"], s["layers"], s["head_dim"], s["intermediate"], s["vocab"]
    q, kv = s["heads"] * hd, s["kv_heads"] * hd
    attn = h * q + 2 * h * kv + q * h
    if cfg.get("attention_bias") or cfg.get("qkv_bias"):
        attn += q + 2 * kv + (h if cfg.get("attention_bias") else 0)
    gated = cfg.get("model_type") not in ("gpt2", "gpt_neox", "opt", "bloom", "falcon", "phi")
    mlp = (3 if gated else 2) * h * inter + (inter * (2 if gated else 1) + h if cfg.get("mlp_bias") else 0)
    experts = _first(cfg, "num_local_experts", "num_experts", "n_routed_experts", default=0)
    if experts:
        moe_inter = _first(cfg, "moe_intermediate_size", default=inter)
        mlp = experts * 3 * h * moe_inter + experts * h
        shared = _first(cfg, "n_shared_experts", default=0)
        if shared:
            mlp += shared * 3 * h * moe_inter
    per_layer = attn + mlp + 2 * h
    total = V * h + L * per_layer + h
    archs = cfg.get("architectures") or []
    if any("SequenceClassification" in a for a in archs):
        total += h * int(cfg.get("num_labels") or len(cfg.get("id2label") or {0: 0}))
    elif not cfg.get("tie_word_embeddings", True):
        total += V * h
    return int(total)


def safetensors_params(folder: Path) -> int | None:
    """Exact element count from safetensors headers: reads each file's JSON header, no tensor data."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, t in header.items():
            if name != "__metadata__":
                total += math.prod(t["shape"])
    return total


def gguf_info(path: Path) -> ModelInfo:
    try:
        from gguf import GGUFReader
        reader = GGUFReader(str(path), "r")    # memory-mapped: tensor metadata only
        params = sum(int(t.n_elements) for t in reader.tensors)
        src = "GGUF tensor metadata"
    except Exception as e:  # noqa: BLE001 - any reader failure falls back to the file size
        params = int(path.stat().st_size * 8 / 4.5)   # ~4.5 bits per weight for common quants
        src = f"GGUF file size at ~4.5 bits/weight (reader failed: {e.__class__.__name__})"
    return ModelInfo(str(path), params, src)


def default_info() -> ModelInfo:
    from ggro.models import cache_dir
    cached = cache_dir() / "smollm2-135m-instruct"
    if (cached / "config.json").exists():
        return folder_info(cached, "default")
    return ModelInfo("default", DEFAULT_PARAMS, "known size of the embedded SmolLM2-135M-Instruct",
                     classifier=False, **DEFAULT_SHAPE)


def folder_info(folder: Path, spec: str) -> ModelInfo:
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise ConfigError(f"{spec} is a folder without config.json: not a Hugging Face model folder")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{cfg_path}: unreadable config.json ({e})") from None
    shapes = shapes_from_config(cfg)
    counted = safetensors_params(folder)
    if counted is not None:
        params, src = counted, "safetensors headers"
    else:
        params, src = params_from_config(cfg), "config.json shapes"
    has_weights = counted is not None or any(folder.glob("*.bin")) or any(folder.glob("*.pt"))
    archs = cfg.get("architectures") or []
    return ModelInfo(spec, params, src, **shapes,
                     classifier=any("SequenceClassification" in a for a in archs) if archs else None,
                     num_labels=cfg.get("num_labels") or (len(cfg["id2label"]) if cfg.get("id2label") else None),
                     missing_weights=not has_weights)


def model_info(spec: str) -> ModelInfo:
    """Metadata for a model spec (the forms ggro.models.resolve accepts), never loading weights."""
    if spec == "default":
        return default_info()
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"GGUF file not found: {spec}")
        return gguf_info(path)
    if path.is_dir():
        return folder_info(path, spec)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ConfigError(f"model path not found: {spec}")
    try:   # a hub id: only its cached config.json is read
        from huggingface_hub import hf_hub_download
        cfg_file = hf_hub_download(spec, "config.json", local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"model {spec!r} is neither a local path nor in the local Hugging Face cache "
                          f"({e.__class__.__name__}); pass a local folder, a .gguf file or 'default'") from None
    return folder_info(Path(cfg_file).parent, spec)


# ---------------------------------------------------------------------------------------------
# resources and clusters
# ---------------------------------------------------------------------------------------------
@dataclass
class Resources:
    tp: int
    policy_gpus: float      # per tp rank
    policy_replicas: int
    reward_replicas: int
    reward_gpus: float      # per reward actor
    policy_cpus: float      # per tp rank
    reward_cpus: float
    aligner_cpus: float
    aligners: int
    serve: bool = False     # `ggro serve`: model deployments instead of actor groups
    local: bool = False     # `--local`: policy and reward in this one process, on --device

    @property
    def cached_batches(self) -> int:
        return IN_PROCESS_CACHED_BATCHES if self.serve or self.local else CACHED_BATCHES

    @property
    def judge_in_policy(self) -> bool:
        """No reward actors: the policy's own weights judge (serve, --local), so the judge's backward counts
        against the policy's memory."""
        return (self.serve or self.local) and self.reward_replicas == 0

    @property
    def mode(self) -> str:
        return "serve" if self.serve else "local" if self.local else "align"

    def flag(self, field: str) -> str:
        """What sets `field` in this job's mode: its flag, else (fixed by the mode) the quantity's name."""
        return FLAGS[self.mode][field] or field.replace("_", " ")

    @classmethod
    def from_args(cls, args, mcfg: ModelConfig) -> Resources:
        def get(name, default):
            v = getattr(args, name, None)
            return default if v is None else v

        on_gpu = 1.0 if mcfg.device.startswith("cuda") else 0.0
        self_judge = mcfg.shares_policy_weights
        if getattr(args, "local", False):
            return cls(tp=1, policy_gpus=on_gpu, policy_replicas=1, reward_replicas=0 if self_judge else 1,
                       reward_gpus=on_gpu, policy_cpus=0, reward_cpus=0, aligner_cpus=0, aligners=1, local=True)
        if hasattr(args, "model_replicas") and not hasattr(args, "policy_replicas"):
            # ggro serve: --model-replicas ModelServer replicas of the policy (and of the reward unless the
            # policy is its own judge, then one deployment holds both), --replica-cpus each, one ingress.
            # With --tp > 1 the policy is a sharded rank group and a self-judge gets its own unsharded copy.
            n, tp = int(get("model_replicas", 1)), int(get("tp", 1))
            cpus, gpus = float(get("replica_cpus", 0.5)), float(get("replica_gpus", 0))
            return cls(tp=tp, policy_gpus=gpus, policy_replicas=n, reward_replicas=0 if self_judge and tp == 1 else n,
                       reward_gpus=gpus, policy_cpus=cpus, reward_cpus=cpus, aligner_cpus=0.1, aligners=1,
                       serve=True)
        return cls(tp=int(get("tp", 1)), policy_gpus=float(get("policy_gpus_per_replica", on_gpu)),
                   policy_replicas=int(get("policy_replicas", 1)), reward_replicas=int(get("reward_replicas", 1)),
                   reward_gpus=float(get("reward_gpus", on_gpu)), policy_cpus=float(get("policy_cpus", 1.0)),
                   reward_cpus=float(get("reward_cpus", 1.0)), aligner_cpus=float(get("aligner_cpus", 0.25)),
                   aligners=int(get("aligners", 1)))


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


def gpu_gib(args, accelerator: str | None = None, device_gib: float | None = None) -> tuple[float, str]:
    """Memory per GPU and where it came from: the flag, else this machine's cuda:0, else the accelerator type."""
    if getattr(args, "gpu_memory_gb", None):
        return float(args.gpu_memory_gb), "--gpu-memory-gb"
    if device_gib:
        return float(device_gib), "read from cuda:0"
    if accelerator:
        for name, gib in ACCELERATOR_GIB.items():      # longest names first in the table
            if name.lower() in accelerator.lower():
                return float(gib), f"accelerator type {accelerator}"
    return float(ASSUMED_GPU_GIB), "assumed; pass --gpu-memory-gb"


def described_cluster(args) -> Cluster:
    n = int(args.cluster_gpus)
    if n < 0:
        raise ConfigError("--cluster-gpus must be >= 0")
    per = int(getattr(args, "gpus_per_node", None) or n)
    if per <= 0 and n:
        raise ConfigError("--gpus-per-node must be >= 1")
    nodes = [per] * (n // per) + ([n % per] if n % per else []) if n else [0]
    cpus = getattr(args, "cluster_cpus", None) or max(8.0, 8.0 * n)
    gib, src = gpu_gib(args)
    return Cluster(f"described: {n} GPUs" + (f", {per} per node" if n else ""), nodes, float(cpus), gib, src,
                   getattr(args, "cluster_memory_gb", None))


def connected_cluster(args, address: str) -> Cluster:
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
    gib, src = gpu_gib(args, acc)
    return Cluster(f"connected: {address} ({len(nodes)} nodes)", node_gpus or [0], cpus, gib, src, mem)


def this_machine(args) -> Cluster:
    gpus, acc, device_gib = 0, None, None
    try:
        import torch
        if torch.cuda.is_available():
            gpus = torch.cuda.device_count()
            acc = torch.cuda.get_device_name(0)
            device_gib = torch.cuda.get_device_properties(0).total_memory / GiB
    except ImportError:
        pass
    gib, src = gpu_gib(args, acc, device_gib)
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    except (ValueError, OSError, AttributeError):
        pass
    return Cluster("this machine (no --cluster-gpus, --address or RAY_ADDRESS)", [gpus],
                   float(os.cpu_count() or 1), gib, src, getattr(args, "cluster_memory_gb", None) or mem)


def find_cluster(args) -> Cluster:
    """The described cluster, else the Ray cluster at --address / RAY_ADDRESS (never for --local, which runs
    in this process), else this machine."""
    if getattr(args, "cluster_gpus", None) is not None:
        return described_cluster(args)
    address = getattr(args, "address", None) or os.environ.get("RAY_ADDRESS")
    if address and not getattr(args, "local", False):
        return connected_cluster(args, address)
    return this_machine(args)


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------
@dataclass
class Group:
    """Actors Ray places on one node together: a policy replica's tp ranks (STRICT_PACK) or one reward actor."""
    name: str
    size: int
    gpu: float              # per actor: fraction of one device
    mem_bytes: float        # per actor: memory on that device


def place(groups: list[Group], node_gpus: list[int]) -> tuple[list[list[float]], list[str]]:
    """First-fit placement like Ray's, for the groups that ask for GPUs. Returns the bytes used on every
    GPU (per node) and the names of the groups that could not be placed."""
    free = [[1.0] * n for n in node_gpus]      # unreserved fraction of every GPU
    used = [[0.0] * n for n in node_gpus]
    unplaced = []
    for group in (g for g in groups if g.gpu > 0):
        for node, room in enumerate(free):
            trial, spots = list(room), []
            for _ in range(group.size):
                gpu = next((i for i, r in enumerate(trial) if r + 1e-9 >= group.gpu), None)
                if gpu is None:
                    break
                trial[gpu] -= group.gpu
                spots.append(gpu)
            else:   # every actor of the group found room on this node
                free[node] = trial
                for gpu in spots:
                    used[node][gpu] += group.mem_bytes
                break
        else:       # no node had room for the whole group
            unplaced.append(group.name)
    return used, unplaced


def share_of(frac: float) -> int:
    """How many actors asking for `frac` of a GPU Ray may put on one device."""
    return max(1, math.floor(1 / frac + 1e-9)) if 0 < frac < 1 else 1


def _gib(b: float) -> str:
    return f"{b / GiB:.2f} GiB" if b < 10 * GiB else f"{b / GiB:.1f} GiB"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


@dataclass
class Estimate:
    policy_rank_bytes: float
    reward_actor_bytes: float
    lines: list[str]        # how each was reached: the policy's, then the reward's


def estimate(pol: ModelInfo, rm: ModelInfo, res: Resources, gcfg: GGROConfig, mcfg: ModelConfig,
             prompt_tokens: int, tp: int | None = None, dtype: str | None = None,
             batch_size: int | None = None) -> Estimate:
    """The memory rule of thumb (see the module docstring), per policy rank and per reward actor.
    tp, dtype and batch_size override the job's, to try fixes."""
    tp = tp or res.tp
    db = DTYPE_BYTES[dtype or mcfg.dtype]
    bs = batch_size or mcfg.batch_size
    on_gpu = res.policy_gpus > 0
    seq = prompt_tokens + gcfg.max_new_tokens
    rows = bs * gcfg.rows_per_prompt             # best-of-n samples and parallel nudges decode side by side
    kv_seqs = bs * res.cached_batches + rows    # the rank's bounded prefix cache + the live (padded) decode batch
    weights = pol.params * db
    kv_per_token = 2 * (pol.layers or 0) * (pol.kv_heads or 0) * (pol.head_dim or 0) * db    # K and V
    kv = kv_seqs * seq * kv_per_token
    policy_rank = (weights + kv) / tp * (1 + HEADROOM) + (CONTEXT_OVERHEAD_GIB * GiB if on_gpu else 0)

    rm_seq = seq + (JUDGE_SUFFIX_TOKENS if mcfg.reward_kind == "judge" else 0)
    per_call = math.ceil(rows / max(1, res.reward_replicas))   # the pool splits each batch across actors
    rm_w = rm.params * db
    act = ACT_FACTOR * per_call * rm_seq * (rm.hidden or 0) * (rm.layers or 0) * db
    reward_actor = (rm_w + act) * (1 + HEADROOM) + (CONTEXT_OVERHEAD_GIB * GiB if res.reward_gpus > 0 else 0)
    if res.judge_in_policy:
        policy_rank += act * (1 + HEADROOM)
    lines = [
        f"policy weights {_gib(weights)} ({_params(pol.params)} x {db} B), KV cache {_gib(kv)} "
        f"({kv_seqs} seqs x {seq} tokens), /tp {tp}"
        + (f", judge backward activations {_gib(act)} ({per_call} seqs x {rm_seq} tokens)"
           if res.judge_in_policy else "")
        + f", +{HEADROOM:.0%}"
        + (f" +{CONTEXT_OVERHEAD_GIB:g} GiB CUDA context" if on_gpu else "")
        + f" = {_gib(policy_rank)} per {'replica' if res.judge_in_policy else 'rank'}",
        f"reward weights {_gib(rm_w)} ({_params(rm.params)} x {db} B), backward activations {_gib(act)} "
        f"({per_call} seqs x {rm_seq} tokens), +{HEADROOM:.0%}"
        + (f" +{CONTEXT_OVERHEAD_GIB:g} GiB CUDA context" if res.reward_gpus > 0 else "")
        + f" = {_gib(reward_actor)} per actor",
    ]
    return Estimate(policy_rank, reward_actor, lines)


def validate(pol: ModelInfo, rm: ModelInfo, res: Resources, gcfg: GGROConfig, mcfg: ModelConfig,
             prompt_tokens: int) -> tuple[list[str], list[str]]:
    """(errors, warnings) about the configuration itself, independent of the cluster."""
    errors, warns = [], []
    cuda = mcfg.device.startswith("cuda")
    if res.tp < 1:
        errors.append("--tp must be >= 1")
    try:
        check_tp_dtype(res.tp, mcfg.dtype)
    except ConfigError as e:
        errors.append(str(e))
    # 0 reward replicas: the policy is its own judge (serve, --local). Serve's --model-replicas sets both replica
    # counts, so only its first (policy, >= 1) failure is reported, never a contradictory "--model-replicas >= 0".
    limits = [("policy_replicas", 1), ("reward_replicas", 0 if res.serve or res.local else 1), ("aligners", 1)]
    limits += [(f, 0) for f in ("policy_gpus", "reward_gpus", "policy_cpus", "reward_cpus", "aligner_cpus")]
    reported = set()
    for field, least in limits:
        if getattr(res, field) < least and res.flag(field) not in reported:
            reported.add(res.flag(field))
            errors.append(f"{res.flag(field)} must be >= {least}")
    gpus_flag = res.flag("policy_gpus")
    if cuda and res.policy_gpus == 0:
        errors.append(f"--device cuda but {gpus_flag} 0: the policy would get no GPU from Ray, so no CUDA device "
                      f"would be visible to it (pass {gpus_flag} 1, or --device cpu)")
    if not cuda and res.policy_gpus > 0:
        errors.append(f"{gpus_flag} {res.policy_gpus:g} with --device {mcfg.device}: the GPUs "
                      "would sit idle (pass --device cuda)")
    if cuda and res.reward_gpus == 0:
        warns.append(f"reward actors run on CPU ({res.flag('reward_gpus')} 0) while the policy is on CUDA: the "
                     "reward backward will be the bottleneck")
    if cuda and res.tp > 1 and 0 < res.policy_gpus < 1:
        errors.append(f"--tp {res.tp} with {gpus_flag} {res.policy_gpus:g}: NCCL cannot run two ranks "
                      f"of one world on the same GPU (pass {gpus_flag} 1)")
    if res.policy_gpus > 1:
        warns.append(f"{gpus_flag} {res.policy_gpus:g}: each tp rank uses one device; "
                     "more than 1 only reserves idle GPUs (raise --tp instead)")
    if cuda and mcfg.dtype == "float32":
        warns.append("float32 on CUDA doubles memory and is slower than --dtype bfloat16")
    if not cuda and mcfg.dtype in ("float16", "bfloat16"):
        warns.append(f"{mcfg.dtype} on CPU is usually slower than float32")
    if pol.heads and res.tp > pol.heads:
        errors.append(f"--tp {res.tp} exceeds the policy's {pol.heads} attention heads")
    elif pol.heads and res.tp > 1 and pol.heads % res.tp:
        warns.append(f"{pol.heads} attention heads over --tp {res.tp}: uneven head split (works, ranks unbalanced)")
    if pol.kv_heads and res.tp > pol.kv_heads:
        warns.append(f"--tp {res.tp} exceeds the policy's {pol.kv_heads} KV heads: KV heads are replicated")
    if pol.classifier:
        errors.append(f"--policy {pol.spec} is a sequence classifier, not a causal LM")
    if mcfg.reward_kind == "classifier":
        if rm.classifier is False and rm.spec != "default":   # default: the shipped head on the default backbone
            errors.append(f"--reward-kind classifier but {rm.spec} is not a *ForSequenceClassification "
                          "checkpoint (use --reward-kind judge for a chat LM)")
        if rm.num_labels not in (None, 1):
            errors.append(f"reward model {rm.spec} has num_labels={rm.num_labels}; a reward classifier "
                          "must output one scalar")
    elif rm.classifier:
        errors.append(f"--reward-kind judge but {rm.spec} is a sequence classifier (use --reward-kind classifier)")
    if rm is not pol and pol.vocab and rm.vocab and pol.vocab != rm.vocab:
        warns.append(f"vocab sizes differ (policy {pol.vocab}, reward {rm.vocab}): GGRO needs one shared "
                     "vocabulary; loading will check the tokenizers")
    if pol.context and prompt_tokens + gcfg.max_new_tokens > pol.context:
        warns.append(f"prompt ({prompt_tokens}) + --max-new-tokens ({gcfg.max_new_tokens}) exceeds the "
                     f"policy's context window {pol.context}: long prompts are rejected per row")
    for m in (pol,) if rm is pol else (pol, rm):
        if m.missing_weights:
            warns.append(f"{m.spec}: no weight files in the folder (config.json only): loading it would fail")
    return errors, warns


def plan(args, gcfg: GGROConfig, mcfg: ModelConfig) -> int:
    prompt_tokens = int(getattr(args, "plan_prompt_tokens", None) or 512)
    pol = model_info(mcfg.policy)
    rm = pol if mcfg.reward_model == mcfg.policy else model_info(mcfg.reward_model)
    res = Resources.from_args(args, mcfg)
    errors, warns = validate(pol, rm, res, gcfg, mcfg, prompt_tokens)

    name = getattr(args, "command", None) or ("serve" if res.serve else "align")
    print(f"ggro {name} --dry-run: resource plan (no weights loaded)")
    for role, m in (("policy", pol), ("reward", rm)):
        shape = (f", {m.layers} layers, hidden {m.hidden}, {m.heads} heads / {m.kv_heads} KV"
                 if m.layers else "")
        print(f"  {role:<7} {m.spec}: {_params(m.params)} params ({m.source}{shape})"
              + (" [same model as the policy]" if role == "reward" and rm is pol else ""))
    print(f"  method {gcfg.method}, dtype {mcfg.dtype}, device {mcfg.device}, batch {mcfg.batch_size}, "
          f"max_new_tokens {gcfg.max_new_tokens}, prompt ~{prompt_tokens} tokens (--plan-prompt-tokens)")
    if errors:
        print("\nINVALID configuration:")
        for e in errors:
            print(f"  - {e}")
        return 2
    if res.local:
        return _plan_local(args, pol, rm, res, gcfg, mcfg, prompt_tokens, warns)
    cluster = find_cluster(args)
    est = estimate(pol, rm, res, gcfg, mcfg, prompt_tokens)
    pol_gpus = res.policy_replicas * res.tp * res.policy_gpus
    rm_gpus = res.reward_replicas * res.reward_gpus
    cpus = (res.policy_replicas * res.tp * res.policy_cpus + res.reward_replicas * res.reward_cpus
            + res.aligners * res.aligner_cpus)
    print("\nplan:")
    print(f"  policy  {res.policy_replicas} replica(s) x tp {res.tp} rank(s) x {res.policy_gpus:g} GPU = "
          f"{pol_gpus:g} GPUs, {res.policy_cpus:g} CPU per rank")
    if res.judge_in_policy:
        print("  reward  the policy replicas themselves (judge on shared weights; their backward is counted there)")
    else:
        print(f"  reward  {res.reward_replicas} actor(s) x {res.reward_gpus:g} GPU = {rm_gpus:g} GPUs, "
              f"{res.reward_cpus:g} CPU each (unsharded: the RM needs input gradients)")
    print(f"  {'ingress' if res.serve else 'aligner'} {res.aligners} actor(s) x {res.aligner_cpus:g} CPU")
    print(f"  total   {pol_gpus + rm_gpus:g} GPUs, {cpus:g} CPUs")
    print("memory (rule of thumb):")
    for line in est.lines:
        print(f"  {line}")
    print(f"\ncluster: {cluster.source}: {cluster.gpus} GPUs on {len(cluster.node_gpus)} node(s) "
          f"{cluster.node_gpus}, {cluster.cpus:g} CPUs, {cluster.gpu_gib:g} GiB per GPU ({cluster.gpu_gib_source})")

    problems: list[tuple[str, str]] = []     # (reason, what to change)
    group_gpus = res.tp * res.policy_gpus
    max_node = max(cluster.node_gpus)
    if pol_gpus + rm_gpus > cluster.gpus + 1e-9:
        spare = cluster.gpus - rm_gpus
        fix = []
        if res.serve:     # one --model-replicas scales the policy and the reward deployments together
            per = group_gpus + (res.reward_gpus if res.reward_replicas else 0)
            if per > 0 and cluster.gpus >= per:
                fix.append(f"{res.flag('policy_replicas')} {int(cluster.gpus // per)}")
        else:
            if group_gpus > 0 and spare >= group_gpus:
                fix.append(f"{res.flag('policy_replicas')} {int(spare // group_gpus)}")
            if res.reward_gpus > 0 and cluster.gpus - pol_gpus >= res.reward_gpus:
                fix.append(f"{res.flag('reward_replicas')} {int((cluster.gpus - pol_gpus) // res.reward_gpus)}")
        fix.append(f"a cluster with >= {math.ceil(pol_gpus + rm_gpus)} GPUs")
        problems.append((f"needs {pol_gpus + rm_gpus:g} GPUs, the cluster has {cluster.gpus}", " or ".join(fix)))
    elif group_gpus > max_node + 1e-9:
        problems.append((f"a policy replica needs {group_gpus:g} GPUs on one node (tp ranks are STRICT_PACKed) "
                         f"but the largest node has {max_node}",
                         f"--tp {max(1, int(max_node // max(res.policy_gpus, 1e-9)))} or nodes with >= "
                         f"{math.ceil(group_gpus)} GPUs"))
    groups = [Group(f"policy replica {r}", res.tp, res.policy_gpus, est.policy_rank_bytes)
              for r in range(res.policy_replicas)]
    groups += [Group(f"reward actor {r}", 1, res.reward_gpus, est.reward_actor_bytes)
               for r in range(res.reward_replicas)]
    used, unplaced = place(groups, cluster.node_gpus)
    if unplaced and not problems:
        problems.append((f"could not place {', '.join(unplaced)} on the nodes {cluster.node_gpus}",
                         "fewer replicas or more GPUs per node"))
    worst = max((m for node in used for m in node), default=0.0)
    if res.policy_gpus > 0 or res.reward_gpus > 0:
        print(f"  most loaded GPU: {_gib(worst)} of {cluster.gpu_gib:g} GiB")
    cap = cluster.gpu_gib * GiB
    role_too_big = False
    for role, frac, each in (("policy", res.policy_gpus, est.policy_rank_bytes),
                             ("reward", res.reward_gpus if res.reward_replicas else 0, est.reward_actor_bytes)):
        if frac <= 0:
            continue
        per_gpu = each * share_of(frac)   # fractional GPUs: Ray may pack 1/frac of them on one device
        if per_gpu > cap:
            role_too_big = True
            problems.append((f"{role}: {_gib(per_gpu)} per GPU exceeds {cluster.gpu_gib:g} GiB",
                             _memory_fix(pol, rm, res, gcfg, mcfg, prompt_tokens, cluster, role)))
    if worst > cap and not role_too_big:
        whole = dict.fromkeys(f"{res.flag(f)} 1" for f in ("policy_gpus", "reward_gpus"))   # serve: one flag
        problems.append((f"actors sharing a GPU need {_gib(worst)} > {cluster.gpu_gib:g} GiB",
                         f"whole GPUs per actor ({' '.join(whole)})"))
    if cpus > cluster.cpus + 1e-9:
        flags = FLAGS[res.mode]     # only the CPU shares this mode lets the user set (serve: --replica-cpus)
        cpu_flags = [f for f in dict.fromkeys(flags[k] for k in ("policy_cpus", "reward_cpus", "aligner_cpus")) if f]
        problems.append((f"needs {cpus:g} CPUs, the cluster has {cluster.cpus:g}",
                         f"smaller {' / '.join(cpu_flags)} (fractions are fine)"
                         + (f" or fewer {flags['aligners']}" if flags["aligners"] else "")))
    host = ((res.policy_replicas * res.tp * est.policy_rank_bytes if res.policy_gpus == 0 else 0)
            + (res.reward_replicas * est.reward_actor_bytes if res.reward_gpus == 0 else 0))
    # GPU tp > 1 ranks load the whole model on the host before sharding it; replicas start one at a time
    load = res.tp * pol.params * DTYPE_BYTES[mcfg.dtype] if res.policy_gpus > 0 and res.tp > 1 else 0
    if host or load:
        parts = []
        if host:
            parts.append(f"{_gib(host)} for CPU actors")
        if load:
            parts.append(f"{_gib(load)} while a replica's {res.tp} GPU ranks load the policy")
        what = " + ".join(parts)
        print(f"  host RAM: {_gib(host + load)}" + (f" of {cluster.memory_gib:.1f} GiB" if cluster.memory_gib
                                                      else " (unchecked)") + f": {what}")
        if cluster.memory_gib and host + load > cluster.memory_gib * GiB:
            problems.append((f"{_gib(host + load)} of host RAM needed ({what}), the cluster has "
                             f"{cluster.memory_gib:.1f} GiB",
                             "fewer replicas, a smaller --batch-size, or GPUs (--device cuda)" if host > load else
                             "nodes with more RAM (each tp rank holds a full copy until it is sharded)"))
    return verdict(warns, problems, "the cluster can hold this plan.")


def _plan_local(args, pol, rm, res, gcfg, mcfg, prompt_tokens, warns) -> int:
    """`--local`: one process holds the policy and the reward model (shared when the policy is the judge)."""
    est = estimate(pol, rm, res, gcfg, mcfg, prompt_tokens)
    need = est.policy_rank_bytes
    if not res.judge_in_policy:     # the reward model shares the process's one CUDA context
        need += est.reward_actor_bytes - (CONTEXT_OVERHEAD_GIB * GiB if res.policy_gpus > 0 else 0)
    print("\nplan (--local: this process, no Ray):")
    print(f"  policy{' + judge (shared weights)' if res.judge_in_policy else ' + reward model'} on {mcfg.device}")
    print("memory (rule of thumb):")
    for line in est.lines[:1] if res.judge_in_policy else est.lines:
        print(f"  {line}")
    print(f"  total {_gib(need)}")
    machine = find_cluster(args)
    problems = []
    if res.policy_gpus > 0:
        print(f"\ndevice: {machine.gpu_gib:g} GiB GPU ({machine.gpu_gib_source}); "
              f"{machine.gpus} GPU(s) {machine.source}")
        if machine.gpus < 1:
            problems.append(("--device cuda but no GPU here", "--device cpu, or run on a GPU machine"))
        elif need > machine.gpu_gib * GiB:
            fix = []
            if mcfg.dtype in ("float32", "float64"):
                fix.append("--dtype bfloat16")
            fix.append("a smaller --batch-size, or the Ray mode (no --local) with --tp > 1 and reward actors "
                       "on their own GPUs")
            problems.append((f"{_gib(need)} exceeds the {machine.gpu_gib:g} GiB GPU", " or ".join(fix)))
    else:
        print(f"\nhost: {machine.cpus:g} CPUs, "
              + (f"{machine.memory_gib:.1f} GiB RAM" if machine.memory_gib else "RAM unknown"))
        if machine.memory_gib and need > machine.memory_gib * GiB:
            problems.append((f"{_gib(need)} exceeds the host's {machine.memory_gib:.1f} GiB RAM",
                             "a smaller --batch-size or model, or the Ray mode on a cluster"))
    return verdict(warns, problems, "this machine can run it.")


def verdict(warns: list[str], problems: list[tuple[str, str]], fits: str) -> int:
    """Print warnings and either the problems with their fixes (exit 1) or FITS (exit 0)."""
    if warns:
        print("warnings:")
        for w in warns:
            print(f"  - {w}")
    if problems:
        print("\nDOES NOT FIT:")
        for reason, fix in problems:
            print(f"  - {reason}\n    change: {fix}")
        return 1
    print(f"\nFITS: {fits}")
    return 0


def _memory_fix(pol, rm, res, gcfg, mcfg, prompt_tokens, cluster, role) -> str:
    """The smallest changes that bring one role under the GPU memory, tried in order."""
    share = share_of(res.policy_gpus if role == "policy" else res.reward_gpus)

    def need(**overrides) -> float:
        e = estimate(pol, rm, res, gcfg, mcfg, prompt_tokens, **overrides)
        return (e.policy_rank_bytes if role == "policy" else e.reward_actor_bytes) * share

    def fits(**overrides) -> bool:
        return need(**overrides) <= cluster.gpu_gib * GiB

    fixes = []
    if share > 1:
        fixes.append(f"whole GPUs per {role} actor ({res.flag(role + '_gpus')} 1)")
    if mcfg.dtype in ("float32", "float64") and fits(dtype="bfloat16"):
        fixes.append("--dtype bfloat16")
    # A serve policy that is its own judge gains an unsharded judge copy at tp > 1, which this estimate does
    # not see: suggest tp only where the reward model is already separate.
    if role == "policy" and not res.judge_in_policy:
        max_tp = min(max(cluster.node_gpus), pol.heads or 64)
        ok = [t for t in range(res.tp + 1, max_tp + 1) if fits(tp=t)]
        tp = next((t for t in ok if not pol.heads or pol.heads % t == 0), ok[0] if ok else None)
        if tp:
            fixes.append(f"--tp {tp}")
    bs = next((b for b in (mcfg.batch_size // 2 ** i for i in range(1, 8)) if b >= 1 and fits(batch_size=b)), None)
    if bs:
        fixes.append(f"--batch-size {bs}")
    if not fixes:
        fixes.append(f"GPUs with >= {math.ceil(need() / GiB)} GiB"
                     + (" (the reward model runs unsharded: it needs input gradients, which AutoTP cannot give)"
                        if role == "reward" else ""))
    return " or ".join(fixes)


def dry_run(args, gcfg: GGROConfig, mcfg: ModelConfig) -> int:
    """Entry point for `--dry-run` (align, dpo, serve): 0 fits, 1 does not fit, 2 invalid."""
    try:
        return plan(args, gcfg, mcfg)
    except ConfigError as e:
        print(f"ggro: error: {e}", file=sys.stderr)
        return 2


def dry_run_args(args) -> int:
    """`--dry-run` for jobs that resolve their configs later (dpo): resolve, then plan."""
    from jobs.common import resolve_args
    try:
        gcfg, mcfg, _ = resolve_args(args)
    except ConfigError as e:
        print(f"ggro: error: {e}", file=sys.stderr)
        return 2
    return dry_run(args, gcfg, mcfg)
