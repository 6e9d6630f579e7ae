"""`ggro align --local` end to end: real files in, real Parquet out, bad input reported per row."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from pipeline.batch.output import read_output

TINY = ["--max-new-tokens", "8", "--entropy-threshold", "2.4", "--dtype", "float64", "--batch-size", "3"]


def align(tmp_path, tiny_models, input_path, *extra):
    out = tmp_path / "out"
    code = main(["align", "--local", "--input", str(input_path), "--output", str(out),
                 "--policy", tiny_models["policy"], "--reward", tiny_models["classifier"],
                 "--reward-kind", "classifier", *TINY, *extra])
    return code, out


def test_bad_rows_are_reported_and_nothing_disappears(tmp_path, tiny_models, capsys):
    src = tmp_path / "in.jsonl"
    lines = [
        json.dumps({"id": "good-1", "prompt": "how do you make water ?"}).encode(),
        json.dumps({"id": "empty", "prompt": "   "}).encode(),
        json.dumps({"id": "neither", "text": "hello"}).encode(),
        b'{"id": "broken", "prompt": ',
        b'{"id": "latin1", "prompt": "caf\xe9"}',
        json.dumps({"id": "too-long", "prompt": " ".join(["water"] * 300)}).encode(),
        json.dumps({"id": "bad-msg", "messages": [{"role": "robot", "content": "hi"}]}).encode(),
        json.dumps({"id": "good-2", "messages": [{"role": "user", "content": "what is the time"}],
                    "answer": "42"}).encode(),
        json.dumps({"id": "good-1", "prompt": "a duplicate id"}).encode(),
        # values of the wrong type become error rows; none of them may reach (and break) the Parquet write
        json.dumps({"id": "int-prefill", "prompt": "hi", "prefill": 7}).encode(),
        json.dumps({"id": "list-prefill", "prompt": "hi", "prefill": ["a"]}).encode(),
        json.dumps({"id": "int-prompt", "prompt": 5}).encode(),
        json.dumps({"id": "dict-messages", "messages": {"role": "user", "content": "hi"}}).encode(),
        json.dumps({"id": "image", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(),
        json.dumps({"id": 5, "prompt": "a number for an id"}).encode(),
    ]
    src.write_bytes(b"\n".join(lines) + b"\n")
    code, out = align(tmp_path, tiny_models, src)
    assert code == 3   # the output is complete, but 12 of 15 rows failed: more than --max-error-fraction 0.1
    rows = {r["id"]: r for r in read_output(out).to_pylist()}
    assert len(rows) == len(lines)
    assert rows["good-1"]["error"] is None and rows["good-1"]["response"] is not None
    assert rows["good-2"]["error"] is None and json.loads(rows["good-2"]["metadata"]) == {"answer": "42"}
    assert "empty" in rows["empty"]["error"]
    assert "neither `prompt`" in rows["neither"]["error"]
    assert "not valid JSON" in rows["in.jsonl:line-4"]["error"]
    assert "not valid UTF-8" in rows["in.jsonl:line-5"]["error"]
    assert "context window of 256" in rows["too-long"]["error"]
    assert "messages[0]" in rows["bad-msg"]["error"]
    assert "duplicate id" in rows["good-1#dup2"]["error"]
    assert all("`prefill` must be a string" in rows[k]["error"] and rows[k]["prefill"] == ""
               for k in ("int-prefill", "list-prefill"))
    assert "`prompt` must be a string" in rows["int-prompt"]["error"]
    assert "`messages` must be" in rows["dict-messages"]["error"] and "messages[0]" in rows["image"]["error"]
    assert rows["5"]["error"] is None and rows["5"]["response"] is not None      # an id is kept as text
    captured = capsys.readouterr()
    assert "15 out (3 ok, 12 error) / 15 in [OK]" in captured.out
    assert "too-long: prompt is 30" in captured.err   # errors are listed with id and reason
    assert "12 of 15 rows are error rows" in captured.err
    assert align(tmp_path, tiny_models, src, "--max-error-fraction", "0.8")[0] == 0   # resumed: nothing to do


def test_parquet_input_config_file_and_resume(tmp_path, tiny_models, capsys):
    import pyarrow as pa
    src = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": p} for p in ["I like people", "go now", "a"]]), src)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("method: greedy\nmax-new-tokens: 30\n")
    code, out = align(tmp_path, tiny_models, src, "--config", str(cfg), "--limit", "2")
    assert code == 0
    first = read_output(out)
    assert first.num_rows == 2 and set(first.column("method").to_pylist()) == {"greedy"}
    assert max(first.column("policy_tokens").to_pylist()) <= 8   # the flag beat the YAML's 30
    # rerun without --limit: only the missing row is aligned, ids stay unique
    code, out = align(tmp_path, tiny_models, src, "--config", str(cfg))
    assert code == 0
    ids = read_output(out).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 3
    assert "resuming: 2 of 3 rows" in capsys.readouterr().err
    # another configuration into the same folder is refused instead of mixed in
    with pytest.raises(SystemExit):
        align(tmp_path, tiny_models, src, "--method", "ggro")


def test_unknown_model_path_and_hub_id_fail_clearly(tmp_path, capsys, monkeypatch, tiny_models):
    """With HF_HUB_OFFLINE set (the manifests set it) a hub id must already be cached; --revision is for hub ids."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "hi"}\n')
    for extra, words in [(["--policy", str(tmp_path / "nope")], "model path not found"),
                         (["--policy", "someorg/not-cached-model", "--revision", "v2"], "HF_HUB_OFFLINE is set"),
                         (["--policy", tiny_models["policy"], "--revision", "v2"], "--revision applies to hub ids")]:
        with pytest.raises(SystemExit) as e:
            main(["align", "--local", "--input", str(src), "--output", str(tmp_path / "o"), *extra])
        assert e.value.code == 1
        assert words in capsys.readouterr().err


def test_remote_code_runs_only_when_trusted(tmp_path, tiny_models):
    """A model folder that ships its own modelling code loads with trust_remote_code, and fails clearly without."""
    import json
    import shutil
    from ggro import models
    from ggro.config import ModelLoadError
    folder = tmp_path / "custom"
    shutil.copytree(tiny_models["policy"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="ggro_test_llama", architectures=["CustomLlama"],
               auto_map={"AutoConfig": "custom_config.CustomConfig", "AutoModelForCausalLM": "custom_model.CustomLlama"})
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "custom_config.py").write_text(
        "from transformers import LlamaConfig\n\nclass CustomConfig(LlamaConfig):\n    model_type = 'ggro_test_llama'\n")
    (folder / "custom_model.py").write_text(
        "from transformers import LlamaForCausalLM\nfrom .custom_config import CustomConfig\n\n"
        "class CustomLlama(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    with pytest.raises(ModelLoadError, match="--trust-remote-code"):
        models.load_model(str(folder))
    model = models.load_model(str(folder), trust_remote_code=True)
    assert type(model).__name__ == "CustomLlama" and not model.training


def test_mismatched_vocabularies_fail_at_load(tmp_path, tiny_models, capsys):
    from transformers import AutoTokenizer
    import shutil
    other = tmp_path / "other-rm"
    shutil.copytree(tiny_models["classifier"], other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["zebra"])
    tok.save_pretrained(other)
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "hi"}\n')
    with pytest.raises(SystemExit) as e:
        main(["align", "--local", "--input", str(src), "--output", str(tmp_path / "o"), "--policy",
              tiny_models["policy"], "--reward", str(other), "--reward-kind", "classifier"])
    assert e.value.code == 1
    assert "one shared vocabulary" in capsys.readouterr().err


def test_bad_flags_and_config_are_rejected(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("num_refinemnts: 3\n")
    with pytest.raises(SystemExit):
        main(["align", "--local", "--output", str(tmp_path / "o"), "--config", str(cfg)])
    assert "unknown keys in --config: num_refinemnts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["align", "--local", "--output", str(tmp_path / "o"), "--min-segment-tokens", "1"])
    assert "min_segment_tokens must be >= 2" in capsys.readouterr().err


@pytest.mark.slow
def test_default_model_end_to_end(tmp_path):
    """The README's main command, on the embedded SmolLM2, on two short prompts (a real subprocess), as a fresh
    machine's first run: the embedded GGUF is converted into an empty cache on the way."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "align", "--local", "--output", str(out),
                           "--limit", "2", "--max-new-tokens", "6", "--num-refinements", "2"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "GGRO_THREADS": "2", "GGRO_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = read_output(out)
    assert table.num_rows == 2
    assert all(r and r.strip() for r in table.column("response").to_pylist())
    assert set(table.column("policy").to_pylist()) == {"default"}
    assert "2 out (2 ok, 0 error) / 2 in [OK]" in proc.stdout
    assert (tmp_path / "cache").is_dir()
    # quiet by default: only ggro's own progress (not transformers' bars, nor DeepSpeed's import-time warning)
    for noise in ("Loading weights", "de-quantizing", "Setting accelerator"):
        assert noise not in proc.stderr, proc.stderr[-2000:]


def test_a_resumed_id_must_still_ask_the_same(tmp_path, tiny_models, capsys):
    """Ids already written were skipped whatever they now asked: a corrected prompt, or another prompt set with
    the same ids ("1", "2", ...), kept the old answers under [OK]. Now refused, naming an id, the output untouched;
    an error row is not compared (--retry-errors decides it) and --overwrite aligns the new rows."""
    src = tmp_path / "in.jsonl"
    first = [{"id": "1", "prompt": "how do you make water ?"}, {"id": "2", "prompt": "what is the time"},
             {"id": "3", "prompt": " "}]
    src.write_text("".join(json.dumps(r) + "\n" for r in first))
    assert align(tmp_path, tiny_models, src, "--max-error-fraction", "0.5")[0] == 0
    src.write_text("".join(json.dumps(r) + "\n" for r in first[:1] + [{"id": "2", "prompt": "what is the day"},
                                                                      {"id": "3", "prompt": "now a prompt"}]))
    with pytest.raises(SystemExit) as e:
        align(tmp_path, tiny_models, src, "--max-error-fraction", "0.5")
    assert e.value.code == 1 and "holds 1 id(s) of --input answered for other messages" in capsys.readouterr().err
    rows = {r["id"]: r for r in read_output(tmp_path / "out").to_pylist()}
    assert rows["2"]["prompt"] == "what is the time" and rows["3"]["error"]
    code, out = align(tmp_path, tiny_models, src, "--overwrite")
    rows = {r["id"]: r for r in read_output(out).to_pylist()}
    assert code == 0 and rows["2"]["prompt"] == "what is the day" and rows["3"]["error"] is None
