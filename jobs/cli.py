"""The `ggro` command: one subcommand per job."""
from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

from jobs.common import Parser, run_command

SUBCOMMANDS = {
    "align": ("jobs.align", "align prompts (JSONL/Parquet) with GGRO or a baseline and write Parquet"),
    "dpo": ("jobs.dpo", "build DPO preference pairs: GGRO (chosen) vs a baseline (rejected)"),
    "serve": ("jobs.serve", "serve GGRO behind an OpenAI-compatible HTTP API (Ray Serve)"),
    "prompts": ("jobs.prompts", "write a real prompt set (Do-Not-Answer, GSM8K-100, over-refusal) as JSONL"),
    "report": ("jobs.report", "Markdown report + plots comparing align outputs"),
    "bench": ("jobs.bench", "time greedy, best-of-n and GGRO side by side and print a table"),
    "eval": ("jobs.eval", "what GGRO buys: refusals, over-refusals, GSM8K and a judge's reward, per method, with CIs"),
    "train-reward": ("jobs.train_reward", "train a reward model (guide) from preference pairs; saves a HF classifier"),
}


def version() -> str:
    """The installed distribution's version; a checkout run without installing reads its pyproject.toml."""
    from importlib.metadata import PackageNotFoundError, version as dist_version
    try:
        return dist_version("ggro")
    except PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M) if pyproject.exists() else None
        return found.group(1) if found else "unknown"


def show_defaults(p: Parser) -> None:
    """Add a shown flag's default to its help, as argparse's ArgumentDefaultsHelpFormatter words it, except the
    None that a flag left for --config to fill has (its help names the real default in brackets). Edits the
    help of the Actions the parser recorded (`Parser.options`), so no formatter internals are overridden."""
    for a in p.options:
        if a.help is argparse.SUPPRESS or not (a.help or "").strip():
            continue            # argparse shows no help line for these, default or not
        if a.default is None or a.default is argparse.SUPPRESS or "%(default)" in a.help:
            continue
        if a.option_strings or a.nargs in ("?", "*"):
            a.help += " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ggro", description="Gradient-Guided Reward Optimization "
                    "(inference-time alignment) on one machine or a Ray cluster.")
    parser.add_argument("--version", action="version", version=f"ggro {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_args(p)
        show_defaults(p)
        p.set_defaults(func=mod.run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    raise SystemExit(main())
