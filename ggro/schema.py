"""The output row: one fixed pyarrow schema for every writer (local parts, Ray Data, Serve logs)."""
from __future__ import annotations

import json
import math

import pyarrow as pa

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])

OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("prompt", pa.string()),
    ("messages", pa.list_(MESSAGE)),
    ("prefill", pa.string()),
    ("response", pa.string()),
    ("reward", pa.float64()),
    ("finish_reason", pa.string()),   # stop (ended with EOS) | length (cut at max_new_tokens); null on errors
    ("method", pa.string()),
    ("num_nudges", pa.int32()),
    ("num_segments", pa.int32()),
    ("segment_boundaries", pa.list_(pa.int32())),
    ("refinements", pa.int32()),
    ("policy_tokens", pa.int64()),
    ("reward_calls", pa.int64()),
    ("elapsed_s", pa.float64()),
    ("error", pa.string()),
    ("metadata", pa.string()),   # JSON of the input row's other fields (task data, references)
    ("trace", pa.string()),      # JSON, when tracing is on
    ("policy", pa.string()),
    ("reward_model", pa.string()),
    ("config_hash", pa.string()),
    ("seed", pa.int64()),
])


def result_stats(result) -> dict:
    """A search Result's numbers, by their output column names: the one Result -> dict that the output rows and
    Serve's `ggro` stats (pipeline/serve/api.py `stats`) share. A NaN reward (nothing scored) is None."""
    return {"reward": None if math.isnan(result.reward) else result.reward, "num_nudges": result.num_nudges,
            "num_segments": result.num_segments, "segment_boundaries": result.segment_boundaries,
            "refinements": result.refinements, "policy_tokens": result.policy_tokens,
            "reward_calls": result.reward_calls, "elapsed_s": result.elapsed_s}


def output_record(row, result, tokenizer, provenance: dict, method: str, error: str | None = None) -> dict:
    """One output row from an InputRow and its search Result (None for an error row)."""
    rec = {
        "id": row.id, "prompt": row.prompt_text, "messages": row.messages, "prefill": row.prefill,
        "response": None, "reward": None, "finish_reason": None, "method": method, "num_nudges": None, "num_segments": None,
        "segment_boundaries": None, "refinements": None, "policy_tokens": None, "reward_calls": None,
        "elapsed_s": None, "error": error or row.error,
        "metadata": json.dumps(row.metadata, ensure_ascii=False, default=str) if row.metadata else None,
        "trace": None, **provenance,
    }
    if result is not None and rec["error"] is None:
        rec.update(
            response=tokenizer.decode(result.tokens, skip_special_tokens=True),
            finish_reason=result.finish_reason, **result_stats(result),
            trace=json.dumps(result.trace) if result.trace is not None else None)
    return rec


def to_table(records: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(records, schema=OUTPUT_SCHEMA)
