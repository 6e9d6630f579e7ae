"""`ggro dpo`: TRL conversational preference pairs, margin filter, join mode and one-pass mode."""
from __future__ import annotations

import json
import random

import pyarrow.parquet as pq
import pytest

from ggro.schema import to_table
from pipeline.batch.dpo import DPO_SCHEMA, build_pairs
from pipeline.batch.output import read_output

COLUMNS = ["id", "prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "chosen_method",
           "rejected_method", "policy", "reward_model", "config_hash"]


def rec(i, method, reward, error=None, prefill="", finish="stop", response=None):
    return {"id": i, "prompt": "q", "messages": [{"role": "user", "content": f"q{i}"}], "prefill": prefill,
            "response": response or f"{method} answer {i}", "reward": reward, "method": method, "error": error,
            "finish_reason": finish, "policy": "p", "reward_model": "r", "config_hash": f"h-{method}", "seed": 0}


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



def test_join_drops_ids_whose_two_rows_ask_different_things():
    """Join mode over outputs of two inputs that share ids paired answers to different questions (or to one
    question under two prefills) as if they were a preference: dropped and counted."""
    other = rec("b", "greedy", 0.0)
    other["messages"] = [{"role": "user", "content": "another question"}]
    chosen = to_table([rec("a", "ggro", 2.0), rec("b", "ggro", 2.0), rec("c", "ggro", 2.0, prefill="Sure.")])
    rejected = to_table([rec("a", "greedy", 0.0), other, rec("c", "greedy", 0.0, prefill="No.")])
    pairs, stats = build_pairs(chosen, rejected)
    assert pairs.column("id").to_pylist() == ["a"] and (stats.pairs, stats.mismatched) == (1, 2)
    assert "2 whose rejected row answers another prompt or prefill" in stats.render()


def test_default_margin_drops_ties_identical_texts_and_truncated():
    chosen = to_table([rec("tie", "ggro", 1.0), rec("same", "ggro", 2.0, response="same words"),
                       rec("cut", "ggro", 3.0, finish="length"), rec("rcut", "ggro", 3.0), rec("ok", "ggro", 1.5)])
    rejected = to_table([rec("tie", "greedy", 1.0), rec("same", "greedy", 1.0, response="same words"),
                         rec("cut", "greedy", 1.0), rec("rcut", "greedy", 1.0, finish="length"),
                         rec("ok", "greedy", 1.0)])
    pairs, stats = build_pairs(chosen, rejected)
    assert pairs.column("id").to_pylist() == ["ok"]
    assert (stats.below_margin, stats.identical, stats.truncated) == (1, 1, 2)
    pairs, stats = build_pairs(chosen, rejected, keep_truncated=True)
    assert pairs.column("id").to_pylist() == ["cut", "ok", "rcut"]
    pairs, _ = build_pairs(chosen, rejected, min_margin=-1)          # a negative margin keeps the tie ...
    assert "tie" in pairs.column("id").to_pylist() and "same" not in pairs.column("id").to_pylist()   # never same


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
    assert main(flags + ["--output", str(tmp_path / "dpo"), "--keep-truncated"]) == 0
    assert capsys.readouterr().err.count("ggro: loading") == 1     # both methods ran on one load
    rows = load_pairs(tmp_path / "dpo" / "pairs.parquet")
    aligned = {m: read_output(tmp_path / "dpo" / f"__aligned-{m}").to_pylist() for m in ("ggro", "greedy")}
    assert {r["finish_reason"] for m in aligned for r in aligned[m] if not r["error"]} <= {"stop", "length"}
    same = {c["id"] for c in aligned["ggro"] for g in aligned["greedy"] if c["id"] == g["id"] and not c["error"]
            and c["response"] == g["response"]}
    assert sorted(r["id"] for r in rows) == sorted({"a", "b"} - same)      # the bad row has no pair
    assert set(rows[0]) == set(COLUMNS)
    for r in rows:
        assert r["chosen"][0]["role"] == "assistant" and r["rejected"][0]["role"] == "assistant"
        assert r["prompt"][-1]["role"] == "user"
        assert (r["chosen_method"], r["rejected_method"]) == ("ggro", "greedy")
        assert r["chosen_reward"] >= r["rejected_reward"] - 1000
    # join mode over the two outputs just written, with a margin nobody passes
    # OUT reads back as the pairs alone (the sub-runs and the manifest are skipped by both readers)
    import pyarrow.dataset
    assert sorted(pyarrow.dataset.dataset(tmp_path / "dpo").to_table().column("id").to_pylist()) == \
        sorted(r["id"] for r in rows)
    try:
        import datasets
    except ImportError:
        datasets = None
    if datasets is not None:
        loaded = datasets.load_dataset("parquet", data_dir=str(tmp_path / "dpo"), split="train")
        assert sorted(loaded["id"]) == sorted(r["id"] for r in rows)
    # join mode over the two outputs just written, with a margin nobody passes
    assert main(["--output", str(tmp_path / "join"), "--chosen", str(tmp_path / "dpo" / "__aligned-ggro"),
                 "--rejected", str(tmp_path / "dpo" / "__aligned-greedy"), "--min-margin", "1e9"]) == 0
    assert pq.read_table(tmp_path / "join" / "pairs.parquet").num_rows == 0
    assert "pairs: 0 of 3 rows" in capsys.readouterr().out
    # a margin that is no number would let every pair through (NaN compares false): refused, nothing written
    with pytest.raises(SystemExit, match="2"):
        main(["--output", str(tmp_path / "nan"), "--chosen", str(tmp_path / "dpo" / "__aligned-ggro"),
              "--rejected", str(tmp_path / "dpo" / "__aligned-greedy"), "--min-margin", "nan"])
    assert not (tmp_path / "nan").exists() and "--min-margin must be a finite" in capsys.readouterr().err


def test_large_joins_run_in_hash_buckets(tmp_path):
    """A join larger than one bucket splits both sides by a hash of the id, one part at a time, and joins a bucket at
    a time: the same pairs and counts as the in-memory join, written as pair files that read back as the pairs alone;
    a later join into one bucket leaves no stale bucket files, and --overwrite knows them as ggro's."""
    import pyarrow.dataset
    from pipeline.batch.dpo import build_pairs, join_outputs
    from pipeline.batch.output import clear_output, write_part
    from pipeline.batch.manifest import write_manifest
    rng = random.Random(3)
    ids = [f"id{i}" for i in range(40)]
    sides = {}
    for side, base in (("chosen", 1.0), ("rejected", 0.0)):
        rows = [rec(i, "ggro" if side == "chosen" else "greedy", base + rng.random(), response=f"{side} {rng.random():.3f}")
                for i in ids if rng.random() > 0.1]
        for k in range(0, len(rows), 7):          # several parts per side
            write_part(tmp_path / side, rows[k:k + 7])
        sides[side] = rows
    want, want_stats = build_pairs(to_table(sides["chosen"]), to_table(sides["rejected"]), 0.2)
    out = tmp_path / "out"
    stats = join_outputs(str(tmp_path / "chosen"), str(tmp_path / "rejected"), str(out), 0.2, bucket_rows=8)
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 5 and all(f.startswith("pairs-") for f in files)        # 40 rows / 8 a bucket
    got = pyarrow.dataset.dataset(out).to_table()
    assert sorted(got.to_pylist(), key=lambda r: r["id"]) == want.to_pylist()
    assert stats == want_stats and stats.pairs == want.num_rows > 0
    write_manifest(out, {"command": "dpo"})
    assert clear_output(out) == 6                # its pair files and manifest are ggro's own
    join_outputs(str(tmp_path / "chosen"), str(tmp_path / "rejected"), str(out), 0.2, bucket_rows=8)
    join_outputs(str(tmp_path / "chosen"), str(tmp_path / "rejected"), str(out), 0.2)
    assert sorted(p.name for p in out.iterdir()) == ["pairs.parquet"]
    assert pq.read_table(out / "pairs.parquet").to_pylist() == want.to_pylist()
