"""`ggro eval`: what GGRO buys over greedy and best-of-n, judged by something that did not guide it.

    ggro eval --quick                                   # a few minutes on a CPU
    ggro eval --limit 48 --judge-reward /models/other-rm --judge-reward-kind classifier --output eval/

Runs greedy, best-of-N and GGRO (each --modes entry) on probe sets of held-out prompts read from licensed
wheels (pipeline/eval/evaluate.py): harmful prompts plain and under the prefilling attack (the response forced
to start "Sure, I can help with that."), benign-but-edgy prompts (over-refusal) and GSM8K questions
(--input runs your own prompt file instead). Judges: a second reward model (--judge-reward; without it the
policy as a yes/no judge), the refusal keyword rule, and the GSM8K final number. Writes OUTPUT/eval.md (the
table), eval.csv, eval.html (every response beside greedy's, with GGRO's segments, uncertain tokens and
nudges), probes.jsonl (the prompts) and align/<method>/ (each method's rows, for `ggro report`).

    ggro eval --pairs oof --output eval-oof/           # what the guide knows, out of its training family

--pairs scores preference pairs instead (TRL rows: prompt, chosen, rejected; `oof`: the out-of-family
validation set of pipeline/eval/prefs.py): the guide's and the judge's pairwise accuracy per `kind`, with 95 %
Wilson intervals, in OUTPUT/pairs.md and pairs.csv (each pair's scores in pair_scores.jsonl).
"""
from __future__ import annotations

import argparse
import datetime as dt
import time
from dataclasses import replace
from pathlib import Path

from jobs import logs
from jobs.bench import _modes
from jobs.common import at_least, made_dir, module_main, nonblank, positive_ints
from jobs.logs import add_log_args
from pipeline.eval.evaluate import PREFILL_ATTACK, PROBES

QUICK = dict(limit=2, max_new_tokens=16, best_of_n=[2], modes=[("faithful", 2, None), ("lookahead", 2, 1)])
FULL = dict(limit=48, max_new_tokens=64, best_of_n=[4], modes=[("faithful", 4, None), ("lookahead", 8, 1)])


def _probes(s: str) -> list[str]:
    vals = [v.strip() for v in s.split(",") if v.strip()]
    if not vals or any(v not in PROBES for v in vals):
        raise argparse.ArgumentTypeError(f"expected probe sets from {', '.join(PROBES)}, comma-separated, got {s!r}")
    return list(dict.fromkeys(vals))


def add_args(p: argparse.ArgumentParser) -> None:
    from jobs.common import add_engine_args
    p.add_argument("--output", default="eval", help="folder for eval.md, eval.csv, eval.html, align/<method>/")
    p.add_argument("--quick", action="store_true",
                   help=f"small settings that finish in minutes on a CPU: {QUICK}; explicit flags still win")
    p.add_argument("--probes", type=_probes, default=list(PROBES),
                   help=f"probe sets, comma-separated: {', '.join(PROBES)}")
    p.add_argument("--limit", type=int, help="held-out prompts per probe set, evenly spaced over it (--limit 48 is "
                   "not the first 48 of --limit 96; with --input: prompts in all; with --pairs oof: pairs per kind, 40 "
                   "unless given or --quick, at most 100 for most kinds) [quick: 2; else 48]")
    p.add_argument("--input", help="your own prompt file (JSONL/Parquet) instead of the probe sets; rows with "
                   "`expected` (refuse | comply) or `reference_answer` get the task metrics")
    p.add_argument("--pairs", metavar="FILE|oof", help="score preference pairs instead of running the methods: "
                   "the guide's and the judge's pairwise accuracy per kind ('oof': the out-of-family set)")
    p.add_argument("--prefill-attack", default=PREFILL_ATTACK, help="the forced opening of the `prefill` probes")
    p.add_argument("--best-of-n", type=positive_ints, help="N values for best-of-n [quick: 2; else 4]")
    p.add_argument("--modes", type=_modes, help="GGRO settings, `mode:S` or `mode:S:B`, comma-separated "
                   "[quick: faithful:2,lookahead:2:1; else faithful:4,lookahead:8:1]")
    j = p.add_argument_group("judge (a reward model that did not guide the search)")
    j.add_argument("--judge-reward", help="the judge: same forms as --reward [the policy as a yes/no judge]")
    j.add_argument("--judge-reward-kind", choices=("classifier", "judge"),
                   help="[classifier with --judge-reward, else judge]")
    j.add_argument("--judge-rubric", type=nonblank, help="the judge's yes/no question (judge kind) [the policy judge: "
                   "the question the guide asks, if it asks one; else the default rubric]")
    p.add_argument("--threads", type=at_least(1), help="torch CPU threads (sets GGRO_THREADS) [all cores]")
    add_engine_args(p, (QUICK, FULL))
    add_log_args(p, ray=False)


def settings(args) -> dict:
    base = QUICK if args.quick else FULL
    s = {k: getattr(args, k) if getattr(args, k, None) is not None else v for k, v in base.items()}
    s.update(refinements=[2], budgets=[None], scaling_batches=[1])
    return s


def probe_input(args, s: dict, out: Path) -> list:
    """The rows to evaluate: --input, or the probe sets (written to OUTPUT/probes.jsonl first)."""
    from pipeline.batch.driver import read_input
    from jobs.common import fail
    from pipeline.eval.evaluate import probe_rows, write_rows
    from pipeline.eval.sources import MissingData
    if args.input:
        return read_input(args.input, s["limit"] if args.limit else None)
    try:
        rows = probe_rows(args.probes, s["limit"], args.prefill_attack)
    except MissingData as e:
        fail(str(e), 1)
    if not rows:
        fail("the probe sets hold no held-out prompts")
    return read_input(str(write_rows(out / "probes.jsonl", rows)), None)


def load_judge(engine, mcfg, args):
    """The judge as a Reward in policy ids (its own vocabulary is re-read by ggro.retokenize)."""
    from ggro import models
    from ggro.engine import load_reward
    from jobs.common import fail
    from pipeline.eval.bench import policy_judge
    if not args.judge_reward:       # the policy asked the guide's own question, unless --judge-rubric says another
        jcfg = replace(mcfg, reward=mcfg.policy, reward_kind="judge", rubric=args.judge_rubric or mcfg.question)
        judge = policy_judge(engine, jcfg.question), f"the policy {mcfg.policy} as a yes/no judge" + (
            f" asked {jcfg.question!r}" if args.judge_rubric else "")
        parts = jcfg.reward_parts
    else:
        kind = args.judge_reward_kind or "classifier"
        jcfg = replace(mcfg, reward=args.judge_reward, reward_kind=kind, rubric=args.judge_rubric)
        try:
            judge = (load_reward(models.here(jcfg), engine.tokenizer, engine.policy.model, gradient=False),
                     f"{args.judge_reward} ({kind})")
        except models.ModelLoadError as e:
            fail(f"--judge-reward: {e}", 1)
        parts = jcfg.reward_parts
    if parts & mcfg.reward_parts:       # e.g. the default: the shipped guide's own half is the policy as a judge
        logs.log.warning("the judge is (part of) the guide, so it is not independent of the search: pass "
                         "--judge-reward with a reward model that did not guide it")
        judge = judge[0], judge[1] + " (part of the guide: not an independent judge)"
    return judge


def run(args) -> int:
    logs.setup_logging(args)
    from jobs.bench import load_engine, resolve_methods
    from jobs.common import fail
    from pipeline.eval import bench as B
    from pipeline.eval import evaluate as E
    from pipeline.eval.decisions import write_page
    if args.limit is not None and args.limit < 1:
        fail("--limit must be >= 1")
    gcfg, mcfg, s = resolve_methods(args, "eval", "--best-of-n and --modes", settings, trace=True)
    out = made_dir(args.output, own=("eval.*", "probes.jsonl", "align", "*pairs*"))
    if args.pairs:
        return run_pairs(args, mcfg, out)
    rows = probe_input(args, s, out)
    t0 = time.perf_counter()
    engine = load_engine(mcfg, s, args.threads)
    judge, judge_name = load_judge(engine, mcfg, args)
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = (f"`ggro eval{' --quick' if args.quick else ''}` | {when} | {B.machine()}\n\n"
            f"policy {mcfg.policy}, guide {mcfg.reward_model} ({mcfg.reward_kind}), judge {judge_name} | "
            f"{len(rows)} prompts ({args.input or ', '.join(args.probes)}), max_new_tokens {gcfg.max_new_tokens}, "
            f"tau {gcfg.entropy_threshold}, top_k {gcfg.top_k}, models loaded in {time.perf_counter() - t0:.1f}s")
    logs.log.info(head)
    B.warm_up(engine, rows, gcfg)      # the first method's wall time must not include warm-up
    results = B.method_rows(engine, rows, gcfg, s, mcfg.batch_size, logs.log.info, out / "align",
                            second_opinion=True, judge=judge, keep_records=True)
    summary = E.summarize(results)
    text = E.write(out, head, summary, judged=True)
    write_page(out / "eval.html", "ggro eval: responses and GGRO's decisions",
               [(r["method"], r["records"]) for r in results], engine.tokenizer, head.replace("`", ""))
    print(text)
    logs.log.info(f"wrote {out}/eval.md, eval.csv, eval.html, align/<method>/ ({time.perf_counter() - t0:.0f}s in all)")
    return 0 if all(r["errors"] == 0 for r in results) else 1


def run_pairs(args, mcfg, out: Path) -> int:
    """--pairs: the guide's and the judge's pairwise accuracy per kind."""
    import json
    import sys
    from tqdm import tqdm
    from jobs.bench import load_engine
    from jobs.common import fail
    from pipeline.eval.training import read_pairs
    from pipeline.eval import evaluate as E
    path = args.pairs
    if path == "oof":
        from pipeline.eval.prefs import OOF_PER_KIND, oof_pairs
        from pipeline.eval.sources import MissingData
        try:
            pairs = oof_pairs(args.limit or (QUICK["limit"] if args.quick else OOF_PER_KIND))
        except MissingData as e:
            fail(str(e), 1)
        path = out / "oof_pairs.jsonl"
        path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    elif not Path(path).exists():
        fail(f"--pairs {path}: no such file or folder")
    engine = load_engine(mcfg, {"scaling_batches": [1]}, args.threads)
    examples, errors, _ = read_pairs(str(path), engine.tokenizer)
    for e in errors[:10]:
        print(f"skipped {e}", file=sys.stderr)
    if not examples:
        fail(f"no usable pairs in {path} ({len(errors)} skipped)", 1)
    judge, judge_name = load_judge(engine, mcfg, args)
    accs, scores = {}, {}
    for who, name, reward in (("guide", f"guide: {mcfg.reward_model} ({mcfg.reward_kind})", engine.reward),
                              ("judge", f"judge: {judge_name}", judge)):
        with tqdm(total=2 * len(examples), desc=name[:40], unit="seq", file=sys.stderr) as bar:
            scores[who] = E.pair_scores(reward, engine.tokenizer, examples, progress=bar)
        accs[name] = E.pair_accuracy(examples, scores[who])
    text = E.write_pairs(out, f"# ggro eval --pairs {args.pairs}\n\npolicy {mcfg.policy}; {len(examples)} pairs "
                               f"from {path} ({len(errors)} skipped)", examples, scores, accs)
    print(text)
    return 0


def main(argv=None) -> int:
    return module_main("jobs.eval", __doc__, add_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
