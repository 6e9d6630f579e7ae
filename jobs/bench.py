"""`ggro bench`: time greedy, best-of-n (several N) and GGRO (several S) side by side in one process.

    ggro bench --quick                         # a few minutes on a laptop CPU
    ggro bench --input gsm8k.jsonl --limit 4 --max-new-tokens 48 --output bench/

Prints and writes (bench.csv, bench_reward_vs_wall.png):
  1. methods: wall time, prompts/s, policy tokens, reward calls, mean reward, win rate vs greedy
     (paired by id, ties count half), wall time relative to greedy and the reward gained over greedy
     per wall-second, for greedy, best-of-n for each --best-of-n and GGRO for each --modes and
     --refinements (and, with --cohorts 2, GGRO again in two overlapped cohorts), all on the same
     prompts with the same models; --second-opinion adds a judge's view of every response (a reward
     that did not guide the search). Each method's rows are also written as an align output under
     OUTPUT/align/<method>/, so `ggro report --input OUTPUT/align/*` adds the task metrics and plots;
  2. engine vs oracle: the batched, KV-cached engine against the plain reference implementation
     (ggro/reference.py: one prompt at a time, no cache, dense one-hot gradient) on the same prompts;
     the outputs are checked token for token, so the ratio is a pure speed-up (bench_oracle.csv);
  3. batch scaling: the engine's GGRO throughput (prompts/s) at batch sizes 1, 4, 16 over 16 prompts
     (the prompt set repeated under new ids when it is smaller) (bench_scaling.csv, bench_scaling.png).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import time
from dataclasses import replace

from ggro.config import SEARCH_MODES
from jobs import logs
from jobs.common import at_least, made_dir, module_main, positive_ints
from jobs.logs import add_log_args

QUICK = dict(limit=2, max_new_tokens=16, best_of_n=[2, 4], refinements=[2, 4], modes=[("faithful", None, None)], budgets=[None],
             oracle_prompts=1, oracle_max_new_tokens=8, scaling_prompts=16, scaling_max_new_tokens=8)
FULL = dict(limit=None, max_new_tokens=64, best_of_n=[2, 4, 8], refinements=[2, 4, 8], modes=[(m, None, None) for m in SEARCH_MODES],
            budgets=[None],
            oracle_prompts=3, oracle_max_new_tokens=32, scaling_prompts=16, scaling_max_new_tokens=32)


def _modes(s: str) -> list[tuple]:
    """`mode` (timed at every --refinements S and --budgets B) or `mode:S` / `mode:S:B` (that row alone)."""
    out = []
    for v in (v.strip() for v in s.split(",") if v.strip()):
        name, *nums = v.split(":")
        try:
            nums = [int(n) for n in nums]
        except ValueError:
            nums = [0]
        if name not in SEARCH_MODES or len(nums) > 2 or any(n < 1 for n in nums):
            raise argparse.ArgumentTypeError(f"expected modes from {SEARCH_MODES}, each optionally :S or :S:B "
                                             f"(e.g. lookahead:8:1), got {v!r}")
        out.append((name, *nums) + (None,) * (2 - len(nums)))
    if not out:
        raise argparse.ArgumentTypeError(f"expected modes from {SEARCH_MODES}, got {s!r}")
    return out


def _budgets(s: str) -> list[int | None]:
    vals = [v.strip() for v in s.split(",") if v.strip()]
    try:
        out = [None if v == "all" else int(v) for v in vals]
    except ValueError:
        out = []
    if not out or any(b is not None and b < 1 for b in out):
        raise argparse.ArgumentTypeError(f"expected 'all' or integers >= 1, comma-separated, got {s!r}")
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    from jobs.common import add_engine_args
    p.add_argument("--input", help="prompt file (JSONL/Parquet) [the bundled example prompts]")
    p.add_argument("--limit", type=at_least(1), help="only the first N prompts [quick: 2; else all]")
    p.add_argument("--output", default="bench", help="folder for bench.csv and the plots")
    p.add_argument("--quick", action="store_true",
                   help=f"small settings that finish in minutes on a CPU: {QUICK}; explicit flags still win")
    p.add_argument("--best-of-n", type=positive_ints, help="N values for best-of-n [quick: 2,4; else 2,4,8]")
    p.add_argument("--refinements", type=positive_ints, help="S values for GGRO [quick: 2,4; else 2,4,8]")
    p.add_argument("--modes", type=_modes, help=f"GGRO search modes timed at each S and B, comma-separated "
                   f"({', '.join(SEARCH_MODES)}); `mode:S` or `mode:S:B` times that one setting (e.g. "
                   f"faithful,lookahead:8:1) [quick: faithful; else all]")
    p.add_argument("--budgets", type=_budgets, help="max refined segments B for the GGRO rows, comma-separated; "
                   "'all' is no budget (e.g. all,1,2) [all]")
    p.add_argument("--second-opinion", action="store_true",
                   help="also score every response with the policy as a yes/no judge (a reward that did not "
                        "guide the search) and report how often it agrees with the guide against greedy")
    p.add_argument("--oracle-prompts", type=at_least(0), help="prompts timed against the reference oracle, 0 to skip "
                   "[quick: 1; else 3]")
    p.add_argument("--oracle-max-new-tokens", type=at_least(1), help="max new tokens in the oracle comparison "
                   "(the oracle re-runs the whole prefix per token) [quick: 8; else 32]")
    p.add_argument("--oracle-refinements", type=at_least(1), default=2, help="S in the oracle comparison")
    p.add_argument("--scaling-batches", type=positive_ints, default=[1, 4, 16], help="batch sizes for the scaling run")
    p.add_argument("--scaling-prompts", type=at_least(0), help="prompts in the scaling run, 0 to skip [16]")
    p.add_argument("--scaling-max-new-tokens", type=at_least(1), help="max new tokens in the scaling run [quick: 8; else 32]")
    p.add_argument("--scaling-refinements", type=at_least(1), default=2, help="S in the scaling run")
    p.add_argument("--threads", type=at_least(1), help="torch CPU threads (sets GGRO_THREADS) [all cores]; on a shared, "
                   "busy machine 1 thread can be many times faster than oversubscribed cores")
    add_engine_args(p, (QUICK, FULL))
    add_log_args(p, ray=False)     # bench runs in this process: no Ray workers' logs to keep off


def settings(args) -> dict:
    base = QUICK if args.quick else FULL
    out = {k: getattr(args, k) if getattr(args, k, None) is not None else v for k, v in base.items()}
    out.update(oracle_refinements=args.oracle_refinements, scaling_batches=args.scaling_batches,
               scaling_refinements=args.scaling_refinements)
    return out


def run(args) -> int:
    logs.setup_logging(args)
    from jobs.common import example_prompts
    from pipeline.batch.driver import read_input
    from pipeline.eval import bench as B
    gcfg, mcfg, s = resolve_methods(args, "bench", "--best-of-n and --refinements lists", settings, trace=False)
    args.limit = s["limit"]
    rows = read_input(args.input or example_prompts(), args.limit)
    out = made_dir(args.output, own=("bench*", "align"))
    log = logs.log.info        # progress on stderr through the `ggro` logger (--log-level WARNING hides it)
    t0 = time.perf_counter()
    engine = load_engine(mcfg, s, args.threads)
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    batch = mcfg.batch_size
    head = (f"ggro bench{' --quick' if args.quick else ''} | {when} | {B.machine()}\n"
            f"policy {mcfg.policy}, reward {mcfg.reward_model} ({mcfg.reward_kind}), {mcfg.dtype} on {mcfg.device}, "
            f"models loaded in {time.perf_counter() - t0:.1f}s | input {args.input or 'example prompts'} ({len(rows)} "
            f"prompts), max_new_tokens {gcfg.max_new_tokens}, batch {batch}, tau {gcfg.entropy_threshold}, "
            f"top_k {gcfg.top_k}")
    log(head)
    B.warm_up(engine, rows, gcfg)
    methods = B.method_rows(engine, rows, gcfg, s, batch, log, out / "align", args.second_opinion)
    oracle = B.oracle_rows(engine, rows, gcfg, s, batch, log) if s["oracle_prompts"] else []
    scaling = B.scaling_rows(engine, rows, gcfg, s, log) if s["scaling_prompts"] else []
    text = B.write_results(out, head, s, gcfg, mcfg, len(rows), methods, oracle, scaling, args.second_opinion)
    print(text)
    log(f"wrote {out}/bench.csv, bench_reward_vs_wall.png, align/<method>/"
        + (", bench_oracle.csv" if oracle else "") + (", bench_scaling.csv, bench_scaling.png" if scaling else "")
        + f", bench.txt ({time.perf_counter() - t0:.0f}s in all)")
    return 0 if all(m["errors"] == 0 for m in methods) else 1


def resolve_methods(args, command: str, instead: str, settings_of, trace: bool):
    """(search config, model config, settings) of a command that runs several methods (bench, eval): the
    one-method flags are refused, the settings' max_new_tokens and `trace` apply to every method."""
    from ggro.config import ConfigError
    from jobs.common import fail, resolve_args
    for flag in ("method", "n", "num_refinements"):
        if getattr(args, flag, None) is not None:
            fail(f"--{flag.replace('_', '-')} does not apply to {command}: use {instead}")
    try:
        gcfg, mcfg, _ = resolve_args(args)
    except ConfigError as e:
        fail(str(e))
    s = settings_of(args)
    return replace(gcfg, max_new_tokens=s["max_new_tokens"], trace=trace), mcfg, s


def load_engine(mcfg, s: dict, threads: int | None):
    """One Engine for every measurement, its decoder sized for the largest scaling batch."""
    from ggro.engine import Engine
    from ggro.models import ModelLoadError
    from ggro.threads import torch_threads
    from jobs.common import fail
    if threads:
        os.environ["GGRO_THREADS"] = str(threads)
    torch_threads()
    try:
        return Engine.load(replace(mcfg, batch_size=max([mcfg.batch_size] + s["scaling_batches"])))
    except ModelLoadError as e:
        fail(str(e), 1)


def main(argv=None) -> int:
    return module_main("jobs.bench", __doc__, add_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
