"""DPO preference pairs from two `ggro align` outputs: chosen = GGRO, rejected = a baseline.

The pair format is TRL's conversational preference format (DPOTrainer reads it as is):
    prompt:   [{role, content}, ...]          the input conversation
    chosen:   [{role: assistant, content}]    prefill + GGRO response
    rejected: [{role: assistant, content}]    prefill + baseline response
plus id, chosen_reward, rejected_reward, chosen_method, rejected_method, policy, reward_model,
config_hash. Pairs are kept when chosen_reward - rejected_reward >= min_margin, the two responses
differ, and (unless keep_truncated) neither was cut at max_new_tokens (finish_reason "length").
No Ray here.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pyarrow as pa

from ggro.schema import MESSAGE

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

    def render(self) -> str:
        return (f"pairs: {self.pairs} of {self.rows} rows (dropped: {self.below_margin} below margin, "
                f"{self.identical} identical, {self.truncated} cut at the token limit, "
                f"{self.errors} with an error or no reward, {self.missing} without a rejected row)")


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
