"""What the search loops share (ggro/faithful.py, ggro/lookahead.py, ggro/baselines.py): the Result each
prompt yields, the per-prompt state of a search, and the steps of a round that do not depend on the mode:
admitting prompts, dropping withdrawn and cancelled ones, appending an accepted segment."""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .config import GGROConfig
from .seam import ENDED, Policy, Prompt, SegmentRequest


@dataclass
class Result:
    id: str
    tokens: list[int]           # y
    reward: float
    method: str
    num_nudges: int = 0
    num_segments: int = 0
    segment_boundaries: list[int] = field(default_factory=list)   # end offset of each segment in y
    refinements: int = 0
    policy_tokens: int = 0
    reward_calls: int = 0
    elapsed_s: float = 0.0
    trace: list[dict] | None = None
    finish_reason: str = "stop"   # "length": cut at max_new_tokens without ending in EOS; "cancelled": withdrawn


def row_seed(seed: int, row_id: str, salt: int = 0) -> int:
    """A per-row seed: sampled outputs must not depend on which batch a row landed in."""
    h = hashlib.sha256(f"{seed}:{row_id}:{salt}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


@dataclass
class Segment:
    """Per-prompt search state for the segment being refined."""
    insert_at: int
    i: int = 0                          # refinements decoded so far
    seen: list = field(default_factory=list)
    best: tuple | None = None           # (tokens, reward, refinement index, stop)
    pending: list = field(default_factory=lambda: [None])   # forced tokens to decode next round (None: greedy)
    tried: list = field(default_factory=list)

    def at_q(self) -> set:
        """Tokens already decoded at the insertion offset: forcing one again repeats its segment exactly."""
        return {s[self.insert_at] for s in self.seen if self.insert_at < len(s)}


class Active:
    """One prompt in a search: its Result so far, the segment being refined, its sampling generator."""

    def __init__(self, prompt: Prompt, cfg: GGROConfig, t0: float):
        self.p, self.t0 = prompt, t0
        self.res = Result(prompt.id, [], math.nan, "ggro", trace=[] if cfg.trace else None)
        first = 0 if prompt.has_prefill else cfg.initial_insertion_offset
        self.seg = Segment(insert_at=first)
        self.gen = torch.Generator().manual_seed(row_seed(cfg.seed, prompt.id)) if cfg.selection == "sample" else None

    @property
    def prefix(self) -> list[int]:
        return self.p.ids + self.res.tokens

    def request(self, cfg: GGROConfig, forced: int | None = None, **kw) -> SegmentRequest:
        """The next segment of this response: up to its token budget, ending at its prompt's stop strings."""
        return SegmentRequest(self.p.id, self.prefix, cfg.max_new_tokens - len(self.res.tokens), forced,
                              stop=self.p.stop, **kw)


def take(source: Iterator[Prompt], n: int) -> list[Prompt]:
    """Up to n prompts from `source`; a None from it means "none waiting now" (Serve's feed), like its end."""
    out = []
    while len(out) < n and (p := next(source, None)) is not None:
        out.append(p)
    return out


def tried_entry(nudge: int | None, s, reward: float) -> dict:
    """One refinement in a segment's trace."""
    return {"nudge": nudge, "reward": reward, "stop": s.stop, "stop_entropy": s.stop_entropy, "tokens": len(s.tokens)}


def split_cancelled(owners: list, segs: list) -> tuple[list, list[int]]:
    """The owners whose decode came back "cancelled" (their caller withdrew them mid-segment: Serve's client
    left), each marked finish_reason "cancelled", and the indexes of the other rows. A cancelled prompt is
    never scored: the search releases it and yields its Result at once, so its caller can forget it."""
    gone = list({id(a): a for a, s in zip(owners, segs) if s.stop == "cancelled"}.values())
    for a in gone:
        a.res.finish_reason = "cancelled"
    return gone, [i for i, a in enumerate(owners) if all(a is not g for g in gone)]


def withdraw(group: list[Active], policy: Policy, withdrawn: Callable[[str], bool] | None) -> list[Active]:
    """`group` without the prompts whose caller gave up on them (Serve: the client disconnected), their
    caches released; they yield no Result. `withdrawn(id)` is asked once per prompt per round and True is
    final (the caller may forget the prompt when it answers True)."""
    if withdrawn is None:
        return group
    gone = [a for a in group if withdrawn(a.p.id)]
    if gone:
        policy.release([a.p.id for a in gone])
        group = [a for a in group if a not in gone]
    return group


def accept(a: Active, tokens, rew: float, i: int, stop: str, cfg: GGROConfig) -> bool:
    """Append the accepted segment to y; True when the response is complete."""
    res = a.res
    res.tokens = res.tokens + list(tokens)
    res.num_segments += 1
    res.num_nudges += i > 0
    res.segment_boundaries.append(len(res.tokens))
    if stop in ENDED or len(res.tokens) >= cfg.max_new_tokens:
        _close(a, rew, stop)   # RM(x + y): the accepted candidate is the whole response
        return True
    return False


def _close(a: Active, rew: float, stop: str) -> None:
    a.res.reward = rew
    a.res.finish_reason = "stop" if stop in ENDED else "length"
    a.res.elapsed_s = time.perf_counter() - a.t0
