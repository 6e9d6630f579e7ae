"""`ggro align`: prompts in, aligned Parquet out; `--local` in this process, otherwise on Ray. This module
turns flags + YAML into the frozen AlignJob and hands it to the driver (pipeline/batch/driver.py).

    python -m jobs.align --input prompts.jsonl --output out/     (what `ray job submit` runs)

Exit codes: 0 done; 1 the job could not run (models, cluster, output folder, a row missing from the
output); 2 bad flags or unreadable input; 3 the output is complete but every row, or more than
--max-error-fraction of them, is an error row (so a RayJob or a pipeline step sees the failure).
"""
from __future__ import annotations

import argparse

from actors.resources import Resources, plan_auto
from ggro.config import ConfigError
from jobs.common import add_engine_args, add_resource_args, at_least, example_prompts, fail, positive, resolve_args, \
    module_main, resources_from_args
from jobs.logs import add_log_args, log_to_driver, setup_logging
from jobs.plan import add_plan_args, dry_run
from pipeline.batch.job import (DEFAULT_IN_FLIGHT, DEFAULT_MAX_ERROR_FRACTION, DEFAULT_RAY_TIMEOUT_S,
                                DEFAULT_ROWS_PER_FILE, AlignJob)


def add_io_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", help="JSONL or Parquet file (or folder) of rows with `prompt` or `messages`, "
                   "optional `id` and `prefill` [the bundled example prompts]")
    p.add_argument("--output", help="output folder for Parquet part files (rerun to resume): a path on storage "
                   "every Ray node sees, or a pyarrow filesystem URI (s3://bucket/dir, gs://..., file://...)")
    p.add_argument("--limit", type=int, help="only the first N input rows (N >= 1)")
    p.add_argument("--overwrite", action="store_true", help="delete what ggro wrote in --output first instead of "
                   "resuming (a folder that holds any other file is refused, nothing deleted)")
    p.add_argument("--retry-errors", action="store_true", help="align again the input ids whose row in --output "
                   "is an error row (the old row is removed: one row per id)")
    p.add_argument("--max-error-fraction", type=float, default=None, metavar="F",
                   help=f"exit 3 when more than this fraction of the input's rows are error rows; every row "
                   f"failing always exits 3; 1 turns the check off [{DEFAULT_MAX_ERROR_FRACTION}]")
    p.add_argument("--rows-per-file", type=int, default=DEFAULT_ROWS_PER_FILE, metavar="N",
                   help="rows per output part file, the last one smaller (--local also writes a part every "
                   "5 minutes): a killed job loses only aligned rows not yet in a whole part")
    p.add_argument("--local", action="store_true", help="run in this process instead of on Ray")


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ray cluster (without --local)")
    g.add_argument("--address", help="Ray cluster address (e.g. ray://head:10001 or auto); default: "
                   "$RAY_ADDRESS, else start a local Ray instance")
    add_resource_args(g)
    g.add_argument("--in-flight", type=at_least(1), default=DEFAULT_IN_FLIGHT,
                   help="sub-batches each aligner keeps in flight (overlaps policy and reward work)")
    g.add_argument("--ray-timeout", type=positive, default=DEFAULT_RAY_TIMEOUT_S,
                   help="seconds to wait for placement groups before failing with a clear message")


def add_args(p: argparse.ArgumentParser) -> None:
    add_io_args(p)
    add_engine_args(p)
    add_plan_args(p)
    add_cluster_args(p)
    add_log_args(p)


def input_path(args) -> str:
    return args.input or example_prompts()


def input_rows(args, skipped: list | None = None) -> list:
    """Every input row the flags name, in memory, as --local reads them: deduplicated, cut to --limit."""
    from pipeline.batch.driver import read_input
    return read_input(input_path(args), args.limit, skipped)


def job_from_args(args) -> AlignJob:
    """The resolved run (raises ConfigError); --local sizes one in-process policy, not the Ray flags."""
    gcfg, mcfg, _ = resolve_args(args)
    if args.local:
        mcfg = plan_auto(mcfg)
        res = Resources.local(mcfg)
    else:
        res = resources_from_args(args, "align")
        mcfg = plan_auto(mcfg, res)
    frac = args.max_error_fraction
    return AlignJob(gcfg=gcfg, mcfg=mcfg, input=input_path(args), output=args.output, limit=args.limit,
                    overwrite=bool(args.overwrite), retry_errors=bool(args.retry_errors),
                    max_error_fraction=DEFAULT_MAX_ERROR_FRACTION if frac is None else frac,
                    rows_per_file=args.rows_per_file, resources=res, address=args.address,
                    ray_timeout=args.ray_timeout or DEFAULT_RAY_TIMEOUT_S, in_flight=args.in_flight or DEFAULT_IN_FLIGHT,
                    log_to_driver=log_to_driver(args))


def run(args) -> int:
    """`ggro align` from parsed flags; --dry-run only plans."""
    setup_logging(args)
    if not args.output and not args.dry_run:
        fail("--output DIR is required (Parquet part files are written there)")
    try:
        job = job_from_args(args)
    except ConfigError as e:
        fail(str(e))
    if args.dry_run:
        return dry_run(args, job.gcfg, job.mcfg, job.resources)
    from pipeline.batch.driver import run_job     # here: `ggro --help` need not import pyarrow
    return run_job(job)


def main(argv=None) -> int:
    return module_main("jobs.align", __doc__, add_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
