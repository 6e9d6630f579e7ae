"""`ggro bench`'s measurements and output (no Ray, no argparse): time each method, the engine against the
reference oracle and batch scaling on one loaded Engine, then tables, CSVs and plots. jobs/bench.py holds
the flags and the entry point."""
from __future__ import annotations

import csv
import math
import os
import platform
import time
from dataclasses import replace
from pathlib import Path


# ---------------------------------------------------------------- measurements

def time_method(engine, rows, gcfg, batch_size: int, cohorts: int = 1) -> dict:
    """Run one configuration over `rows`; wall time covers encoding, search and decoding to text."""
    eng = replace(engine, mcfg=replace(engine.mcfg, batch_size=batch_size, cohorts=min(cohorts, batch_size)))
    t0 = time.perf_counter()
    recs = list(eng.align(rows, gcfg))
    wall = time.perf_counter() - t0
    engine.policy.release([r.id for r in rows])
    return {"records": recs, "wall_s": wall}


def warm_up(engine, rows, gcfg) -> None:
    """One short untimed greedy and GGRO pass, so the first timed method does not pay for warm-up
    (allocator growth, first-call kernel selection)."""
    time_method(engine, rows[:2], replace(gcfg, method="greedy", max_new_tokens=4), 2)
    time_method(engine, rows[:2], replace(gcfg, method="ggro", max_new_tokens=6, num_refinements=2), 2)


def method_rows(engine, rows, gcfg, s: dict, batch_size: int, log, save_dir: Path | None = None,
                second_opinion: bool = False, judge=None, keep_records: bool = False) -> list[dict]:
    """Time each method; with `save_dir`, also write its rows as an align output (for `ggro report`).
    `second_opinion`: score every response with `judge` too (a Reward in policy ids; None: the policy as a
    yes/no judge). `keep_records`: leave each method's output records in its result (`records`)."""
    import shutil
    from pipeline.eval import metrics as M
    from pipeline.batch.output import write_part
    configs = [("greedy", replace(gcfg, method="greedy"), 1)]
    configs += [(f"best-of-{n}", replace(gcfg, method="best-of-n", n=n), 1) for n in s["best_of_n"]]
    ggro = []    # (mode, S, B): every mode at every S and B, unless the mode names its own
    for b in s["budgets"]:
        for m, ms, mb in s["modes"]:
            ggro += [(m, k, mb or b) for k in ([ms] if ms else s["refinements"])]
    configs += [(f"ggro{'' if m == 'faithful' else '-' + m} S={k}{f' B={b}' if b else ''}{f' x{c}' if c > 1 else ''}",
                 replace(gcfg, method="ggro", num_refinements=k, search_mode=m, max_refined_segments=b), c)
                for c in sorted({1, engine.mcfg.cohorts}) for m, k, b in dict.fromkeys(ggro)]
    import torch
    results, greedy = [], None
    threads = torch.get_num_threads()
    for label, cfg, cohorts in configs:
        log(f"bench: {label} on {len(rows)} prompts, max_new_tokens={cfg.max_new_tokens} ...")
        torch.set_num_threads(max(1, threads // cohorts))    # every row gets the same cores in all
        r = time_method(engine, rows, cfg, batch_size, cohorts)
        torch.set_num_threads(threads)
        recs = r["records"]
        if save_dir is not None:
            d = save_dir / label.replace(" S=", "-S").replace(" B=", "-B").replace(" x", "-x")
            shutil.rmtree(d, ignore_errors=True)
            write_part(d, recs)
        ok = [x for x in recs if x["error"] is None]
        by_id = {x["id"]: x["reward"] for x in ok}
        if greedy is None:
            greedy = (by_id, ok)
        wr = M.win_rate(by_id, greedy[0], M.same_responses(ok, greedy[1]))
        results.append({
            "method": label, "prompts": len(recs), "errors": len(recs) - len(ok), "wall_s": r["wall_s"],
            "prompts_per_s": len(recs) / r["wall_s"] if r["wall_s"] else math.nan,
            "policy_tokens": sum(x["policy_tokens"] or 0 for x in ok),
            "reward_calls": sum(x["reward_calls"] or 0 for x in ok),
            "mean_reward": M.mean(by_id.values()), "win_rate_vs_greedy": wr.rate,
            "wins": wr.wins, "ties": wr.ties, "losses": wr.losses,
            "mean_nudges": M.mean(x["num_nudges"] for x in ok),
        })
        results[-1]["records"] = recs
        log(f"bench:   {results[-1]['wall_s']:.1f}s, mean reward {results[-1]['mean_reward']:.3f}")
    base = results[0]
    for r in results:   # what a user weighs: the cost relative to greedy and the reward it buys per second
        r["wall_vs_greedy"] = r["wall_s"] / base["wall_s"] if base["wall_s"] else math.nan
        r["gain_per_s"] = (r["mean_reward"] - base["mean_reward"]) / r["wall_s"] if r["wall_s"] else math.nan
    if second_opinion:
        second_opinions(engine, rows, results, log, judge)
    for r in results:
        if not keep_records:
            del r["records"]
    return results


def second_opinions(engine, rows, results: list[dict], log, judge=None) -> None:
    """Score every response with `judge` (None: the policy as a yes/no judge), a reward that did not guide the
    search: per method its mean (`judge_reward`), each prompt's score (`judge`, by id), and the share of
    prompts where it agrees with the guide on whether the method beat greedy (`judge_agreement`; a prompt where
    the method gave greedy's response, or either scores a tie, is left out)."""
    from pipeline.eval import metrics as M
    judge = judge if judge is not None else policy_judge(engine)
    log("bench: second opinion (a judge that did not guide the search) on every response ...")
    for r in results:
        r["judge"] = judge_scores(engine, rows, r["records"], judge)
        r["guide"] = {rec["id"]: rec["reward"] for rec in r["records"] if rec["id"] in r["judge"]}
        r["judge_reward"] = M.mean(r["judge"].values())
    judge_agreement(results)


def judge_agreement(results: list[dict]) -> None:
    """Each method's `judge_agreement` with the guide on whether it beat greedy (`results[0]`), from its records
    and its `guide` and `judge` scores by id (see second_opinions)."""
    from pipeline.eval import metrics as M
    base = results[0]
    for r in results:
        same = M.same_responses(r["records"], base["records"])      # a tie, whatever the rounding of its scores
        agree = [(r["guide"][i] > base["guide"][i]) == (r["judge"][i] > base["judge"][i])
                 for i in r["guide"] if i in base["guide"] and i not in same and r["guide"][i] != base["guide"][i]
                 and r["judge"][i] != base["judge"][i]]
        r["judge_agreement"] = sum(agree) / len(agree) if agree else math.nan


def policy_judge(engine, rubric: str | None = None):
    """The policy as a yes/no judge of the responses (`rubric`, else the guide's own question), on its own weights."""
    from ggro.reward import RewardModel
    return RewardModel(engine.policy.model, engine.tokenizer, "judge", rubric or engine.mcfg.question, engine.policy.eos)


def judge_scores(engine, rows, records: list[dict], judge, chunk: int = 8) -> dict[str, float]:
    """{id: judge's reward} for every record without an error: the prompt as the policy read it (prefill
    included) plus the response, in policy ids (a judge of another vocabulary re-reads it in its own)."""
    from ggro.chat import text_ids
    from ggro.retokenize import Retokenized
    from ggro.seam import RewardQuery
    tok = engine.tokenizer
    x = {p.id: p.ids for p in encode_rows(engine, rows, 1)}
    if isinstance(judge, Retokenized):
        for row in rows:
            if row.id in x:
                judge.register(row)
    ok = [rec for rec in records if rec["error"] is None and rec["id"] in x]
    out = {}
    for i in range(0, len(ok), chunk):
        part = ok[i:i + chunk]
        queries = [RewardQuery(x[rec["id"]] + text_ids(tok, rec["response"] or ""),
                               **({"seq_id": rec["id"], "prefix_len": len(x[rec["id"]])} if isinstance(judge, Retokenized)
                                  else {})) for rec in part]
        out.update((rec["id"], s.reward) for rec, s in zip(part, judge.score(queries)))
    if isinstance(judge, Retokenized):
        for i in x:
            judge.forget(i)
    return out


def encode_rows(engine, rows, max_new_tokens: int):
    from ggro.rows import encode
    out = []
    for row in rows:
        if row.error is None:
            try:
                out.append(encode(row, engine.tokenizer, engine.mcfg.prompt_format, max_new_tokens, engine.context))
            except ValueError:
                pass
    return out


def oracle_rows(engine, rows, gcfg, s: dict, batch_size: int, log) -> list[dict]:
    """The engine (batch 1 and batched) against ggro/reference.py on the same prompts."""
    from ggro import reference
    from ggro.search import run
    cfg = replace(gcfg, method="ggro", max_new_tokens=s["oracle_max_new_tokens"],
                  num_refinements=s["oracle_refinements"])
    prompts = encode_rows(engine, rows, cfg.max_new_tokens)[:s["oracle_prompts"]]
    if not prompts:
        return []
    log(f"bench: oracle (ggro/reference.py) on {len(prompts)} prompts, S={cfg.num_refinements}, "
        f"max_new_tokens={cfg.max_new_tokens} ...")
    ref_reward = reference.ReferenceReward.of(engine.reward)
    model, eos = engine.policy.model, engine.policy.eos
    t0 = time.perf_counter()
    oracle = {p.id: reference.reference_ggro(p.id, p.ids, model, ref_reward, cfg, eos, p.has_prefill)
              for p in prompts}
    oracle_wall = time.perf_counter() - t0
    out = [{"implementation": "oracle (reference.py)", "batch_size": 1, "prompts": len(prompts),
            "wall_s": oracle_wall, "speedup_vs_oracle": 1.0, "identical_tokens": f"{len(prompts)}/{len(prompts)}",
            "max_reward_diff": 0.0, "policy_tokens": sum(r.policy_tokens for r in oracle.values())}]
    for b in sorted({1, min(batch_size, len(prompts))}):
        log(f"bench: engine at batch {b} on the same prompts ...")
        t0 = time.perf_counter()
        got = {r.id: r for r in run(prompts, engine.policy, engine.reward, cfg, b)}
        wall = time.perf_counter() - t0
        engine.policy.release([p.id for p in prompts])
        same = sum(got[i].tokens == oracle[i].tokens for i in oracle)
        diff = max(abs(got[i].reward - oracle[i].reward) for i in oracle)
        out.append({"implementation": "engine", "batch_size": b, "prompts": len(prompts), "wall_s": wall,
                    "speedup_vs_oracle": oracle_wall / wall if wall else math.nan,
                    "identical_tokens": f"{same}/{len(prompts)}", "max_reward_diff": diff,
                    "policy_tokens": sum(r.policy_tokens for r in got.values())})
    return out


def scaling_rows(engine, rows, gcfg, s: dict, log) -> list[dict]:
    from ggro.search import Prompt, run
    cfg = replace(gcfg, method="ggro", max_new_tokens=s["scaling_max_new_tokens"],
                  num_refinements=s["scaling_refinements"])
    base = encode_rows(engine, rows, cfg.max_new_tokens)
    n = s["scaling_prompts"]
    if not base or not n:
        return []
    prompts = [Prompt(f"{base[i % len(base)].id}#{i // len(base)}" if i >= len(base) else base[i].id,
                      base[i % len(base)].ids, base[i % len(base)].has_prefill) for i in range(n)]
    out, first = [], None
    for b in s["scaling_batches"]:
        log(f"bench: scaling, ggro S={cfg.num_refinements} on {n} prompts at batch {b} ...")
        t0 = time.perf_counter()
        res = {r.id: r.tokens for r in run(prompts, engine.policy, engine.reward, cfg, b)}
        wall = time.perf_counter() - t0
        engine.policy.release([p.id for p in prompts])
        first = first or res
        toks = sum(len(t) for t in res.values())
        out.append({"batch_size": b, "prompts": n, "wall_s": wall, "prompts_per_s": n / wall,
                    "response_tokens_per_s": toks / wall,
                    "same_outputs_as_first": f"{sum(res[i] == first[i] for i in res)}/{n}"})
    for r in out:
        r["speedup_vs_first"] = r["prompts_per_s"] / out[0]["prompts_per_s"]
    return out


# ---------------------------------------------------------------- output

def table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    def cell(v):
        if isinstance(v, float):
            if math.isnan(v):
                return "–"
            return f"{v:.1e}" if 0 < abs(v) < 1e-3 else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)
    body = [[cell(r.get(k, "")) for k, _ in cols] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, (_, h) in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths))) + " |"
    sep = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line([h for _, h in cols]), sep] + [line(b) for b in body])


METHOD_COLS = [("method", "method"), ("prompts", "prompts"), ("errors", "errors"), ("wall_s", "wall (s)"),
               ("prompts_per_s", "prompts/s"), ("policy_tokens", "policy tokens"), ("reward_calls", "RM calls"),
               ("mean_reward", "mean reward"), ("win_rate_vs_greedy", "win rate vs greedy"),
               ("mean_nudges", "nudges/resp"), ("wall_vs_greedy", "wall / greedy"),
               ("gain_per_s", "reward gain over greedy per s")]
SECOND_COLS = [("judge_reward", "judge reward (2nd opinion)"), ("judge_agreement", "judge agrees vs greedy")]
ORACLE_COLS = [("implementation", "implementation"), ("batch_size", "batch"), ("prompts", "prompts"),
               ("wall_s", "wall (s)"), ("speedup_vs_oracle", "speed-up vs oracle"),
               ("identical_tokens", "identical outputs"), ("max_reward_diff", "max reward diff")]
SCALING_COLS = [("batch_size", "batch"), ("prompts", "prompts"), ("wall_s", "wall (s)"),
                ("prompts_per_s", "prompts/s"), ("response_tokens_per_s", "response tok/s"),
                ("speedup_vs_first", "speed-up vs batch 1"), ("same_outputs_as_first", "same outputs as batch 1")]


def write_csv(path: Path, rows: list[dict], cols) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k, _ in cols], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def plot_reward_vs_wall(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    import re
    families: dict[str, list] = {}     # one line per method family: its N or S values along it
    for r in rows:
        families.setdefault(re.sub(r"(S=|best-of-)\d+", r"\1N", r["method"]).replace("S=N", "S=*"), []).append(r)
    for k, (name, pts) in enumerate(families.items()):
        ax.plot([r["wall_s"] for r in pts], [r["mean_reward"] for r in pts], marker="osD^v<>p*h"[k % 10],
                color=f"C{k % 10}", label=name, ms=7)
        for r in pts:
            ax.annotate(r["method"], (r["wall_s"], r["mean_reward"]), textcoords="offset points", xytext=(5, 5),
                        fontsize=8)
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.15, y=0.12)
    ax.set_xlabel("wall time for the whole prompt set (s, log scale)")
    ax.set_ylabel("mean reward over prompts (RM score)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["batch_size"] for r in rows], [r["prompts_per_s"] for r in rows], marker="o")
    for r in rows:
        ax.annotate(f"{r['prompts_per_s']:.2f}", (r["batch_size"], r["prompts_per_s"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["batch_size"] for r in rows], [str(r["batch_size"]) for r in rows])
    ax.set_ylim(0, 1.15 * max(r["prompts_per_s"] for r in rows))
    ax.margins(x=0.1)
    ax.set_xlabel("batch size (prompts advanced together per round)")
    ax.set_ylabel("throughput (prompts/s)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def model_name(spec: str) -> str:
    from ggro.models import DEFAULT_NAME
    return f"{spec} ({DEFAULT_NAME})" if spec == "default" else Path(spec).name


def machine() -> str:
    import torch
    load = ""
    if hasattr(os, "getloadavg"):
        load = f", load avg {os.getloadavg()[0]:.1f}"
    return (f"{platform.machine()} {os.cpu_count()} cores{load}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {platform.python_implementation()} {platform.python_version()}")


def write_results(out: Path, head: str, s: dict, gcfg, mcfg, n_rows: int, methods: list[dict], oracle: list[dict],
                  scaling: list[dict], second_opinion: bool) -> str:
    """Write bench.csv (+ oracle, scaling), the plots and bench.txt into `out`; returns the text."""
    cols = METHOD_COLS + (SECOND_COLS if second_opinion else [])
    batch = mcfg.batch_size
    write_csv(out / "bench.csv", methods, cols + [("wins", ""), ("ties", ""), ("losses", "")])
    plot_reward_vs_wall(methods, out / "bench_reward_vs_wall.png",
                        f"Reward vs wall time: {n_rows} prompts, max {gcfg.max_new_tokens} new tokens, batch {batch}"
                        f"\npolicy {model_name(mcfg.policy)}, reward {model_name(mcfg.reward_model)} "
                        f"({mcfg.reward_kind})")
    parts = [head, "", "Methods (win rate: paired by prompt id vs greedy, ties count half)", table(methods, cols)]
    if oracle:
        write_csv(out / "bench_oracle.csv", oracle, ORACLE_COLS + [("policy_tokens", "")])
        parts += ["", f"Engine vs oracle (ggro/reference.py), GGRO S={s['oracle_refinements']}, "
                      f"max_new_tokens {s['oracle_max_new_tokens']}", table(oracle, ORACLE_COLS)]
    if scaling:
        import torch
        write_csv(out / "bench_scaling.csv", scaling, SCALING_COLS)
        plot_scaling(scaling, out / "bench_scaling.png",
                     f"GGRO engine throughput vs batch size\n(S={s['scaling_refinements']}, "
                     f"max {s['scaling_max_new_tokens']} new tokens, {scaling[0]['prompts']} prompts, "
                     f"{torch.get_num_threads()} thread(s))")
        parts += ["", f"Batch scaling, GGRO S={s['scaling_refinements']}, max_new_tokens {s['scaling_max_new_tokens']}",
                  table(scaling, SCALING_COLS)]
    text = "\n".join(parts) + "\n"
    (out / "bench.txt").write_text(text, encoding="utf-8")
    return text
