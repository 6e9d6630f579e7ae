"""`ggro dpo`: DPO preference pairs (TRL conversational format), chosen = GGRO, rejected = a baseline.

Either run both methods over --input now (on Ray, or --local), each into OUTPUT/__aligned-METHOD/
(resumable like `ggro align`), or join two existing align outputs with --chosen DIR --rejected DIR.
OUTPUT then holds pairs.parquet as its only data file: the sub-runs' "__" folders and the ".ggro_run.json"
manifest are skipped by pyarrow.dataset.dataset(OUTPUT) and datasets.load_dataset("parquet", data_dir=OUTPUT).

    python -m jobs.dpo --input prompts.jsonl --output dpo/ --rejected-method greedy --min-margin 0.5
"""
from __future__ import annotations

import argparse
import dataclasses
import math

from ggro.config import ConfigError
from jobs import align
from jobs.common import fail, module_main
from jobs.logs import log, setup_logging


def add_args(p: argparse.ArgumentParser) -> None:
    align.add_args(p)
    d = p.add_argument_group("dpo")
    d.add_argument("--rejected-method", choices=("greedy", "best-of-n"), default="greedy",
                   help="baseline for the rejected response (best-of-n with --n 1 is one sampled response)")
    d.add_argument("--min-margin", type=float, default=None,
                   help="keep pairs with chosen_reward - rejected_reward >= this; the default drops ties "
                   "[1e-6]; pairs whose two responses are the same text are always dropped")
    d.add_argument("--keep-truncated", action="store_true",
                   help="keep pairs where either response was cut at --max-new-tokens (finish_reason length)")
    d.add_argument("--chosen", help="existing `ggro align` output folder to use as chosen (skip aligning)")
    d.add_argument("--rejected", help="existing `ggro align` output folder to use as rejected (skip aligning)")


def run(args) -> int:
    setup_logging(args)
    import uuid

    from pipeline.batch.dpo import DEFAULT_MIN_MARGIN, join_outputs
    from pipeline.batch.lock import OutputLock
    from pipeline.batch.manifest import now, versions, write_manifest
    from pipeline.batch.output import OutputError, clear_output, prepare_output

    if args.dry_run:   # ggro and the baseline run in turn on the same actors: one plan covers both
        from jobs.plan import dry_run
        job = _job(args)
        return dry_run(args, job.gcfg, job.mcfg, job.resources)
    if not args.output:
        fail("--output DIR is required")
    out = args.output
    if bool(args.chosen) != bool(args.rejected):
        fail("give both --chosen and --rejected (join mode), or neither (align both now)")
    if args.method not in (None, "ggro"):
        fail("--method is the chosen side and must be ggro; pick the baseline with --rejected-method")
    min_margin = DEFAULT_MIN_MARGIN if args.min_margin is None else args.min_margin
    if not math.isfinite(min_margin):   # NaN compares false: every pair would pass, whatever its margin
        fail(f"--min-margin must be a finite reward difference, got {min_margin}")
    try:
        prepare_output(out)
        lock = OutputLock(out).acquire()
    except OutputError as e:
        fail(str(e), 1)
    try:
        if args.overwrite:
            clear_output(out)
        info = {"command": "dpo", "run_id": uuid.uuid4().hex[:12], "status": "running", "started": now(),
                "ended": None, "input": args.input, "output": str(out), "chosen": args.chosen,
                "rejected": args.rejected, "rejected_method": args.rejected_method, "min_margin": min_margin,
                "keep_truncated": bool(args.keep_truncated), "versions": versions()}
        write_manifest(out, info)
        chosen_dir, rejected_dir = (args.chosen, args.rejected) if args.chosen else align_both(args, out)
        stats = join_outputs(chosen_dir, rejected_dir, out, min_margin, keep_truncated=args.keep_truncated)
        if stats.rows == 0:
            fail(f"no aligned rows in {chosen_dir}")
        info.update(status="finished", ended=now(), pairs=stats.__dict__.copy())
        write_manifest(out, info)
    except OutputError as e:
        fail(str(e), 1)
    finally:
        lock.release()
    print(f"wrote the pairs into {out}\n{stats.render()}")
    return 0


def align_both(args, out) -> tuple[str, str]:
    """Align --input with GGRO and with the baseline into OUT/__aligned-METHOD/, on the same models."""
    from pipeline.batch.driver import Aligners, run_job
    from pipeline.batch.output import SUBRUN_PREFIX, child
    chosen_dir = child(out, f"{SUBRUN_PREFIX}ggro")
    rejected_dir = child(out, f"{SUBRUN_PREFIX}{args.rejected_method}")
    job = _job(args)
    aligners = Aligners(job)     # both methods run on the same models, loaded once
    try:
        for method, where in (("ggro", chosen_dir), (args.rejected_method, rejected_dir)):
            sub = dataclasses.replace(job, gcfg=dataclasses.replace(job.gcfg, method=method), output=where,
                                      overwrite=False)
            log.info("dpo: aligning with %s into %s", method, where)
            code = run_job(sub, aligners)
            if code == 1:
                log.warning("dpo: warning: %s output does not hold every input row", method)
            elif code:
                log.warning("dpo: warning: %s output has many error rows (no pairs for them)", method)
    finally:
        aligners.close()
    return chosen_dir, rejected_dir


def _job(args):
    try:
        return align.job_from_args(args)
    except ConfigError as e:
        fail(str(e))


def main(argv=None) -> int:
    return module_main("jobs.dpo", __doc__, add_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
