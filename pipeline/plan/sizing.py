"""Sizing a GGRO job from the models' metadata, never their weights: parameter counts and shapes, the memory
per policy rank and per reward actor, and packing actor groups onto GPUs. Pure functions; `ggro --dry-run`
(pipeline/plan/planner.py) checks and renders them.

Parameter counts come from, in order: safetensors headers (exact shapes, no tensor data read), the
model's config.json (shapes -> a parameter formula), GGUF tensor metadata, or the known size of the
embedded default. Memory per GPU follows the rule of thumb documented in docs/cluster.md ("The memory rule of thumb"):

    policy rank  = (weights + KV cache) / tp * 1.10 + 1 GiB
    reward actor = (weights + its own prefix cache + activations for the input-gradient backward) * 1.10 + 1 GiB
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from ggro.hf_folder import check_head, safetensors_shapes
from ggro.config import (DEFAULT_NAME, GRAD_TOKENS, REWARD_CACHED, ConfigError, GGROConfig, ModelConfig,
                         ModelLoadError, cache_dir, cached_prefixes, context_window, locate)
from ggro.shipped import HEAD_FILE

GiB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}
CONTEXT_OVERHEAD_GIB = 1.0      # CUDA context + allocator slack, per process on a GPU
HEADROOM = 0.10                 # fragmentation and transient buffers, on top of weights + cache
# A reward backward keeps, per row and layer, ACT_FACTOR x hidden values per token of the row's uncached rest
# (the segment and the judge's question; its cached prefix runs without autograd), and PAST_FACTOR x (2 x kv
# width, plus heads x rest on a CPU, whose SDPA keeps a masked call's attention weights) per token of its
# whole sequence. Measured on the default guide (fp32, CPU): 0.19-0.22 GiB per row at 512 cached + 93 rest
# tokens, 2.0 GiB per 16 rows at 512 + 53 and at 64 + 93 (docs/cluster.md); the rule gives 0.23, 2.3 and 2.2.
ACT_FACTOR = 18
PAST_FACTOR = 1.5
JUDGE_SUFFIX_TOKENS = 64        # the judge's rubric turn appended to every scored response
DEFAULT_PARAMS = 134_515_008    # SmolLM2-135M-Instruct (tied embeddings)
DEFAULT_SHAPE = dict(layers=30, hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536,
                     vocab=49152, context=8192)
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
    shapes = dict(layers=layers, hidden=hidden, heads=heads,
                  kv_heads=_first(cfg, "num_key_value_heads", "num_kv_heads", default=heads),
                  head_dim=_first(cfg, "head_dim", default=None),
                  intermediate=_first(cfg, "intermediate_size", "n_inner", "ffn_dim", default=None),
                  vocab=_first(cfg, "vocab_size", default=0))
    for name, v in shapes.items():      # a hostile or broken config.json: a clear error, not a TypeError later
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < (name != "vocab")):
            raise ConfigError(f"config.json: its {name} is {v!r}, not a positive integer")
    shapes["head_dim"] = shapes["head_dim"] or hidden // heads
    shapes["intermediate"] = shapes["intermediate"] or 4 * hidden
    try:
        return {**shapes, "context": context_window(cfg)}
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.json: its context window is not an integer ({e})") from None


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
    return sum(math.prod(t["shape"]) for f in files for t in safetensors_shapes(f).values())


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
    cached = cache_dir() / DEFAULT_NAME
    if (cached / "config.json").exists():
        return folder_info(cached, "default")
    return ModelInfo("default", DEFAULT_PARAMS, "known size of the embedded SmolLM2-135M-Instruct",
                     classifier=False, **DEFAULT_SHAPE)


def folder_info(folder: Path, spec: str) -> ModelInfo:
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise ModelLoadError(f"{spec} is a folder without config.json: not a Hugging Face model folder")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{cfg_path}: unreadable config.json ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{cfg_path}: config.json holds a {type(cfg).__name__}, not a JSON object")
    shapes = shapes_from_config(cfg)
    counted = safetensors_params(folder)
    if counted is not None:
        params, src = counted, "safetensors headers"
    else:
        params, src = params_from_config(cfg), "config.json shapes"
    has_weights = counted is not None or any(folder.glob("*.bin")) or any(folder.glob("*.pt"))
    archs = cfg.get("architectures") or []
    classifier = any("SequenceClassification" in a for a in archs) if archs else None
    num_labels = cfg.get("num_labels") or (len(cfg["id2label"]) if cfg.get("id2label") else None)
    head = (folder / HEAD_FILE).is_file()     # a causal LM + an MLP guide head: a one-label classifier when loaded
    if head and shapes:
        check_head(spec, folder / HEAD_FILE, shapes["hidden"])
    return ModelInfo(spec, params, src, **shapes, classifier=True if head else classifier,
                     num_labels=1 if head else num_labels, missing_weights=not has_weights)


def model_info(spec: str) -> ModelInfo:
    """Metadata for a model spec (where it points: ggro.config.locate, as ggro.models.resolve loads it), never
    loading weights."""
    kind, path = locate(spec)
    if kind == "default":
        return default_info()
    if kind == "gguf":
        return gguf_info(path)
    if kind == "folder":
        return folder_info(path, spec)
    try:   # a hub id: only its cached config.json is read
        from huggingface_hub import hf_hub_download
        cfg_file = hf_hub_download(spec, "config.json", local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"model {spec!r} is neither a local path nor in the local Hugging Face cache "
                          f"({e.__class__.__name__}); pass a local folder, a .gguf file or 'default'") from None
    return folder_info(Path(cfg_file).parent, spec)


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


def fmt_gib(b: float) -> str:
    return f"{b / GiB:.2f} GiB" if b < 10 * GiB else f"{b / GiB:.1f} GiB"


def fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


@dataclass
class Estimate:
    policy_rank_bytes: float
    reward_actor_bytes: float
    lines: list[str]        # how each was reached: the policy's, then the reward's


def kv_bytes(m: ModelInfo, db: int) -> int:
    """Bytes of K and V per token of a cached sequence."""
    return 2 * (m.layers or 0) * (m.kv_heads or 0) * (m.head_dim or 0) * db


def grad_activations(rm: ModelInfo, rows: int, seq: int, rest: int, db: int, on_cpu: bool) -> tuple[int, float]:
    """(rows, bytes) of the reward's largest backward: `rows` queries of `seq` tokens, the last `rest` of them
    uncached, cut into chunks of GRAD_TOKENS tokens as ggro.reward.grad_chunks cuts them."""
    chunk = min(rows, max(1, GRAD_TOKENS // max(1, rest)))
    width = 2 * (rm.kv_heads or 0) * (rm.head_dim or 0) + ((rm.heads or 0) * rest if on_cpu else 0)
    per_row = (rm.layers or 0) * db * (ACT_FACTOR * rest * (rm.hidden or 0) + PAST_FACTOR * seq * width)
    return chunk, chunk * per_row


def estimate(pol: ModelInfo, rm: ModelInfo, res, gcfg: GGROConfig, mcfg: ModelConfig,
             prompt_tokens: int, tp: int | None = None, dtype: str | None = None,
             batch_size: int | None = None) -> Estimate:
    """The memory rule of thumb (see the module docstring), per policy rank and per reward actor. `res` is the
    job's resources (actors.resources.Resources: tp, replicas, GPUs, cached_prefixes, judge_in_policy); tp, dtype and
    batch_size override the job's, to try fixes."""
    tp = tp or res.tp
    db = DTYPE_BYTES[dtype or mcfg.dtype]
    bs = batch_size or mcfg.batch_size
    on_gpu = res.policy_gpus_per_replica > 0
    seq = prompt_tokens + gcfg.max_new_tokens
    sized = replace(mcfg, batch_size=bs)
    rows = sized.decode_rows(gcfg)   # samples, nudges and GGRO's filled calls side by side
    kv_seqs = res.cached_prefixes(sized) + rows    # the rank's bounded prefix cache + the live (padded) decode batch
    weights = pol.params * db
    kv = kv_seqs * seq * kv_bytes(pol, db)
    policy_rank = (weights + kv) / tp * (1 + HEADROOM) + (CONTEXT_OVERHEAD_GIB * GiB if on_gpu else 0)

    per_call = math.ceil(rows / max(1, res.reward_replicas))   # the pool splits each batch across actors
    question = JUDGE_SUFFIX_TOKENS if mcfg.reward_asks_question else 0
    rest = gcfg.max_new_tokens + question    # at worst a whole response is new to the reward, then its question
    rm_on_gpu = on_gpu if res.judge_in_policy else res.reward_gpus > 0
    chunk, act = grad_activations(rm, per_call, seq + question, rest, db, on_cpu=not rm_on_gpu)
    rm_w = rm.params * db
    # a reward model off the policy's weights keeps its own x + y prefixes (ggro.engine.load_reward)
    rm_kv = 0 if res.judge_in_policy else max(REWARD_CACHED, cached_prefixes(sized)) * seq * kv_bytes(rm, db)
    reward_actor = (rm_w + rm_kv + act) * (1 + HEADROOM) + (CONTEXT_OVERHEAD_GIB * GiB if res.reward_gpus > 0 else 0)
    if res.judge_in_policy:
        policy_rank += act * (1 + HEADROOM)
    backward = (f"backward activations {fmt_gib(act)} ({chunk} of {per_call} seqs per backward x {rest} uncached "
                f"tokens, {seq + question} in all)")
    lines = [
        f"policy weights {fmt_gib(weights)} ({fmt_params(pol.params)} x {db} B), KV cache {fmt_gib(kv)} "
        f"({kv_seqs} seqs x {seq} tokens), /tp {tp}"
        + (f", judge {backward}" if res.judge_in_policy else "")
        + f", +{HEADROOM:.0%}"
        + (f" +{CONTEXT_OVERHEAD_GIB:g} GiB CUDA context" if on_gpu else "")
        + f" = {fmt_gib(policy_rank)} per {'replica' if res.judge_in_policy else 'rank'}",
        f"reward weights {fmt_gib(rm_w)} ({fmt_params(rm.params)} x {db} B), "
        + (f"prefix cache {fmt_gib(rm_kv)}, " if rm_kv else "") + backward + f", +{HEADROOM:.0%}"
        + (f" +{CONTEXT_OVERHEAD_GIB:g} GiB CUDA context" if res.reward_gpus > 0 else "")
        + f" = {fmt_gib(reward_actor)} per actor",
    ]
    return Estimate(policy_rank, reward_actor, lines)
