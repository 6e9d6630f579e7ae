"""The config hash: the fields of a run's configuration that change its outputs, hashed into every output row
(provenance) and compared on resume. What a field contributes is its own `hashed` metadata (ggro.config.knob)."""
from __future__ import annotations

import dataclasses
import hashlib
import json

from .config import GGROConfig, ModelConfig, knobs
from .shipped import shipped_guide_id

# What the hash leaves out, from the fields' own `hashed` (see `knob`)
NOT_HASHED = tuple(f.name for c in (GGROConfig, ModelConfig) for f in knobs(c) if f.metadata["hashed"] == "never")
HASHED_WHEN_SET = {f.name: f.default for c in (GGROConfig, ModelConfig) for f in knobs(c)
                   if f.metadata["hashed"] == "when_set"}


def _hashed_fields(c) -> dict:
    values = dataclasses.asdict(c)
    if isinstance(c, ModelConfig):
        # the question asked, not how it was given: a judge's default rubric hashes as it did before the shipped
        # guide got a question of its own (2026-12-06), so those outputs still resume
        values["rubric"] = c.question
    elif c.method != "ggro":   # (a GGROConfig) never reads top_k: hash its old default 25, so outputs of before resume
        values["top_k"] = 25
    return {k: v for k, v in values.items()
            if k not in NOT_HASHED and not (k in HASHED_WHEN_SET and v == HASHED_WHEN_SET[k])}


def config_hash(*configs) -> str:
    """Stable short hash of everything that changes outputs (provenance, resume checks)."""
    fields = [_hashed_fields(c) for c in configs]
    if any(isinstance(c, ModelConfig) and c.uses_shipped_guide for c in configs):     # the spec "default" names whatever guide ships: hash what it is
        fields.append({"shipped_guide": shipped_guide_id()})
    blob = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
