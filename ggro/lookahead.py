"""The GGRO search with whole-response rollouts (search_mode lookahead)."""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable, Iterator

from .config import GGROConfig
from .nudges import propose_many
from .rounds import Active, Result, accept, split_cancelled, take, tried_entry, withdraw
from .seam import Policy, Prompt, Reward, RewardQuery, SegmentRequest


def lookahead(prompts: Iterable[Prompt], policy: Policy, reward: Reward, cfg: GGROConfig,
              batch_size: int = 8, withdrawn: Callable[[str], bool] | None = None) -> Iterator[Result]:
    """`lookahead` mode: refine at the policy's uncertain points with whole-response rollouts.

    Decode greedily to the next uncertain point u (the entropy rule of a segment); take the guide's gradient at
    u as faithful GGRO does (of the response so far plus u's greedy token), decode the greedy continuation and
    the S - 1 best nudges at u to the end of the response (one batched call, like best-of-n's samples), and keep
    the best-scored complete response. With
    max_refined_segments B > 1 the search moves on to the next uncertain point of the kept rollout (whose greedy
    rollout is the kept one, so the reward never drops); after B points the kept rollout is the response.
    The guide only ever scores complete responses, where it is most accurate.
    With an assistant prefill the first point is right after it (offset 0), where faithful GGRO's first nudge
    goes too: a response forced to start "Sure, I can help with that." can only turn into a refusal there.
    """
    source = iter(prompts)
    while chunk := take(source, batch_size):
        active = [Active(p, cfg, time.perf_counter()) for p in chunk]
        points = 0
        while active := withdraw(active, policy, withdrawn):
            points += 1
            last = cfg.budget_spent(points)
            finished = _lookahead_point(active, policy, reward, cfg, last, first=points == 1)
            active = [a for a in active if a not in finished]
            policy.release([a.p.id for a in finished])
            yield from (a.res for a in finished)


def _lookahead_point(active: list[Active], policy: Policy, reward: Reward, cfg: GGROConfig, last: bool,
                     first: bool) -> list:
    """One uncertain point for every active prompt (at the first, a prefilled prompt's is right after its
    prefill); returns those whose response is complete and those cancelled on the way (the caller releases and
    yields both)."""
    now = [a for a in active if first and a.p.has_prefill]
    done, at_u = _to_uncertain_point([a for a in active if a not in now], policy, reward, cfg)
    at_u = now + at_u
    if not at_u:
        return done
    gone, at_u, forced = _nudges_at(at_u, policy, reward, cfg)
    return done + gone + _best_rollout(at_u, forced, policy, reward, cfg, last)


def _to_uncertain_point(active: list[Active], policy: Policy, reward: Reward, cfg: GGROConfig) -> tuple[list, list]:
    """Decode every prompt greedily to its next uncertain point u: (those done: cancelled, or ended before any
    uncertain point and scored as they stand; those at u)."""
    if not active:
        return [], []
    segs = policy.decode([a.request(cfg, entropy_threshold=cfg.entropy_threshold,
                                    min_segment_tokens=cfg.min_segment_tokens) for a in active])
    cancelled, kept = split_cancelled(active, segs)   # returned with the finished ones: released, yielded
    active, segs = [active[i] for i in kept], [segs[i] for i in kept]
    ended, unsure = [], []
    for a, s in zip(active, segs):
        a.res.policy_tokens += s.decoded
        (unsure if s.stop == "entropy" else ended).append((a, s))
    if ended:     # the response ended before any uncertain point: score it as it stands
        scores = reward.score([RewardQuery(a.prefix + s.tokens, seq_id=a.p.id, prefix_len=len(a.prefix))
                               for a, s in ended])
        for (a, s), r in zip(ended, scores):
            a.res.reward_calls += 1
            accept(a, s.tokens, r.reward, 0, s.stop, cfg)
    for a, s in unsure:   # the greedy run up to u is kept as it is (it is the greedy rollout's start)
        accept(a, s.tokens, math.nan, 0, s.stop, cfg)
    return cancelled + [a for a, _ in ended], [a for a, _ in unsure]


def _nudges_at(at_u: list[Active], policy: Policy, reward: Reward, cfg: GGROConfig) -> tuple[list, list, list]:
    """The nudges at u: the guide's gradient of the response so far plus u's greedy token (a one-token decode
    that also caches x + y for the rollouts), as faithful GGRO proposes them. Returns (the prompts cancelled,
    the others, their rollouts as (prompt, forced token), the greedy one (None) first)."""
    probes = policy.decode([SegmentRequest(a.p.id, a.prefix, 1, top_k=cfg.top_k) for a in at_u])
    gone, kept = split_cancelled(at_u, probes)
    at_u, probes = [at_u[i] for i in kept], [probes[i] for i in kept]
    grads = reward.score([RewardQuery(a.prefix + s.tokens, len(a.prefix), s.candidates + s.tokens, a.p.id,
                                      len(a.prefix)) for a, s in zip(at_u, probes)])
    forced = []
    for a, s, r in zip(at_u, probes, grads):
        a.res.policy_tokens += s.decoded
        a.res.reward_calls += 1
        forced += [(a, None)] + [(a, c) for c in propose_many(r.scores, s.candidates, s.tokens[0], cfg, a.gen,
                                                                  cfg.num_refinements - 1)]
    return gone, at_u, forced


def _best_rollout(at_u: list[Active], forced: list, policy: Policy, reward: Reward, cfg: GGROConfig,
                  last: bool) -> list:
    """Every candidate, the greedy one first, decoded to the end in one call and scored whole in one call;
    each prompt keeps its best. Returns those cancelled and those whose response is complete."""
    segs = policy.decode([a.request(cfg, c) for a, c in forced])
    gone, kept = split_cancelled([a for a, _ in forced], segs)
    done = list(gone)
    at_u, forced, segs = [a for a in at_u if a not in gone], [forced[i] for i in kept], [segs[i] for i in kept]
    scores = reward.score([RewardQuery(a.prefix + s.tokens, seq_id=a.p.id, prefix_len=len(a.prefix))
                           for (a, _), s in zip(forced, segs)])
    tried = {id(a): [] for a in at_u}
    for (a, c), s, r in zip(forced, segs, scores):
        a.res.refinements += 1
        a.res.policy_tokens += s.decoded
        a.res.reward_calls += 1
        tried[id(a)].append((c, s, r.reward))
    for a in at_u:
        options = tried[id(a)]
        k = max(range(len(options)), key=lambda i: (options[i][2], -i))   # first wins ties: greedy first
        nudge, s, rew = options[k]
        if a.res.trace is not None:
            a.res.trace.append({"stop": s.stop, "accepted": k,
                                "tried": [tried_entry(c, t, r) for c, t, r in options]})
        a.res.num_nudges += k > 0
        if last or len(s.tokens) == 1:    # the kept rollout ends the response (eos, a stop string or length)
            accept(a, s.tokens, rew, 0, s.stop, cfg)
            done.append(a)
        else:    # keep u's chosen token; the next point's greedy rollout is this rollout's remainder
            a.res.tokens = a.res.tokens + [s.tokens[0]]
    return done
