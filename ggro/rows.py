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
    # default=str: a Parquet row's values need not be JSON types (bytes that are not UTF-8, a timestamp)
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()[:16]


def parse_row(obj, where: str) -> InputRow:
    """Validate one decoded record; `where` names it in errors when it has no id."""
    if not isinstance(obj, dict):
        return InputRow(id=where, error=f"row is a {type(obj).__name__}, expected a JSON object")
    prompt, messages, prefill = obj.get("prompt"), obj.get("messages"), obj.get("prefill")
    rid = obj.get("id")
    rid = str(rid) if rid is not None and rid != "" else content_id(
        {"prompt": prompt, "messages": messages, "prefill": prefill})
    meta = {k: v for k, v in obj.items() if k not in ("id", "prompt", "messages", "prefill")}
    # an error row carries only what the output schema can hold: a non-string prefill is the error, not its value
    row = InputRow(id=rid, prefill=prefill if isinstance(prefill, str) else "", metadata=meta)

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
    texts = []
    for i, m in enumerate(messages):
        text = text_content(m.get("content")) if isinstance(m, dict) else None
        if text is None or m.get("role") not in ROLES:
            return bad(f"messages[{i}] must be {{role: one of {ROLES}, content: a string or a list of text parts}}")
        texts.append(text)
    if not any(t.strip() for t in texts):
        return bad("all `messages` are empty")
    row.messages = [{"role": m["role"], "content": t} for m, t in zip(messages, texts)]
    return row


def text_content(content) -> str | None:
    """A message's content as one string: a string as it is, OpenAI's content parts joined when every part is a
    text part ({"type": "text", "text": ...}); None for anything else (images, audio, other types)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return None


class InputError(ValueError):
    """The input cannot be read at all (missing, corrupt, empty); the message names the file and why."""


JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
BOM = b"\xef\xbb\xbf"


def input_kind(name: str) -> str | None:
    """"json" (JSON Lines, or a JSON array in a .json file), "parquet", or None (not an input file)."""
    low = name.lower()
    if low.endswith(JSON_SUFFIXES):
        return "json"
    if low.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def list_inputs(filesystem, path: str) -> tuple[list[str], list[str]]:
    """(input files, skipped files) of a file or folder on a pyarrow filesystem, in sorted order.

    A folder's files are read when their extension (any case) is .jsonl, .json or .parquet and their
    name does not start with "." or "_" (hidden and bookkeeping files); every other file is returned
    in `skipped` so the caller can name it. Subfolders are not entered (they are named as skipped)."""
    from pyarrow import fs as pafs
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    if info.type != pafs.FileType.Directory:
        return [path], []
    files, skipped = [], []
    for f in sorted(filesystem.get_file_info(pafs.FileSelector(path)), key=lambda f: f.path):
        ok = f.type == pafs.FileType.File and input_kind(f.base_name) and not f.base_name.startswith((".", "_"))
        (files if ok else skipped).append(f.path if ok else f.base_name + ("/" if f.type == pafs.FileType.Directory else ""))
    return files, skipped


def check_parquet(filesystem, path: str) -> None:
    """Read a Parquet file's footer: a corrupt or non-Parquet file is an InputError, not a traceback."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        with filesystem.open_input_file(path) as f:
            pq.ParquetFile(f).metadata
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"--input {path} is not a readable Parquet file: {e}") from None


MAX_LINE_BYTES = 64 << 20     # a JSON Lines row longer than this is an error row, not a driver out of memory


class LongLine(int):
    """What iter_lines yields for a line over its limit (the line's length in bytes; its bytes are dropped)."""


def _utf8(value):
    """Parquet written without string annotations (Spark, Hive) holds text as binary: read it as the text it is
    (an id would otherwise become "b'...'"); bytes that are not UTF-8 stay bytes, which parse_row refuses."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return value


def iter_lines(stream, chunk: int = 1 << 20, limit: int | None = None) -> Iterator[bytes | LongLine]:
    """Lines (split on \\n, the \\n kept) of a binary stream that has only `read` (pyarrow input streams).
    A line longer than `limit` bytes comes as a LongLine instead: a file with no newlines (a binary file named
    .jsonl) is read in bounded memory, in linear time."""
    parts, size = [], 0          # the line so far, in pieces: no quadratic re-joining of a long line
    while data := stream.read(chunk):
        *whole, tail = data.split(b"\n")
        for piece in whole:
            if limit is not None and size + len(piece) > limit:
                yield LongLine(size + len(piece) + 1)
            else:
                yield b"".join(parts) + piece + b"\n"
            parts, size = [], 0
        size += len(tail)
        if limit is not None and size > limit:
            parts = []           # over the limit: its bytes are dropped, only its length counts
        else:
            parts.append(tail)
    if size and (limit is None or size <= limit):
        yield b"".join(parts)
    elif size:
        yield LongLine(size)


def file_rows(stream, name: str, kind: str, batch_rows: int = 4096, parse=None) -> Iterator[tuple[int, InputRow]]:
    """(n, row) for every row of one input file, errors included; n is the 1-based line (JSON Lines),
    item (JSON array) or row (Parquet) number, so rows can be ordered across a streamed read.

    `stream` is a binary file with `read` (JSON) or a random-access file (Parquet); `name` is the file's
    base name, used in the ids of rows that have none of their own. A .json file whose first character
    is `[` is one JSON array (read whole: arrays cannot be streamed); otherwise JSON Lines. A UTF-8 byte
    order mark at the start is dropped. Raises InputError for a corrupt Parquet file or JSON array.
    `parse(obj, where)` turns each decoded record into a row (default: parse_row, a prompt row); lines that
    are not valid UTF-8 or JSON are InputRow errors whatever it is."""
    parse = parse or parse_row
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            pf = pq.ParquetFile(stream)
            n = 0
            for batch in pf.iter_batches(batch_size=batch_rows):
                for obj in batch.to_pylist():
                    n += 1
                    yield n, parse({k: _utf8(v) for k, v in obj.items() if v is not None}, f"{name}:row-{n}")
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"--input file {name} is not a readable Parquet file: {e}") from None
        return
    # a .json file may be one JSON array, read whole; a .jsonl file's lines are capped
    lines = iter_lines(stream, limit=None if name.lower().endswith(".json") else MAX_LINE_BYTES)
    for n, raw in enumerate(lines, 1):
        if isinstance(raw, LongLine):
            yield n, InputRow(id=f"{name}:line-{n}", error=f"line {n} is {int(raw):,} bytes, over the "
                                                             f"{MAX_LINE_BYTES:,} a row may take")
            continue
        if n == 1 and raw.startswith(BOM):
            raw = raw[len(BOM):]
        if n == 1 and name.lower().endswith(".json") and raw.lstrip().startswith(b"["):
            yield from _json_array(raw + b"".join(lines), name, parse)
            return
        if not raw.strip():
            continue
        yield n, parse_line(raw, n, name, parse)


def _json_array(data: bytes, name: str, parse=None) -> Iterator[tuple[int, InputRow]]:
    try:
        items = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"--input file {name} starts with `[` but is not a valid JSON array: {e}") from None
    for i, obj in enumerate(items, 1):
        yield i, (parse or parse_row)(obj, f"{name}:item-{i}")


def parse_line(raw: bytes, n: int, name: str, parse=None) -> InputRow:
    """One JSON Lines line (bytes) as a row; bad UTF-8 or JSON becomes an error row named by its line."""
    where = f"{name}:line-{n}"
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return InputRow(id=where, error=f"line {n} is not valid UTF-8 ({e.reason} at byte {e.start})")
    except json.JSONDecodeError as e:
        return InputRow(id=where, error=f"line {n} is not valid JSON: {e.msg} (column {e.colno})")
    return (parse or parse_row)(obj, where)


def read_rows(path: str | Path, skipped: list | None = None, parse=None) -> Iterator[InputRow]:
    """Rows of a .jsonl/.json/.parquet file (or a folder of them) at a local path or any pyarrow URI,
    errors included, in file order (the in-process reader; `ggro align` on Ray streams the same rows).
    Files a folder holds that are not inputs are appended to `skipped` (pass a list to learn them)."""
    filesystem, root = input_fs(path)
    files, skip = list_inputs(filesystem, root)
    if skipped is not None:
        skipped.extend(skip)
    for f in files:
        if input_kind(f) == "parquet":
            check_parquet(filesystem, f)
    for f in files:
        kind = input_kind(f) or "json"      # a file named explicitly is read as JSON Lines whatever its name
        opener = filesystem.open_input_file if kind == "parquet" else filesystem.open_input_stream
        with opener(f) as stream:
            yield from (r for _, r in file_rows(stream, f.rsplit("/", 1)[-1], kind, parse=parse))


def input_fs(path: str | Path):
    """(pyarrow filesystem, path) of a local path or a URI (s3://, gs://, hdfs://, file://)."""
    from pyarrow import fs as pafs
    s = str(path)
    if "://" in s:
        return pafs.FileSystem.from_uri(s)
    return pafs.LocalFileSystem(), str(Path(s).absolute())


def dup_id(rid: str, k: int, taken) -> str:
    """The id of the k-th (k >= 2) row carrying id `rid`: `rid#dupK`, or, when that is `taken(name)` (another
    row's own id, or a name given to an earlier copy), `rid#dupK.2`, `rid#dupK.3`... so it never collides.
    The --local reader (dedupe) and the Ray id pass (pipeline.batch.ray_input.scan_input) both name copies in file
    order with this, each against the ids of every row it reads (after --limit), so they agree."""
    name, n = f"{rid}#dup{k}", 1
    while taken(name):
        n += 1
        name = f"{rid}#dup{k}.{n}"
    return name


def dedupe(rows) -> list[InputRow]:
    """Outputs are keyed by id, so a repeated id is reported on each later row (as `id#dupK`, K = 2, 3..
    for the K-th copy; see dup_id) instead of aligned."""
    rows = list(rows)
    real, made, seen, out = {r.id for r in rows}, set(), {}, []
    for r in rows:
        k = seen.get(r.id, 0) + 1
        seen[r.id] = k
        if k > 1:
            rid = dup_id(r.id, k, lambda name: name in real or name in made)
            made.add(rid)
            r = InputRow(id=rid, messages=r.messages, prompt=r.prompt, prefill=r.prefill,
                         metadata=r.metadata, error=f"duplicate id {r.id!r}: ids must be unique")
        out.append(r)
    return out


def encode(row: InputRow, tokenizer, prompt_format: str, max_new_tokens: int, context: int) -> Prompt:
    """x as token ids (chat template per `prompt_format`, prefill appended). Raises ValueError.

    Message contents and the prefill are content: control-token text in them stays text (ggro.chat). A `raw`
    prompt is the model's whole input as its user wrote it, template text included, so its control tokens are
    parsed (the user already controls every turn there: nothing to inject into)."""
    from .chat import chat_ids, text_ids
    if prompt_format == "raw":
        if row.prompt is None:
            raise ValueError("--prompt-format raw needs a `prompt` string, not `messages`")
        ids = tokenizer.encode(row.prompt)
    else:
        ids = chat_ids(tokenizer, row.messages, add_generation_prompt=prompt_format == "chat")
    ids = ids + text_ids(tokenizer, row.prefill)
    if len(ids) + max_new_tokens > context:
        raise ValueError(f"prompt is {len(ids)} tokens; with max_new_tokens={max_new_tokens} that exceeds "
                         f"the model's context window of {context}: shorten the prompt or lower --max-new-tokens")
    return Prompt(row.id, ids, has_prefill=bool(row.prefill))
