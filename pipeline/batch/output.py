"""Output folders (local or any pyarrow filesystem URI): Parquet part files, resume by id, the lock,
the run manifest, --overwrite and --retry-errors, and the end-of-run summary. No Ray here.

What ggro writes in an output folder, and so all that --overwrite may delete:
    part-<12 hex>.parquet     whole part files (written as .NAME.tmp, then moved into place)
    .ggro_run.json            the run manifest (configuration, versions, models, times, row counts)
    .ggro.lock                held while a run writes (holder host, pid, start; see OutputLock)
    pairs.parquet             `ggro dpo` only (pairs-NNNNN.parquet when the join ran in hash buckets)
    .dpo-join/               `ggro dpo` only, while a bucketed join runs: its scratch buckets
    __aligned-METHOD/         `ggro dpo` only: the aligned sub-runs, each an output folder like this one
Bookkeeping names start with "." and sub-runs with "__" because both pyarrow.dataset (ignores "." and
"_") and Hugging Face `datasets` (ignores "." files and "__" folders) then read the folder as its rows
alone.

Memory: resume, --retry-errors and the summary read one part at a time and only the columns they
need (never responses); ids are kept as 16-byte digests (16 B per output row in the driver).
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from ggro.schema import OUTPUT_SCHEMA, to_table
from pipeline.batch.digests import NO_DIGEST, content_digests, id_digests, lookup


class OutputError(RuntimeError):
    """--output cannot be used; the message names it and says why."""


class OutputConflict(OutputError):
    pass


class OutputLocked(OutputError):
    """Another run holds the folder's lock."""


MANIFEST = ".ggro_run.json"
LOCK = ".ggro.lock"
PART_RE = re.compile(r"part-[0-9a-f]{12}\.parquet")
SUBRUN_PREFIX = "__aligned-"
PAIRS_RE = re.compile(r"pairs(-\d{5})?\.parquet")     # ggro dpo's pair files


def output_uri(out_dir: str | Path) -> str:
    """A local path made absolute (Ray workers run elsewhere), or a URI any pyarrow filesystem accepts
    (s3://, gs://, hdfs://, file://; options such as ?endpoint_override=... are kept)."""
    s = str(out_dir)
    return s if "://" in s else os.path.abspath(s)


def output_fs(out_dir: str | Path) -> tuple[pafs.FileSystem, str]:
    s = output_uri(out_dir)
    return pafs.FileSystem.from_uri(s) if "://" in s else (pafs.LocalFileSystem(), s)


def child(out_dir: str | Path, name: str) -> str:
    """out_dir/name, keeping a URI's scheme, credentials and query options."""
    u = urlsplit(output_uri(out_dir))
    return urlunsplit(u._replace(path=u.path.rstrip("/") + "/" + name))


def _ours(rel: str, dpo: bool) -> bool:
    """Is `rel` (a path relative to an output folder) a file ggro writes there?"""
    parts = rel.split("/")
    if dpo and parts[0] == ".dpo-join":    # a dpo join's scratch buckets (pipeline.batch.dpo.JOIN_DIR)
        return True
    if len(parts) > 1:   # only a dpo folder's sub-runs, holding an output folder's own files
        return dpo and parts[0].startswith(SUBRUN_PREFIX) and len(parts) == 2 and _ours(parts[1], False)
    name = parts[0]
    if name.startswith(".") and name.endswith(".tmp"):
        name = name[1:-4]
    stale = name.startswith(LOCK + ".") and name.endswith(".stale")     # a lock being taken over (pipeline.batch.lock)
    return bool(PART_RE.fullmatch(name)) or name in (MANIFEST, LOCK) or stale or (dpo and bool(PAIRS_RE.fullmatch(name)))


def _manifest_command(fs, path: str) -> str | None:
    try:
        with fs.open_input_stream(f"{path}/{MANIFEST}") as f:
            return json.loads(f.read()).get("command")
    except (OSError, ValueError):
        return None


def _listing(out_dir: str | Path, dpo: bool | None = None):
    """(fs, infos of everything under out_dir, [(path, relative path) of files], the foreign ones sorted);
    `dpo` None: a dpo folder when its manifest says so."""
    fs, path = output_fs(out_dir)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    dpo = _manifest_command(fs, path) == "dpo" if dpo is None else dpo
    files = [(f.path, f.path[len(path):].lstrip("/")) for f in infos if f.type == pafs.FileType.File]
    return fs, infos, files, sorted(rel for _, rel in files if not _ours(rel, dpo))


def _names(foreign: list[str]) -> str:
    return ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")


def check_output(out_dir: str | Path) -> None:
    """An align run's --output holds only what ggro align writes. Any other file is refused by name
    (OutputError): a foreign .parquet would be read as rows already written (a prompts file with the
    same ids made a run write nothing and report [OK]), and --input inside --output is the same case."""
    foreign = _listing(out_dir, dpo=False)[3]
    if foreign:
        raise OutputError(f"--output {out_dir} holds files ggro did not write ({_names(foreign)}): an output folder "
                          "holds only ggro's part-*.parquet files and run manifest, or another file could be taken "
                          "for rows already written. Move them away or pick another (new or empty) --output")


def clear_output(out_dir: str | Path) -> int:
    """--overwrite: delete what ggro wrote in out_dir (its parts, manifest, temp files, a dpo folder's
    pairs and sub-runs), keeping the lock this run holds. A folder holding anything else is refused
    with OutputError and nothing is deleted. Returns the number of files deleted."""
    fs, infos, files, foreign = _listing(out_dir)
    if foreign:
        raise OutputError(f"--overwrite refused: {out_dir} holds files ggro did not write ({_names(foreign)}); "
                          "nothing was deleted. Move them away or pick another --output")
    n = 0
    for full, rel in files:
        if rel != LOCK:
            fs.delete_file(full)
            n += 1
    for f in infos:
        if f.type == pafs.FileType.Directory:
            fs.delete_dir(f.path)
    return n


FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)    # no space, over quota, over the file-size limit


def disk_full(e: BaseException, out_dir) -> str | None:
    """The message for a run stopped by a full disk (or quota, or file-size limit) anywhere in `e`'s causes
    (a Ray task's error wraps the OSError of its write), else None. Parts are written whole (tmp + move), so
    every part already in the folder is complete and a rerun resumes after them."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if (isinstance(e, OSError) and e.errno in FULL) or any(os.strerror(n) in str(e) for n in FULL):
            return (f"the disk holding --output {out_dir} is full ({e.__class__.__name__}: "
                    f"{(str(e).strip().splitlines() or [''])[-1][:200]}). The part files already written are whole "
                    "and kept: free space (or raise the quota) and run the same command again; it aligns only the "
                    "rows not yet written")
        cause = getattr(e, "cause", None)
        e = cause if isinstance(cause, BaseException) else (e.__cause__ or e.__context__)
    return None


def prepare_output(out_dir: str | Path) -> None:
    """Create --output before any work, so a missing bucket or a read-only path fails the job at once
    rather than when the first rows are written (taking the lock then proves it writable)."""
    try:
        fs, path = output_fs(out_dir)
        fs.create_dir(path, recursive=True)
    except (OSError, ValueError) as e:   # pyarrow raises OSError subclasses; bad URIs ValueError
        raise OutputError(f"cannot write --output {out_dir}: {e}") from None


def part_files(out_dir: str | Path) -> list[str]:
    """The whole part files of an output folder: ggro's own names only (part-*.parquet; a dpo folder's pairs
    files), never any other .parquet (check_output refuses those before a run reads the folder)."""
    fs, path = output_fs(out_dir)
    return sorted(f.path for f in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
                  if f.type == pafs.FileType.File and (PART_RE.fullmatch(f.base_name) or PAIRS_RE.fullmatch(f.base_name)))


def read_output(out_dir: str | Path, columns: list[str] | None = None) -> pa.Table:
    """The whole output table (small outputs, tests, reports); `columns` reads only those."""
    fs, _ = output_fs(out_dir)
    names = columns or OUTPUT_SCHEMA.names
    schema = pa.schema([OUTPUT_SCHEMA.field(n) for n in names])
    files = part_files(out_dir)
    if not files:
        return schema.empty_table()
    return pa.concat_tables([_read_part(fs, f, names).cast(schema) for f in files])


def _read_part(fs, f: str, columns: list[str]) -> pa.Table:
    """One part file's `columns` (the one reader of parts: resume, summaries, reports). A part damaged after ggro
    wrote it (parts are written whole, then renamed: a cut copy or sync of the folder) is an OutputError naming it."""
    try:
        have = pq.read_schema(f, filesystem=fs).names
        t = pq.read_table(f, filesystem=fs, columns=[c for c in columns if c in have])
    except pa.ArrowInvalid as e:
        raise OutputError(f"{f} is damaged ({e}): ggro cannot tell which rows it held. Move it out of the output "
                          "folder and rerun the same command: the rows it held are aligned again") from None
    for c in columns:          # parts written before a column existed (e.g. finish_reason) read as null
        if c not in have:
            t = t.append_column(OUTPUT_SCHEMA.field(c), pa.nulls(t.num_rows, OUTPUT_SCHEMA.field(c).type))
    return t.select(columns)


@dataclass
class OutputIndex:
    """The ids in an output folder, read from its `id`, `error`, `config_hash`, `messages` and `prefill` columns."""
    done: np.ndarray                 # sorted digests of every id written
    errors: np.ndarray               # sorted digests of the ids whose row is an error
    rows: int
    duplicates: int                  # rows whose id another row already has (0 unless something broke)
    hashes: set = field(default_factory=set)
    contents: np.ndarray | None = None     # content_digests of `done`'s rows, in its order (NO_DIGEST: an error row)

    def changed(self, ids: np.ndarray, contents: np.ndarray) -> np.ndarray:
        """Which of these ids (digests, with their rows' content_digests) the output holds answered for other
        messages or another prefill: the input changed since that run, or another input shares its ids."""
        at, found = lookup(self.done, ids)
        if self.contents is None or not found.any():
            return np.zeros(len(ids), dtype=bool)
        theirs = self.contents[at]
        return found & (theirs != NO_DIGEST) & (theirs != contents)


def output_index(out_dir: str | Path, config_hash: str | None = None) -> OutputIndex:
    """Ids already written (resume) and what each row asked, reading one part at a time and only the columns that
    say so. With `config_hash`, rows of another configuration are an OutputConflict."""
    fs, _ = output_fs(out_dir)
    done, errors, contents, hashes, rows = [], [], [], set(), 0
    for f in part_files(out_dir):
        t = _read_part(fs, f, ["id", "error", "config_hash", "messages", "prefill"])
        d = id_digests(t.column("id"))
        done.append(d)
        bad = np.array(t.column("error").is_valid().to_pylist(), dtype=bool)
        errors.append(d[bad])
        c = content_digests(t.column("messages").to_pylist(), t.column("prefill").to_pylist())
        c[bad] = NO_DIGEST
        contents.append(c)
        hashes |= set(t.column("config_hash").unique().to_pylist()) - {None}
        rows += t.num_rows
    if config_hash is not None and hashes - {config_hash}:
        raise OutputConflict(
            f"{out_dir} already holds rows of another configuration (config hash {sorted(hashes - {config_hash})[0]}, "
            f"this run is {config_hash}); pass a new --output folder or --overwrite")
    done = np.concatenate(done) if done else np.array([], dtype="S16")
    order = np.argsort(done, kind="stable")
    contents = np.concatenate(contents) if contents else np.array([], dtype="S16")
    done, contents = done[order], contents[order]
    dups = int(np.count_nonzero(done[1:] == done[:-1])) if len(done) > 1 else 0
    return OutputIndex(done, np.sort(np.concatenate(errors)) if errors else np.array([], dtype="S16"),
                       rows, dups, hashes, contents)


def done_ids(out_dir: str | Path, config_hash: str) -> set[str]:
    """Ids already written by an earlier run of the same configuration (small outputs; see output_index)."""
    output_index(out_dir, config_hash)      # the configuration check
    return set(read_output(out_dir, ["id"]).column("id").to_pylist())


def drop_error_rows(out_dir: str | Path, select=None) -> int:
    """--retry-errors: remove the error rows (of the ids `select(ids) -> bool mask` picks, or all) from their
    part files, so those ids count as not done and the run aligns them again: exactly one row per id
    at every moment. Each affected part is rewritten whole under its own name (tmp + move replaces it
    atomically; a part left empty is deleted), so a reader never sees a half-rewritten part, and a
    run killed after this step simply aligns those ids on its next run. Returns the rows removed."""
    fs, path = output_fs(out_dir)
    removed = 0
    for f in part_files(out_dir):
        t = _read_part(fs, f, ["id", "error"])
        bad = np.array(t.column("error").is_valid().to_pylist(), dtype=bool)
        if select is not None and bad.any():
            bad &= select(t.column("id").to_pylist())
        if not bad.any():
            continue
        full = pq.read_table(f, filesystem=fs)
        keep = full.filter(pa.array(~bad))
        removed += int(bad.sum())
        if keep.num_rows == 0:
            fs.delete_file(f)
            continue
        name = f.rsplit("/", 1)[-1]
        tmp = f"{path}/.{name}.tmp"
        pq.write_table(keep, tmp, filesystem=fs)
        fs.move(tmp, f)
    return removed


def write_file(out_dir: str | Path, name: str, table: pa.Table) -> str:
    """Write out_dir/name whole or not at all (a hidden tmp file, then a move), so an interrupted run
    leaves only whole files behind and resume never reads half a part."""
    fs, path = output_fs(out_dir)
    fs.create_dir(path, recursive=True)
    tmp, final = f"{path}/.{name}.tmp", f"{path}/{name}"
    pq.write_table(table, tmp, filesystem=fs)
    fs.move(tmp, final)
    return final


def write_part(out_dir: str | Path, records: "list[dict] | pa.Table") -> str:
    table = records if isinstance(records, pa.Table) else to_table(records)
    return write_file(out_dir, f"part-{uuid.uuid4().hex[:12]}.parquet", table)


SUMMARY_COLUMNS = ["id", "error", "reward", "num_nudges", "policy_tokens", "reward_calls"]


@dataclass
class Summary:
    rows: int = 0               # output rows of this run's input ids
    ok: int = 0
    errors: int = 0
    mean_reward: float = math.nan
    mean_nudges: float = math.nan
    policy_tokens: int = 0
    reward_calls: int = 0
    wall_s: float = 0.0
    duplicates: int = 0         # output rows whose id another row of this input already has
    error_examples: list = field(default_factory=list)   # (id, error), the first few
    _rsum: float = field(default=0.0, repr=False)
    _rn: int = field(default=0, repr=False)
    _nsum: int = field(default=0, repr=False)

    @classmethod
    def of(cls, table: pa.Table, wall_s: float) -> "Summary":
        s = cls(wall_s=wall_s)
        s._add(table)
        return s._done()

    def _add(self, table: pa.Table, show: int = 10) -> None:
        bad = table.column("error").is_valid()
        ok = table.filter(pc.invert(bad))
        if len(self.error_examples) < show and pc.any(bad).as_py():
            errs = table.filter(bad).slice(0, show - len(self.error_examples))
            self.error_examples += list(zip(errs.column("id").to_pylist(), errs.column("error").to_pylist()))
        self.rows += table.num_rows
        self.errors += table.num_rows - ok.num_rows
        self.ok += ok.num_rows
        self._rsum += pc.sum(ok.column("reward")).as_py() or 0.0
        self._rn += pc.count(ok.column("reward")).as_py()
        self._nsum += pc.sum(ok.column("num_nudges")).as_py() or 0
        self.policy_tokens += pc.sum(ok.column("policy_tokens")).as_py() or 0
        self.reward_calls += pc.sum(ok.column("reward_calls")).as_py() or 0

    def _done(self) -> "Summary":
        self.mean_reward = self._rsum / self._rn if self._rn else math.nan
        self.mean_nudges = self._nsum / self.ok if self.ok else math.nan
        return self

    @classmethod
    def of_output(cls, out_dir: str | Path, ids: np.ndarray, wall_s: float = 0.0) -> "Summary":
        """The summary of the rows whose id digest is in `ids` (sorted: the input's), reading one part at a time
        and no response text. Each row's id is marked in a bitmap over `ids` (1 B an input row) to count
        duplicates, so the driver never gathers the output's ids."""
        fs, _ = output_fs(out_dir)
        s, seen = cls(wall_s=wall_s), np.zeros(len(ids), dtype=bool)
        for f in part_files(out_dir):
            t = _read_part(fs, f, SUMMARY_COLUMNS)
            pos, hit = lookup(ids, id_digests(t.column("id")))
            t, (u, n) = t.filter(pa.array(hit)), np.unique(pos[hit], return_counts=True)
            s.duplicates += int(n.sum() - np.count_nonzero(~seen[u]))   # all copies but a first one
            seen[u] = True
            s._add(t)
        return s._done()

    def render(self, rows_in: int) -> str:
        check = "OK" if rows_in == self.rows and not self.duplicates else (
            f"MISMATCH: {rows_in} rows in" + (f", {self.duplicates} duplicate rows" if self.duplicates else ""))
        return (f"rows: {self.rows} out ({self.ok} ok, {self.errors} error) / {rows_in} in [{check}]\n"
                f"mean reward: {self.mean_reward:.4f}   mean nudges: {self.mean_nudges:.2f}   "
                f"policy tokens: {self.policy_tokens}   reward calls: {self.reward_calls}   "
                f"wall: {self.wall_s:.1f}s")
