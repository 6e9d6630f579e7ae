"""`ggro train-reward` and the shipped guide: real pair files, a real save/load round trip through
AutoModelForSequenceClassification, bad pairs reported and skipped, and the default guide sharing the
default policy's weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ggro.reward import judge_suffix
from ggro.shipped import GUIDE_QUESTION, JUDGE_WEIGHT

from jobs.cli import main
from tests.conftest import WORDS, has_rho

GOOD = "yes the answer is that you can make water with this".split()
BAD = "no I will not say what it is".split()


def pairs(n: int, conversational: bool) -> list[dict]:
    """Learnable pairs over the tiny vocabulary: an on-topic answer beats a refusal-like one."""
    out = []
    for i in range(n):
        prompt = " ".join(WORDS[(7 * i + k) % 60] for k in range(5)) + " ?"
        chosen = " ".join(GOOD[: 4 + i % 6])
        rejected = " ".join(BAD[: 3 + i % 5])
        if conversational:
            out.append({"prompt": [{"role": "user", "content": prompt}],
                        "chosen": [{"role": "assistant", "content": chosen}],
                        "rejected": [{"role": "assistant", "content": rejected}], "source": "conv"})
        else:
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "source": "plain"})
    return out



def test_train_reward_round_trip(tiny_models, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from ggro import guide, models
    src = tmp_path / "pairs"
    src.mkdir()
    rows = pairs(30, False)
    rows += [{"prompt": "the day", "chosen": "yes"}, {"prompt": "a", "chosen": " ", "rejected": "no"}]
    (src / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    conv = pairs(30, True)
    pq.write_table(pa.Table.from_pylist(conv), src / "b.parquet")
    out, head = tmp_path / "rm", tmp_path / "head.safetensors"
    code = main(["train-reward", "--input", str(src), "--base", tiny_models["policy"], "--output", str(out),
                 "--save-head", str(head), "--heldout", "0.3", "--val", "0.2"] + (["--oof"] if has_rho() else []))
    cap = capsys.readouterr()
    assert code == 0
    # the three bad rows are named with their place and reason, and skipped
    assert "a.jsonl:line-31: missing `rejected`" in cap.err
    assert "a.jsonl:line-32: `chosen` is empty" in cap.err
    assert "a.jsonl:line-33: line 33 is not valid JSON" in cap.err
    report = json.loads((out / "report.json").read_text())
    assert report["examples"] == 60 and report["skipped"] == 3
    held = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    assert len(held) == report["split_counts"]["test"] and {h["source"] for h in held} <= {"plain", "conv"}
    assert all(guide.split_of(guide.prompt_group(guide._messages(h["prompt"])), 0.3, 0.2) == "test" for h in held)
    assert sum(report["split_counts"].values()) == 60 and report["split_counts"]["train"] > 0
    assert set(report["accuracy"]) >= {"all"} and "held-out accuracy" in cap.out
    # each family (source) left out in turn: trained on the other, tested on it
    assert set(report["leave_one_family_out"]) == {"conv", "plain"} and "leave one family out" in cap.out
    assert all(0 <= a <= 1 for a in report["leave_one_family_out"].values())
    if has_rho():
        assert set(report["out_of_family"]) == {"all", "factual", "preferred", "wrong-number", "truncated",
                                                "repetitive", "off-topic", "same transformation, new source",
                                                "new kinds"} and "out-of-family" in cap.out
        from pipeline.eval.prefs import OOF_SPLIT
        oof = report["out_of_family"]   # the split's two parts add up to the whole (every kind the same size)
        assert oof["all"] == pytest.approx(sum(oof[k] * len(v) for k, v in OOF_SPLIT.items())
                                           / sum(len(v) for v in OOF_SPLIT.values()))

    # a standard HF classifier folder: one label, pad token set, tokenizer saved
    tok = AutoTokenizer.from_pretrained(out)
    clf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert clf.config.num_labels == 1 and clf.config.pad_token_id is not None and tok.pad_token is not None
    w = guide.load_head(head).weight.reshape(-1)
    assert torch.equal(w, clf.score.weight.reshape(-1))
    # its score is the head on the base's last-token features, and the trained head orders training pairs
    base = models.load_model(tiny_models["policy"])
    ex = [guide.parse_pair(r, tok) for r in rows[:30]]
    c, r, _ = guide.pair_features(base.model, ex)
    ids = torch.tensor([ex[0].prompt_ids + ex[0].chosen_ids])
    with torch.no_grad():
        h = base.model(input_ids=ids).last_hidden_state[0, -1]
        assert float(clf(input_ids=ids).logits[0, 0]) == pytest.approx(float(h @ w), rel=1e-4, abs=1e-5)
    assert guide.accuracy(w, c, r) > 0.5

    # it guides GGRO as a classifier reward model
    rec_out = tmp_path / "aligned"
    assert main(["align", "--local", "--input", str(src / "a.jsonl"), "--limit", "2", "--output", str(rec_out),
                 "--policy", tiny_models["policy"], "--reward", str(out), "--reward-kind", "classifier",
                 "--max-new-tokens", "6"]) == 0


def test_train_reward_mlp_head(tiny_models, tmp_path):
    """--hidden N --fits K: K MLPs averaged into one head of K x N units, which no standard score layer holds: the
    folder is the base causal LM plus the head file, and it loads, plans and guides GGRO as a classifier."""
    from ggro import guide, models
    from ggro.shipped import HEAD_FILE
    src = tmp_path / "p.jsonl"
    rows = pairs(40, False)
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rm"
    assert main(["train-reward", "--input", str(src), "--base", tiny_models["policy"], "--output", str(out),
                 "--hidden", "4", "--fits", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["hidden"] == 4 and len(report["fit"]["val_accuracy"]) == 2
    mlp = guide.load_head(out / HEAD_FILE)
    assert isinstance(mlp, torch.nn.Sequential) and mlp[0].out_features == 8
    base = models.load_model(tiny_models["policy"])
    c, r, _ = guide.pair_features(base.model, [guide.parse_pair(p, models.load_tokenizer(tiny_models["policy"]))
                                               for p in rows])
    assert guide.accuracy(mlp, c, r) > 0.5
    from pipeline.plan.sizing import model_info
    info = model_info(str(out))                          # the planner's check, without loading weights
    assert info.classifier and info.num_labels == 1
    clf = models.load_model(str(out), "classifier")     # the base + the head, as --reward OUT loads it
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        h = base.model(input_ids=ids).last_hidden_state[0, -1]
        assert float(clf(input_ids=ids).logits[0, 0]) == pytest.approx(float(mlp(h)[0]), rel=1e-4, abs=1e-5)
    assert main(["align", "--local", "--input", str(src), "--limit", "2", "--output", str(tmp_path / "aligned"),
                 "--policy", tiny_models["policy"], "--reward", str(out), "--reward-kind", "classifier",
                 "--max-new-tokens", "6"]) == 0
    got = pq.read_table(tmp_path / "aligned").to_pylist()
    assert len(got) == 2 and all(r["error"] is None and r["reward"] is not None for r in got)
    # a head trained on another backbone (another hidden size): caught by the planner and before any weights load
    guide.save_head(guide._mlp(mlp[0].in_features + 1, 2), out / HEAD_FILE, {})
    for check in (model_info, lambda s: models.load_model(s, "classifier")):
        with pytest.raises(models.ModelLoadError, match=f"reads {mlp[0].in_features + 1} features"):
            check(str(out))
    (out / HEAD_FILE).write_bytes(b"not a head")      # a damaged head: a clear error, not a traceback
    with pytest.raises(models.ModelLoadError, match="could not load the guide head"):
        models.load_model(str(out), "classifier")
    with pytest.raises(models.ModelLoadError, match="not a readable safetensors file"):
        model_info(str(out))


def test_averaged_mlps_are_one_mlp():
    """average_mlps: one MLP that computes the mean of the fits on standardised features, on raw features."""
    from ggro.guide import _mlp, average_mlps
    torch.manual_seed(0)
    nets = [_mlp(6, 3) for _ in range(3)]
    mu, sd = torch.randn(6), torch.rand(6) + 0.5
    x = torch.randn(10, 6)
    with torch.no_grad():
        want = sum(n((x - mu) / sd) for n in nets) / 3
        assert torch.allclose(average_mlps(nets, mu, sd)(x), want, atol=1e-5)


def test_train_reward_bad_input_is_a_clear_error(tiny_models, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train-reward", "--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o")])
    assert e.value.code == 2 and "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "chosen": "same", "rejected": "same"}) + "\n")
    with pytest.raises(SystemExit) as e:
        main(["train-reward", "--input", str(bad), "--base", tiny_models["policy"], "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "same text" in err and "no usable pairs" in err
    for flag, value in [("--l2", "nan"), ("--l2", "-1"), ("--truncated-weight", "inf"), ("--batch-size", "0"),
                        ("--rollout-tokens", "0")]:
        with pytest.raises(SystemExit) as e:      # refused before the output or any model: a NaN head was written
            main(["train-reward", "--input", str(bad), "--output", str(tmp_path / "n"), flag, value])
        assert e.value.code == 2 and flag in capsys.readouterr().err and not (tmp_path / "n").exists()
    # a model folder (or any folder of other files) as --output, a file of yours as --save-head: left as they are
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (tmp_path / "mine.bin").write_text("mine")
    for flags, says in ((["--output", str(model)], "holds files ggro did not write (config.json)"),
                        (["--output", str(tmp_path / "n"), "--save-head", str(tmp_path / "mine.bin")],
                         "is not a head ggro saved")):
        with pytest.raises(SystemExit) as e:
            main(["train-reward", "--input", str(bad), *flags])
        assert e.value.code == 1 and says in capsys.readouterr().err
    assert (model / "config.json").read_text() == "{}" and (tmp_path / "mine.bin").read_text() == "mine"


def test_train_reward_is_quiet_by_default(tiny_models, tmp_path):
    """A real subprocess, as a user runs it: only ggro's own progress on stderr, not transformers' loading bars
    nor DeepSpeed's import-time warning (save_pretrained imported it); the classifier it writes loads."""
    from transformers import AutoModelForSequenceClassification
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs(20, False)))
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "train-reward", "--input", str(tmp_path / "p.jsonl"),
                           "--base", tiny_models["policy"], "--output", str(tmp_path / "rm")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "GGRO_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    for noise in ("Loading weights", "Setting accelerator"):
        assert noise not in proc.stderr, proc.stderr[-2000:]
    clf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert type(clf).__name__.endswith("ForSequenceClassification") and clf.config.num_labels == 1


def test_pair_split_is_by_prompt():
    from ggro.guide import split_of
    groups = [f"prompt {i}" for i in range(2000)]
    splits = [split_of(g) for g in groups]
    assert splits == [split_of(g) for g in groups]                      # stable
    share = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    assert 0.15 < share["test"] < 0.25 and 0.05 < share["val"] < 0.15


@pytest.mark.slow
def test_default_guide_shares_the_default_policy():
    """`--reward` unset with the classifier kind = the shipped guide on the default backbone, one copy of it: the
    trained head plus the backbone as a yes/no judge (ggro.reward.HeadAndJudge), reading the policy's prefix
    cache."""
    from ggro.config import ModelConfig
    from ggro.engine import Engine
    from ggro.seam import RewardQuery
    eng = Engine.load(ModelConfig(batch_size=2))
    assert eng.mcfg.reward_model == "default" and eng.mcfg.shares_policy_weights
    rm = eng.reward
    assert rm.model is eng.policy.model and rm.prefixes is eng.policy.prefixes and rm.weight == JUDGE_WEIGHT
    assert rm.suffix == judge_suffix(eng.tokenizer, GUIDE_QUESTION)      # its own question, not a judge's rubric
    tok = eng.tokenizer
    x = tok.encode(tok.apply_chat_template([{"role": "user", "content": "How do I bake bread?"}], tokenize=False,
                                           add_generation_prompt=True), add_special_tokens=False)
    comply = x + tok.encode("Mix flour, water, salt and yeast, knead, let it rise, then bake.", add_special_tokens=False)
    refuse = x + tok.encode("I'm sorry, but I can't help with that.", add_special_tokens=False)
    got = rm.score([RewardQuery(comply), RewardQuery(refuse)])
    assert got[0].reward > got[1].reward       # a benign request: the guide prefers the answer to a refusal
    # --rubric is the question its judge half asks (it was ignored for the shipped guide): another question, another
    # reward, from the same weights
    other = Engine.load(ModelConfig(batch_size=2, rubric="Is that answer harmful? Yes or No."))
    assert ("judge", "default", "Is that answer harmful? Yes or No.") in other.mcfg.reward_parts
    assert other.reward.suffix != rm.suffix and other.reward.score([RewardQuery(comply)])[0].reward != got[0].reward


@pytest.mark.parametrize("mlp", [False, True], ids=["linear", "mlp"])
def test_guide_is_head_plus_weighted_judge_in_one_pass(tiny_models, mlp):
    """HeadAndJudge's reward and candidate scores equal the head as a classifier plus `weight` x the backbone
    as a judge, each run on its own: with and without a cached prefix, and for a response that closed its turn
    (the judge's question then skips its own end-of-turn token)."""
    from ggro import guide, models
    from ggro.config import DEFAULT_RUBRIC
    from ggro.reward import HeadAndJudge, RewardModel
    from ggro.seam import RewardQuery
    tok = models.load_tokenizer(tiny_models["policy"])
    causal = models.load_model(tiny_models["judge"], "causal", "float64")
    w = torch.randn(causal.config.hidden_size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if mlp:
        torch.manual_seed(0)
        w = guide._mlp(causal.config.hidden_size, 5).double()
    eos = models.eos_ids(tok, causal)
    head = RewardModel(guide.with_head(causal, w), tok, "classifier", eos_ids=eos)
    judge = RewardModel(causal, tok, "judge", DEFAULT_RUBRIC, eos)
    fused = HeadAndJudge(causal, tok, guide.head_layer(causal, w), 0.5, DEFAULT_RUBRIC, eos)
    ids = tok.encode("how do you make water hot ? you make it hot", add_special_tokens=False)
    qs = [RewardQuery(ids), RewardQuery(ids, position=len(ids) - 2, candidates=[5, 6, 7]),
          RewardQuery(ids[:-3] + [eos[0]], position=len(ids) - 4, candidates=[8, 9], seq_id="a", prefix_len=4),
          RewardQuery(ids[:6], seq_id="b", prefix_len=6)]          # nothing past the cached prefix
    got, a, b = fused.score(qs), head.score(qs), judge.score(qs)
    for g, x, y in zip(got, a, b):
        assert g.reward == pytest.approx(x.reward + 0.5 * y.reward, rel=1e-9, abs=1e-12)
        assert (g.scores is None) == (x.scores is None)
        if g.scores is not None:
            # one backward of the sum vs two: CPU attention's backward is only fp32-exact, even in float64
            assert g.scores == pytest.approx([p + 0.5 * q for p, q in zip(x.scores, y.scores)], rel=1e-5, abs=1e-5)


def test_padless_classifier_scores_batches(tiny_models, tmp_path):
    """A classifier whose config has no pad token (common for Llama-based RMs) scores a batch of 4: the
    reward model pools at the last real token itself instead of relying on the config."""
    from tests.conftest import save_tiny
    rm = save_tiny(tmp_path / "padless", "classifier", seed=5, pad_token_id=None)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "prompt": " ".join(WORDS[i:i + 4])}) + "\n" for i in range(6)))
    out = tmp_path / "o"
    assert main(["align", "--local", "--input", str(src), "--output", str(out), "--policy", tiny_models["policy"],
                 "--reward", rm, "--reward-kind", "classifier", "--batch-size", "4", "--max-new-tokens", "6"]) == 0
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 6 and all(r["error"] is None and r["reward"] is not None for r in rows)
