"""The two calls the GGRO search makes, and the dataclasses that cross them.

The search never knows where a Policy or Reward runs: in this process (tests, `--local`) or behind
Ray actor handles (the cluster). Everything here is plain data so it pickles cheaply.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Prompt:
    """One prompt as the search sees it (ggro.rows builds it from an input row)."""
    id: str
    ids: list[int]              # x: prompt tokens, assistant prefill included
    has_prefill: bool = False
    stop: tuple[str, ...] = ()  # stop strings (Serve's `stop`): decoding ends once one appears in y


@dataclass(frozen=True)
class Sampling:
    """Ancestral sampling (best-of-n). `seed` makes one sample reproducible whatever its batch."""
    temperature: float
    top_p: float
    seed: int


@dataclass(frozen=True)
class SegmentRequest:
    seq_id: str                 # prefix-cache key: the same sequence across refinements and segments
    prefix: list[int]           # x + y
    max_tokens: int             # tokens this segment may emit before the length cap
    forced: int | None = None   # the nudge, emitted at offset `insert_at`
    insert_at: int = 0
    entropy_threshold: float = float("inf")   # inf: no high-entropy stop (plain decoding)
    min_segment_tokens: int = 4
    top_k: int = 0              # return the top-k base-logit token ids at `insert_at`
    sampling: Sampling | None = None
    stop: tuple[str, ...] = ()  # end the segment ("stop") once one of these strings appears in the emitted text


ENDED = ("eos", "stop")         # segment stops that end the whole response


@dataclass
class SegmentResult:
    tokens: list[int]           # emitted tokens, the dropped uncertain one excluded
    stop: str                   # "eos" | "stop" (a stop string) | "length" | "entropy" | "cancelled" (withdrawn)
    stop_entropy: float         # H(p_j) at the last emitted (or dropped) token, nats
    candidates: list[int] | None  # top-k at insert_at (None if decoding never reached it)
    decoded: int                # tokens the policy emitted, dropped one included (cost)


@dataclass(frozen=True)
class RewardQuery:
    tokens: list[int]           # z = x + y + s, policy token ids
    position: int | None = None   # q: where the candidate scores are wanted (None: reward only)
    candidates: list[int] | None = None
    seq_id: str | None = None   # with prefix_len: tokens[:prefix_len] (x + y) may be cached under seq_id
    prefix_len: int = 0         # must be <= position; the RM then differentiates only the rest


@dataclass
class RewardResult:
    reward: float
    scores: list[float] | None = None   # g_q . E_rm[c] for each candidate c, in query order


class Policy(Protocol):
    def decode(self, requests: list[SegmentRequest]) -> list[SegmentResult]: ...
    def release(self, seq_ids: list[str]) -> None: ...


class Reward(Protocol):
    def score(self, queries: list[RewardQuery]) -> list[RewardResult]: ...
