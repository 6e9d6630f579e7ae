"""The batch driver behind `ggro align` (and `ggro dpo`, which aligns twice on the same models): the output
folder made ours (lock, manifest), the input read, the ids already done skipped (resume), the rest aligned in
this process (`--local`) or on Ray (pipeline/batch/ray_align.py), and the finished output summed up.

jobs/align.py turns flags into the frozen AlignJob (pipeline/batch/job.py) and calls `run_job`; a run that
cannot go on raises JobFailed, whose exit code the entry point returns.

Exit codes: 0 done; 1 the job could not run (models, cluster, output folder, a row missing from the
output); 2 unreadable input; 3 the output is complete but every row, or more than --max-error-fraction of
them, is an error row (so a RayJob or a pipeline step sees the failure).
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from actors.resources import ClusterTooSmall, ClusterUnreachable
from ggro.config import ConfigError, ModelLoadError
from ggro.rows import InputError, dedupe, read_rows
from ggro.threads import torch_threads
from pipeline.batch.job import AlignJob, JobFailed
from pipeline.batch.lock import OutputLock
from pipeline.batch.manifest import now, versions, write_manifest
from pipeline.batch.digests import contains, content_digests, id_digests
from pipeline.batch.output import (OutputConflict, OutputError, Summary, check_output, clear_output, disk_full,
                                   drop_error_rows, output_index, part_files, prepare_output, write_part)

log = logging.getLogger("ggro")   # the driver's progress: jobs.logs sets its level and handler


def read_input(path: str, limit: int | None, skipped: list | None = None) -> list:
    """Every row of `path` in memory (--local, bench, eval): read, deduplicated, cut to `limit`."""
    try:
        rows = list(dedupe(read_rows(path, skipped)))
    except FileNotFoundError:
        raise JobFailed(f"--input {path}: no such file or folder") from None
    except InputError as e:
        raise JobFailed(str(e)) from None
    return rows[:limit] if limit else rows


@dataclass
class Prompts:
    """This run's input as the driver knows it: a row count and id digests, and (--local) the rows."""
    count: int
    ids: np.ndarray               # sorted 16-byte digests of every output id this input has (`#dupK` included)
    skipped: list = field(default_factory=list)
    rows: list | None = None      # --local: every InputRow
    plan: object = None           # Ray: pipeline.batch.ray_input.InputPlan (the rows stay in storage)
    contents: np.ndarray | None = None   # content_digests in `ids`' order (Ray: only when resuming)

    @classmethod
    def of_rows(cls, rows: list, skipped: list, contents: bool = True) -> "Prompts":
        ids = id_digests([r.id for r in rows])      # unique: read_input names later copies id#dupK
        order = np.argsort(ids)
        asks = content_digests([r.messages for r in rows], [r.prefill for r in rows])[order] if contents else None
        return cls(len(rows), ids[order], skipped, rows=rows, contents=asks)

    def name(self, digest: bytes) -> str:
        """The id with this digest (for a message: a second pass over the input on Ray)."""
        if self.rows is not None:
            return self.rows[int(np.flatnonzero(id_digests([r.id for r in self.rows]) == digest)[0])].id
        from pipeline.batch.ray_input import id_strings
        return id_strings(self.plan, np.array([digest], dtype="S16"))[digest]

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
        from pipeline.batch.ray_align import align_on_ray, start_ray_workers
        try:
            if self.workers is None:
                self.workers = start_ray_workers(self.job)
            align_on_ray(rows, job, self.workers)   # ClusterTooSmall there: nodes lost mid-job
        except ClusterTooSmall as e:
            raise JobFailed(str(e), 1) from None

    def close(self) -> None:
        if self.workers is not None:
            self.workers.shutdown()
            self.workers = None


def _load_engine(m, gradient: bool = True):
    """The models in this process; `gradient`: GGRO will run (it needs one vocabulary for both models)."""
    from ggro.engine import Engine
    guide = m.uses_shipped_guide
    if m.shares_policy_weights:
        also = f" ({'with the shipped guide: head + judge' if guide else 'as its own judge'}, one copy of the weights)"
    else:
        also = f" and {'the shipped guide' if guide else m.reward_model}"
    log.info("ggro: loading %s%s in this process", m.policy, also)
    torch_threads(m.cohorts)
    return Engine.load(m, gradient)


def read_prompts(job: AlignJob, contents: bool = True) -> Prompts:
    """The input as the driver needs it; `contents`: also every row's content_digests (on Ray 16 B a row in the
    driver, so only for a resumed output, where they are checked)."""
    if job.local:
        skipped: list = []
        prompts = Prompts.of_rows(read_input(job.input, job.limit, skipped), skipped, contents)
    else:
        from pipeline.batch.ray_align import connect
        from pipeline.batch.ray_input import scan_input
        connect(job.address, log_to_driver=job.log_to_driver)
        try:
            plan = scan_input(job.input, job.limit, contents)
        except FileNotFoundError:
            raise JobFailed(f"--input {job.input}: no such file or folder") from None
        except InputError as e:
            raise JobFailed(str(e)) from None
        prompts = Prompts(plan.count, plan.ids, plan.skipped, plan=plan, contents=plan.contents)
    for name in prompts.skipped:
        log.warning("ggro: skipped %s in --input (not .jsonl, .json or .parquet, or a hidden/_ name)", name)
    if prompts.count == 0:
        raise JobFailed(f"--input {job.input} has no rows" + (
            f" (skipped: {', '.join(prompts.skipped)})" if prompts.skipped else ""))
    return prompts


def manifest(job: AlignJob, run_id: str, started: str) -> dict:
    from ggro.confighash import config_hash
    gcfg, mcfg = job.gcfg, job.mcfg
    return {"command": "align", "run_id": run_id, "status": "running", "started": started, "ended": None,
            "mode": "local" if job.local else "ray", "input": job.input, "output": str(job.output), "limit": job.limit,
            "retry_errors": job.retry_errors, "overwrite": job.overwrite,
            "max_error_fraction": job.max_error_fraction,
            "config_hash": config_hash(gcfg, mcfg), "ggro_config": dataclasses.asdict(gcfg),
            "model_config": {**dataclasses.asdict(mcfg), "reward_model": mcfg.reward_model},
            "models": {"policy": mcfg.policy, "reward_model": mcfg.reward_model, "reward_kind": mcfg.reward_kind},
            "cluster": job.cluster(), "versions": versions(), "host": __import__("socket").gethostname(),
            "rows": None}


def run_job(job: AlignJob, aligners: Aligners | None = None) -> int:
    """One align run; pass `aligners` to reuse models already loaded by an earlier run (same ModelConfig)."""
    t0, started, run_id = time.perf_counter(), now(), uuid.uuid4().hex[:12]
    try:                     # the folder is writable and ours before any input is read or model loaded
        prepare_output(job.output)
        if not job.overwrite:       # --overwrite refuses foreign files itself (clear_output), by name too
            check_output(job.output)
        lock = OutputLock(job.output).acquire()
    except OutputError as e:
        raise JobFailed(str(e), 1) from None
    own, info = aligners is None, None
    aligners = aligners or Aligners(job)
    try:
        if job.overwrite:
            n = clear_output(job.output)
            if n:
                log.info("--overwrite: deleted %d file(s) ggro wrote in %s", n, job.output)
        info = manifest(job, run_id, started)
        write_manifest(job.output, info)
        prompts = read_prompts(job, contents=bool(part_files(job.output)))
        ntodo = align_todo(job, prompts, aligners)
        summary = Summary.of_output(job.output, prompts.ids, time.perf_counter() - t0)
        info.update(status="finished", ended=now(), rows={
            "in": prompts.count, "out": summary.rows, "ok": summary.ok, "error": summary.errors,
            "aligned_this_run": ntodo, "skipped_files": prompts.skipped})
        write_manifest(job.output, info)
    except JobFailed as e:
        _failed(job.output, info, str(e))
        raise
    except (ModelLoadError, OutputError, ConfigError, ClusterUnreachable) as e:
        _failed(job.output, info, str(e))
        raise JobFailed(str(e), 1) from None
    except BaseException as e:
        full = disk_full(e, job.output)
        _failed(job.output, info, full or f"{e.__class__.__name__}: {e}")
        if full:
            raise JobFailed(full, 1) from None
        raise
    finally:
        if own:
            aligners.close()
        lock.release()
    return report(job, summary, prompts.count)


def align_todo(job: AlignJob, prompts: Prompts, aligners: Aligners) -> int:
    """Align the input ids not yet in the output (--retry-errors: error rows count as not done); returns how many."""
    from ggro.confighash import config_hash
    index = output_index(job.output, config_hash(job.gcfg, job.mcfg))
    if job.retry_errors and len(index.errors):
        removed = drop_error_rows(job.output, prompts.mask)
        log.info("--retry-errors: %d error row(s) removed from %s; aligning those ids again", removed, job.output)
        index = output_index(job.output, config_hash(job.gcfg, job.mcfg))
    refuse_changed(job, prompts, index)
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


def refuse_changed(job: AlignJob, prompts: Prompts, index) -> None:
    """An id the output holds answered for other messages or another prefill would be skipped as done, and the
    output would keep an answer to a question the input no longer asks: refused, naming one such id."""
    if prompts.contents is None:
        return
    changed = prompts.ids[index.changed(prompts.ids, prompts.contents)]
    if len(changed):
        raise OutputConflict(
            f"{job.output} holds {len(changed)} id(s) of --input answered for other messages or another prefill "
            f"(e.g. {prompts.name(changed[0])!r}): the input changed since that run, or another input shares its "
            "ids. Pass a new --output folder, or --overwrite to align every row again")


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
