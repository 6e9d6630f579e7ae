"""What the shipped guide is: its head's file, its judge half's question and weight, and the identity the config hash
reads (`shipped_guide_id`). Torch-free: the CLI, the planner and the config hash read it."""
from __future__ import annotations

import functools
import hashlib

# The shipped guide = head + JUDGE_WEIGHT x (the backbone asked GUIDE_QUESTION: logit Yes - logit No). The head knows
# refusals but not helpfulness or truth, the judge the reverse. Since 2026-12-06 its judge half asks a question of its
# own: the 21-token one beat DEFAULT_RUBRIC (45 tokens) out of family and under the prefilling attack at an equal
# in-family accuracy, and costs each reward call half the tokens; 1.5 is the weight that kept the in-family floor
# (docs/reward-model.md). Other judges keep DEFAULT_RUBRIC: nothing here measured the short question on them.
GUIDE_QUESTION = "Was that a good answer? Yes or No."
JUDGE_WEIGHT = 1.5
GUIDE_HEAD = "data/guide_head.safetensors"   # the shipped head, inside the ggro package
HEAD_FILE = "guide_head.safetensors"   # beside a causal LM's files: a guide folder with an MLP head (ggro.guide.save_classifier)


def shipped_guide_id() -> str:
    """What the shipped guide is, for the config hash: its head file's bytes and the judge weight. A retrained
    head or a new weight changes the outputs, so an output folder written with the old guide must not resume
    as the same config (it would mix two guides)."""
    return f"{_head_digest()}+judge{JUDGE_WEIGHT}"


@functools.cache
def _head_digest() -> str:      # config_hash runs per run and per Serve request: read the file once
    from importlib import resources
    return hashlib.sha256(resources.files("ggro").joinpath(GUIDE_HEAD).read_bytes()).hexdigest()[:12]
