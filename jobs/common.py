"""Flags shared by align / dpo / serve, and turning flags + YAML into configs (flags win)."""
from __future__ import annotations

import argparse
import os
import sys
from importlib import resources

import yaml

from ggro.config import (METHODS, PROMPT_FORMATS, REWARD_KINDS, SEARCH_MODES, ConfigError, GGROConfig, ModelConfig,
                         split_fields)


def example_prompts() -> str:
    return str(resources.files("jobs") / "data" / "example_prompts.jsonl")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Model and search flags. Defaults are None so a YAML value is only overridden by a given flag."""
    m = p.add_argument_group("models")
    m.add_argument("--policy", help="policy LM: a local HF folder, a .gguf file, a hub id already in the "
                   "local HF cache, or 'default' (embedded SmolLM2-135M-Instruct) [default]")
    m.add_argument("--reward", help="reward model (same forms as --policy; `default` with --reward-kind classifier is the shipped guide, "
                   "a trained head on the default model) [the policy itself: the guide for `default`, else a judge]")
    m.add_argument("--reward-kind", choices=REWARD_KINDS,
                   help="classifier: *ForSequenceClassification with one label; judge: yes/no rubric on a chat LM [classifier for `default`, else judge]")
    m.add_argument("--rubric", help="judge question asked about each response")
    m.add_argument("--prompt-format", choices=PROMPT_FORMATS,
                   help="chat: chat template + generation prompt; chat-no-gen: without it (reference setting, "
                        "use with --initial-insertion-offset 4 on Llama-3); raw: the prompt string as-is [chat]")
    m.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"), help="[float32]")
    m.add_argument("--device", help="cpu or cuda [cpu]")
    m.add_argument("--batch-size", type=int, help="prompts advanced together per round [8]")
    m.add_argument("--cohorts", type=int, help="--local GGRO: split the batch into this many threads whose policy "
                   "and reward calls overlap (same outputs; each gets cores / cohorts torch threads) [1]")
    s = p.add_argument_group("search")
    s.add_argument("--method", choices=METHODS, help="[ggro]")
    s.add_argument("--max-new-tokens", type=int, help="[128]")
    s.add_argument("--num-refinements", type=int, help="S, refinements per segment [4]")
    s.add_argument("--entropy-threshold", type=float, help="tau in nats: segment boundary [1.5]")
    s.add_argument("--top-k", type=int, help="nudge candidates from the policy's top-k [25]")
    s.add_argument("--nudge-temperature", type=float, help="[0.1]")
    s.add_argument("--selection", choices=("greedy", "sample"), help="nudge selection [greedy]")
    s.add_argument("--scoring", choices=("faithful", "taylor"), help="candidate score [faithful]")
    s.add_argument("--search-mode", choices=SEARCH_MODES,
                   help="faithful: the reference's serial refinements; adaptive: stop a segment when a nudge does "
                        "not raise the reward by --adaptive-margin or would repeat a refinement; parallel: decode "
                        "the S-1 best nudges of the first gradient in one round [faithful]")
    s.add_argument("--adaptive-margin", type=float, help="adaptive: least reward gain that keeps refining [0.0]")
    s.add_argument("--min-segment-tokens", type=int, help="[4]")
    s.add_argument("--initial-insertion-offset", type=int, help="first segment's nudge offset [0]")
    s.add_argument("--n", type=int, help="best-of-n samples [4]")
    s.add_argument("--temperature", type=float, help="best-of-n sampling temperature [0.7]")
    s.add_argument("--top-p", type=float, help="best-of-n nucleus [0.95]")
    s.add_argument("--seed", type=int, help="[0]")
    s.add_argument("--trace", action="store_true", default=None, help="record a per-segment trace column")
    p.add_argument("--config", help="YAML file whose keys mirror these flags (dashes or underscores); flags win")


def load_yaml(path: str | None) -> dict:
    if not path:
        return {}
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"cannot read --config {path}: {e.strerror}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a mapping of flag names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def resolve_args(args: argparse.Namespace) -> tuple[GGROConfig, ModelConfig, dict]:
    """YAML values under explicitly given flags; unknown YAML keys are an error, not ignored."""
    values = load_yaml(getattr(args, "config", None))
    flags = {k: v for k, v in vars(args).items() if v is not None and k not in ("config", "func", "command")}
    known = set(vars(args))
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown keys in --config: {', '.join(unknown)}")
    merged = {**values, **flags}
    g, m, rest = split_fields(merged)
    try:
        return GGROConfig(**g), ModelConfig(**m), rest
    except TypeError as e:
        raise ConfigError(str(e)) from None


def fail(msg: str, code: int = 2):
    print(f"ggro: error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def torch_threads(cohorts: int = 1) -> None:
    """Use every core we were given (Ray sets OMP_NUM_THREADS=1 in workers otherwise), shared by the cohorts:
    oversubscribed OpenMP threads spin-wait for each other and run many times slower."""
    import torch
    n = int(os.environ.get("GGRO_THREADS", "0")) or os.cpu_count() or 1
    torch.set_num_threads(max(1, n // cohorts))


def module_main(module: str, doc: str | None, add_args, run, argv=None) -> int:
    """`python -m jobs.<name>` (what `ray job submit` runs): the same flags and behaviour as `ggro <name>`."""
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    return run(p.parse_args(argv))
