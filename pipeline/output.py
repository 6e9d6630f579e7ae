"""Output folders (local or any pyarrow filesystem URI): Parquet part files, resume by id, and the
end-of-run summary. No Ray here."""
from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from ggro.schema import OUTPUT_SCHEMA, to_table


class OutputError(RuntimeError):
    """--output cannot be used; the message names it and says why."""


class OutputConflict(OutputError):
    pass


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


def prepare_output(out_dir: str | Path, overwrite: bool = False) -> None:
    """Create --output (emptied first with overwrite) before any work, so a missing bucket or a
    read-only path fails the job at once rather than when the first rows are written."""
    try:
        fs, path = output_fs(out_dir)
        if overwrite:
            fs.delete_dir_contents(path, missing_dir_ok=True)
        fs.create_dir(path, recursive=True)
    except (OSError, ValueError) as e:   # pyarrow raises OSError subclasses; bad URIs ValueError
        raise OutputError(f"cannot write --output {out_dir}: {e}") from None


def read_output(out_dir: str | Path) -> pa.Table:
    fs, path = output_fs(out_dir)
    files = sorted(f.path for f in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
                   if f.type == pafs.FileType.File and f.base_name.endswith(".parquet"))
    if not files:
        return OUTPUT_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(f, filesystem=fs).select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)
                             for f in files])


def done_ids(out_dir: str | Path, config_hash: str) -> set[str]:
    """Ids already written by an earlier run of the same configuration (resume)."""
    t = read_output(out_dir)
    if t.num_rows == 0:
        return set()
    hashes = set(t.column("config_hash").to_pylist()) - {None}
    if hashes - {config_hash}:
        raise OutputConflict(
            f"{out_dir} already holds rows of another configuration (config hash {sorted(hashes)[0]}, this "
            f"run is {config_hash}); pass a new --output folder or --overwrite")
    return set(t.column("id").to_pylist())


def write_file(out_dir: str | Path, name: str, table: pa.Table) -> str:
    """Write out_dir/name whole or not at all (a hidden tmp file, then a move), so an interrupted run
    leaves only whole files behind and resume never reads half a part."""
    fs, path = output_fs(out_dir)
    fs.create_dir(path, recursive=True)
    tmp, final = f"{path}/.{name}.tmp", f"{path}/{name}"
    pq.write_table(table, tmp, filesystem=fs)
    fs.move(tmp, final)
    return final


def write_part(out_dir: str | Path, records: list[dict]) -> str:
    return write_file(out_dir, f"part-{uuid.uuid4().hex[:12]}.parquet", to_table(records))


@dataclass
class Summary:
    rows: int
    ok: int
    errors: int
    mean_reward: float
    mean_nudges: float
    policy_tokens: int
    reward_calls: int
    wall_s: float

    @classmethod
    def of(cls, table: pa.Table, wall_s: float) -> "Summary":
        d = table.select(["reward", "num_nudges", "policy_tokens", "reward_calls", "error"]).to_pydict()
        ok = [i for i, e in enumerate(d["error"]) if e is None]
        rewards = [d["reward"][i] for i in ok if d["reward"][i] is not None]
        return cls(rows=table.num_rows, ok=len(ok), errors=table.num_rows - len(ok),
                   mean_reward=sum(rewards) / len(rewards) if rewards else math.nan,
                   mean_nudges=sum(d["num_nudges"][i] or 0 for i in ok) / len(ok) if ok else math.nan,
                   policy_tokens=sum(d["policy_tokens"][i] or 0 for i in ok),
                   reward_calls=sum(d["reward_calls"][i] or 0 for i in ok), wall_s=wall_s)

    def render(self, rows_in: int) -> str:
        check = "OK" if rows_in == self.rows else f"MISMATCH: {rows_in} rows in"
        return (f"rows: {self.rows} out ({self.ok} ok, {self.errors} error) / {rows_in} in [{check}]\n"
                f"mean reward: {self.mean_reward:.4f}   mean nudges: {self.mean_nudges:.2f}   "
                f"policy tokens: {self.policy_tokens}   reward calls: {self.reward_calls}   "
                f"wall: {self.wall_s:.1f}s")
