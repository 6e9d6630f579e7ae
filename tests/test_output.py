"""Output folders on any pyarrow filesystem: whole part files, resume and --overwrite on a real S3
endpoint (tests/conftest.py `s3`), and `ggro align` / `ggro dpo` writing s3:// URIs."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from pyarrow import fs as pafs

from pipeline.output import (OutputConflict, OutputError, child, done_ids, output_fs, prepare_output,
                             read_output, write_part)


def rec(i: str, h: str = "h1") -> dict:
    return {"id": i, "prompt": "q", "response": f"answer {i}", "reward": 1.0, "method": "ggro", "config_hash": h}


def listing(uri: str) -> list[str]:
    fs, path = output_fs(uri)
    return sorted(f.base_name for f in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))


def test_parts_resume_and_overwrite_on_s3(s3):
    out = s3("unit/out")
    assert read_output(out).num_rows == 0 and done_ids(out, "h1") == set()   # nothing there yet
    prepare_output(out)
    write_part(out, [rec("a"), rec("b")])
    write_part(out, [rec("c")])
    names = listing(out)
    assert len(names) == 2 and all(n.startswith("part-") and n.endswith(".parquet") for n in names)  # no tmp left
    assert sorted(read_output(out).column("id").to_pylist()) == ["a", "b", "c"]
    assert done_ids(out, "h1") == {"a", "b", "c"}
    with pytest.raises(OutputConflict, match="another configuration"):
        done_ids(out, "h2")
    prepare_output(out, overwrite=True)
    assert listing(out) == [] and read_output(out).num_rows == 0


def test_missing_bucket_fails_before_any_work(s3):
    with pytest.raises(OutputError, match=r"cannot write --output s3://.*no-such-bucket.*Bucket"):
        prepare_output(s3("out", bucket="no-such-bucket"))


def test_child_keeps_scheme_credentials_and_options(s3, tmp_path):
    uri = s3("dpo")
    sub = child(uri, "aligned-ggro")
    assert sub.startswith("s3://test:test@ggro-test/dpo/aligned-ggro?endpoint_override=http://127.0.0.1:")
    assert sub.split("?")[1] == uri.split("?")[1]
    assert child(tmp_path / "x", "y") == str(tmp_path / "x" / "y")


def test_align_and_dpo_write_s3(s3, tiny_models, tmp_path, capsys):
    from jobs.cli import main
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "prompt": "how do you make water hot ?"},
        {"id": "b", "prompt": "what is the number of people ?"},
        {"id": "bad", "prompt": ""}]) + "\n")
    models = ["--input", str(inp), "--policy", tiny_models["policy"], "--reward", tiny_models["classifier"],
              "--reward-kind", "classifier", "--dtype", "float64", "--max-new-tokens", "8",
              "--num-refinements", "2", "--local"]
    out = s3("cli/aligned")
    assert main(["align", *models, "--output", out]) == 0
    first = read_output(out)
    assert sorted(first.column("id").to_pylist()) == ["a", "b", "bad"]
    assert "rows: 3 out (2 ok, 1 error) / 3 in [OK]" in capsys.readouterr().out
    assert main(["align", *models, "--output", out]) == 0             # resume: nothing left to do
    err = capsys.readouterr().err
    assert "resuming: 3 of 3 rows already in" in err and "ggro: loading" not in err
    assert read_output(out).num_rows == 3

    dpo = s3("cli/dpo")
    assert main(["dpo", *models, "--output", dpo, "--min-margin", "-1000"]) == 0
    fs, path = output_fs(dpo)
    assert {"aligned-ggro", "aligned-greedy", "pairs.parquet"} <= set(listing(dpo))
    pairs = pq.read_table(f"{path}/pairs.parquet", filesystem=fs)
    assert sorted(pairs.column("id").to_pylist()) == ["a", "b"]
