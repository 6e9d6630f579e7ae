"""`ggro bench --quick` on the tiny models: a complete table, CSVs and plots, engine == oracle."""
from __future__ import annotations

import csv

from jobs.cli import main


def test_bench_quick_tiny(tiny_models, tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "--quick", "--policy", tiny_models["policy"], "--reward", tiny_models["classifier"],
                 "--reward-kind", "classifier", "--limit", "2", "--max-new-tokens", "12",
                 "--scaling-prompts", "6", "--scaling-batches", "1,4", "--output", str(out)])
    assert code == 0
    text = capsys.readouterr().out
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
