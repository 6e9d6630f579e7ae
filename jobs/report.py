"""`ggro report`: compare `ggro align` outputs (any methods) in a Markdown report with PNG plots.

    ggro report --input out/greedy out/bon4 out/ggro --output report/

Writes REPORT_DIR/report.md, summary.csv and PNGs (reward distribution, paired win rate against the
baseline, coverage curve, reward against cost, nudges per response, task metrics when the rows carry
them: GSM8K accuracy, refusal and over-refusal rates) and report.html: every response beside the
baseline's, and for GGRO rows aligned with `--trace`, its segments, the uncertain tokens with their
entropy and the nudges tried with their rewards, the accepted one highlighted (a self-contained page, no
scripts). Definitions: pipeline/eval/metrics.py.
"""
from __future__ import annotations

import argparse
import sys
from jobs.common import module_main


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="DIR", help="`ggro align` output folders")
    p.add_argument("--output", required=True, metavar="REPORT_DIR",
                   help="folder for report.md, summary.csv, PNGs and report.html")
    p.add_argument("--labels", nargs="+", help="a name per input (default: the method, plus the folder when "
                   "two inputs share a method)")
    p.add_argument("--baseline", help="label of the method others are paired against [greedy if present, "
                   "else the first input]")
    p.add_argument("--threshold", type=float, default=0.0,
                   help="coverage threshold: a prompt is covered when its reward >= this (for the default "
                        "judge reward, 0 means the judge says Yes more than No)")
    p.add_argument("--reward-unit", default="RM score",
                   help="how plots name the reward's unit (e.g. 'judge logit Yes - No')")


def run(args) -> int:
    from jobs.common import fail, made_dir
    from pipeline.eval.report import load_methods, markdown_table, pick_baseline, write_report, SUMMARY_COLUMNS, TASK_COLUMNS
    try:
        methods = load_methods(args.input, args.labels)
        base = pick_baseline(methods, args.baseline)
    except ValueError as e:
        fail(str(e))
    made_dir(args.output, own=("report.md", "report.html", "summary.csv", "*.png"))
    try:
        res = write_report(methods, args.output, base, args.threshold, args.reward_unit)
    except OSError as e:
        fail(f"--output {args.output}: cannot write the report there ({e.strerror or e})", 1)
    print(markdown_table(res["summary"], SUMMARY_COLUMNS))
    if any(s["_task_n"] for s in res["summary"]):
        print()
        print(markdown_table(res["summary"], TASK_COLUMNS))
    print(f"\nwrote {len(res['files'])} files to {args.output} (report.md, summary.csv, "
          f"{sum(1 for f in res['files'] if f.suffix == '.png')} plots, report.html)", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return module_main("jobs.report", __doc__, add_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
