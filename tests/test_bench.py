"""`ggro bench --quick` on the tiny models: a complete table, CSVs and plots, engine == oracle."""
from __future__ import annotations

import csv

import pyarrow.parquet as pq

from jobs.cli import main


def test_bench_quick_tiny(tiny_models, tmp_path, capsys):
    """The default quick table: greedy, best-of-n and faithful GGRO, the oracle and batch scaling."""
    out = tmp_path / "bench"
    code = main(["bench", "--quick", "--policy", tiny_models["policy"], "--reward", tiny_models["classifier"],
                 "--reward-kind", "classifier", "--limit", "2", "--max-new-tokens", "12",
                 "--scaling-prompts", "6", "--scaling-batches", "1,4", "--output", str(out)])
    assert code == 0
    cap = capsys.readouterr()
    text = cap.out
    assert "bench: greedy on 2 prompts" in cap.err and "bench.csv" in cap.err     # progress: the ggro logger
    for label in ("greedy", "best-of-2", "best-of-4", "ggro S=2", "ggro S=4", "oracle (reference.py)",
                  "speed-up vs oracle", "prompts/s"):
        assert label in text
    rows = list(csv.DictReader(open(out / "bench.csv")))
    assert [r["method"] for r in rows] == ["greedy", "best-of-2", "best-of-4", "ggro S=2", "ggro S=4"]
    assert sorted(p.name for p in (out / "align").iterdir()) == ["best-of-2", "best-of-4", "ggro-S2", "ggro-S4", "greedy"]
    assert main(["report", "--input", *sorted(str(p) for p in (out / "align").iterdir()), "--output", str(out / "rep")]) == 0
    for r in rows:     # a complete table: every cell filled
        assert all(v not in ("", "nan") for v in r.values()), r
        assert int(r["prompts"]) == 2 and float(r["wall_s"]) > 0
    assert float(rows[0]["win_rate_vs_greedy"]) == 0.5
    assert int(rows[2]["reward_calls"]) == 2 * 4                   # best-of-4: one RM call per sample
    oracle = list(csv.DictReader(open(out / "bench_oracle.csv")))
    assert oracle[0]["implementation"].startswith("oracle") and oracle[1]["implementation"] == "engine"
    assert all(r["identical_tokens"] == "1/1" for r in oracle)     # same outputs: a pure speed ratio
    scaling = list(csv.DictReader(open(out / "bench_scaling.csv")))
    assert [r["batch_size"] for r in scaling] == ["1", "4"]
    assert all(r["same_outputs_as_first"] == "6/6" for r in scaling)
    for png in ("bench_reward_vs_wall.png", "bench_scaling.png"):
        assert (out / png).stat().st_size > 5000


def test_bench_rejects_single_method_flags(capsys):
    import pytest
    with pytest.raises(SystemExit):
        main(["bench", "--method", "ggro"])
    assert "--best-of-n and --refinements" in capsys.readouterr().err


def test_bench_modes_cohorts_and_second_opinion(tiny_models, tmp_path, capsys):
    """Every search mode (and budget) gets its own row, once serial and once in two overlapped cohorts (the same outputs),
    with the cost relative to greedy, the reward gained per second and a judge's second opinion."""
    out = tmp_path / "bench"
    code = main(["bench", "--quick", "--policy", tiny_models["policy"], "--reward", tiny_models["classifier"],
                 "--reward-kind", "classifier", "--limit", "3", "--max-new-tokens", "10", "--best-of-n", "2",
                 "--refinements", "3", "--modes", "faithful,adaptive,parallel,lookahead:2:1", "--budgets", "all,1", "--cohorts", "2",
                 "--second-opinion", "--oracle-prompts", "0", "--scaling-prompts", "0", "--output", str(out)])
    assert code == 0
    rows = {r["method"]: r for r in csv.DictReader(open(out / "bench.csv"))}
    modes = ["ggro S=3", "ggro-adaptive S=3", "ggro-parallel S=3"]
    modes += ["ggro-lookahead S=2 B=1"] + [m + " B=1" for m in modes]     # a mode:S:B row is timed once
    assert list(rows) == ["greedy", "best-of-2", *modes, *(m + " x2" for m in modes)]
    assert float(rows["greedy"]["wall_vs_greedy"]) == 1.0 and float(rows["greedy"]["gain_per_s"]) == 0.0
    for m in modes:     # cohorts change the schedule, not a token
        a = {r["id"]: r["response"] for r in pq.read_table(out / "align" / m.replace(" S=", "-S").replace(" B=", "-B")).to_pylist()}
        b = {r["id"]: r["response"] for r in pq.read_table(out / "align" / (m.replace(" S=", "-S").replace(" B=", "-B") + "-x2")).to_pylist()}
        assert a == b
    for r in rows.values():
        assert all(v not in ("", "nan") for k, v in r.items() if k != "judge_agreement"), r
        assert float(r["judge_reward"]) == float(r["judge_reward"])
    assert "judge reward (2nd opinion)" in capsys.readouterr().out
