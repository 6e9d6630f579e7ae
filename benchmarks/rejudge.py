"""Judge the responses of an earlier `ggro eval` run with another reward model, without running the methods again.

    python benchmarks/rejudge.py EVAL_DIR JUDGE [classifier|judge]     (seconds to minutes: scoring only)

Reads EVAL_DIR/probes.jsonl and EVAL_DIR/align/<method>/ (greedy first), scores every response with JUDGE as
`ggro eval --judge-reward JUDGE` does (pipeline/eval/bench.second_opinions: the prompt as the policy read it,
prefill included, plus the response) and prints the judge's columns of eval.md: mean ± standard error, the
paired gain over greedy ± its standard error, and how often it agrees with the guide on "better than greedy":
for all prompts, then for each probe set when there are several.
The methods' rows are read as they were written; only the judge is new.
"""
import json
import sys
from dataclasses import replace
from pathlib import Path

from ggro.threads import torch_threads

torch_threads()
import pyarrow.dataset as ds  # noqa: E402

from ggro import models  # noqa: E402
from ggro.config import ModelConfig  # noqa: E402
from ggro.engine import Engine, load_reward  # noqa: E402
from pipeline.batch.driver import read_input  # noqa: E402
from pipeline.eval import bench as B  # noqa: E402
from pipeline.eval import evaluate as E  # noqa: E402


def records(folder: Path) -> list[dict]:
    recs = ds.dataset(folder, format="parquet").to_table().to_pylist()
    for r in recs:
        if isinstance(r.get("trace"), str):
            r["trace"] = json.loads(r["trace"])
    return recs


def main(eval_dir: Path, judge_spec: str, kind: str = "classifier") -> None:
    mcfg = ModelConfig()
    engine = Engine.load(mcfg)
    judge = load_reward(models.here(replace(mcfg, reward=judge_spec, reward_kind=kind)), engine.tokenizer,
                        engine.policy.model, gradient=False)
    rows = read_input(str(eval_dir / "probes.jsonl"), None)
    names = sorted((p.name for p in (eval_dir / "align").iterdir()), key=lambda n: (n != "greedy", n))
    results = []
    for name in names:
        recs = records(eval_dir / "align" / name)
        results.append({"method": name, "records": recs, "prompts": len(recs),
                        "errors": sum(r["error"] is not None for r in recs), "wall_s": float("nan"),
                        "policy_tokens": sum(r["policy_tokens"] or 0 for r in recs),
                        "reward_calls": sum(r["reward_calls"] or 0 for r in recs),
                        "mean_nudges": float("nan"), "win_rate_vs_greedy": float("nan")})
    print(f"judge: {judge_spec} ({kind}) on {eval_dir}")
    B.second_opinions(engine, rows, results, lambda m: print(m, file=sys.stderr), judge)    # every response once
    probes = sorted({E.probe_of(r) for r in results[0]["records"]})
    for probe in [None] + probes if len(probes) > 1 else [None]:     # all prompts, then each probe set
        part = []
        for res in results:
            recs = [r for r in res["records"] if probe in (None, E.probe_of(r))]
            ids = {r["id"] for r in recs}
            part.append({**res, "records": recs, **{k: {i: v for i, v in res[k].items() if i in ids}
                                                    for k in ("judge", "guide")}})
        B.judge_agreement(part)
        head, body = E.table_rows(E.summarize(part), judged=True)
        keep = [i for i, h in enumerate(head) if h == "method" or h.startswith(("judge", "guide gain", "refusal",
                                                                                 "over-refusal"))]
        print(f"\n{probe or 'all probe sets'} ({len(part[0]['records'])} prompts)\n")
        print(E.markdown([head[i] for i in keep], [[row[i] for i in keep] for row in body]))


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    main(Path(sys.argv[1]), sys.argv[2], *sys.argv[3:])
