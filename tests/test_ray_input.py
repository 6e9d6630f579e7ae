"""Inputs at filesystem URIs (s3://, gs://, file://): same rows and error rows as a local path."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from ggro.rows import read_rows
from pipeline.ray_align import read_uri_rows


def test_uri_rows_match_local(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.jsonl").write_text(json.dumps({"id": "x", "prompt": "hi"}) + "\n{broken\n"
                               + json.dumps({"id": "y", "prompt": ""}) + "\n")
    pq.write_table(pa.Table.from_pylist([{"id": "z", "prompt": "yo"}]), d / "b.parquet")
    def key(rows):
        return [(r.id, r.prompt, r.error) for r in rows]
    assert key(read_uri_rows(f"file://{d}")) == key(read_rows(d))
    assert key(read_uri_rows(f"file://{d}/a.jsonl")) == key(read_rows(d / "a.jsonl"))
    assert [r.id for r in read_uri_rows(f"file://{d}")] == ["x", "a.jsonl:line-2", "y", "z"]


def test_uri_missing(tmp_path):
    import pytest
    with pytest.raises(FileNotFoundError):
        list(read_uri_rows(f"file://{tmp_path}/nope.jsonl"))
