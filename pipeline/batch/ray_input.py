"""`ggro align` on Ray, the input side: the prompt files as a Ray Data datasource, and what the driver
knows of them before the pipeline starts.

The driver never holds the prompt set. Before the pipeline it makes one id-only pass (`scan_input`):
ids and an order key (file number, line) stream back, a batch at a time, and only each id's 16-byte
digest and its int64 key are kept (24 B a row, whatever the ids' length), to find duplicate ids (the
first occurrence in file order wins, as in --local) and the --limit cut-off; only when ids repeat does a
second pass fetch those ids' strings (to name the copies id#dupK); after it the digests stay (16 B a
row). Resume reads only the `id`/`error`/`config_hash` columns of --output, one part at a time
(pipeline.batch.output.output_index), and ships the sorted digests to the prepare tasks through the object
store. Ray Data's CheckpointConfig is not used: it keeps its own checkpoint files beside the output,
written apart from the data, while here the whole, atomically moved part files are the checkpoint.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from pipeline.batch.digests import contains, content_digests, id_digests

ROW_SCHEMA = pa.schema([
    ("id", pa.string()), ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("prompt", pa.string()), ("prefill", pa.string()), ("metadata", pa.string()), ("error", pa.string()),
])
KEYED_SCHEMA = ROW_SCHEMA.append(pa.field("key", pa.int64()))
KEY_BITS = 40                 # key = file number << 40 | line (or row) number within the file
READ_BLOCK_ROWS = 4096
READ_CPUS = 0.25              # read/parse and prepare tasks: light, and fused into one task


def row_to_item(r) -> dict:
    return {"id": r.id, "messages": r.messages, "prompt": r.prompt, "prefill": r.prefill,
            "metadata": json.dumps(r.metadata, ensure_ascii=False, default=str) if r.metadata else None,
            "error": r.error}


def item_to_row(d: dict):
    from ggro.rows import InputRow
    return InputRow(id=d["id"], messages=list(d["messages"] or []), prompt=d["prompt"], prefill=d["prefill"] or "",
                    metadata=json.loads(d["metadata"]) if d["metadata"] else {}, error=d["error"])


class PromptFiles:
    """Factory for the Ray Data datasource over input files (a FileBasedDatasource subclass, built lazily so
    this module imports without Ray Data). JSON Lines/.json files stream line by line; Parquet files by
    record batch; every file is parsed by ggro.rows.file_rows, the in-process reader's code."""

    @staticmethod
    def make(files: list[str], filesystem):
        from ray.data.datasource import FileBasedDatasource
        from ggro.rows import input_kind

        numbers = {f: i for i, f in enumerate(files)}

        class _PromptFiles(FileBasedDatasource):
            def __init__(self):
                super().__init__(files, filesystem=filesystem)
                self.numbers = numbers

            def _open_input_source(self, fs, path, **open_args):
                if input_kind(path) == "parquet":          # Parquet needs random access
                    return fs.open_input_file(path)
                return super()._open_input_source(fs, path, **open_args)

            def _read_stream(self, f, path):
                from ggro.rows import file_rows
                base = self.numbers[path] << KEY_BITS
                buf = []
                for n, row in file_rows(f, path.rsplit("/", 1)[-1], input_kind(path) or "json"):
                    buf.append({**row_to_item(row), "key": base | n})
                    if len(buf) >= READ_BLOCK_ROWS:
                        yield pa.Table.from_pylist(buf, schema=KEYED_SCHEMA)
                        buf = []
                if buf:
                    yield pa.Table.from_pylist(buf, schema=KEYED_SCHEMA)

        return _PromptFiles()


class InputPlan:
    """What the driver knows of a streamed input after the id-only pass: no prompt text."""

    def __init__(self, uri, files, filesystem, skipped, count, ids, cutoff, dup_keys, dup_names):
        self.uri, self.files, self.filesystem, self.skipped = uri, files, filesystem, skipped
        self.count = count            # input rows (after --limit)
        self.ids = ids                # sorted digests of every output id this input has
        self.cutoff = cutoff          # largest key within --limit (None: no limit)
        self.dup_keys, self.dup_names = dup_keys, dup_names   # sorted keys of the 2nd.. copies of an id, their ids
        self.done = np.array([], dtype="S16")
        self.todo = count             # rows left to align (count_todo)
        self.contents = None          # content_digests in `ids`' order, when the scan was asked for them

    def dataset(self):
        """The input rows (KEYED_SCHEMA), one read task per file, streamed in blocks of READ_BLOCK_ROWS."""
        import ray.data
        return ray.data.read_datasource(PromptFiles.make(self.files, self.filesystem), num_cpus=READ_CPUS,
                                        override_num_blocks=len(self.files))

    def count_todo(self, done: np.ndarray) -> int:
        self.done = done
        self.todo = self.count - int(np.count_nonzero(contains(done, self.ids)))
        return self.todo


def _ids_and_keys(batch: pa.Table) -> pa.Table:
    return batch.select(["id", "key"])


def _ids_keys_and_contents(batch: pa.Table) -> pa.Table:
    """A resumed run's id pass also carries what each row asks (content_digests), computed in the read task."""
    c = content_digests(batch.column("messages").to_pylist(), batch.column("prefill").to_pylist())
    # tolist() drops a digest's trailing zero bytes and the driver's S16 array pads them back: the same 16 bytes
    return batch.select(["id", "key"]).append_column("content", pa.array(c.tolist(), pa.binary()))


def scan_input(uri: str, limit: int | None = None, contents: bool = False) -> InputPlan:
    """List the input files (naming the skipped ones), check Parquet footers, then stream ids and order
    keys back once to count rows, apply --limit and find duplicate ids (see the module docstring). With
    `contents`, also each row's content_digests (16 B a row more), in `plan.ids`' order: a resume checks them."""
    from ggro.rows import check_parquet, input_fs, input_kind, list_inputs

    filesystem, path = input_fs(uri)
    files, skipped = list_inputs(filesystem, path)
    for f in files:
        if input_kind(f) == "parquet":
            check_parquet(filesystem, f)
    plan = InputPlan(uri, files, filesystem, skipped, 0, np.array([], dtype="S16"), None,
                     np.array([], dtype=np.int64), np.array([], dtype=object))
    if not files:
        return plan
    digests, keys, content = _scan(plan, contents)
    if not len(keys):
        return plan
    # Peak ~40 B a row (the 24 held + one sorted copy of the digests): only rows of repeated ids (rare) are
    # ever sorted by key, and each array is copied one at a time.
    ids = np.sort(digests)
    repeated = np.unique(ids[1:][ids[1:] == ids[:-1]])
    if len(repeated):   # the K-th copy of an id (K >= 2), in key order, is named by dup_id (id#dupK)
        _name_copies(plan, digests, keys, ids, repeated)
    del ids
    if limit is not None and limit < len(keys):   # cut after naming, as --local does: the same ids at any limit
        plan.cutoff = int(np.partition(keys, limit - 1)[limit - 1])   # keys are unique: the limit-th smallest
        keep = keys <= plan.cutoff
        digests, keys = digests[keep], keys[keep]
        content = content[keep] if content is not None else None
        keep = plan.dup_keys <= plan.cutoff
        plan.dup_keys, plan.dup_names = plan.dup_keys[keep], plan.dup_names[keep]
    if content is None:
        plan.count, plan.ids = len(keys), np.sort(digests)
    else:
        order = np.argsort(digests)
        plan.count, plan.ids, plan.contents = len(keys), digests[order], content[order]
    return plan


def _name_copies(plan, digests, keys, ids, repeated) -> None:
    """Rename the 2nd, 3rd.. copies of each `repeated` id in `digests` (in place) and record them in `plan`,
    named in file order against every input id (`ids`, sorted): the --local reader's rule (ggro.rows.dedupe)."""
    from ggro.rows import dup_id
    names = id_strings(plan, repeated)
    at = np.flatnonzero(contains(repeated, digests))           # every copy of a repeated id
    at = at[np.lexsort((keys[at], digests[at]))]                # one id's copies together, in key order
    same = np.r_[False, digests[at][1:] == digests[at][:-1]]
    start = np.maximum.accumulate(np.where(same, 0, np.arange(len(at))))
    k = (np.arange(len(at)) - start + 1)[same]                  # K of each 2nd, 3rd.. copy
    dups = at[same]
    by_key = np.argsort(keys[dups])
    dups, k = dups[by_key], k[by_key]
    made, new = set(), []
    taken = lambda name: name in made or bool(contains(ids, id_digests([name]))[0])   # never another row's id
    for d, kk in zip(digests[dups].tolist(), k):
        new.append(dup_id(names[d], int(kk), taken))
        made.add(new[-1])
    digests[dups] = id_digests(new)
    plan.dup_keys, plan.dup_names = keys[dups], np.array(new, dtype=object)


def _id_batches(plan, contents: bool = False):
    """The input's (id, key[, content]) batches, read by Ray Data's read tasks; our InputError surfaces as itself."""
    try:
        yield from plan.dataset().map_batches(_ids_keys_and_contents if contents else _ids_and_keys,
                                              batch_format="pyarrow", num_cpus=READ_CPUS).iter_batches(
            batch_size=None, batch_format="pyarrow")
    except Exception as e:   # a read task failed: a corrupt file's InputError, not Ray's wrapper
        raise input_error(e) from None


def _scan(plan, contents: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Every row's id digest and order key: 24 bytes a row in the driver, whatever the ids' length (joined one
    array at a time, so the peak is 40 B a row, not 48); with `contents`, also its content digest (16 B more)."""
    digests, keys, content = [], [], []
    for b in _id_batches(plan, contents):
        digests.append(id_digests(b.column("id")))
        keys.append(b.column("key").to_numpy())
        if contents:
            content.append(np.array(b.column("content").to_pylist(), dtype="S16"))   # S16 re-pads the bytes
    if not keys:
        return np.array([], dtype="S16"), np.array([], dtype=np.int64), None
    d = np.concatenate(digests)
    digests.clear()
    return d, np.concatenate(keys), np.concatenate(content) if contents else None


def id_strings(plan, wanted: np.ndarray) -> dict:
    """{digest: id} for the `wanted` digests (sorted; ids that repeat: rare), from a second pass over the input."""
    out = {}
    for b in _id_batches(plan):
        d = id_digests(b.column("id"))
        hit = np.flatnonzero(contains(wanted, d))
        if len(hit):
            ids = b.column("id").take(pa.array(hit)).to_pylist()
            out.update(zip(d[hit].tolist(), ids))
    return out


def input_error(e: Exception) -> Exception:
    from ggro.rows import InputError
    seen = e
    while seen is not None:
        if isinstance(seen, InputError):
            return seen
        cause = getattr(seen, "cause", None)
        seen = cause if isinstance(cause, BaseException) else seen.__cause__
    text = str(e)
    if "InputError" in text:
        line = next((ln for ln in text.splitlines() if "InputError" in ln), text)
        return InputError(line.split("InputError:", 1)[-1].strip())
    return e


def prepare(batch: pa.Table, done: np.ndarray, cutoff: int | None, dup_keys: np.ndarray,
            dup_names: np.ndarray) -> pa.Table:
    """Rows past --limit and ids already in --output leave; later copies of an id become error rows."""
    if not isinstance(done, np.ndarray):      # an ObjectRef: one copy in the object store, read zero-copy
        import ray
        done = ray.get(done)
    keys = batch.column("key").to_numpy()
    if cutoff is not None:
        batch = batch.filter(pa.array(keys <= cutoff))
        keys = batch.column("key").to_numpy()
    ids = batch.column("id").to_pylist()
    if len(dup_keys):
        i = np.searchsorted(dup_keys, keys).clip(0, len(dup_keys) - 1)
        hit = dup_keys[i] == keys
        if hit.any():
            errors = batch.column("error").to_pylist()
            for j in np.nonzero(hit)[0]:
                errors[j] = f"duplicate id {ids[j]!r}: ids must be unique"
                ids[j] = dup_names[i[j]]
            batch = batch.set_column(batch.schema.get_field_index("id"), "id", pa.array(ids, pa.string()))
            batch = batch.set_column(batch.schema.get_field_index("error"), "error", pa.array(errors, pa.string()))
    if len(done):
        batch = batch.filter(pa.array(~contains(done, id_digests(ids))))
    return batch.drop_columns(["key"])
