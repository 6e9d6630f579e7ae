"""`--dry-run`: size a job before paying for it. Checks the configuration against the models' metadata
(never their weights) and the plan against a cluster; every check returns its problems and `render` alone
prints. The metadata, memory rule of thumb and GPU packing are pipeline/plan/sizing.py's; the cluster is
pipeline/plan/clusters.py's. Exit status: 0 the plan fits, 1 it does not (the output says what to change),
2 bad configuration.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from ggro.config import ConfigError, GGROConfig, ModelConfig, check_tp
from pipeline.plan.clusters import Cluster
from actors.resources import Resources
from pipeline.plan.sizing import (CONTEXT_OVERHEAD_GIB, DTYPE_BYTES, GiB, Estimate, Group, ModelInfo, estimate, fmt_gib,
                             fmt_params, place, share_of)

GPU_FIELD = {"policy": "policy_gpus_per_replica", "reward": "reward_gpus"}
Problem = tuple[str, str]      # (reason, what to change)


@dataclass
class Plan:
    pol: ModelInfo
    rm: ModelInfo
    res: Resources               # what the job starts (Resources.started)
    gcfg: GGROConfig
    mcfg: ModelConfig
    prompt_tokens: int
    errors: list[str] = field(default_factory=list)
    warns: list[str] = field(default_factory=list)
    cluster: Cluster | None = None
    est: Estimate | None = None
    worst: float = 0.0           # bytes on the most loaded GPU
    host: float = 0.0            # host RAM of the actors that run on CPU
    load: float = 0.0            # host RAM while GPU tp ranks load the policy
    problems: list[Problem] = field(default_factory=list)

    def fits(self, **overrides) -> Estimate:
        return estimate(self.pol, self.rm, self.res, self.gcfg, self.mcfg, self.prompt_tokens, **overrides)


# -- the configuration itself ---------------------------------------------------------------------------
def resource_errors(res: Resources, mcfg: ModelConfig) -> tuple[list[str], list[str]]:
    """(errors, warnings) about the resources (as started: `Resources.started`) and the device."""
    errors, warns = [], []
    cuda = mcfg.device.startswith("cuda")
    try:
        check_tp(res.tp, mcfg)
    except ConfigError as e:
        errors.append(str(e))
    gpus, flag = res.policy_gpus_per_replica, res.flag("policy_gpus_per_replica")
    if cuda and gpus == 0:
        errors.append(f"--device cuda but {flag} 0: the policy would get no GPU from Ray, so no CUDA device "
                      f"would be visible to it (pass {flag} 1, or --device cpu)")
    if not cuda and gpus > 0:
        errors.append(f"{flag} {gpus:g} with --device {mcfg.device}: the GPUs would sit idle (pass --device cuda)")
    if cuda and res.reward_gpus == 0 and not res.judge_in_policy:
        warns.append(f"reward actors run on CPU ({res.flag('reward_gpus')} 0) while the policy is on CUDA: the "
                     "reward backward will be the bottleneck")
    if cuda and res.tp > 1 and 0 < gpus < 1:
        errors.append(f"--tp {res.tp} with {flag} {gpus:g}: NCCL cannot run two ranks "
                      f"of one world on the same GPU (pass {flag} 1)")
    if gpus > 1:
        warns.append(f"{flag} {gpus:g}: each tp rank uses one device; "
                     "more than 1 only reserves idle GPUs (raise --tp instead)")
    if cuda and mcfg.dtype == "float32":
        warns.append("float32 on CUDA doubles memory and is slower than --dtype bfloat16")
    if not cuda and mcfg.dtype in ("float16", "bfloat16"):
        warns.append(f"{mcfg.dtype} on CPU is usually slower than float32")
    return errors, warns


def model_errors(pol: ModelInfo, rm: ModelInfo, tp: int, gcfg: GGROConfig, mcfg: ModelConfig,
                 prompt_tokens: int) -> tuple[list[str], list[str]]:
    """(errors, warnings) about the models' metadata against the flags."""
    errors, warns = [], []
    if pol.heads and tp > pol.heads:
        errors.append(f"--tp {tp} exceeds the policy's {pol.heads} attention heads")
    elif pol.heads and tp > 1 and pol.heads % tp:
        warns.append(f"{pol.heads} attention heads over --tp {tp}: uneven head split (works, ranks unbalanced)")
    if pol.kv_heads and tp > pol.kv_heads:
        warns.append(f"--tp {tp} exceeds the policy's {pol.kv_heads} KV heads: KV heads are replicated")
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


def validate(pol: ModelInfo, rm: ModelInfo, res: Resources, gcfg: GGROConfig, mcfg: ModelConfig,
             prompt_tokens: int) -> tuple[list[str], list[str]]:
    """(errors, warnings) about the configuration itself, independent of the cluster."""
    e1, w1 = resource_errors(res, mcfg)
    e2, w2 = model_errors(pol, rm, res.tp, gcfg, mcfg, prompt_tokens)
    return e1 + e2, w1 + w2


# -- the plan against a cluster -------------------------------------------------------------------------
def make_plan(pol: ModelInfo, rm: ModelInfo, res: Resources, gcfg: GGROConfig, mcfg: ModelConfig,
              prompt_tokens: int, find: Callable[[], Cluster]) -> Plan:
    """The checked plan; `find` (which may connect to Ray) is called only for a valid configuration."""
    if res.mode == "local":
        mcfg = mcfg.in_one_process()    # the fill the run's one process gets
    p = Plan(pol, rm, res.started(mcfg), gcfg, mcfg, prompt_tokens)
    p.errors, p.warns = validate(pol, rm, p.res, gcfg, mcfg, prompt_tokens)
    p.errors[:0] = res.problems()      # the flags as given (started: no reward actors for a self-judge)
    if p.errors:
        return p
    p.est, p.cluster = p.fits(), find()
    if p.res.mode == "local":
        p.problems = local_problems(p)
        return p
    p.worst, unplaced = gpu_load(p.res, p.est, p.cluster)
    p.host, p.load = host_ram(p)
    p.problems = gpu_count_problems(p.res, p.cluster)
    if unplaced and not p.problems:
        p.problems.append((f"could not place {', '.join(unplaced)} on the nodes {p.cluster.node_gpus}",
                           "fewer replicas or more GPUs per node"))
    p.problems += memory_problems(p) + cpu_problems(p.res, p.cluster) + host_problems(p)
    return p


def gpu_count_problems(res: Resources, cluster: Cluster) -> list[Problem]:
    pol_gpus, rm_gpus = res.policy_gpus, res.reward_gpus_total
    group_gpus, max_node = res.tp * res.policy_gpus_per_replica, max(cluster.node_gpus)
    if pol_gpus + rm_gpus > cluster.gpus + 1e-9:
        spare, fix = cluster.gpus - rm_gpus, []
        if group_gpus > 0 and spare >= group_gpus:
            fix.append(f"{res.flag('policy_replicas')} {int(spare // group_gpus)}")
        if res.reward_gpus > 0 and cluster.gpus - pol_gpus >= res.reward_gpus:
            fix.append(f"{res.flag('reward_replicas')} {int((cluster.gpus - pol_gpus) // res.reward_gpus)}")
        fix.append(f"a cluster with >= {math.ceil(pol_gpus + rm_gpus)} GPUs")
        return [(f"needs {pol_gpus + rm_gpus:g} GPUs, the cluster has {cluster.gpus}", " or ".join(fix))]
    if group_gpus > max_node + 1e-9:
        return [(f"a policy replica needs {group_gpus:g} GPUs on one node (tp ranks are STRICT_PACKed) "
                 f"but the largest node has {max_node}",
                 f"--tp {max(1, int(max_node // max(res.policy_gpus_per_replica, 1e-9)))} or nodes with >= "
                 f"{math.ceil(group_gpus)} GPUs")]
    return []


def gpu_load(res: Resources, est: Estimate, cluster: Cluster) -> tuple[float, list[str]]:
    """(bytes on the most loaded GPU, groups that could not be placed) under Ray-like first-fit placement."""
    groups = [Group(f"policy replica {r}", res.tp, res.policy_gpus_per_replica, est.policy_rank_bytes)
              for r in range(res.policy_replicas)]
    groups += [Group(f"reward actor {r}", 1, res.reward_gpus, est.reward_actor_bytes)
               for r in range(res.reward_replicas)]
    used, unplaced = place(groups, cluster.node_gpus)
    return max((m for node in used for m in node), default=0.0), unplaced


def memory_problems(p: Plan) -> list[Problem]:
    res, cap, problems = p.res, p.cluster.gpu_gib * GiB, []
    for role, frac, each in (("policy", res.policy_gpus_per_replica, p.est.policy_rank_bytes),
                             ("reward", res.reward_gpus if res.reward_replicas else 0, p.est.reward_actor_bytes)):
        per_gpu = each * share_of(frac)   # fractional GPUs: Ray may pack 1/frac of them on one device
        if frac > 0 and per_gpu > cap:
            problems.append((f"{role}: {fmt_gib(per_gpu)} per GPU exceeds {p.cluster.gpu_gib:g} GiB",
                             memory_fix(p, role)))
    if p.worst > cap and not problems:
        whole = dict.fromkeys(f"{res.flag(f)} 1" for f in GPU_FIELD.values())
        problems.append((f"actors sharing a GPU need {fmt_gib(p.worst)} > {p.cluster.gpu_gib:g} GiB",
                         f"whole GPUs per actor ({' '.join(whole)})"))
    return problems


def memory_fix(p: Plan, role: str) -> str:
    """The smallest changes that bring one role under the GPU memory, tried in order."""
    res, mcfg, cluster = p.res, p.mcfg, p.cluster
    share = share_of(getattr(res, GPU_FIELD[role]))

    def need(**overrides) -> float:
        e = p.fits(**overrides)
        return (e.policy_rank_bytes if role == "policy" else e.reward_actor_bytes) * share

    def fits(**overrides) -> bool:
        return need(**overrides) <= cluster.gpu_gib * GiB

    fixes = []
    if share > 1:
        fixes.append(f"whole GPUs per {role} actor ({res.flag(GPU_FIELD[role])} 1)")
    if mcfg.dtype in ("float32", "float64") and fits(dtype="bfloat16"):
        fixes.append("--dtype bfloat16")
    # A serve policy that is its own judge gains an unsharded judge copy at tp > 1, which this estimate does
    # not see: suggest tp only where the reward model is already separate.
    if role == "policy" and not res.judge_in_policy:
        max_tp = min(max(cluster.node_gpus), p.pol.heads or 64)
        ok = [t for t in range(res.tp + 1, max_tp + 1) if fits(tp=t)]
        tp = next((t for t in ok if not p.pol.heads or p.pol.heads % t == 0), ok[0] if ok else None)
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


def cpu_problems(res: Resources, cluster: Cluster) -> list[Problem]:
    if res.cpus <= cluster.cpus + 1e-9:
        return []
    # only the CPU shares this mode lets the user set
    flags = [res.flag(f) for f in ("policy_cpus", "reward_cpus", "aligner_cpus") if res.flag(f).startswith("--")]
    fewer = res.flag("aligners")
    return [(f"needs {res.cpus:g} CPUs, the cluster has {cluster.cpus:g}",
             f"smaller {' / '.join(flags)} (fractions are fine)" + (f" or fewer {fewer}" if fewer.startswith("--")
                                                                    else ""))]


def host_ram(p: Plan) -> tuple[float, float]:
    """(bytes of the actors that run on CPU, bytes while GPU tp ranks load the whole policy on the host)."""
    res = p.res
    host = ((res.policy_replicas * res.tp * p.est.policy_rank_bytes if res.policy_gpus_per_replica == 0 else 0)
            + (res.reward_replicas * p.est.reward_actor_bytes if res.reward_gpus == 0 else 0))
    # GPU tp > 1 ranks load the whole model on the host before sharding it; replicas start one at a time
    gpu_tp = res.policy_gpus_per_replica > 0 and res.tp > 1
    return host, res.tp * p.pol.params * DTYPE_BYTES[p.mcfg.dtype] if gpu_tp else 0


def host_what(p: Plan) -> str:
    parts = [f"{fmt_gib(p.host)} for CPU actors"] if p.host else []
    if p.load:
        parts.append(f"{fmt_gib(p.load)} while a replica's {p.res.tp} GPU ranks load the policy")
    return " + ".join(parts)


def host_problems(p: Plan) -> list[Problem]:
    mem = p.cluster.memory_gib
    if not mem or p.host + p.load <= mem * GiB:
        return []
    return [(f"{fmt_gib(p.host + p.load)} of host RAM needed ({host_what(p)}), the cluster has {mem:.1f} GiB",
             "fewer replicas, a smaller --batch-size, or GPUs (--device cuda)" if p.host > p.load else
             "nodes with more RAM (each tp rank holds a full copy until it is sharded)")]


def local_need(p: Plan) -> float:
    """`--local`: one process holds the policy and the reward model (shared when the policy is the judge)."""
    need = p.est.policy_rank_bytes
    if not p.res.judge_in_policy:     # the reward model shares the process's one CUDA context
        need += p.est.reward_actor_bytes - (CONTEXT_OVERHEAD_GIB * GiB if p.res.policy_gpus_per_replica > 0 else 0)
    return need


def local_problems(p: Plan) -> list[Problem]:
    need, machine = local_need(p), p.cluster
    if p.res.policy_gpus_per_replica <= 0:
        if machine.memory_gib and need > machine.memory_gib * GiB:
            return [(f"{fmt_gib(need)} exceeds the host's {machine.memory_gib:.1f} GiB RAM",
                     "a smaller --batch-size or model, or the Ray mode on a cluster")]
        return []
    if machine.gpus < 1:
        return [("--device cuda but no GPU here", "--device cpu, or run on a GPU machine")]
    if need <= machine.gpu_gib * GiB:
        return []
    fix = ["--dtype bfloat16"] if p.mcfg.dtype in ("float32", "float64") else []
    fix.append("a smaller --batch-size, or the Ray mode (no --local) with --tp > 1 and reward actors "
               "on their own GPUs")
    return [(f"{fmt_gib(need)} exceeds the {machine.gpu_gib:g} GiB GPU", " or ".join(fix))]


# -- the one place that prints ----------------------------------------------------------------------------
def render(p: Plan, command: str) -> tuple[str, int]:
    """The plan as text, and the exit status: 0 fits, 1 does not fit, 2 invalid."""
    lines = [f"ggro {command} --dry-run: resource plan (no weights loaded)"]
    for role, m in (("policy", p.pol), ("reward", p.rm)):
        shape = f", {m.layers} layers, hidden {m.hidden}, {m.heads} heads / {m.kv_heads} KV" if m.layers else ""
        lines.append(f"  {role:<7} {m.spec}: {fmt_params(m.params)} params ({m.source}{shape})"
                     + (" [same model as the policy]" if role == "reward" and p.rm is p.pol else ""))
    lines.append(f"  method {p.gcfg.method}, dtype {p.mcfg.dtype}, device {p.mcfg.device}, batch "
                 f"{p.mcfg.batch_size}, max_new_tokens {p.gcfg.max_new_tokens}, prompt ~{p.prompt_tokens} tokens "
                 "(--plan-prompt-tokens)")
    if p.errors:
        return "\n".join(lines + ["\nINVALID configuration:"] + [f"  - {e}" for e in p.errors]), 2
    lines += _local_lines(p) if p.res.mode == "local" else _cluster_lines(p)
    if p.warns:
        lines += ["warnings:"] + [f"  - {w}" for w in p.warns]
    if p.problems:
        lines.append("\nDOES NOT FIT:")
        lines += [f"  - {reason}\n    change: {fix}" for reason, fix in p.problems]
        return "\n".join(lines), 1
    fits = "this machine can run it." if p.res.mode == "local" else "the cluster can hold this plan."
    return "\n".join(lines + [f"\nFITS: {fits}"]), 0


def _cluster_lines(p: Plan) -> list[str]:
    res, c = p.res, p.cluster
    pol_gpus, rm_gpus = res.policy_gpus, res.reward_gpus_total
    lines = ["\nplan:", f"  policy  {res.policy_replicas} replica(s) x tp {res.tp} rank(s) x "
             f"{res.policy_gpus_per_replica:g} GPU = {pol_gpus:g} GPUs, {res.policy_cpus:g} CPU per rank"]
    if res.judge_in_policy:
        lines.append("  reward  the policy replicas themselves (judge on shared weights; their backward is counted "
                     "there)")
    else:
        lines.append(f"  reward  {res.reward_replicas} actor(s) x {res.reward_gpus:g} GPU = {rm_gpus:g} GPUs, "
                     f"{res.reward_cpus:g} CPU each (unsharded: the RM needs input gradients)")
    lines.append(f"  {'ingress' if res.mode == 'serve' else 'aligner'} {res.aligners} actor(s) x "
                 f"{res.aligner_cpus:g} CPU")
    lines.append(f"  total   {pol_gpus + rm_gpus:g} GPUs, {res.cpus:g} CPUs")
    lines += ["memory (rule of thumb):"] + [f"  {line}" for line in p.est.lines]
    lines.append(f"\ncluster: {c.source}: {c.gpus} GPUs on {len(c.node_gpus)} node(s) {c.node_gpus}, {c.cpus:g} "
                 f"CPUs, {c.gpu_gib:g} GiB per GPU ({c.gpu_gib_source})")
    if res.policy_gpus_per_replica > 0 or res.reward_gpus > 0:
        lines.append(f"  most loaded GPU: {fmt_gib(p.worst)} of {c.gpu_gib:g} GiB")
    if p.host or p.load:
        of = f" of {c.memory_gib:.1f} GiB" if c.memory_gib else " (unchecked)"
        lines.append(f"  host RAM: {fmt_gib(p.host + p.load)}{of}: {host_what(p)}")
    return lines


def _local_lines(p: Plan) -> list[str]:
    judge, m = p.res.judge_in_policy, p.cluster
    lines = ["\nplan (--local: this process, no Ray):",
             f"  policy{' + judge (shared weights)' if judge else ' + reward model'} on {p.mcfg.device}",
             "memory (rule of thumb):"]
    lines += [f"  {line}" for line in (p.est.lines[:1] if judge else p.est.lines)]
    lines.append(f"  total {fmt_gib(local_need(p))}")
    if p.res.policy_gpus_per_replica > 0:
        lines.append(f"\ndevice: {m.gpu_gib:g} GiB GPU ({m.gpu_gib_source}); {m.gpus} GPU(s) {m.source}")
    else:
        lines.append(f"\nhost: {m.cpus:g} CPUs, " + (f"{m.memory_gib:.1f} GiB RAM" if m.memory_gib else "RAM unknown"))
    return lines
