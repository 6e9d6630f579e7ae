"""Output folders: Parquet part files, resume by id, and the end-of-run summary. No Ray here."""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ggro.schema import OUTPUT_SCHEMA, to_table


class OutputConflict(RuntimeError):
    pass


def read_output(out_dir: str | Path) -> pa.Table:
    files = sorted(Path(out_dir).glob("*.parquet")) if Path(out_dir).is_dir() else []
    if not files:
        return OUTPUT_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(f).select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA) for f in files])


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


def write_part(out_dir: str | Path, records: list[dict]) -> Path:
    """Write one part file atomically, so an interrupted run leaves only whole parts behind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"part-{uuid.uuid4().hex[:12]}.parquet"
    tmp = out / f".{name}.tmp"
    pq.write_table(to_table(records), tmp)
    tmp.rename(out / name)
    return out / name


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
