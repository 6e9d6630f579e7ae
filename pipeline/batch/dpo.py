"""DPO preference pairs from two `ggro align` outputs: chosen = GGRO, rejected = a baseline.

The pair format is TRL's conversational preference format (DPOTrainer reads it as is):
    prompt:   [{role, content}, ...]          the input conversation
    chosen:   [{role: assistant, content}]    prefill + GGRO response
    rejected: [{role: assistant, content}]    prefill + baseline response
plus id, chosen_reward, rejected_reward, chosen_method, rejected_method, policy, reward_model,
config_hash. Pairs are kept when chosen_reward - rejected_reward >= min_margin, the two responses
differ, and (unless keep_truncated) neither was cut at max_new_tokens (finish_reason "length").

Outputs of any size: `join_outputs` holds about `bucket_rows` rows of each side in memory. Larger outputs are
split by a hash of the id into buckets (scratch part files under OUT/.dpo-join/, removed at the end), one part
file at a time, and joined a bucket at a time into pairs-NNNNN.parquet; small ones give one pairs.parquet.
No Ray here.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from ggro.schema import MESSAGE, OUTPUT_SCHEMA
from pipeline.batch.digests import asked, id_digests
from pipeline.batch.output import PAIRS_RE, _read_part, child, output_fs, part_files, read_output, write_file, write_part

DPO_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("prompt", pa.list_(MESSAGE)),
    ("chosen", pa.list_(MESSAGE)),
    ("rejected", pa.list_(MESSAGE)),
    ("chosen_reward", pa.float64()),
    ("rejected_reward", pa.float64()),
    ("chosen_method", pa.string()),
    ("rejected_method", pa.string()),
    ("policy", pa.string()),
    ("reward_model", pa.string()),
    ("config_hash", pa.string()),
])


@dataclass
class PairStats:
    rows: int = 0          # ids in the chosen output
    pairs: int = 0
    missing: int = 0       # id absent from the rejected output
    errors: int = 0        # either side has an error or no reward
    below_margin: int = 0
    identical: int = 0     # chosen and rejected texts are the same: no preference to learn
    truncated: int = 0     # either side was cut at max_new_tokens
    mismatched: int = 0    # the two rows of an id ask different things (join mode over outputs of other inputs)

    def __add__(self, other: "PairStats") -> "PairStats":
        return PairStats(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def render(self) -> str:
        return (f"pairs: {self.pairs} of {self.rows} rows (dropped: {self.below_margin} below margin, "
                f"{self.identical} identical, {self.truncated} cut at the token limit, "
                f"{self.errors} with an error or no reward, {self.missing} without a rejected row"
                + (f", {self.mismatched} whose rejected row answers another prompt or prefill" if self.mismatched else "")
                + ")")


def pair_hash(chosen_hash: str | None, rejected_hash: str | None) -> str:
    return hashlib.sha256(f"{chosen_hash}|{rejected_hash}".encode()).hexdigest()[:12]


DEFAULT_MIN_MARGIN = 1e-6     # a tie (or float noise around one) is no preference


def build_pairs(chosen: pa.Table, rejected: pa.Table, min_margin: float = DEFAULT_MIN_MARGIN,
                keep_truncated: bool = False) -> tuple[pa.Table, PairStats]:
    """Join two align outputs (OUTPUT_SCHEMA) by id into a DPO_SCHEMA table."""
    rej = {r["id"]: r for r in rejected.to_pylist()}
    stats, out = PairStats(), []
    for c in sorted(chosen.to_pylist(), key=lambda r: r["id"]):
        stats.rows += 1
        r = rej.get(c["id"])
        if r is None:
            stats.missing += 1
            continue
        if asked(c["messages"], c["prefill"]) != asked(r["messages"], r["prefill"]):
            stats.mismatched += 1     # a pair of answers to two questions teaches nothing, or the wrong thing
            continue
        if c["error"] or r["error"] or c["reward"] is None or r["reward"] is None:
            stats.errors += 1
            continue
        if not keep_truncated and "length" in (c.get("finish_reason"), r.get("finish_reason")):
            stats.truncated += 1
            continue
        chosen_text = (c["prefill"] or "") + (c["response"] or "")
        rejected_text = (r["prefill"] or "") + (r["response"] or "")
        if chosen_text == rejected_text:
            stats.identical += 1
            continue
        if c["reward"] - r["reward"] < min_margin:
            stats.below_margin += 1
            continue
        out.append({
            "id": c["id"], "prompt": c["messages"],
            "chosen": [{"role": "assistant", "content": chosen_text}],
            "rejected": [{"role": "assistant", "content": rejected_text}],
            "chosen_reward": c["reward"], "rejected_reward": r["reward"],
            "chosen_method": c["method"], "rejected_method": r["method"],
            "policy": c["policy"], "reward_model": c["reward_model"],
            "config_hash": pair_hash(c["config_hash"], r["config_hash"]),
        })
        stats.pairs += 1
    return pa.Table.from_pylist(out, schema=DPO_SCHEMA), stats


JOIN_DIR = ".dpo-join"          # scratch bucket files of a large join (hidden from dataset readers)
BUCKET_ROWS = 200_000           # rows of one side a bucket may hold (each a response and its metadata)


def join_outputs(chosen_dir: str, rejected_dir: str, out_dir: str, min_margin: float = DEFAULT_MIN_MARGIN,
                 keep_truncated: bool = False, bucket_rows: int = BUCKET_ROWS) -> PairStats:
    """Join two align outputs by id into pair files in out_dir (see the module docstring); returns the counts."""
    n = max(_rows(chosen_dir), _rows(rejected_dir))
    k = max(1, math.ceil(n / bucket_rows))
    _clear_pairs(out_dir)
    if k == 1:
        pairs, stats = build_pairs(read_output(chosen_dir), read_output(rejected_dir), min_margin, keep_truncated)
        write_file(out_dir, "pairs.parquet", pairs)
        return stats
    scratch = child(out_dir, JOIN_DIR)
    for side, src in (("chosen", chosen_dir), ("rejected", rejected_dir)):
        _split(src, child(scratch, side), k)
    total = PairStats()
    for b in range(k):
        pairs, stats = build_pairs(*(read_output(child(scratch, f"{side}/{b:05d}")) for side in ("chosen", "rejected")),
                                   min_margin, keep_truncated)
        write_file(out_dir, f"pairs-{b:05d}.parquet", pairs)
        total += stats
    fs, path = output_fs(scratch)
    fs.delete_dir(path)
    return total


def _rows(out_dir: str) -> int:
    fs, _ = output_fs(out_dir)
    return sum(pq.read_metadata(f, filesystem=fs).num_rows for f in part_files(out_dir))


def _split(src: str, dest: str, k: int) -> None:
    """Each part of `src` split into k bucket folders by a hash of the id, one part in memory at a time."""
    fs, _ = output_fs(src)
    for f in part_files(src):
        t = _read_part(fs, f, OUTPUT_SCHEMA.names)
        bucket = id_digests(t.column("id")).view("<u8")[::2] % k      # the digest's first 8 bytes
        for b in np.unique(bucket):
            write_part(child(dest, f"{int(b):05d}"), t.filter(pa.array(bucket == b)))


def _clear_pairs(out_dir: str) -> None:
    """Pair files of an earlier join: a join into fewer buckets must not leave stale ones beside its own."""
    fs, path = output_fs(out_dir)
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if info.type == pafs.FileType.File and PAIRS_RE.fullmatch(info.base_name):
            fs.delete_file(info.path)
    if fs.get_file_info(f"{path}/{JOIN_DIR}").type == pafs.FileType.Directory:
        fs.delete_dir(f"{path}/{JOIN_DIR}")
