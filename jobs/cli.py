"""The `ggro` command: one subcommand per job."""
from __future__ import annotations

import argparse
import importlib

from jobs.common import Parser

SUBCOMMANDS = {
    "align": ("jobs.align", "align prompts (JSONL/Parquet) with GGRO or a baseline and write Parquet"),
    "dpo": ("jobs.dpo", "build DPO preference pairs: GGRO (chosen) vs a baseline (rejected)"),
    "serve": ("jobs.serve", "serve GGRO behind an OpenAI-compatible HTTP API (Ray Serve)"),
    "prompts": ("jobs.prompts", "write a real prompt set (Do-Not-Answer, GSM8K-100, over-refusal) as JSONL"),
    "report": ("jobs.report", "Markdown report + plots comparing align outputs"),
    "bench": ("jobs.bench", "time greedy, best-of-n and GGRO side by side and print a table"),
    "train-reward": ("jobs.train_reward", "train a reward model (guide) from preference pairs; saves a HF classifier"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ggro", description="Gradient-Guided Reward Optimization "
                    "(inference-time alignment) on one machine or a Ray cluster.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        mod.add_args(p)
        p.set_defaults(func=mod.run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    raise SystemExit(main())
