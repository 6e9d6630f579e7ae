"""Flags shared by align / dpo / serve, and turning flags + YAML into configs (flags win)."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
from importlib import resources

import yaml

from ggro.config import ConfigError, GGROConfig, ModelConfig, knob_help, knob_type, knobs, old_flags, split_fields
from actors.resources import Resources


def example_prompts() -> str:
    return str(resources.files("jobs") / "data" / "example_prompts.jsonl")


def add_engine_args(p: argparse.ArgumentParser, settings: tuple[dict, dict] | None = None) -> None:
    """Model and search flags, one per field of ModelConfig and GGROConfig, from the field's own metadata
    (ggro.config `knob`: help, choices; the type from its annotation). Defaults are None so a YAML value is only
    overridden by a given flag; the default a help text shows is the field's own, or, for a command with its own
    (QUICK, FULL) `settings` (bench, eval), the values those give the field (`max_new_tokens`)."""
    quick, full = settings or ({}, {})
    for title, cls in (("models", ModelConfig), ("search", GGROConfig)):
        group = p.add_argument_group(title)
        for f in knobs(cls):
            flag, typ = "--" + f.name.replace("_", "-"), knob_type(f)
            text = (f.metadata["help"].format(default=f"quick: {quick[f.name]}; else {full[f.name]}")
                    if f.name in quick and f.name in full else knob_help(f))
            if typ is bool:
                group.add_argument(flag, action="store_true", default=None, help=text)
            else:
                group.add_argument(flag, type=None if typ is str else typ, choices=f.metadata["choices"], help=text)
    p.add_argument("--config", help="YAML file whose keys mirror these flags (dashes or underscores); flags win")

# `ggro serve`'s old names for the resources, from the knobs' `old_flag`: hidden, still accepted
DEPRECATED = old_flags(Resources)


def add_resource_args(g, aligners: bool = True) -> None:
    """The resource flags of align, dpo and serve: one per knob of actors.resources.Resources (help, type and
    default its own); serve has no aligners and takes its deprecated names instead."""
    for f in knobs(Resources):
        if aligners or f.name not in ("aligners", "aligner_cpus"):
            g.add_argument("--" + f.name.replace("_", "-"), type=knob_type(f), default=f.default, help=knob_help(f))
    if not aligners:
        for old, new in DEPRECATED.items():
            g.add_argument("--" + old.replace("_", "-"), type=knob_type(new[0]), help=argparse.SUPPRESS)


def resources_from_args(args: argparse.Namespace, mode: str, **fixed) -> Resources:
    """Resources from the parsed flags; a deprecated serve name, when given, sets both of its roles."""
    names = [f.name for f in dataclasses.fields(Resources) if f.name != "mode"]
    values = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    for old, new in DEPRECATED.items():
        if getattr(args, old, None) is not None:
            flags = " and ".join("--" + f.name.replace("_", "-") for f in new)
            print(f"ggro: --{old.replace('_', '-')} is deprecated, use {flags}", file=sys.stderr)
            values.update(dict.fromkeys((f.name for f in new), getattr(args, old)))
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


def yaml_keys(parser: Parser) -> dict[str, argparse.Action]:
    """Every option of `parser` that a --config key can set, by key (flag name without dashes, `_` for `-`)."""
    keys = {}
    for a in parser.options:
        if not a.option_strings or a.dest in ("help", "config") or a.dest is argparse.SUPPRESS:
            continue
        keys[a.dest] = a
        for o in a.option_strings:
            if o.startswith("--"):
                keys[o[2:].replace("-", "_")] = a
    return keys


def yaml_value(action: argparse.Action, key: str, value):
    """A YAML value checked and converted the way argparse treats the flag's command-line string."""
    if action.nargs == 0 and action.const is not None:    # store_true / store_false / store_const
        if not isinstance(value, bool):
            raise ConfigError(f"--config key {key!r} must be true or false, got {value!r}")
        return action.const if value else action.default
    if action.nargs == 0:
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
        out.append(flag_value(action, str(v), f"--config key {key!r}: "))
    return out if many else out[0]


def flag_value(action: argparse.Action, text: str, where: str):
    """`text` converted by the flag's type and checked against its choices, as argparse does on the command line
    (its messages), through the Action's public attributes only."""
    v = text
    if action.type not in (None, str):
        try:
            v = action.type(text)
        except (TypeError, ValueError):
            name = getattr(action.type, "__name__", repr(action.type))
            raise ConfigError(f"{where}invalid {name} value: {text!r}") from None
        except argparse.ArgumentTypeError as e:
            raise ConfigError(f"{where}{e}") from None
    if action.choices is not None and v not in action.choices:
        raise ConfigError(f"{where}invalid choice: {v!r} (choose from {', '.join(map(repr, action.choices))})")
    return v


def _kind(action: argparse.Action) -> str:
    return {int: "an integer", float: "a number"}.get(action.type, "a string")


class Parser(argparse.ArgumentParser):
    """argparse plus --config: a YAML key sets any flag that was not given on the command line.

    The one merge rule: command line > YAML > the flag's default. Keys are the long flag names (dashes
    or underscores); a YAML value is checked like the flag's own string would be (type, choices,
    true/false for switches), and unknown keys or wrong types are errors naming the key. Subparsers
    (`ggro align`, ...) are built from this class too, so `args` leaves parse_args fully resolved.
    It keeps its own list of the options added (`options`, from add_argument's returned Actions, in groups too),
    so the merge reads no private argparse state.
    """

    def __init__(self, *args, **kwargs):
        self.options: list[argparse.Action] = []    # before argparse's __init__ adds -h
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        self.options.append(action)
        return action

    def add_argument_group(self, *args, **kwargs):
        group = super().add_argument_group(*args, **kwargs)
        add = group.add_argument

        def add_and_record(*a, **k):
            action = add(*a, **k)
            self.options.append(action)
            return action
        group.add_argument = add_and_record
        return group

    def parse_known_args(self, args=None, namespace=None):
        namespace = namespace if namespace is not None else argparse.Namespace()
        mine = [a for a in self.options if a.dest is not argparse.SUPPRESS and not hasattr(namespace, a.dest)]
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
                    default = flag_value(a, default, f"{a.option_strings[0]}'s default: ")
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
        return any(a.dest == "config" for a in self.options)

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
            value = yaml_value(action, key, value)   # checked even where the command line wins
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


def at_least(lo: int):
    """An argparse type (and --config value check): an integer >= `lo`, for counts and sizes a 0 or a negative
    number would otherwise turn into "all" or "none" without a word."""
    def parse(value) -> int:
        try:
            v = int(value)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {value!r}")
        return v
    parse.lo = lo
    return parse


def nonblank(value) -> str:
    """An argparse type: text with a word in it (a question, a name); "" would fall back to a default unseen."""
    if not str(value).strip():
        raise argparse.ArgumentTypeError(f"expected a non-empty string, got {value!r}")
    return str(value)


def positive_ints(s: str) -> list[int]:
    """An argparse type: comma-separated integers >= 1 ("2,4,8": best-of-n sizes, batch sizes, rollout lengths)."""
    try:
        vals = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {s!r}")
    return vals


def positive(value) -> float:
    """An argparse type: a finite number > 0 (seconds, GiB, CPUs); NaN would pass every `<` check after it."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {value!r}")
    return v


def fail(msg: str, code: int = 2):
    print(f"ggro: error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def made_dir(path, flag: str = "--output", own: tuple[str, ...] | None = None):
    """`path` as a folder that exists now (made with its parents), or exit 1 saying why it cannot be: checked
    before any model loads, so no run's work is lost at its end to an unwritable path. `own`: the names (glob
    patterns) the command writes there; a folder holding anything else is refused, since ggro never replaces a
    file it did not write (hidden files such as .DS_Store are let be)."""
    from fnmatch import fnmatch
    from pathlib import Path
    if own is not None and Path(path).is_dir():
        foreign = sorted(p.name for p in Path(path).iterdir()
                         if not p.name.startswith(".") and not any(fnmatch(p.name, o) for o in own))
        if foreign:
            fail(f"{flag} {path} holds files this command does not write ({', '.join(foreign[:4])}"
                 f"{', ...' if len(foreign) > 4 else ''}): pick a new or empty folder", 1)
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"{flag} {path}: cannot create the folder ({e.strerror or e})", 1)
    return Path(path)


class Terminated(KeyboardInterrupt):
    """SIGTERM (`ray job stop`, a pod's shutdown, `timeout`), raised like Ctrl-C so the run unwinds: its manifest
    says it failed and its output lock is released, instead of the process vanishing mid-step."""


def _terminated(signum, frame):
    raise Terminated


def run_command(run, args: argparse.Namespace) -> int:
    """Run one command; a JobFailed from below jobs/ (pipeline.batch.job) becomes `ggro: error:` and its exit code;
    Ctrl-C and SIGTERM one line and 130 / 143."""
    import signal
    import threading
    from pipeline.batch.job import JobFailed
    from ggro.threads import env_threads
    try:                # checked here, not in the first process that loads a model
        env_threads()
    except ValueError as e:
        fail(str(e))
    main = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, _terminated) if main else None
    try:
        return run(args) or 0
    except JobFailed as e:
        fail(str(e), e.code)
    except KeyboardInterrupt as e:     # a line, not the traceback of whatever kernel was running
        out = getattr(args, "output", None)
        kept = (f"; what {out} holds is whole (rerun the same command to resume)"
                if out and getattr(args, "command", None) in ("align", "dpo") else "")
        term = isinstance(e, Terminated)
        print(f"\nggro: {'terminated (SIGTERM)' if term else 'interrupted'}{kept}", file=sys.stderr)
        raise SystemExit(143 if term else 130) from None
    finally:
        if main:       # a caller's own handler (pytest's, a notebook's) comes back
            signal.signal(signal.SIGTERM, before if before is not None else signal.SIG_DFL)


def module_main(module: str, doc: str | None, add_args, run, argv=None) -> int:
    """`python -m jobs.<name>` (what `ray job submit` runs): the same flags and behaviour as `ggro <name>`."""
    p = Parser(prog=f"python -m {module}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    p.set_defaults(command=module.rsplit(".", 1)[-1])
    return run_command(run, p.parse_args(argv))
