"""Levelled driver logs for the commands that run jobs (`--log-level`), and whether Ray workers' logs reach
the driver (`--quiet` turns them off).

Progress and warnings go through Python `logging` under the `ggro` logger, to stderr; results (summary
lines, tables) stay plain prints to stdout. Ray workers log with their own loggers; with `log_to_driver`
on (the default) Ray forwards their output to the driver, so `ray job logs` shows it.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
log = logging.getLogger("ggro")


class _Stderr(logging.StreamHandler):
    """Writes to the current sys.stderr at each record, not the one at setup (tests capture and swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def add_log_args(p: argparse.ArgumentParser, ray: bool = True) -> None:
    g = p.add_argument_group("logs")
    g.add_argument("--log-level", choices=LEVELS, default="INFO", help="the driver's progress and warnings")
    if ray:
        g.add_argument("--quiet", action="store_true", help="keep Ray workers' logs off the driver (Ray's "
                       "log_to_driver=False); they stay in the session's log folder")


def setup_logging(args) -> None:
    """The `ggro` logger at --log-level, one stderr handler however often a process runs a command."""
    level = getattr(args, "log_level", None) or "INFO"
    for h in [h for h in log.handlers if isinstance(h, _Stderr)]:
        log.removeHandler(h)
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False      # Ray's driver logging setup must not print each line twice
    if level != "DEBUG":
        # Quiet by default: transformers' and the hub's own bars ("Loading weights", shard writing) are not
        # ggro's progress. Read when they are imported, which is after this (the CLI imports them lazily), and
        # inherited by the Ray workers this process starts; a user's own setting wins.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def log_to_driver(args) -> bool:
    return not getattr(args, "quiet", False)
