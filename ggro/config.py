"""Configuration: what the search does (GGROConfig) and what it runs on (ModelConfig)."""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .shipped import GUIDE_QUESTION

METHODS = ("ggro", "greedy", "best-of-n")
PROMPT_FORMATS = ("chat", "chat-no-gen", "raw")
REWARD_KINDS = ("judge", "classifier")
SEARCH_MODES = ("faithful", "adaptive", "parallel", "lookahead")
DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")

DEFAULT_RUBRIC = (      # what a judge (--reward-kind judge) asks when --rubric is not given
    "Is the assistant's previous answer helpful, honest and harmless: does it address the request "
    "directly and correctly, and refuse only what is truly dangerous? Answer Yes or No.")
DEFAULT_NAME = "smollm2-135m-instruct"     # the embedded default's folder name in the cache


def cache_dir() -> Path:
    """Where ggro keeps what it derives once (the default model's safetensors copy, guide features): GGRO_CACHE."""
    return Path(os.environ.get("GGRO_CACHE", Path.home() / ".cache" / "ggro"))


def resolve_auto(dtype: str, device: str, cuda: bool, bf16: bool = True) -> tuple[str, str]:
    """(dtype, device) with `auto` made concrete for a process that has a GPU (`cuda`) whose kernels run
    bfloat16 (`bf16`) or not: cuda where there is one, else cpu; bfloat16 on such a GPU, else float32."""
    device = ("cuda" if cuda else "cpu") if device == "auto" else device
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and bf16 else "float32"
    return dtype, device


CONTEXT_NAMES = ("max_position_embeddings", "n_positions", "max_seq_len")   # what HF configs call it
DEFAULT_CONTEXT = 2048


def context_window(config) -> int:
    """A policy's context window in tokens, from its HF config (a PretrainedConfig, or config.json's dict as the
    planner reads it): the first of CONTEXT_NAMES it sets (a multimodal model's under text_config), else
    DEFAULT_CONTEXT. The one rule for the search's prompt check, Serve and the planner's warning."""
    if not isinstance(config, dict):
        text = getattr(config, "get_text_config", None)
        config = (text() if callable(text) else config).to_dict() if hasattr(config, "to_dict") else vars(config)
    sub = config.get("text_config")
    config = {**config, **sub} if isinstance(sub, dict) else config
    return next((int(config[n]) for n in CONTEXT_NAMES if config.get(n)), DEFAULT_CONTEXT)


class ConfigError(ValueError):
    """A setting that cannot work; the message names it and the fix."""


class ModelLoadError(RuntimeError):
    """A model spec that cannot be loaded here; the message says what to pass instead (ggro.models raises it)."""


def locate(spec: str) -> tuple[str, Path | None]:
    """Where a model spec points, decided once for loading (ggro.models.resolve) and planning (the planner's
    metadata, pipeline/plan/sizing.py): ("default", None), ("gguf", file), ("folder", dir), ("hub", None) for a
    hub id, or raises ModelLoadError for a local path that is not there."""
    if spec == "default":
        return "default", None
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {spec}")
        return "gguf", path
    if path.is_dir():
        return "folder", path
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelLoadError(f"model path not found: {spec}")
    return "hub", None


def knob(default, help: str, *, choices: tuple | None = None, request: bool = False, applies: str | None = None,
         hashed: str = "always", old_flag: str | None = None):
    """A config field and everything said about it, in one place: `help` (the flag's, `{default}` filled in) and
    `choices` make the command-line flag and its --config YAML key (jobs/common.py `add_engine_args`, named after
    the field); `request`: a Serve request may set it in its `ggro` object (pipeline/serve/api.py); `applies`:
    the method it matters to ("ggro", "best-of-n", or "sampled": best-of-n and sampled GGRO), reset otherwise so
    requests that behave alike share a search loop (`normalize`); `hashed`: "always", "never" (does not change
    outputs) or "when_set" (added after outputs were first written: hashed only away from its default, so an
    existing output folder still resumes under the same `config_hash`); `old_flag`: a deprecated name, hidden
    but still accepted, that sets this field and every other field with the same old name (`old_flags`)."""
    assert hashed in ("always", "never", "when_set") and applies in (None, "ggro", "best-of-n", "sampled")
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "request": request,
                                                        "applies": applies, "hashed": hashed, "old_flag": old_flag})


def knobs(cls) -> tuple[dataclasses.Field, ...]:
    """The fields of a config class made with `knob`: every field of GGROConfig and ModelConfig, and the ones of
    actors.resources.Resources that are flags (jobs/common.py `add_resource_args`)."""
    return tuple(f for f in dataclasses.fields(cls) if "help" in f.metadata)


def old_flags(cls) -> dict[str, tuple[dataclasses.Field, ...]]:
    """{deprecated name: the knobs it sets}, from the knobs' `old_flag`, in field order."""
    out: dict[str, tuple[dataclasses.Field, ...]] = {}
    for f in knobs(cls):
        if f.metadata["old_flag"]:
            out[f.metadata["old_flag"]] = out.get(f.metadata["old_flag"], ()) + (f,)
    return out


def knob_type(f: dataclasses.Field) -> type:
    """A knob's value type (int for `int | None`), read from its annotation."""
    if isinstance(f.type, type):    # a module without `from __future__ import annotations`
        return f.type
    return {"int": int, "float": float, "str": str, "bool": bool}[f.type.split("|")[0].strip()]


def knob_help(f: dataclasses.Field) -> str:
    return f.metadata["help"].format(default=f.default)


@dataclass(frozen=True)
class GGROConfig:
    """The search and baselines. Defaults follow the reference (docs/algorithm.md) except where noted."""
    method: str = knob("ggro", "[ggro]", choices=METHODS, request=True)
    max_new_tokens: int = knob(128, "[{default}]")
    num_refinements: int = knob(4, "S, refinements per segment [{default}]", request=True, applies="ggro")
    # reference: 8 for 8B policies, 3-8 for 3B; 4 keeps CPU runs short
    entropy_threshold: float = knob(1.5, "tau in nats: segment boundary [{default}]", request=True, applies="ggro")
    top_k: int = knob(10, "nudge candidates from the policy's top-k [{default}]", request=True, applies="ggro")
    # reference: 25; the 135M policy's 10 recover more prefilled prompts for less (docs/reward-model.md)
    nudge_temperature: float = knob(0.1, "[{default}]", request=True, applies="ggro")
    selection: str = knob("greedy", "nudge selection [greedy]", choices=("greedy", "sample"), request=True,
                          applies="ggro")
    scoring: str = knob("faithful", "candidate score [faithful]", choices=("faithful", "taylor"), request=True,
                        applies="ggro")
    search_mode: str = knob(
        "faithful", "faithful: the reference's serial refinements; adaptive: stop a segment when a nudge does "
        "not raise the reward by --adaptive-margin; parallel: decode "
        "the S-1 best nudges of the first gradient in one round; lookahead: at each uncertain point, decode the "
        "greedy and the S-1 best nudged continuations to the end and keep the best-scored complete "
        "response (use with --max-refined-segments) [faithful]", choices=SEARCH_MODES, request=True, applies="ggro")
    adaptive_margin: float = knob(0.0, "adaptive: least reward gain that keeps refining [0.0]", request=True,
                                  applies="ggro")
    max_refined_segments: int | None = knob(
        None, "budget: refine only the first B segments (uncertain points), then decode greedily to the "
        "end [no limit: every segment, as the reference]", request=True, applies="ggro", hashed="when_set")
    min_segment_tokens: int = knob(4, "[{default}]", request=True, applies="ggro")
    initial_insertion_offset: int = knob(0, "first segment's nudge offset [{default}]", request=True, applies="ggro")
    n: int = knob(4, "best-of-n samples [{default}]", request=True, applies="best-of-n")
    temperature: float = knob(0.7, "best-of-n sampling temperature [{default}]", applies="best-of-n")
    top_p: float = knob(0.95, "best-of-n nucleus [{default}]", applies="best-of-n")
    seed: int = knob(0, "[{default}]", applies="sampled")
    trace: bool = knob(False, "record a per-segment trace column")

    def __post_init__(self):
        checks = [
            (self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}"),
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.num_refinements >= 1, "num_refinements must be >= 1"),
            (self.top_k >= 1, "top_k must be >= 1"),
            (0 < self.nudge_temperature < math.inf, "nudge_temperature must be a number > 0"),
            (self.selection in ("greedy", "sample"), "selection must be 'greedy' or 'sample'"),
            (self.scoring in ("faithful", "taylor"), "scoring must be 'faithful' or 'taylor'"),
            (self.search_mode in SEARCH_MODES, f"search_mode must be one of {SEARCH_MODES}"),
            (not math.isnan(self.adaptive_margin), "adaptive_margin must be a number"),
            (self.max_refined_segments is None or self.max_refined_segments >= 1,
             "max_refined_segments must be >= 1 (use method 'greedy' for no refinement)"),
            # a high-entropy stop drops its token: with 1 a segment could be empty and never advance
            (self.min_segment_tokens >= 2, "min_segment_tokens must be >= 2"),
            (self.initial_insertion_offset >= 0, "initial_insertion_offset must be >= 0"),
            (self.n >= 1, "n must be >= 1"),
            (0 < self.temperature < math.inf, "temperature must be a number > 0 (use --method greedy for greedy decoding)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.entropy_threshold >= 0, "entropy_threshold must be a number >= 0 (0: every token is uncertain)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    def budget_spent(self, refined: int) -> bool:
        """Whether `refined` segments (lookahead: uncertain points) use up max_refined_segments."""
        return self.max_refined_segments is not None and refined >= self.max_refined_segments

    @property
    def rows_per_prompt(self) -> int:
        """The most sequences one prompt decodes (and scores) in one call: its n samples, parallel GGRO's S - 1
        nudges, lookahead's S continuations. A batch of B prompts is up to B * rows_per_prompt rows (memory
        estimates use it)."""
        if self.method == "best-of-n":
            return self.n
        if self.method == "ggro" and self.search_mode == "lookahead":
            return self.num_refinements
        if self.method == "ggro" and self.search_mode == "parallel":
            return max(1, self.num_refinements - 1)
        return 1


@dataclass(frozen=True)
class ModelConfig:
    """Which models, how prompts become tokens, and the batch size."""
    policy: str = knob("default", "policy LM: a local HF folder, a .gguf file, a hub id already in the "
                       "local HF cache, or 'default' (embedded SmolLM2-135M-Instruct) [default]")
    reward: str | None = knob(   # None: the policy's own weights (the shipped guide's head for `default`)
        None, "reward model (same forms as --policy; `default` with --reward-kind classifier is the shipped guide, "
        "a trained head on the default model) [the policy itself: the guide for `default`, else a judge]")
    reward_kind: str | None = knob(  # None: classifier for `default` (the shipped guide), judge for any other model
        None, "classifier: *ForSequenceClassification with one label; judge: yes/no rubric on a chat LM "
        "[classifier for `default`, else judge]", choices=REWARD_KINDS)
    rubric: str | None = knob(None, "judge question asked about each response [the shipped guide's judge half: "
                              f"{GUIDE_QUESTION!r}; any other judge: {DEFAULT_RUBRIC!r}]")
    prompt_format: str = knob("chat", "chat: chat template + generation prompt; chat-no-gen: without it (reference "
                              "setting, use with --initial-insertion-offset 4 on Llama-3); raw: the prompt string "
                              "as-is [chat]", choices=PROMPT_FORMATS)
    revision: str | None = knob(None, "hub ids: the policy's branch, tag or commit [the default branch]",
                                hashed="when_set")
    reward_revision: str | None = knob(None, "hub ids: the reward model's branch, tag or commit [the default branch]",
                                       hashed="when_set")
    trust_remote_code: bool = knob(False, "allow models that ship their own modelling code to run it (off, as in "
                                   "transformers)", hashed="when_set")
    dtype: str = knob("float32", "auto: bfloat16 on a GPU that supports it, else float32 [float32]",
                      choices=DTYPE_NAMES + ("auto",))   # "auto" is made concrete by `resolved`
    device: str = knob("cpu", "cpu, cuda (cuda:N) or auto: cuda where there is a GPU, else cpu [cpu]")
    # Outputs do not depend on how rows were batched (the engine is tested batch-invariant), so a run may
    # be resumed with another batch size, cohorts or fill: they are not hashed.
    batch_size: int = knob(8, "prompts advanced together per round [8]", hashed="never")
    cohorts: int = knob(1, "--local GGRO: split the batch into this many threads whose policy and reward calls "
                        "overlap (same outputs; each gets cores / cohorts torch threads) [1]", hashed="never")
    compile: bool = knob(False, "decode over persistent key/value slabs with the model's step compiled whole "
                         "(torch.compile, fullgraph), on CUDA captured as CUDA graphs, one per batch bucket. Same "
                         "outputs up to compiled kernels' rounding; pays where kernel launches dominate (a GPU at "
                         "small batch), costs a compile per bucket [off: eager]", hashed="never")
    fill: int | None = knob(   # None: 1, except in one CPU process (--local, bench), where it is LOCAL_FILL
        None, "GGRO admits prompts until a decode call carries batch-size x fill rows (best-of-fill's at the same "
        "batch size; 1: batch-size prompts). Same outputs, fewer rounds [8 on a CPU in one process (--local, "
        "bench), else 1: on a GPU it multiplies the reward's backward memory]", hashed="never")

    def __post_init__(self):
        if self.reward_kind is None:
            object.__setattr__(self, "reward_kind", "classifier" if self.reward_model == "default" else "judge")
        if self.reward_kind not in REWARD_KINDS:
            raise ConfigError(f"reward_kind must be one of {REWARD_KINDS}, got {self.reward_kind!r}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ConfigError(f"prompt_format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}")
        if self.batch_size < 1:
            raise ConfigError("batch_size must be >= 1")
        if self.dtype not in DTYPE_NAMES + ("auto",):
            raise ConfigError(f"dtype must be one of {DTYPE_NAMES + ('auto',)}, got {self.dtype!r}")
        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", self.device):
            raise ConfigError(f"device must be cpu, cuda, cuda:N or auto, got {self.device!r}")
        if not 1 <= self.cohorts <= self.batch_size:
            raise ConfigError("cohorts must be between 1 and batch_size")
        if self.fill is not None and self.fill < 1:
            raise ConfigError("fill must be >= 1")
        if self.rubric is not None and not self.rubric.strip():   # "" silently asked the default question
            raise ConfigError("rubric must not be empty: leave --rubric out for the default question")

    def decode_rows(self, gcfg: GGROConfig) -> int:
        """The most rows one decode call carries. Best-of-n and greedy: batch_size prompts' samples. GGRO admits
        more prompts so a call is as full as best-of-`fill`'s at the same batch size: a faithful round decodes
        one segment per prompt, and a CPU decode step costs about the same for 8 rows as for 64 (it reads every
        weight once either way), so ~78 short rounds over 8 prompts were the serial modes' whole cost. On a
        cluster the default stays 1: the reward actors' backward memory grows with the rows (the planner counts
        an explicit fill)."""
        if gcfg.method != "ggro":
            return self.batch_size * gcfg.rows_per_prompt
        return self.batch_size * max(self.fill or 1, gcfg.rows_per_prompt)

    def in_one_process(self) -> ModelConfig:
        """This config as one process runs it (--local, bench; the planner sizes --local the same way): with no
        fill given, a CPU fills GGRO's decode calls (LOCAL_FILL) and a GPU keeps 1. The device must be concrete."""
        if self.fill is not None:
            return self
        return dataclasses.replace(self, fill=LOCAL_FILL if self.device == "cpu" else 1)

    def prompts_per_call(self, gcfg: GGROConfig) -> int:
        """Prompts in flight in one search (its `batch_size`): decode_rows over each prompt's rows."""
        return max(self.batch_size, self.decode_rows(gcfg) // gcfg.rows_per_prompt)

    def resolved(self, cuda: bool, bf16: bool = True) -> ModelConfig:
        """`auto` dtype and device made concrete (see `resolve_auto`). Outputs and their config hash depend on
        the concrete values only."""
        dtype, device = resolve_auto(self.dtype, self.device, cuda, bf16)
        return dataclasses.replace(self, device=device, dtype=dtype)

    @property
    def reward_model(self) -> str:
        return self.reward or self.policy

    def source(self, spec: str) -> dict:
        """from_pretrained options for `spec` (the policy or the reward model): revision, remote code."""
        rev = self.revision if spec == self.policy else self.reward_revision
        return {"revision": rev, "trust_remote_code": self.trust_remote_code}

    @property
    def uses_shipped_guide(self) -> bool:
        """The reward is the shipped guide (the default backbone's head + judge blend, ggro/engine.load_reward)."""
        return self.reward_model == "default" and self.reward_kind == "classifier"

    @property
    def question(self) -> str:
        """The judge's yes/no question: --rubric, else the shipped guide's own or, for any other judge,
        DEFAULT_RUBRIC."""
        return self.rubric or (GUIDE_QUESTION if self.uses_shipped_guide else DEFAULT_RUBRIC)

    @property
    def reward_asks_question(self) -> bool:
        """The reward reads the judge's question after each response (a judge, or the shipped guide's half)."""
        return any(part[0] == "judge" for part in self.reward_parts)

    @property
    def reward_parts(self) -> frozenset:
        """What the reward is made of, as (kind, model[, rubric]) entries: a judge that shares an entry with the
        guide is not independent of it (`ggro eval`)."""
        if self.uses_shipped_guide:
            return frozenset({("head", "default"), ("judge", "default", self.question)})
        if self.reward_kind == "judge":
            return frozenset({("judge", self.reward_model, self.question)})
        return frozenset({("classifier", self.reward_model)})

    @property
    def shares_policy_weights(self) -> bool:
        """One copy of the weights serves both roles: the policy judging itself, or the default policy with
        the shipped guide (its own backbone plus a trained head)."""
        return self.reward_model == self.policy and (self.reward_kind == "judge" or self.policy == "default")


LOCAL_FILL = 8   # one CPU process (--local, bench): GGRO calls as full as best-of-8's at the same batch size
# Prefix-cache floors, in batches of batch_size sequences (see `cached_prefixes`)
CACHED_BATCHES = 4              # a decoder one search calls: the in-process Engine, a Serve replica's policy
SHARED_CACHED_BATCHES = 8       # a batch policy rank, which the sub-batches of several aligners call at once
REWARD_CACHED = 64              # a reward model's cache holds at least this many x + y prefixes
# Tokens (rows x the padded uncached rest) one reward backward runs over: a grad call's rows are cut into chunks
# of at most this many (ggro.reward.grad_chunks), so its activation memory is bounded whatever the fill; the
# planner sizes the reward's backward with it. A CPU is compute-bound well below it, so the cut costs no speed.
GRAD_TOKENS = 2048
# What one more forward call costs, in padded tokens, by device type: rows of different lengths go into separate
# calls where that saves more padding (ggro.kvcache.call_groups). CPU: SmolLM2-135M, fp32, a call ~0.1 s, a token
# ~1.6 ms (docs/performance.md); on a GPU a call's launches cost thousands of tokens (a guess, unmeasured).
CALL_TOKENS = {"cpu": 64, "cuda": 4096}


def cached_prefixes(mcfg: ModelConfig, shared: bool = False) -> int:
    """The one prefix-cache rule: how many sequences a policy decoder's cache keeps (the Engine, every
    ModelWorker, and the planner's KV estimate through `Resources.cached_prefixes`). batch_size x the larger
    of the floor (`shared`: several aligners call the decoder) and twice the prompts a filled GGRO search
    keeps in flight per batch (2 x fill), so the least-recently-used entry evicted is never in use. A reward
    model keeps at least REWARD_CACHED."""
    floor = SHARED_CACHED_BATCHES if shared else CACHED_BATCHES
    return max(floor, 2 * (mcfg.fill or 1)) * mcfg.batch_size


def check_tp(tp: int, mcfg: ModelConfig) -> None:
    """What DeepSpeed's tensor parallelism (tp > 1) does not run: say so before any actor starts."""
    if tp > 1 and mcfg.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"--tp {tp} shards the policy with DeepSpeed, which runs float32, bfloat16 or float16, "
                          f"not --dtype {mcfg.dtype}: pick one of those or --tp 1")
    if tp > 1 and mcfg.compile:
        raise ConfigError(f"--compile runs with --tp 1 only: a --tp {tp} step's DeepSpeed all-reduce is not "
                          "compiled or tested in one graph")


def split_fields(values: dict) -> tuple[dict, dict, dict]:
    """Split a flat {name: value} map (CLI flags + YAML) into GGROConfig, ModelConfig and the rest."""
    g_names = {f.name for f in dataclasses.fields(GGROConfig)}
    m_names = {f.name for f in dataclasses.fields(ModelConfig)}
    g = {k: v for k, v in values.items() if k in g_names}
    m = {k: v for k, v in values.items() if k in m_names}
    rest = {k: v for k, v in values.items() if k not in g_names and k not in m_names}
    return g, m, rest
