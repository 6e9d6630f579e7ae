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
from jobs.common import add_engine_args, add_resource_args, example_prompts, fail, resolve_args, module_main, \
    resources_from_args
from jobs.logs import add_log_args, log, log_to_driver, setup_logging
from jobs.plan import add_plan_args, dry_run
from pipeline.job import (DEFAULT_IN_FLIGHT, DEFAULT_MAX_ERROR_FRACTION, DEFAULT_RAY_TIMEOUT_S, DEFAULT_ROWS_PER_FILE,
                          AlignJob)
from pipeline.lock import OutputLock
from pipeline.manifest import now, versions, write_manifest
from pipeline.output import (OutputError, Summary, check_output, clear_output, contains, disk_full, drop_error_rows,
                             id_digests, output_index, prepare_output, write_part)
from pipeline.resources import ClusterTooSmall, ClusterUnreachable, Resources, plan_auto


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
    g.add_argument("--in-flight", type=int, default=DEFAULT_IN_FLIGHT,
                   help="sub-batches each aligner keeps in flight (overlaps policy and reward work)")
    g.add_argument("--ray-timeout", type=float, default=DEFAULT_RAY_TIMEOUT_S,
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
    """Every input row in memory (--local, bench): read, deduplicated, cut to --limit."""
    return read_input(input_path(args), args.limit, skipped)


def read_input(path: str, limit: int | None, skipped: list | None = None) -> list:
    try:
        rows = list(dedupe(read_rows(path, skipped)))
    except FileNotFoundError:
        fail(f"--input {path}: no such file or folder")
    except InputError as e:
        fail(str(e))
    return rows[:limit] if limit else rows


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
                    rows_per_file=args.rows_per_file, local=bool(args.local), resources=res, address=args.address,
                    ray_timeout=args.ray_timeout or DEFAULT_RAY_TIMEOUT_S, in_flight=args.in_flight or DEFAULT_IN_FLIGHT,
                    log_to_driver=log_to_driver(args))


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

    def __init__(self, job: AlignJob):
        self.job = job
        self.engine = self.workers = None

    def align(self, rows, job: AlignJob) -> None:
        """Align `rows` (--local: InputRows; Ray: an InputPlan) into job.output with job.gcfg."""
        assert job.mcfg == self.job.mcfg, "one Aligners serves one ModelConfig"
        if job.local:
            if self.engine is None:
                self.engine = _load_engine(job.mcfg, gradient=job.gcfg.method == "ggro")
            align_local(self.engine, rows, job.output, job.gcfg, job.rows_per_file)
            return
        from pipeline.ray_align import align_on_ray, start_ray_workers
        try:
            if self.workers is None:
                self.workers = start_ray_workers(self.job)
            align_on_ray(rows, job, self.workers)   # ClusterTooSmall there: nodes lost mid-job
        except ClusterTooSmall as e:
            fail(str(e), 1)

    def close(self) -> None:
        if self.workers is not None:
            self.workers.shutdown()
            self.workers = None


def _load_engine(m, gradient: bool = True):
    """The models in this process; `gradient`: GGRO will run (it needs one vocabulary for both models)."""
    from ggro.engine import Engine
    guide = m.reward_kind == "classifier" and m.reward_model == "default"
    if m.shares_policy_weights:
        also = f" ({'with the shipped guide head' if guide else 'as its own judge'}, one copy of the weights)"
    else:
        also = f" and {'the shipped guide' if guide else m.reward_model}"
    log.info("ggro: loading %s%s in this process", m.policy, also)
    torch_threads(m.cohorts)
    return Engine.load(m, gradient)


def read_prompts(job: AlignJob) -> Prompts:
    if job.local:
        skipped: list = []
        prompts = Prompts.of_rows(read_input(job.input, job.limit, skipped), skipped)
    else:
        from pipeline.ray_align import connect, scan_input
        connect(job.address, log_to_driver=job.log_to_driver)
        try:
            plan = scan_input(job.input, job.limit)
        except FileNotFoundError:
            fail(f"--input {job.input}: no such file or folder")
        except InputError as e:
            fail(str(e))
        prompts = Prompts(plan.count, plan.ids, plan.skipped, plan=plan)
    for name in prompts.skipped:
        log.warning("ggro: skipped %s in --input (not .jsonl, .json or .parquet, or a hidden/_ name)", name)
    if prompts.count == 0:
        fail(f"--input {job.input} has no rows" + (
            f" (skipped: {', '.join(prompts.skipped)})" if prompts.skipped else ""))
    return prompts


def manifest(job: AlignJob, run_id: str, started: str) -> dict:
    from ggro.config import config_hash
    gcfg, mcfg = job.gcfg, job.mcfg
    return {"command": "align", "run_id": run_id, "status": "running", "started": started, "ended": None,
            "mode": job.mode, "input": job.input, "output": str(job.output), "limit": job.limit,
            "retry_errors": job.retry_errors, "overwrite": job.overwrite,
            "max_error_fraction": job.max_error_fraction,
            "config_hash": config_hash(gcfg, mcfg), "ggro_config": dataclasses.asdict(gcfg),
            "model_config": {**dataclasses.asdict(mcfg), "reward_model": mcfg.reward_model},
            "models": {"policy": mcfg.policy, "reward_model": mcfg.reward_model, "reward_kind": mcfg.reward_kind},
            "cluster": job.cluster(), "versions": versions(), "host": __import__("socket").gethostname(),
            "rows": None}


def run(args, aligners: Aligners | None = None) -> int:
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
    return run_job(job, aligners)


def run_job(job: AlignJob, aligners: Aligners | None = None) -> int:
    """One align run; pass `aligners` to reuse models already loaded by an earlier run (same ModelConfig)."""
    t0, started, run_id = time.perf_counter(), now(), uuid.uuid4().hex[:12]
    try:                     # the folder is writable and ours before any input is read or model loaded
        prepare_output(job.output)
        if not job.overwrite:       # --overwrite refuses foreign files itself (clear_output), by name too
            check_output(job.output)
        lock = OutputLock(job.output).acquire()
    except OutputError as e:
        fail(str(e), 1)
    own, info = aligners is None, None
    aligners = aligners or Aligners(job)
    try:
        if job.overwrite:
            n = clear_output(job.output)
            if n:
                log.info("--overwrite: deleted %d file(s) ggro wrote in %s", n, job.output)
        info = manifest(job, run_id, started)
        write_manifest(job.output, info)
        prompts = read_prompts(job)
        ntodo = align_todo(job, prompts, aligners)
        summary = Summary.of_output(job.output, prompts.ids, time.perf_counter() - t0)
        info.update(status="finished", ended=now(), rows={
            "in": prompts.count, "out": summary.rows, "ok": summary.ok, "error": summary.errors,
            "aligned_this_run": ntodo, "skipped_files": prompts.skipped})
        write_manifest(job.output, info)
    except (ModelLoadError, OutputError, ConfigError, ClusterUnreachable) as e:
        _failed(job.output, info, str(e))
        fail(str(e), 1)
    except BaseException as e:
        full = disk_full(e, job.output)
        _failed(job.output, info, full or f"{e.__class__.__name__}: {e}")
        if full:
            fail(full, 1)
        raise
    finally:
        if own:
            aligners.close()
        lock.release()
    return report(job, summary, prompts.count)


def align_todo(job: AlignJob, prompts: Prompts, aligners: Aligners) -> int:
    """Align the input ids not yet in the output (--retry-errors: error rows count as not done); returns how many."""
    from ggro.config import config_hash
    index = output_index(job.output, config_hash(job.gcfg, job.mcfg))
    if job.retry_errors and len(index.errors):
        removed = drop_error_rows(job.output, prompts.mask)
        log.info("--retry-errors: %d error row(s) removed from %s; aligning those ids again", removed, job.output)
        index = output_index(job.output, config_hash(job.gcfg, job.mcfg))
    if job.local:
        done = contains(index.done, id_digests([r.id for r in prompts.rows]))
        todo = [r for r, d in zip(prompts.rows, done) if not d]
        ntodo = len(todo)
    else:
        ntodo = prompts.plan.count_todo(index.done)
        todo = prompts.plan
    if ntodo < prompts.count:
        log.info("resuming: %d of %d rows already in %s", prompts.count - ntodo, prompts.count, job.output)
    if ntodo:
        aligners.align(todo, job)
    return ntodo


def report(job: AlignJob, summary: Summary, rows_in: int) -> int:
    for rid, err in summary.error_examples:
        print(f"row {rid}: {err}", file=sys.stderr)
    if summary.errors > len(summary.error_examples):
        print(f"... and {summary.errors - len(summary.error_examples)} more rows with errors (see the `error` column)",
              file=sys.stderr)
    print(f"wrote {job.output}\n" + summary.render(rows_in))
    return exit_code(summary, rows_in, job.max_error_fraction)


def _failed(out_dir, info: dict | None, why: str) -> None:
    if info is not None:
        try:
            write_manifest(out_dir, {**info, "status": "failed", "ended": now(), "failure": why})
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
