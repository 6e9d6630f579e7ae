"""`ggro align`: prompts in, aligned Parquet out; `--local` in this process, otherwise on Ray.

    python -m jobs.align --input prompts.jsonl --output out/     (what `ray job submit` runs)

Exit codes: 0 done; 1 the job could not run (models, cluster, output folder, a row missing from the
output); 2 bad flags or unreadable input; 3 the output is complete but every row, or more than
--max-error-fraction of them, is an error row (so a RayJob or a pipeline step sees the failure).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from ggro.config import ConfigError, ModelLoadError
from ggro.rows import InputError, dedupe, read_rows
from ggro.threads import torch_threads
from jobs.common import add_engine_args, example_prompts, fail, resolve_args, module_main
from jobs.logs import add_log_args, log, log_to_driver, setup_logging
from jobs.plan import add_plan_args, dry_run
from pipeline.output import (OutputError, OutputLock, Summary, _now, clear_output, contains, drop_error_rows,
                             id_digests, output_index, prepare_output, versions, write_manifest, write_part)
from pipeline.ray_align import add_cluster_args

DEFAULT_MAX_ERROR_FRACTION = 0.1


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
    p.add_argument("--rows-per-file", type=int, default=10_000, metavar="N",
                   help="rows per output part file, the last one smaller (--local also writes a part every "
                   "5 minutes): a killed job loses only aligned rows not yet in a whole part")
    p.add_argument("--local", action="store_true", help="run in this process instead of on Ray")


def add_args(p: argparse.ArgumentParser) -> None:
    add_io_args(p)
    add_engine_args(p)
    add_plan_args(p)
    add_cluster_args(p)
    add_log_args(p)


def input_path(args) -> str:
    return args.input or example_prompts()


def input_rows(args, skipped: list | None = None) -> list:
    """Every input row in memory (--local, bench): read, deduplicated, cut to --limit."""
    path = input_path(args)
    try:
        rows = list(dedupe(read_rows(path, skipped)))
    except FileNotFoundError:
        fail(f"--input {path}: no such file or folder")
    except InputError as e:
        fail(str(e))
    return rows[:args.limit] if args.limit else rows


@dataclass
class Prompts:
    """This run's input as the driver knows it: a row count and id digests, and (--local) the rows."""
    count: int
    ids: np.ndarray               # sorted 16-byte digests of every output id this input has (`#dupK` included)
    skipped: list = field(default_factory=list)
    rows: list | None = None      # --local: every InputRow
    plan: object = None           # Ray: pipeline.ray_align.InputPlan (the rows stay in storage)

    @classmethod
    def of_rows(cls, rows: list, skipped: list) -> "Prompts":
        return cls(len(rows), np.unique(id_digests([r.id for r in rows])), skipped, rows=rows)

    def mask(self, ids: list[str]) -> np.ndarray:
        """Which of these output ids belong to this input."""
        return contains(self.ids, id_digests(ids))


def align_local(engine, rows, out_dir, gcfg, rows_per_file: int, flush_s: float = 300.0) -> None:
    from tqdm import tqdm
    buf, last = [], time.monotonic()
    with tqdm(total=len(rows), desc=f"align ({gcfg.method})", unit="row", file=sys.stderr) as bar:
        for rec in engine.align(rows, gcfg):
            buf.append(rec)
            bar.update(1)
            if len(buf) >= rows_per_file or time.monotonic() - last > flush_s:
                write_part(out_dir, buf)
                buf, last = [], time.monotonic()
    if buf:
        write_part(out_dir, buf)


class Aligners:
    """Where rows get aligned: this process (--local) or Ray workers. Models load on first use and stay
    for every later run (`ggro dpo` aligns twice with the same models); a resumed, finished job loads none."""

    def __init__(self, args):
        self.args, self.mcfg = args, None
        self.engine = self.workers = None

    def align(self, rows, out_dir, gcfg, mcfg) -> None:
        assert self.mcfg in (None, mcfg), "one Aligners serves one ModelConfig"
        self.mcfg = mcfg
        if self.args.local:
            if self.engine is None:
                from ggro.engine import Engine
                m = self.mcfg
                guide = m.reward_kind == "classifier" and m.reward_model == "default"
                if m.shares_policy_weights:
                    also = f" ({'with the shipped guide head' if guide else 'as its own judge'}, one copy of the weights)"
                else:
                    also = f" and {'the shipped guide' if guide else m.reward_model}"
                log.info("ggro: loading %s%s in this process", m.policy, also)
                torch_threads(self.mcfg.cohorts)
                self.engine = Engine.load(self.mcfg)
            align_local(self.engine, rows, out_dir, gcfg, max(1, getattr(self.args, "rows_per_file", None) or 10_000))
            return
        from actors.policy import ClusterTooSmall
        from pipeline.ray_align import align_on_ray, start_ray_workers
        if self.workers is None:
            try:
                self.workers = start_ray_workers(self.mcfg, self.args)
            except ClusterTooSmall as e:
                fail(str(e), 1)
        align_on_ray(rows, out_dir, gcfg, self.mcfg, self.args, self.workers)   # rows: an InputPlan

    def close(self) -> None:
        if self.workers is not None:
            self.workers.shutdown()
            self.workers = None


def read_prompts(args, gcfg, mcfg) -> Prompts:
    path = input_path(args)
    if args.local:
        skipped: list = []
        return Prompts.of_rows(input_rows(args, skipped), skipped)
    from pipeline.ray_align import connect, scan_input
    connect(getattr(args, "address", None), log_to_driver=log_to_driver(args))
    try:
        plan = scan_input(path, args.limit)
    except FileNotFoundError:
        fail(f"--input {path}: no such file or folder")
    except InputError as e:
        fail(str(e))
    return Prompts(plan.count, plan.ids, plan.skipped, plan=plan)


def manifest(args, gcfg, mcfg, run_id: str, started: str, mode: str) -> dict:
    from ggro.config import config_hash
    cluster = {k: getattr(args, k, None) for k in ("address", "tp", "policy_gpus_per_replica", "policy_replicas",
                                                    "policy_cpus", "reward_replicas", "reward_gpus", "reward_cpus",
                                                    "aligners", "aligner_cpus", "in_flight")} if mode == "ray" else {}
    return {"command": "align", "run_id": run_id, "status": "running", "started": started, "ended": None,
            "mode": mode, "input": input_path(args), "output": str(args.output), "limit": args.limit,
            "retry_errors": bool(args.retry_errors), "overwrite": bool(args.overwrite),
            "max_error_fraction": max_error_fraction(args),
            "config_hash": config_hash(gcfg, mcfg), "ggro_config": dataclasses.asdict(gcfg),
            "model_config": {**dataclasses.asdict(mcfg), "reward_model": mcfg.reward_model},
            "models": {"policy": mcfg.policy, "reward_model": mcfg.reward_model, "reward_kind": mcfg.reward_kind},
            "cluster": cluster, "versions": versions(), "host": __import__("socket").gethostname(),
            "rows": None}


def max_error_fraction(args) -> float:
    f = getattr(args, "max_error_fraction", None)
    return DEFAULT_MAX_ERROR_FRACTION if f is None else f


def run(args, aligners: Aligners | None = None) -> int:
    """`ggro align`; pass `aligners` to reuse models already loaded by an earlier run (same ModelConfig)."""
    setup_logging(args)
    if not args.output and not args.dry_run:
        fail("--output DIR is required (Parquet part files are written there)")
    if args.limit is not None and args.limit < 1:
        fail(f"--limit must be >= 1, got {args.limit}")
    if getattr(args, "rows_per_file", 1) is not None and getattr(args, "rows_per_file", 1) < 1:
        fail("--rows-per-file must be >= 1")
    if not 0 <= max_error_fraction(args) <= 1:
        fail("--max-error-fraction must be between 0 and 1")
    try:
        gcfg, mcfg, rest = resolve_args(args)
    except ConfigError as e:
        fail(str(e))
    if args.dry_run:
        return dry_run(args, gcfg, mcfg)
    from ggro.config import config_hash
    t0, started, run_id = time.perf_counter(), _now(), uuid.uuid4().hex[:12]
    try:                     # the folder is writable and ours before any input is read or model loaded
        prepare_output(args.output)
        lock = OutputLock(args.output).acquire()
    except OutputError as e:
        fail(str(e), 1)
    own = aligners is None
    aligners = aligners or Aligners(args)
    try:
        if args.overwrite:
            n = clear_output(args.output)
            if n:
                log.info("--overwrite: deleted %d file(s) ggro wrote in %s", n, args.output)
        info = manifest(args, gcfg, mcfg, run_id, started, "local" if args.local else "ray")
        write_manifest(args.output, info)
        prompts = read_prompts(args, gcfg, mcfg)
        for name in prompts.skipped:
            log.warning("ggro: skipped %s in --input (not .jsonl, .json or .parquet, or a hidden/_ name)", name)
        if prompts.count == 0:
            fail(f"--input {input_path(args)} has no rows" + (
                f" (skipped: {', '.join(prompts.skipped)})" if prompts.skipped else ""))
        index = output_index(args.output, config_hash(gcfg, mcfg))
        if args.retry_errors and len(index.errors):
            removed = drop_error_rows(args.output, prompts.mask)
            log.info("--retry-errors: %d error row(s) removed from %s; aligning those ids again", removed,
                     args.output)
            index = output_index(args.output, config_hash(gcfg, mcfg))
        if args.local:
            todo = [r for r, d in zip(prompts.rows, contains(index.done, id_digests([r.id for r in prompts.rows])))
                    if not d]
            ntodo = len(todo)
        else:
            ntodo = prompts.plan.count_todo(index.done)
            todo = prompts.plan
        if ntodo < prompts.count:
            log.info("resuming: %d of %d rows already in %s", prompts.count - ntodo, prompts.count, args.output)
        if ntodo:
            aligners.align(todo, args.output, gcfg, mcfg)
        summary = Summary.of_output(args.output, prompts.mask, time.perf_counter() - t0)
        info.update(status="finished", ended=_now(), rows={
            "in": prompts.count, "out": summary.rows, "ok": summary.ok, "error": summary.errors,
            "aligned_this_run": ntodo, "skipped_files": prompts.skipped})
        write_manifest(args.output, info)
    except (ModelLoadError, OutputError, ConfigError) as e:
        _failed(args.output, locals().get("info"), str(e))
        fail(str(e), 1)
    except BaseException as e:
        _failed(args.output, locals().get("info"), f"{e.__class__.__name__}: {e}")
        raise
    finally:
        if own:
            aligners.close()
        lock.release()
    for rid, err in summary.error_examples:
        print(f"row {rid}: {err}", file=sys.stderr)
    if summary.errors > len(summary.error_examples):
        print(f"... and {summary.errors - len(summary.error_examples)} more rows with errors (see the `error` column)",
              file=sys.stderr)
    print(f"wrote {args.output}\n" + summary.render(prompts.count))
    return exit_code(summary, prompts.count, max_error_fraction(args))


def _failed(out_dir, info: dict | None, why: str) -> None:
    if info is not None:
        try:
            write_manifest(out_dir, {**info, "status": "failed", "ended": _now(), "failure": why})
        except OSError:
            pass


def exit_code(summary: Summary, rows_in: int, max_frac: float) -> int:
    if summary.rows != rows_in or summary.duplicates:
        return 1
    if summary.ok == 0 or summary.errors > max_frac * rows_in:
        print(f"ggro: error: {summary.errors} of {rows_in} rows are error rows (more than --max-error-fraction "
              f"{max_frac}); the output is complete, see the `error` column (rerun with --retry-errors)",
              file=sys.stderr)
        return 3
    return 0


def main(argv=None) -> int:
    return module_main("jobs.align", __doc__, add_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
