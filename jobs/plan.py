"""`--dry-run`: size a job before paying for it. Validates the configuration and the models' metadata
(never their weights), prints the resource plan and says whether the cluster can hold it.

The model metadata, the memory rule of thumb and GPU packing are pure functions in pipeline/sizing.py;
this module finds the cluster, checks the plan and prints it.

The resource flags (--tp, --policy-replicas, ...) belong to pipeline.ray_align; they are read with
getattr so the planner works whichever of them exist.

Exit status: 0 the plan fits, 1 it does not (the output says what to change), 2 bad configuration.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

from ggro.config import ConfigError, GGROConfig, ModelConfig, check_tp_dtype
from pipeline.sizing import (CACHED_BATCHES, CONTEXT_OVERHEAD_GIB, DTYPE_BYTES, IN_PROCESS_CACHED_BATCHES, GiB, Group,
                             ModelInfo, estimate, fmt_gib, fmt_params, model_info, place, share_of)

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
        print(f"  {role:<7} {m.spec}: {fmt_params(m.params)} params ({m.source}{shape})"
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
        print(f"  most loaded GPU: {fmt_gib(worst)} of {cluster.gpu_gib:g} GiB")
    cap = cluster.gpu_gib * GiB
    role_too_big = False
    for role, frac, each in (("policy", res.policy_gpus, est.policy_rank_bytes),
                             ("reward", res.reward_gpus if res.reward_replicas else 0, est.reward_actor_bytes)):
        if frac <= 0:
            continue
        per_gpu = each * share_of(frac)   # fractional GPUs: Ray may pack 1/frac of them on one device
        if per_gpu > cap:
            role_too_big = True
            problems.append((f"{role}: {fmt_gib(per_gpu)} per GPU exceeds {cluster.gpu_gib:g} GiB",
                             _memory_fix(pol, rm, res, gcfg, mcfg, prompt_tokens, cluster, role)))
    if worst > cap and not role_too_big:
        whole = dict.fromkeys(f"{res.flag(f)} 1" for f in ("policy_gpus", "reward_gpus"))   # serve: one flag
        problems.append((f"actors sharing a GPU need {fmt_gib(worst)} > {cluster.gpu_gib:g} GiB",
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
            parts.append(f"{fmt_gib(host)} for CPU actors")
        if load:
            parts.append(f"{fmt_gib(load)} while a replica's {res.tp} GPU ranks load the policy")
        what = " + ".join(parts)
        print(f"  host RAM: {fmt_gib(host + load)}" + (f" of {cluster.memory_gib:.1f} GiB" if cluster.memory_gib
                                                      else " (unchecked)") + f": {what}")
        if cluster.memory_gib and host + load > cluster.memory_gib * GiB:
            problems.append((f"{fmt_gib(host + load)} of host RAM needed ({what}), the cluster has "
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
    print(f"  total {fmt_gib(need)}")
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
            problems.append((f"{fmt_gib(need)} exceeds the {machine.gpu_gib:g} GiB GPU", " or ".join(fix)))
    else:
        print(f"\nhost: {machine.cpus:g} CPUs, "
              + (f"{machine.memory_gib:.1f} GiB RAM" if machine.memory_gib else "RAM unknown"))
        if machine.memory_gib and need > machine.memory_gib * GiB:
            problems.append((f"{fmt_gib(need)} exceeds the host's {machine.memory_gib:.1f} GiB RAM",
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
