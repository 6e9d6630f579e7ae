"""`ggro dpo`: TRL conversational preference pairs, margin filter, join mode and one-pass mode."""
from __future__ import annotations

import json

import pyarrow.parquet as pq

from ggro.schema import to_table
from pipeline.dpo import DPO_SCHEMA, build_pairs

COLUMNS = ["id", "prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "chosen_method",
           "rejected_method", "policy", "reward_model", "config_hash"]


def rec(i, method, reward, error=None, prefill=""):
    return {"id": i, "prompt": "q", "messages": [{"role": "user", "content": f"q{i}"}], "prefill": prefill,
            "response": f"{method} answer {i}", "reward": reward, "method": method, "error": error,
            "policy": "p", "reward_model": "r", "config_hash": f"h-{method}", "seed": 0}


def test_build_pairs_margin_errors_missing():
    chosen = to_table([rec("a", "ggro", 2.0), rec("b", "ggro", 1.0), rec("c", "ggro", None, "boom"),
                       rec("d", "ggro", 3.0, prefill="Sure. "), rec("e", "ggro", 1.0)])
    rejected = to_table([rec("a", "greedy", 0.5), rec("b", "greedy", 0.9), rec("c", "greedy", 1.0),
                         rec("d", "greedy", 0.0, prefill="Sure. ")])
    pairs, stats = build_pairs(chosen, rejected, min_margin=0.5)
    assert pairs.schema == DPO_SCHEMA and pairs.column_names == COLUMNS
    assert pairs.column("id").to_pylist() == ["a", "d"]
    assert (stats.pairs, stats.below_margin, stats.errors, stats.missing) == (2, 1, 1, 1)
    d = pairs.to_pylist()[1]
    assert d["prompt"] == [{"role": "user", "content": "qd"}]
    assert d["chosen"] == [{"role": "assistant", "content": "Sure. ggro answer d"}]
    assert d["rejected"] == [{"role": "assistant", "content": "Sure. greedy answer d"}]
    assert (d["chosen_method"], d["rejected_method"]) == ("ggro", "greedy")


def load_pairs(path):
    try:
        import datasets
    except ImportError:
        return pq.read_table(path).to_pylist()
    return list(datasets.load_dataset("parquet", data_files=str(path), split="train"))


def test_dpo_local_one_pass_and_join(tiny_models, tmp_path, capsys):
    from jobs.dpo import main
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "prompt": "how do you make water hot ?"},
        {"id": "b", "prompt": "what is the number of people ?"},
        {"id": "bad", "prompt": ""}]) + "\n")
    flags = ["--input", str(inp), "--policy", tiny_models["policy"], "--reward", tiny_models["classifier"],
             "--reward-kind", "classifier", "--dtype", "float64", "--max-new-tokens", "10",
             "--num-refinements", "3", "--local", "--min-margin", "-1000"]
    assert main(flags + ["--output", str(tmp_path / "dpo")]) == 0
    assert capsys.readouterr().err.count("ggro: loading") == 1     # both methods ran on one load
    rows = load_pairs(tmp_path / "dpo" / "pairs.parquet")
    assert sorted(r["id"] for r in rows) == ["a", "b"]      # the bad row has no pair
    assert set(rows[0]) == set(COLUMNS)
    for r in rows:
        assert r["chosen"][0]["role"] == "assistant" and r["rejected"][0]["role"] == "assistant"
        assert r["prompt"][-1]["role"] == "user"
        assert (r["chosen_method"], r["rejected_method"]) == ("ggro", "greedy")
        assert r["chosen_reward"] >= r["rejected_reward"] - 1000
    # join mode over the two outputs just written, with a margin nobody passes
    assert main(["--output", str(tmp_path / "join"), "--chosen", str(tmp_path / "dpo" / "aligned-ggro"),
                 "--rejected", str(tmp_path / "dpo" / "aligned-greedy"), "--min-margin", "1e9"]) == 0
    assert pq.read_table(tmp_path / "join" / "pairs.parquet").num_rows == 0
    assert "pairs: 0 of 3 rows" in capsys.readouterr().out
