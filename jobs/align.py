"""`ggro align`: prompts in, aligned Parquet out; `--local` in this process, otherwise on Ray.

    python -m jobs.align --input prompts.jsonl --output out/     (what `ray job submit` runs)
"""
from __future__ import annotations

import argparse
import sys
import time

from ggro.config import ConfigError, ModelLoadError
from ggro.rows import dedupe, read_rows
from jobs.common import add_engine_args, example_prompts, fail, resolve_args, torch_threads, module_main
from jobs.plan import add_plan_args, dry_run
from pipeline.output import OutputError, Summary, done_ids, prepare_output, read_output, write_part
from pipeline.ray_align import add_cluster_args


def add_io_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", help="JSONL or Parquet file (or folder) of rows with `prompt` or `messages`, "
                   "optional `id` and `prefill` [the bundled example prompts]")
    p.add_argument("--output", help="output folder for Parquet part files (rerun to resume): a path on storage "
                   "every Ray node sees, or a pyarrow filesystem URI (s3://bucket/dir, gs://..., file://...)")
    p.add_argument("--limit", type=int, help="only the first N input rows")
    p.add_argument("--overwrite", action="store_true", help="empty --output first instead of resuming")
    p.add_argument("--local", action="store_true", help="run in this process instead of on Ray")


def add_args(p: argparse.ArgumentParser) -> None:
    add_io_args(p)
    add_engine_args(p)
    add_plan_args(p)
    add_cluster_args(p)


def input_rows(args) -> list:
    path = args.input or example_prompts()
    try:
        if "://" in str(path):   # s3://, gs://, file://...: any filesystem pyarrow accepts
            from pipeline.ray_align import read_uri_rows
            rows = list(dedupe(read_uri_rows(path)))
        else:
            rows = list(dedupe(read_rows(path)))
    except FileNotFoundError:
        fail(f"--input {path}: no such file")
    return rows[:args.limit] if args.limit else rows


def align_local(engine, rows, out_dir, gcfg, flush_every: int) -> None:
    from tqdm import tqdm
    buf = []
    with tqdm(total=len(rows), desc=f"align ({gcfg.method})", unit="row", file=sys.stderr) as bar:
        for rec in engine.align(rows, gcfg):
            buf.append(rec)
            bar.update(1)
            if len(buf) >= flush_every:
                write_part(out_dir, buf)
                buf = []
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
                print(f"ggro: loading {m.policy}{also} in this process", file=sys.stderr)
                torch_threads(self.mcfg.cohorts)
                self.engine = Engine.load(self.mcfg)
            align_local(self.engine, rows, out_dir, gcfg, flush_every=self.mcfg.batch_size)
            return
        from pipeline.ray_align import align_on_ray, start_ray_workers
        if self.workers is None:
            self.workers = start_ray_workers(self.mcfg, self.args)
        align_on_ray(rows, out_dir, gcfg, self.mcfg, self.args, self.workers)

    def close(self) -> None:
        if self.workers is not None:
            self.workers.shutdown()
            self.workers = None


def report_errors(table, show: int = 10) -> None:
    bad = [(i, e) for i, e in zip(table.column("id").to_pylist(), table.column("error").to_pylist()) if e]
    for rid, err in bad[:show]:
        print(f"row {rid}: {err}", file=sys.stderr)
    if len(bad) > show:
        print(f"... and {len(bad) - show} more rows with errors (see the `error` column)", file=sys.stderr)


def run(args, aligners: Aligners | None = None) -> int:
    """`ggro align`; pass `aligners` to reuse models already loaded by an earlier run (same ModelConfig)."""
    if not args.output and not args.dry_run:
        fail("--output DIR is required (Parquet part files are written there)")
    try:
        gcfg, mcfg, rest = resolve_args(args)
    except ConfigError as e:
        fail(str(e))
    if args.dry_run:
        return dry_run(args, gcfg, mcfg)
    rows = input_rows(args)
    t0 = time.perf_counter()
    own = aligners is None
    aligners = aligners or Aligners(args)
    try:
        from ggro.config import config_hash
        prepare_output(args.output, args.overwrite)
        done = done_ids(args.output, config_hash(gcfg, mcfg))
        todo = [r for r in rows if r.id not in done]
        if done:
            print(f"resuming: {len(rows) - len(todo)} of {len(rows)} rows already in {args.output}", file=sys.stderr)
        if todo:
            aligners.align(todo, args.output, gcfg, mcfg)
    except (ModelLoadError, OutputError, ConfigError) as e:
        fail(str(e), 1)
    finally:
        if own:
            aligners.close()
    table = read_output(args.output)
    wanted = {r.id for r in rows}
    table = table.filter([i in wanted for i in table.column("id").to_pylist()])
    report_errors(table)
    print(f"wrote {args.output}\n" + Summary.of(table, time.perf_counter() - t0).render(len(rows)))
    return 0 if table.num_rows == len(rows) else 1


def main(argv=None) -> int:
    return module_main("jobs.align", __doc__, add_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
