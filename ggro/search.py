"""The batched GGRO search and its baselines, written against the Policy/Reward seam.

Every active prompt advances one refinement per round: one Policy.decode call decodes the current
refinement of all of them, one Reward.score call scores them all. Finished prompts leave and
waiting ones join between rounds (continuous batching), so results stream out as they finish.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from .config import GGROConfig
from .seam import Policy, Reward, RewardQuery, Sampling, SegmentRequest


@dataclass(frozen=True)
class Prompt:
    id: str
    ids: list[int]              # x: prompt tokens, assistant prefill included
    has_prefill: bool = False


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
    finish_reason: str = "stop"   # "length": cut at max_new_tokens without ending in EOS


def row_seed(seed: int, row_id: str, salt: int = 0) -> int:
    """A per-row seed: sampled outputs must not depend on which batch a row landed in."""
    h = hashlib.sha256(f"{seed}:{row_id}:{salt}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def propose(scores: list[float], candidates: list[int], current: int, cfg: GGROConfig,
            gen: torch.Generator | None) -> int:
    """Pick the nudge from raw candidate scores g_q . E[c] (the last score is the current token's)."""
    dots = torch.tensor(scores, dtype=torch.float64)
    cur = dots[-1]
    sigma = dots[:-1] - cur if cfg.scoring == "taylor" else dots[:-1].clone()
    sigma[torch.tensor(candidates) == current] = 0.0
    if cfg.selection == "sample":
        probs = torch.softmax(sigma / cfg.nudge_temperature, dim=0)
        return candidates[int(torch.multinomial(probs, 1, generator=gen))]
    return candidates[int(torch.argmax(sigma / cfg.nudge_temperature))]


@dataclass
class _Segment:
    """Per-prompt search state for the segment being refined."""
    insert_at: int
    i: int = 0
    seen: list = field(default_factory=list)
    best: tuple | None = None           # (tokens, reward, refinement index, stop)
    nudge: int | None = None
    tried: list = field(default_factory=list)


class _Active:
    def __init__(self, prompt: Prompt, cfg: GGROConfig, t0: float):
        self.p, self.t0 = prompt, t0
        self.res = Result(prompt.id, [], math.nan, "ggro", trace=[] if cfg.trace else None)
        first = 0 if prompt.has_prefill else cfg.initial_insertion_offset
        self.seg = _Segment(insert_at=first)
        self.gen = torch.Generator().manual_seed(row_seed(cfg.seed, prompt.id)) if cfg.selection == "sample" else None

    @property
    def prefix(self) -> list[int]:
        return self.p.ids + self.res.tokens


def ggro(prompts: Iterable[Prompt], policy: Policy, reward: Reward, cfg: GGROConfig,
         batch_size: int = 8) -> Iterator[Result]:
    """GGRO over `prompts`, yielding each Result as soon as its prompt finishes."""
    pending = iter(prompts)
    active: list[_Active] = []
    S = cfg.num_refinements
    while True:
        while len(active) < batch_size:
            p = next(pending, None)
            if p is None:
                break
            active.append(_Active(p, cfg, time.perf_counter()))
        if not active:
            return
        reqs = [SegmentRequest(a.p.id, a.prefix, cfg.max_new_tokens - len(a.res.tokens), a.seg.nudge,
                               a.seg.insert_at, cfg.entropy_threshold, cfg.min_segment_tokens, cfg.top_k)
                for a in active]
        segs = policy.decode(reqs)
        queries, scored, closing = [], [], []
        for a, s in zip(active, segs):
            a.res.refinements += 1
            a.res.policy_tokens += s.decoded
            if tuple(s.tokens) in a.seg.seen:       # a repeat: the search has converged
                closing.append(a)
                continue
            a.seg.seen.append(tuple(s.tokens))
            q = len(a.prefix) + a.seg.insert_at
            more = a.seg.i + 1 < S and a.seg.insert_at < len(s.tokens) and s.candidates is not None
            cands = s.candidates + [s.tokens[a.seg.insert_at]] if more else None
            queries.append(RewardQuery(a.prefix + s.tokens, q if more else None, cands, a.p.id, len(a.prefix)))
            scored.append((a, s, more))
        for (a, s, more), r in zip(scored, reward.score(queries)):
            a.res.reward_calls += 1
            seg = a.seg
            if seg.best is None or r.reward > seg.best[1]:
                seg.best = (s.tokens, r.reward, seg.i, s.stop)
            if a.res.trace is not None:
                seg.tried.append({"nudge": seg.nudge, "reward": r.reward, "stop": s.stop,
                                  "stop_entropy": s.stop_entropy, "tokens": len(s.tokens)})
            if more:
                seg.nudge = propose(r.scores, s.candidates, s.tokens[seg.insert_at], cfg, a.gen)
                seg.i += 1
            else:
                closing.append(a)
        done = []
        for a in closing:
            tokens, rew, i, stop = a.seg.best
            res = a.res
            res.tokens = res.tokens + list(tokens)
            res.num_segments += 1
            res.num_nudges += i > 0
            res.segment_boundaries.append(len(res.tokens))
            if res.trace is not None:
                res.trace.append({"stop": stop, "accepted": i, "tried": a.seg.tried})
            if stop == "eos" or len(res.tokens) >= cfg.max_new_tokens:
                res.reward = rew    # RM(x + y): the accepted candidate is the whole response
                res.finish_reason = "stop" if stop == "eos" else "length"
                res.elapsed_s = time.perf_counter() - a.t0
                done.append(a)
            else:
                a.seg = _Segment(insert_at=0)
        if done:
            policy.release([a.p.id for a in done])
            active = [a for a in active if a not in done]
            yield from (a.res for a in done)


def baseline(prompts: Iterable[Prompt], policy: Policy, reward: Reward, cfg: GGROConfig,
             batch_size: int = 8) -> Iterator[Result]:
    """`greedy` (one greedy decode) or `best-of-n` (n seeded samples, best RM score kept)."""
    pending = list(prompts)
    n = cfg.n if cfg.method == "best-of-n" else 1
    per_call = max(1, batch_size // n)
    for start in range(0, len(pending), per_call):
        chunk = pending[start:start + per_call]
        t0 = time.perf_counter()
        reqs = [SegmentRequest(p.id, p.ids, cfg.max_new_tokens,
                               sampling=Sampling(cfg.temperature, cfg.top_p, row_seed(cfg.seed, p.id, k))
                               if cfg.method == "best-of-n" else None)
                for p in chunk for k in range(n)]
        segs = policy.decode(reqs)
        rewards = reward.score([RewardQuery(p.ids + s.tokens) for p, s in zip(
            [p for p in chunk for _ in range(n)], segs)])
        policy.release([p.id for p in chunk])
        elapsed = time.perf_counter() - t0
        for i, p in enumerate(chunk):
            group = list(zip(segs[i * n:(i + 1) * n], rewards[i * n:(i + 1) * n]))
            best_k = max(range(n), key=lambda k: (group[k][1].reward, -k))   # first wins ties
            s, r = group[best_k]
            yield Result(p.id, s.tokens, r.reward, cfg.method, 0, 1, [len(s.tokens)], n,
                         sum(g.decoded for g, _ in group), n, elapsed,
                         finish_reason="stop" if s.stop == "eos" else "length")


def run(prompts: Iterable[Prompt], policy: Policy, reward: Reward, cfg: GGROConfig,
        batch_size: int = 8) -> Iterator[Result]:
    fn = ggro if cfg.method == "ggro" else baseline
    return fn(prompts, policy, reward, cfg, batch_size)
