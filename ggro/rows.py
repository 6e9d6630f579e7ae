"""Input rows: reading JSONL/Parquet, validating each row, and turning it into prompt token ids.

A bad row never stops a job and never disappears: it becomes an InputRow with `error` set, which
flows to the output as a row with that error.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .seam import Prompt

ROLES = ("system", "user", "assistant")


@dataclass
class InputRow:
    id: str
    messages: list[dict] = field(default_factory=list)   # always set when valid
    prompt: str | None = None                            # the raw string, when given as `prompt`
    prefill: str = ""
    metadata: dict = field(default_factory=dict)         # any other fields, carried to the output
    error: str | None = None

    @property
    def prompt_text(self) -> str:
        if self.prompt is not None:
            return self.prompt
        users = [m["content"] for m in self.messages if m.get("role") == "user"]
        return users[-1] if users else ""


def content_id(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def parse_row(obj, where: str) -> InputRow:
    """Validate one decoded record; `where` names it in errors when it has no id."""
    if not isinstance(obj, dict):
        return InputRow(id=where, error=f"row is a {type(obj).__name__}, expected a JSON object")
    prompt, messages, prefill = obj.get("prompt"), obj.get("messages"), obj.get("prefill")
    rid = obj.get("id")
    rid = str(rid) if rid is not None and rid != "" else content_id(
        {"prompt": prompt, "messages": messages, "prefill": prefill})
    meta = {k: v for k, v in obj.items() if k not in ("id", "prompt", "messages", "prefill")}
    row = InputRow(id=rid, prefill=prefill or "", metadata=meta)

    def bad(msg):
        row.error = msg
        return row

    if prefill is not None and not isinstance(prefill, str):
        return bad("`prefill` must be a string")
    if prompt is not None and messages is not None:
        return bad("row has both `prompt` and `messages`; give one")
    if prompt is None and messages is None:
        return bad("row has neither `prompt` (string) nor `messages` (list of {role, content})")
    if prompt is not None:
        if not isinstance(prompt, str):
            return bad(f"`prompt` must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            return bad("`prompt` is empty")
        row.prompt = prompt
        row.messages = [{"role": "user", "content": prompt}]
        return row
    if not isinstance(messages, list) or not messages:
        return bad("`messages` must be a non-empty list of {role, content}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            return bad(f"messages[{i}] must be {{role: one of {ROLES}, content: string}}")
    if not any(m["content"].strip() for m in messages):
        return bad("all `messages` are empty")
    row.messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    return row


def read_records(path: str | Path) -> Iterator[tuple[str, dict | None, str | None]]:
    """(where, object, error) for each record of a .jsonl or .parquet file (or a folder of them);
    a line that is not valid UTF-8 or JSON comes back as an error, never dropped."""
    path = Path(path)
    if path.is_dir():
        for f in sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".parquet")):
            yield from read_records(f)
        return
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        for i, obj in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path.name}:row-{i + 1}", {k: v for k, v in obj.items() if v is not None}, None
        return
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path.name}:line-{n}"
            if not raw.strip():
                continue
            try:
                yield where, json.loads(raw.decode("utf-8")), None
            except UnicodeDecodeError as e:
                yield where, None, f"line {n} is not valid UTF-8 ({e.reason} at byte {e.start})"
            except json.JSONDecodeError as e:
                yield where, None, f"line {n} is not valid JSON: {e.msg} (column {e.colno})"


def read_rows(path: str | Path) -> Iterator[InputRow]:
    """Rows of a .jsonl/.json-lines or .parquet file (or a folder of them), errors included."""
    for where, obj, err in read_records(path):
        yield InputRow(id=where, error=err) if err else parse_row(obj, where)


def dedupe(rows) -> Iterator[InputRow]:
    """Outputs are keyed by id, so a repeated id is reported on the later row instead of aligned."""
    seen = set()
    for r in rows:
        if r.id in seen:
            yield InputRow(id=f"{r.id}#dup", messages=r.messages, prompt=r.prompt, prefill=r.prefill,
                           metadata=r.metadata, error=f"duplicate id {r.id!r}: ids must be unique")
            continue
        seen.add(r.id)
        yield r


def encode(row: InputRow, tokenizer, prompt_format: str, max_new_tokens: int, context: int) -> Prompt:
    """x as token ids (chat template per `prompt_format`, prefill appended). Raises ValueError."""
    if prompt_format == "raw":
        if row.prompt is None:
            raise ValueError("--prompt-format raw needs a `prompt` string, not `messages`")
        ids = tokenizer.encode(row.prompt)
    else:
        text = tokenizer.apply_chat_template(row.messages, tokenize=False,
                                             add_generation_prompt=prompt_format == "chat")
        ids = tokenizer.encode(text, add_special_tokens=False)
    if row.prefill:
        ids = ids + tokenizer.encode(row.prefill, add_special_tokens=False)
    if len(ids) + max_new_tokens > context:
        raise ValueError(f"prompt is {len(ids)} tokens; with max_new_tokens={max_new_tokens} that exceeds "
                         f"the model's context window of {context}: shorten the prompt or lower --max-new-tokens")
    return Prompt(row.id, ids, has_prefill=bool(row.prefill))
