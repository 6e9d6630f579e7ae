"""`ggro dpo`: DPO preference pairs (TRL conversational format), chosen = GGRO, rejected = a baseline.

Either run both methods over --input now (on Ray, or --local), each into OUTPUT/aligned-METHOD/
(resumable like `ggro align`), or join two existing align outputs with --chosen DIR --rejected DIR.

    python -m jobs.dpo --input prompts.jsonl --output dpo/ --rejected-method greedy --min-margin 0.5
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

from jobs import align
from jobs.common import fail, module_main


def add_args(p: argparse.ArgumentParser) -> None:
    align.add_args(p)
    d = p.add_argument_group("dpo")
    d.add_argument("--rejected-method", choices=("greedy", "best-of-n"), default="greedy",
                   help="baseline for the rejected response (best-of-n with --n 1 is one sampled response)")
    d.add_argument("--min-margin", type=float, default=0.0,
                   help="keep pairs with chosen_reward - rejected_reward >= this")
    d.add_argument("--chosen", help="existing `ggro align` output folder to use as chosen (skip aligning)")
    d.add_argument("--rejected", help="existing `ggro align` output folder to use as rejected (skip aligning)")


def run(args) -> int:
    from pipeline.dpo import build_pairs
    from pipeline.output import read_output
    import pyarrow.parquet as pq

    if args.dry_run:   # ggro and the baseline run in turn on the same actors: one plan covers both
        from jobs.plan import dry_run_args
        return dry_run_args(args)
    if not args.output:
        fail("--output DIR is required")
    out = Path(args.output)
    if bool(args.chosen) != bool(args.rejected):
        fail("give both --chosen and --rejected (join mode), or neither (align both now)")
    if args.method not in (None, "ggro"):
        fail("--method is the chosen side and must be ggro; pick the baseline with --rejected-method")
    if args.overwrite and out.exists():
        import shutil
        shutil.rmtree(out)
    if args.chosen:
        chosen_dir, rejected_dir = Path(args.chosen), Path(args.rejected)
    else:
        chosen_dir, rejected_dir = out / "aligned-ggro", out / f"aligned-{args.rejected_method}"
        aligners = align.Aligners(args)     # both methods run on the same models, loaded once
        try:
            for method, where in (("ggro", chosen_dir), (args.rejected_method, rejected_dir)):
                sub = copy.copy(args)
                sub.method, sub.output, sub.overwrite = method, str(where), False
                print(f"dpo: aligning with {method} into {where}", file=sys.stderr)
                if align.run(sub, aligners):
                    print(f"dpo: warning: {method} output does not hold every input row", file=sys.stderr)
        finally:
            aligners.close()
    chosen, rejected = read_output(chosen_dir), read_output(rejected_dir)
    if chosen.num_rows == 0:
        fail(f"no aligned rows in {chosen_dir}")
    pairs, stats = build_pairs(chosen, rejected, args.min_margin)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "pairs.parquet"
    tmp = out / ".pairs.parquet.tmp"
    pq.write_table(pairs, tmp)
    tmp.rename(target)
    print(f"wrote {target}\n{stats.render()}")
    return 0


def main(argv=None) -> int:
    return module_main("jobs.dpo", __doc__, add_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
