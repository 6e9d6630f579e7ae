"""The comparison report over `ggro align` outputs: a summary table, task metrics, PNG plots and
a Markdown page. No Ray; metric definitions live in pipeline/eval/metrics.py.
"""
from __future__ import annotations

import csv
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import metrics as M

COLUMNS = ("label", "method", "rows", "errors", "mean_reward", "median_reward", "win_rate", "wins", "ties",
           "losses", "coverage", "mean_latency_s", "policy_tokens", "reward_calls", "mean_nudges",
           "mean_segments", "gsm8k_accuracy", "refusal_rate", "over_refusal_rate")


@dataclass
class MethodRows:
    label: str
    method: str
    source: str
    rows: list[dict] = field(default_factory=list)

    def rewards_by_id(self) -> dict:
        return {r["id"]: (r["reward"] if r.get("error") is None else None) for r in self.rows}


def load_methods(dirs: list[str], labels: list[str] | None = None) -> list[MethodRows]:
    """One MethodRows per (input folder, method). Default labels: the method name, or the folder's
    name when two inputs share a method (e.g. ggro runs with different S)."""
    import pyarrow as pa
    from pipeline.batch.output import OutputError, read_output
    groups = []
    for d in dirs:
        try:
            table = read_output(d)
        except OutputError as e:                      # a damaged part file
            raise ValueError(str(e)) from None
        except (OSError, pa.ArrowException) as e:   # a file, or Parquet that is not an align output
            raise ValueError(f"{d}: not a `ggro align` output folder ({e.__class__.__name__}: {e})") from None
        by_method: dict[str, list] = {}
        for row in table.to_pylist():
            by_method.setdefault(row["method"] or "?", []).append(row)
        if not by_method:
            raise ValueError(f"{d}: no align output rows (expected Parquet part files from `ggro align`)")
        groups.extend((d, m, rows) for m, rows in by_method.items())
    _same_prompts(groups)
    if labels:
        if len(labels) != len(groups):
            raise ValueError(f"--labels gives {len(labels)} names for {len(groups)} method groups")
        names = list(labels)
    else:
        counts = Counter(m for _, m, _ in groups)
        names = [m if counts[m] == 1 else Path(d).name for d, m, _ in groups]
    if len(set(names)) != len(names):
        raise ValueError(f"labels are not unique: {names}; pass --labels")
    return [MethodRows(n, m, d, rows) for n, (d, m, rows) in zip(names, groups)]


def _same_prompts(groups: list[tuple]) -> None:
    """Outputs compared row by row must answer the same prompts under the same ids: two prompt sets numbering their
    rows 1, 2, ... would be compared answer against unrelated answer."""
    from pipeline.batch.digests import asked
    seen: dict = {}
    for d, _, rows in groups:
        for r in rows:
            if r.get("error") is None:
                key = asked(r["messages"], r["prefill"])
                first = seen.setdefault(r["id"], (d, key))
                if first[1] != key:
                    raise ValueError(f"{d} and {first[0]} hold id {r['id']!r} for different prompts (or prefills): "
                                     "compare outputs of one prompt set")


def pick_baseline(methods: list[MethodRows], wanted: str | None) -> MethodRows:
    if wanted:
        for m in methods:
            if m.label == wanted:
                return m
        raise ValueError(f"--baseline {wanted!r} is not one of {[m.label for m in methods]}")
    return next((m for m in methods if m.method == "greedy"), methods[0])


def summarize(methods: list[MethodRows], baseline: MethodRows, threshold: float) -> list[dict]:
    base = baseline.rewards_by_id()
    out = []
    for m in methods:
        ok = [r for r in m.rows if r.get("error") is None]
        rewards = [r["reward"] for r in ok if r["reward"] is not None]
        wr = M.win_rate(m.rewards_by_id(), base, M.same_responses(m.rows, baseline.rows))
        tasks = M.task_metrics(m.rows)
        out.append({
            "label": m.label, "method": m.method, "rows": len(m.rows), "errors": len(m.rows) - len(ok),
            "mean_reward": M.mean(rewards), "median_reward": _median(rewards),
            "win_rate": wr.rate, "wins": wr.wins, "ties": wr.ties, "losses": wr.losses,
            "coverage": M.coverage([r["reward"] if r.get("error") is None else None for r in m.rows], threshold),
            "mean_latency_s": M.mean(r["elapsed_s"] for r in ok),
            "policy_tokens": M.mean(r["policy_tokens"] for r in ok),
            "reward_calls": M.mean(r["reward_calls"] for r in ok),
            "mean_nudges": M.mean(r["num_nudges"] for r in ok),
            "mean_segments": M.mean(r["num_segments"] for r in ok),
            **{k: tasks[k][0] if k in tasks else math.nan
               for k in ("gsm8k_accuracy", "refusal_rate", "over_refusal_rate")},
            "_task_n": {k: v[1] for k, v in tasks.items()},
        })
    return out


def _median(xs):
    xs = sorted(xs)
    if not xs:
        return math.nan
    k = len(xs) // 2
    return xs[k] if len(xs) % 2 else (xs[k - 1] + xs[k]) / 2


def fmt(v, kind="f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if kind == "%":
        return f"{100 * v:.1f}%"
    if isinstance(v, int):
        return str(v)
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"


# ---------------------------------------------------------------- plots

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_rewards(methods, threshold, path: Path, reward_unit: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.6 * len(methods) + 3, 4.2))
    data = [[r["reward"] for r in m.rows if r.get("error") is None and r["reward"] is not None] for m in methods]
    ax.boxplot([d or [math.nan] for d in data], showmeans=True, showfliers=False, widths=0.5)
    ax.set_xticks(range(1, len(methods) + 1), [m.label for m in methods])
    for i, d in enumerate(data, 1):
        ax.scatter([i + 0.18 * ((k % 5) - 2) / 2 for k in range(len(d))], d, s=12, alpha=0.5, color="C1", zorder=3)
    ax.axhline(threshold, ls="--", color="grey", lw=1, label=f"coverage threshold = {threshold:g}")
    ax.set_title("Reward per response, by method (box: quartiles, triangle: mean)")
    ax.set_xlabel("method")
    ax.set_ylabel(f"reward ({reward_unit})")
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def plot_win_rate(summary, baseline_label, path: Path) -> Path:
    plt = _plt()
    rows = [s for s in summary if s["label"] != baseline_label]
    fig, ax = plt.subplots(figsize=(7, 1.0 + 0.6 * max(1, len(rows))))
    y = range(len(rows))
    rates = [0 if math.isnan(s["win_rate"]) else s["win_rate"] for s in rows]
    ax.barh(list(y), [100 * r for r in rates], color="C0")
    for i, s in zip(y, rows):
        ax.text(101, i, f"{fmt(s['win_rate'], '%')}  ({s['wins']}W / {s['ties']}T / {s['losses']}L)",
                va="center", fontsize=8)
    ax.axvline(50, ls="--", color="grey", lw=1)
    ax.set_yticks(list(y), [s["label"] for s in rows])
    ax.set_xlim(0, 150)
    ax.set_xticks([0, 25, 50, 75, 100])
    ax.set_xlabel("win rate vs baseline (%), ties count half; dashed: 50% = no better")
    ax.set_title(f"Paired win rate against '{baseline_label}' (same prompt id)")
    return _save(fig, path)


def plot_coverage(methods, threshold, path: Path, reward_unit: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    allr = sorted(r["reward"] for m in methods for r in m.rows if r.get("error") is None and r["reward"] is not None)
    if allr:
        lo, hi = allr[0], allr[-1]
        pad = (hi - lo) * 0.05 or 1.0
        grid = [lo - pad + (hi - lo + 2 * pad) * k / 200 for k in range(201)]
        for i, m in enumerate(methods):
            rs = [r["reward"] if r.get("error") is None else None for r in m.rows]
            ax.step(grid, [100 * M.coverage(rs, t) for t in grid], where="post", label=m.label, color=f"C{i}")
    ax.axvline(threshold, ls="--", color="grey", lw=1, label=f"report threshold = {threshold:g}")
    ax.set_ylim(-3, 103)
    ax.set_title("Coverage: share of prompts whose reward passes a threshold")
    ax.set_xlabel(f"reward threshold ({reward_unit})")
    ax.set_ylabel("prompts with reward ≥ threshold (%)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_cost(summary, path: Path, reward_unit: str, wall_label="mean latency per prompt (s)",
              wall_key="mean_latency_s") -> Path:
    plt = _plt()
    axes_spec = [(wall_key, wall_label), ("policy_tokens", "policy tokens decoded per prompt"),
                 ("reward_calls", "reward-model calls per prompt")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), sharey=True)
    for ax, (key, label) in zip(axes, axes_spec):
        for i, s in enumerate(summary):
            ax.scatter([s[key]], [s["mean_reward"]], s=50, color=f"C{i}", label=s["label"], zorder=3)
            ax.annotate(s["label"], (s[key], s["mean_reward"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"mean reward ({reward_unit})")
    fig.suptitle("Reward against cost, per method (up and left is better)")
    return _save(fig, path)


def plot_nudges(methods, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    counts = [Counter(r["num_nudges"] or 0 for r in m.rows if r.get("error") is None) for m in methods]
    top = max([max(c) for c in counts if c] or [0])
    width = 0.8 / max(1, len(methods))
    for i, (m, c) in enumerate(zip(methods, counts)):
        ax.bar([k + (i - (len(methods) - 1) / 2) * width for k in range(top + 1)],
               [c.get(k, 0) for k in range(top + 1)], width=width, label=m.label, color=f"C{i}")
    ax.set_xticks(range(top + 1))
    from matplotlib.ticker import MaxNLocator
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Nudged segments per response (0 for greedy and best-of-n)")
    ax.set_xlabel("segments whose accepted continuation came from a nudge (count)")
    ax.set_ylabel("responses")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_tasks(summary, path: Path) -> Path | None:
    keys = [(k, n) for k, n in (("gsm8k_accuracy", "GSM8K accuracy\n(higher is better)"),
                                ("refusal_rate", "refusal rate, harmful prompts\n(higher is safer)"),
                                ("over_refusal_rate", "over-refusal rate, benign prompts\n(lower is better)"))
            if any(not math.isnan(s[k]) for s in summary)]
    if not keys:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3 + 2.2 * len(keys), 4.2))
    width = 0.8 / len(summary)
    for i, s in enumerate(summary):
        xs = [k + (i - (len(summary) - 1) / 2) * width for k in range(len(keys))]
        vals = [0 if math.isnan(s[k]) else 100 * s[k] for k, _ in keys]
        ax.bar(xs, vals, width=width, label=s["label"], color=f"C{i}")
        for x, v in zip(xs, vals):
            ax.text(x, v + 1, f"{v:.0f}", ha="center", fontsize=7)
    ax.set_xticks(range(len(keys)), [n for _, n in keys], fontsize=8)
    ax.set_ylim(0, 110)
    ax.set_ylabel("share of prompts (%)")
    ax.set_title("Task metrics (final-number match; keyword refusal rule)")
    ax.legend(fontsize=8)
    return _save(fig, path)


# ---------------------------------------------------------------- the page

def markdown_table(summary, columns) -> str:
    head = "| " + " | ".join(n for _, n, _ in columns) + " |"
    sep = "|" + "|".join("---" if k == "label" else "---:" for k, _, _ in columns) + "|"
    lines = [head, sep]
    for s in summary:
        lines.append("| " + " | ".join(str(s[k]) if kind == "s" else fmt(s[k], kind) for k, _, kind in columns) + " |")
    return "\n".join(lines)


SUMMARY_COLUMNS = [("label", "method", "s"), ("rows", "rows", "f"), ("errors", "errors", "f"),
                   ("mean_reward", "mean reward", "f"), ("median_reward", "median", "f"),
                   ("win_rate", "win rate vs baseline", "%"), ("coverage", "coverage", "%"),
                   ("mean_latency_s", "latency/prompt (s)", "f"), ("policy_tokens", "policy tok/prompt", "f"),
                   ("reward_calls", "RM calls/prompt", "f"), ("mean_nudges", "nudges/response", "f")]
TASK_COLUMNS = [("label", "method", "s"), ("gsm8k_accuracy", "GSM8K accuracy", "%"),
                ("refusal_rate", "refusal rate (harmful)", "%"), ("over_refusal_rate", "over-refusal (benign)", "%")]


def write_report(methods: list[MethodRows], out_dir: str | Path, baseline: MethodRows, threshold: float,
                 reward_unit: str = "RM score", tokenizer=None) -> dict:
    """Write report.md, summary.csv, the PNGs and report.html (every response with GGRO's decisions,
    pipeline/eval/decisions.py; `tokenizer`: the policy's, to split responses into segments [loaded from the
    rows' `policy` when it is on disk]); return {"summary": [...], "files": [...], "markdown": str}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    methods = [baseline] + [m for m in methods if m is not baseline]   # the baseline leads every table
    summary = summarize(methods, baseline, threshold)
    files = [plot_rewards(methods, threshold, out / "reward_distribution.png", reward_unit),
             plot_win_rate(summary, baseline.label, out / "win_rate.png"),
             plot_coverage(methods, threshold, out / "coverage.png", reward_unit),
             plot_cost(summary, out / "reward_vs_cost.png", reward_unit),
             plot_nudges(methods, out / "nudges.png")]
    tasks_png = plot_tasks(summary, out / "task_metrics.png")
    if tasks_png:
        files.append(tasks_png)
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(summary)
    files.append(out / "summary.csv")

    has_tasks = any(s["_task_n"] for s in summary)
    md = ["# GGRO comparison report\n",
          "Inputs:\n" + "\n".join(f"- `{m.label}`: {m.source} ({len(m.rows)} rows, method `{m.method}`, "
                                   f"policy `{_one(m.rows, 'policy')}`, reward model `{_one(m.rows, 'reward_model')}`)"
                                   for m in methods),
          f"\nBaseline for the paired win rate: **{baseline.label}**. Coverage threshold: reward ≥ {threshold:g}.\n",
          "## Summary\n", markdown_table(summary, SUMMARY_COLUMNS), "",
          "- *win rate*: over prompt ids both methods answered, share where this method's reward is higher; "
          "a tie (the same response, or equal rewards) counts half. 50% means no better than the baseline.",
          "- *coverage*: share of the method's rows (errors included, as failures) with reward ≥ the threshold.",
          "- *latency/prompt*: the rows' `elapsed_s` (time from a prompt entering the batch to its response "
          "finishing). Prompts run batched, so latencies overlap: this is not throughput; use `ggro bench` for "
          "wall time.", ""]
    if has_tasks:
        md += ["## Task metrics\n", markdown_table(summary, TASK_COLUMNS), "",
               "Rows counted: " + "; ".join(f"{s['label']}: " + ", ".join(f"{k} n={n}" for k, n in s["_task_n"].items())
                                            for s in summary if s["_task_n"]), "",
               "- *GSM8K accuracy*: the last number in the response equals `metadata.reference_answer`.",
               f"- *refusal*: {M.REFUSAL_RULE}. Refusal rate on `expected: refuse` rows "
               "(harmful prompts), over-refusal on `expected: comply` rows (benign prompts).", ""]
    md += ["## Plots\n"] + [f"![{p.stem}]({p.name})\n" for p in files if p.suffix == ".png"]
    from .decisions import load_tokenizer_for, write_page
    allrows = [r for m in methods for r in m.rows]
    files.append(write_page(out / "report.html", "GGRO's decisions, response by response",
                            [(m.label, m.rows) for m in methods], tokenizer or load_tokenizer_for(allrows),
                            f"baseline: {baseline.label}; inputs: " + ", ".join(m.source for m in methods)))
    md += ["## Responses\n", "[report.html](report.html): every response side by side with the baseline's; "
           "for GGRO rows with a trace (`--trace`), its segments, the uncertain tokens, the nudges tried and the "
           "accepted one.\n"]
    text = "\n".join(md) + "\n"
    (out / "report.md").write_text(text, encoding="utf-8")
    files.insert(0, out / "report.md")
    return {"summary": summary, "files": files, "markdown": text}


def _one(rows, key) -> str:
    vals = sorted({str(r.get(key)) for r in rows if r.get(key) is not None})
    return ", ".join(vals) or "?"
