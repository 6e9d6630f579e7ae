"""The GGRO search one segment at a time (search_mode faithful, adaptive and parallel; ALGORITHM.md).

Every active prompt advances one refinement per round: one Policy.decode call decodes the current
refinement of all of them, one Reward.score call scores them all. Finished prompts leave and
waiting ones join between rounds (continuous batching), so results stream out as they finish.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable, Iterator

from .config import GGROConfig
from .nudges import propose, propose_many
from .rounds import Active, Result, Segment, accept, split_cancelled, take, tried_entry, withdraw
from .seam import Policy, Prompt, Reward, RewardQuery


def ggro(prompts: Iterable[Prompt], policy: Policy, reward: Reward, cfg: GGROConfig,
         batch_size: int = 8, withdrawn: Callable[[str], bool] | None = None) -> Iterator[Result]:
    """GGRO over `prompts`, yielding each Result as soon as its prompt finishes.

    search_mode `faithful` refines serially (ALGORITHM.md; a nudge that would repeat an earlier refinement ends
    the segment without being decoded); `adaptive` also stops a segment when a nudge fails to raise the reward
    by `adaptive_margin`; `parallel` decodes the S-1 best nudges of the first gradient together in one round
    and scores them in one call. With `max_refined_segments` B, any mode refines the first B segments only and
    decodes the rest greedily. `withdrawn` (optional) drops prompts between rounds, see rounds.withdraw.
    """
    pending = iter(prompts)
    active: list[Active] = []
    waiting: list[Active] = []     # past max_refined_segments: decoded to the end together, a batch at a time
    S = cfg.num_refinements
    while True:
        active, waiting = withdraw(active, policy, withdrawn), withdraw(waiting, policy, withdrawn)
        active += [Active(p, cfg, time.perf_counter()) for p in take(pending, batch_size - len(active))]
        if not active:
            if waiting:
                yield from _finish(waiting, policy, reward, cfg)
            return
        owners = [a for a in active for _ in a.seg.pending]
        reqs = [a.request(cfg, f, insert_at=a.seg.insert_at, entropy_threshold=cfg.entropy_threshold,
                          min_segment_tokens=cfg.min_segment_tokens, top_k=cfg.top_k)
                for a in active for f in a.seg.pending]
        segs = policy.decode(reqs)
        gone, kept = split_cancelled(owners, segs)
        if gone:
            owners, reqs, segs = [owners[i] for i in kept], [reqs[i] for i in kept], [segs[i] for i in kept]
            active = [a for a in active if all(a is not g for g in gone)]
            policy.release([a.p.id for a in gone])
            yield from (a.res for a in gone)
        queries, scored, closing = [], [], []
        for a, req, s in zip(owners, reqs, segs):
            a.res.refinements += 1
            a.res.policy_tokens += s.decoded
            seg = a.seg
            seg.seen.append(tuple(s.tokens))      # never a repeat: _next ends a segment before one is decoded
            seg.i += 1
            q = len(a.prefix) + seg.insert_at
            grads = min(1, S - 1) if cfg.search_mode == "parallel" else S - 1   # refinements that get a gradient
            more = seg.i <= grads and seg.insert_at < len(s.tokens) and s.candidates is not None
            cands = s.candidates + [s.tokens[seg.insert_at]] if more else None
            queries.append(RewardQuery(a.prefix + s.tokens, q if more else None, cands, a.p.id, len(a.prefix)))
            scored.append((a, req.forced, s, seg.i - 1, more))
        going = set()
        for (a, f, s, idx, more), r in zip(scored, reward.score(queries)):
            a.res.reward_calls += 1
            if a.res.trace is not None:
                a.seg.tried.append(tried_entry(f, s, r.reward))
            if _next(a, s, r, idx, more, cfg):
                going.add(id(a))
        for a in active:
            if id(a) not in going and a not in closing:
                closing.append(a)
        done, tails = [], []
        for a in closing:
            tokens, rew, i, stop = a.seg.best
            if a.res.trace is not None:
                a.res.trace.append({"stop": stop, "accepted": i, "tried": a.seg.tried})
            if accept(a, tokens, rew, i, stop, cfg):
                done.append(a)
            elif cfg.budget_spent(a.res.num_segments):
                tails.append(a)
            else:
                a.seg = Segment(insert_at=0)
        if done or tails:
            policy.release([a.p.id for a in done])
            active = [a for a in active if a not in done and a not in tails]
            yield from (a.res for a in done)
            waiting += tails
        if len(waiting) >= batch_size:
            yield from _finish(waiting, policy, reward, cfg)
            waiting = []


def _next(a: Active, s, r, idx: int, more: bool, cfg: GGROConfig) -> bool:
    """After scoring refinement `idx`, segment `s` with reward `r`: set the next round's nudges; False when
    the segment is done."""
    seg, S = a.seg, cfg.num_refinements
    improved = seg.best is None or r.reward > seg.best[1]
    gain = r.reward - seg.best[1] if seg.best is not None else math.inf
    if improved:
        seg.best = (s.tokens, r.reward, idx, s.stop)
    if not more:
        return False
    current = s.tokens[seg.insert_at]
    if cfg.search_mode == "parallel":
        seg.pending = propose_many(r.scores, s.candidates, current, cfg, a.gen, S - 1)
        return bool(seg.pending)
    if cfg.search_mode == "adaptive" and idx > 0 and gain < cfg.adaptive_margin:
        return False      # this nudge did not pay: stop refining the segment
    nudge = propose(r.scores, s.candidates, current, cfg, a.gen)
    if nudge in seg.at_q():
        # forced where an earlier refinement already has it, from the same prefix, the greedy decode repeats that
        # refinement token for token, and the loop stops at a repeat: stop here without decoding it
        return False
    seg.pending = [nudge]
    return True


def _finish(tails: list[Active], policy: Policy, reward: Reward, cfg: GGROConfig) -> Iterator[Result]:
    """Past the refinement budget: decode every waiting response greedily to its end in one call and score it
    (no gradient). Waiting for a full batch keeps these long decodes out of the short refinement rounds."""
    segs = policy.decode([a.request(cfg) for a in tails])
    gone, kept = split_cancelled(tails, segs)
    policy.release([a.p.id for a in gone])
    yield from (a.res for a in gone)
    tails, segs = [tails[i] for i in kept], [segs[i] for i in kept]
    scores = reward.score([RewardQuery(a.prefix + s.tokens, seq_id=a.p.id, prefix_len=len(a.prefix))
                           for a, s in zip(tails, segs)])
    for a, s, r in zip(tails, segs, scores):
        a.res.refinements += 1
        a.res.policy_tokens += s.decoded
        a.res.reward_calls += 1
        if a.res.trace is not None:
            a.res.trace.append({"stop": s.stop, "accepted": 0, "tried": [tried_entry(None, s, r.reward)]})
        accept(a, s.tokens, r.reward, 0, s.stop, cfg)   # decoded to the end: the response ends here
    policy.release([a.p.id for a in tails])
    yield from (a.res for a in tails)
