"""Input files: the same rows from a local path and a URI, BOM, .json (lines or array), upper-case
extensions, skipped files named, corrupt Parquet as a clear error."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ggro.rows import InputError, dedupe, read_rows


def key(rows):
    return [(r.id, r.prompt, r.error) for r in rows]


def test_uri_rows_match_local(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.jsonl").write_text(json.dumps({"id": "x", "prompt": "hi"}) + "\n{broken\n"
                               + json.dumps({"id": "y", "prompt": ""}) + "\n")
    pq.write_table(pa.Table.from_pylist([{"id": "z", "prompt": "yo"}]), d / "b.parquet")
    assert key(read_rows(f"file://{d}")) == key(read_rows(d))
    assert key(read_rows(f"file://{d}/a.jsonl")) == key(read_rows(d / "a.jsonl"))
    assert [r.id for r in read_rows(f"file://{d}")] == ["x", "a.jsonl:line-2", "y", "z"]
    with pytest.raises(FileNotFoundError):
        list(read_rows(f"file://{tmp_path}/nope.jsonl"))


def test_bom_json_arrays_upper_case_and_skipped_files(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.JSONL").write_bytes(b"\xef\xbb\xbf" + json.dumps({"id": "bom", "prompt": "hi"}).encode() + b"\n")
    (d / "b.json").write_text(json.dumps([{"id": "arr1", "prompt": "p"}, {"id": "arr2", "prompt": "q"}, 7]))
    (d / "c.json").write_text(json.dumps({"id": "lines", "prompt": "z"}) + "\n")   # .json holding JSON Lines
    pq.write_table(pa.Table.from_pylist([{"id": "P", "prompt": "yo"}]), d / "d.PARQUET")
    (d / "notes.txt").write_text("hello")
    (d / "_SUCCESS").write_text("")
    (d / "sub").mkdir()
    skipped = []
    rows = list(read_rows(d, skipped))
    assert [(r.id, r.error) for r in rows] == [
        ("bom", None), ("arr1", None), ("arr2", None), ("b.json:item-3", "row is a int, expected a JSON object"),
        ("lines", None), ("P", None)]
    assert skipped == ["_SUCCESS", "notes.txt", "sub/"]
    # every copy of a repeated id gets its own error row
    again = list(dedupe([rows[0], rows[0], rows[0]]))
    assert [r.id for r in again] == ["bom", "bom#dup2", "bom#dup3"]


def test_a_copys_generated_id_never_collides_with_a_real_one():
    """ids d1, d1, d1#dup2: the second d1 was named d1#dup2 too, two rows with one id (MISMATCH). A copy's name
    skips every id of the input and every name given before it."""
    from ggro.rows import InputRow
    ids = ["d1", "d1", "d1#dup2", "d1#dup2", "d1", "d1#dup2.2", "d1#dup3", "d1"]
    out = [r.id for r in dedupe(InputRow(id=i, prompt="p") for i in ids)]
    assert len(set(out)) == len(out), out
    assert out == ["d1", "d1#dup2.3", "d1#dup2", "d1#dup2#dup2", "d1#dup3.2", "d1#dup2.2", "d1#dup3", "d1#dup4"]


def test_binary_parquet_columns_are_read_as_text(tmp_path):
    """Spark and Hive may write text as unannotated binary: valid UTF-8 is the text it holds (ids stay ids);
    bytes that are not UTF-8 are an error row, with or without an id of their own, and never stop the read."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    f = tmp_path / "spark.parquet"
    pq.write_table(pa.table({"id": pa.array([b"a", b"b", None], pa.binary()),
                             "prompt": pa.array([b"caf\xc3\xa9 ?", b"\xff\xfe", b"\xff"], pa.binary()),
                             "extra": pa.array([b"x", b"\xff", b"y"], pa.binary())}), f)
    rows = list(read_rows(f))
    assert [r.id for r in rows[:2]] == ["a", "b"] and rows[0].error is None and rows[0].prompt == "caf\u00e9 ?"
    assert rows[0].metadata == {"extra": "x"}
    assert all("`prompt` must be a string, got bytes" in r.error for r in rows[1:])
    assert len(rows[2].id) == 16 and rows[2].id == list(read_rows(f))[2].id   # a content id, stable


def test_corrupt_parquet_and_bad_json_array_are_clear_errors(tmp_path):
    bad = tmp_path / "x.parquet"
    bad.write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="x.parquet is not a readable Parquet file"):
        list(read_rows(bad))
    arr = tmp_path / "y.json"
    arr.write_text('[{"prompt": "a"}, ')
    with pytest.raises(InputError, match="y.json starts with `\\[` but is not a valid JSON array"):
        list(read_rows(arr))


def test_an_over_long_line_is_an_error_row_read_in_bounded_memory(tmp_path, monkeypatch):
    """A JSON Lines line over MAX_LINE_BYTES (a binary file named .jsonl has no newlines: the whole file was one
    line, joined in memory) is an error row naming its size; the rows around it are read as usual."""
    import ggro.rows
    monkeypatch.setattr(ggro.rows, "MAX_LINE_BYTES", 1000)
    f = tmp_path / "in.jsonl"
    f.write_bytes(b'{"id": "a", "prompt": "hi"}\n' + b"\x00" * 5000 + b'\n{"id": "b", "prompt": "there"}\n'
                  + b"x" * 3000)
    rows = list(read_rows(f))
    assert [r.id for r in rows] == ["a", "in.jsonl:line-2", "b", "in.jsonl:line-4"]
    assert rows[1].error == "line 2 is 5,001 bytes, over the 1,000 a row may take" and rows[3].error.startswith(
        "line 4 is 3,000 bytes") and rows[0].error is None and rows[2].error is None


def test_aligner_blocks_are_whole_calls_and_feed_every_aligner():
    from pipeline.batch.ray_align import BLOCKS_PER_ALIGNER, MAX_CALLS_PER_BLOCK, aligner_block_rows
    for todo in (1, 50, 1_000, 20_000, 500_000):
        for per_call, aligners in ((128, 1), (128, 2), (16, 8)):
            rows = aligner_block_rows(todo, per_call, aligners)
            assert rows % per_call == 0 and per_call <= rows <= MAX_CALLS_PER_BLOCK * per_call
            if rows > per_call:      # grown past one call only while every aligner still gets enough blocks
                assert todo // rows >= BLOCKS_PER_ALIGNER * aligners
    assert aligner_block_rows(500_000, 128, 2) == MAX_CALLS_PER_BLOCK * 128      # large runs: the fewest blocks
