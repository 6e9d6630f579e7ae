"""Flags shared by align / dpo / serve, and turning flags + YAML into configs (flags win)."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
from importlib import resources

import yaml

from ggro.config import (DTYPE_NAMES, METHODS, PROMPT_FORMATS, REWARD_KINDS, SEARCH_MODES, ConfigError, GGROConfig,
                         ModelConfig, split_fields)
from actors.resources import Resources


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
    m.add_argument("--revision", help="hub ids: the policy's branch, tag or commit [the default branch]")
    m.add_argument("--reward-revision", help="hub ids: the reward model's branch, tag or commit [the default branch]")
    m.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="allow models that ship their own modelling code to run it (off, as in transformers)")
    m.add_argument("--dtype", choices=DTYPE_NAMES + ("auto",),
                   help="auto: bfloat16 on a GPU that supports it, else float32 [float32]")
    m.add_argument("--device", help="cpu, cuda (cuda:N) or auto: cuda where there is a GPU, else cpu [cpu]")
    m.add_argument("--batch-size", type=int, help="prompts advanced together per round [8]")
    m.add_argument("--cohorts", type=int, help="--local GGRO: split the batch into this many threads whose policy "
                   "and reward calls overlap (same outputs; each gets cores / cohorts torch threads) [1]")
    m.add_argument("--fill", type=int, help="GGRO admits prompts until a decode call carries batch-size x fill rows "
                   "(best-of-fill's at the same batch size; 1: batch-size prompts). Same outputs, fewer rounds "
                   "[8 on a CPU in one process (--local, bench), else 1: on a GPU it multiplies the reward's backward memory]")
    s = p.add_argument_group("search")
    s.add_argument("--method", choices=METHODS, help="[ggro]")
    plain = (("max_new_tokens", int, ""), ("num_refinements", int, "S, refinements per segment"),
             ("entropy_threshold", float, "tau in nats: segment boundary"),
             ("top_k", int, "nudge candidates from the policy's top-k"), ("nudge_temperature", float, ""))
    for name, typ, text in plain:      # the default shown is GGROConfig's own
        s.add_argument("--" + name.replace("_", "-"), type=typ, help=f"{text} [{getattr(GGRO_DEFAULTS, name)}]".lstrip())
    s.add_argument("--selection", choices=("greedy", "sample"), help="nudge selection [greedy]")
    s.add_argument("--scoring", choices=("faithful", "taylor"), help="candidate score [faithful]")
    s.add_argument("--search-mode", choices=SEARCH_MODES,
                   help="faithful: the reference's serial refinements; adaptive: stop a segment when a nudge does "
                        "not raise the reward by --adaptive-margin or would repeat a refinement; parallel: decode "
                        "the S-1 best nudges of the first gradient in one round; lookahead: at each uncertain point, decode the "
                        "greedy and the S-1 best nudged continuations to the end and keep the best-scored complete "
                        "response (use with --max-refined-segments) [faithful]")
    s.add_argument("--adaptive-margin", type=float, help="adaptive: least reward gain that keeps refining [0.0]")
    s.add_argument("--max-refined-segments", type=int,
                   help="budget: refine only the first B segments (uncertain points), then decode greedily to the "
                        "end [no limit: every segment, as the reference]")
    plain = (("min_segment_tokens", int, ""), ("initial_insertion_offset", int, "first segment's nudge offset"),
             ("n", int, "best-of-n samples"), ("temperature", float, "best-of-n sampling temperature"),
             ("top_p", float, "best-of-n nucleus"), ("seed", int, ""))
    for name, typ, text in plain:
        s.add_argument("--" + name.replace("_", "-"), type=typ, help=f"{text} [{getattr(GGRO_DEFAULTS, name)}]".lstrip())
    s.add_argument("--trace", action="store_true", default=None, help="record a per-segment trace column")
    p.add_argument("--config", help="YAML file whose keys mirror these flags (dashes or underscores); flags win")


GGRO_DEFAULTS = GGROConfig()

# `ggro serve`'s old names for the resources: hidden, still accepted (scripts use them); each sets both roles
DEPRECATED = {"model_replicas": ("policy_replicas", "reward_replicas"), "replica_cpus": ("policy_cpus", "reward_cpus"),
              "replica_gpus": ("policy_gpus_per_replica", "reward_gpus")}


def add_resource_args(g, aligners: bool = True) -> None:
    """The resource flags of align, dpo and serve; their defaults are actors.resources.Resources'."""
    d = Resources()
    g.add_argument("--tp", type=int, default=d.tp, help="tensor-parallel degree of each policy replica "
                   "(DeepSpeed AutoTP; gloo on CPU, NCCL on GPU)")
    g.add_argument("--policy-gpus-per-replica", type=float, default=d.policy_gpus_per_replica,
                   help="GPUs per TP rank of a policy replica (0: CPU)")
    g.add_argument("--policy-replicas", type=int, default=d.policy_replicas,
                   help="policy replicas (each --tp rank actors)")
    g.add_argument("--policy-cpus", type=float, default=d.policy_cpus, help="CPU share per policy TP rank")
    g.add_argument("--reward-replicas", type=int, default=d.reward_replicas,
                   help="reward-model actors (batches split across them)")
    g.add_argument("--reward-gpus", type=float, default=d.reward_gpus, help="GPUs per reward actor (0: CPU)")
    g.add_argument("--reward-cpus", type=float, default=d.reward_cpus, help="CPU share per reward actor")
    if aligners:
        g.add_argument("--aligners", type=int, default=d.aligners, help="aligner actor pool size (Ray Data map_batches)")
        g.add_argument("--aligner-cpus", type=float, default=d.aligner_cpus, help="CPU share per aligner actor")
    else:
        for old, new in DEPRECATED.items():
            g.add_argument("--" + old.replace("_", "-"), type=int if "replicas" in old else float,
                           help=argparse.SUPPRESS)


def resources_from_args(args: argparse.Namespace, mode: str, **fixed) -> Resources:
    """Resources from the parsed flags; a deprecated serve name, when given, sets both of its roles."""
    names = [f.name for f in dataclasses.fields(Resources) if f.name != "mode"]
    values = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    for old, new in DEPRECATED.items():
        if getattr(args, old, None) is not None:
            flags = " and ".join("--" + n.replace("_", "-") for n in new)
            print(f"ggro: --{old.replace('_', '-')} is deprecated, use {flags}", file=sys.stderr)
            values.update(dict.fromkeys(new, getattr(args, old)))
    return Resources(**{**values, **fixed}, mode=mode)


def load_yaml(path: str | None) -> dict:
    """The --config file as {key as written: value}."""
    if not path:
        return {}
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"cannot read --config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ConfigError(f"--config {path} must hold a mapping of flag names to values")
    return data


_UNSET = object()   # "not on the command line": stands in for every default while parsing


def yaml_keys(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every option of `parser` that a --config key can set, by key (flag name without dashes, `_` for `-`)."""
    keys = {}
    for a in parser._actions:
        if not a.option_strings or a.dest in ("help", "config") or a.dest is argparse.SUPPRESS:
            continue
        keys[a.dest] = a
        for o in a.option_strings:
            if o.startswith("--"):
                keys[o[2:].replace("-", "_")] = a
    return keys


def yaml_value(parser: argparse.ArgumentParser, action: argparse.Action, key: str, value):
    """A YAML value checked and converted the way argparse treats the flag's command-line string."""
    if isinstance(action, argparse._StoreConstAction):    # store_true / store_false / store_const
        if not isinstance(value, bool):
            raise ConfigError(f"--config key {key!r} must be true or false, got {value!r}")
        return action.const if value else action.default
    if not isinstance(action, argparse._StoreAction):
        raise ConfigError(f"--config key {key!r}: flag {action.option_strings[0]} cannot be set from YAML")
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    items = value if many and isinstance(value, list) else [value]
    if isinstance(value, list) and not many:   # a list for a comma-separated flag (bench's --best-of-n)
        items = [",".join(str(v) for v in value)]
    out = []
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise ConfigError(f"--config key {key!r} must be {_kind(action)}, got {v!r}")
        if action.type is int and isinstance(v, float):
            raise ConfigError(f"--config key {key!r} must be an integer, got {v!r}")
        try:
            v = parser._get_value(action, str(v)) if action.type not in (None, str) else str(v)
            parser._check_value(action, v)
        except argparse.ArgumentError as e:
            raise ConfigError(f"--config key {key!r}: {e.message}") from None
        out.append(v)
    return out if many else out[0]


def _kind(action: argparse.Action) -> str:
    return {int: "an integer", float: "a number"}.get(action.type, "a string")


class Parser(argparse.ArgumentParser):
    """argparse plus --config: a YAML key sets any flag that was not given on the command line.

    The one merge rule: command line > YAML > the flag's default. Keys are the long flag names (dashes
    or underscores); a YAML value is checked like the flag's own string would be (type, choices,
    true/false for switches), and unknown keys or wrong types are errors naming the key. Subparsers
    (`ggro align`, ...) are built from this class too, so `args` leaves parse_args fully resolved.
    """

    def parse_known_args(self, args=None, namespace=None):
        namespace = namespace if namespace is not None else argparse.Namespace()
        mine = [a for a in self._actions if a.dest is not argparse.SUPPRESS and not hasattr(namespace, a.dest)]
        for a in mine:
            setattr(namespace, a.dest, _UNSET)
        # a required flag may come from the YAML: argparse must not insist on the command line
        required = [a for a in mine if a.required and a.option_strings] if self.takes_config else []
        for a in required:
            a.required = False
        try:
            namespace, extras = super().parse_known_args(args, namespace)
        finally:
            for a in required:
                a.required = True
        unset = {a.dest: a for a in mine if getattr(namespace, a.dest) is _UNSET}
        for dest, a in unset.items():
            if a.default is argparse.SUPPRESS:
                delattr(namespace, dest)
            else:
                default = a.default
                if isinstance(default, str) and a.type not in (None, str):
                    default = self._get_value(a, default)
                setattr(namespace, dest, default)
        try:
            from_yaml = self.apply_config(namespace, unset)
        except ConfigError as e:   # the message names the key; the usage text would bury it
            self.exit(2, f"{self.prog}: error: {e}\n")
        missing = [a.option_strings[0] for a in required if a.dest in unset and a.dest not in from_yaml]
        if missing:
            self.error(f"the following arguments are required (on the command line or as --config keys): "
                       f"{', '.join(missing)}")
        return namespace, extras

    @property
    def takes_config(self) -> bool:
        return any(a.dest == "config" for a in self._actions)

    def apply_config(self, namespace: argparse.Namespace, unset: dict) -> set[str]:
        """Set the flags in `unset` that the --config YAML names; returns their dests."""
        if not self.takes_config:
            return set()   # (e.g. the top-level `ggro` parser: its subcommand's parser already merged)
        values, keys = load_yaml(namespace.config), yaml_keys(self)
        unknown = [k for k in values if k.replace("-", "_") not in keys]
        if unknown:
            hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k.replace("-", "_"), keys, 1))
                     else k for k in unknown]
            raise ConfigError(f"unknown keys in --config: {', '.join(hints)}")
        seen, applied = {}, set()
        for key, value in values.items():
            action = keys[key.replace("-", "_")]
            if action.dest in seen:
                raise ConfigError(f"--config sets {action.option_strings[0]} twice: {seen[action.dest]!r} and {key!r}")
            seen[action.dest] = key
            if value is None:              # `key:` or `key: null` leaves the flag's default
                continue
            value = yaml_value(self, action, key, value)   # checked even where the command line wins
            if action.dest in unset:
                setattr(namespace, action.dest, value)
                applied.add(action.dest)
        return applied


def resolve_args(args: argparse.Namespace) -> tuple[GGROConfig, ModelConfig, dict]:
    """The search and model configs from parsed args (YAML already merged by Parser); the rest as a dict."""
    values = {k: v for k, v in vars(args).items() if v is not None and k not in ("config", "func", "command")}
    g, m, rest = split_fields(values)
    try:
        return GGROConfig(**g), ModelConfig(**m), rest
    except TypeError as e:
        raise ConfigError(str(e)) from None


def fail(msg: str, code: int = 2):
    print(f"ggro: error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def run_command(run, args: argparse.Namespace) -> int:
    """Run one command; a JobFailed from below jobs/ (pipeline.batch.job) becomes `ggro: error:` and its exit code."""
    from pipeline.batch.job import JobFailed
    try:
        return run(args) or 0
    except JobFailed as e:
        fail(str(e), e.code)


def module_main(module: str, doc: str | None, add_args, run, argv=None) -> int:
    """`python -m jobs.<name>` (what `ray job submit` runs): the same flags and behaviour as `ggro <name>`."""
    p = Parser(prog=f"python -m {module}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    return run_command(run, p.parse_args(argv))
