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
from typing import Callable, Iterable, Iterator

import torch

from .cohorts import overlapped
from .config import GGROConfig
from .seam import ENDED, Policy, Prompt, Reward, RewardQuery, Sampling, SegmentRequest


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


def _sigma(scores: list[float], candidates: list[int], current: int, cfg: GGROConfig) -> torch.Tensor:
    """sigma_c from raw candidate scores g_q . E[c] (the last score is the current token's)."""
    dots = torch.tensor(scores, dtype=torch.float64)
    cur = dots[-1]
    sigma = dots[:-1] - cur if cfg.scoring == "taylor" else dots[:-1].clone()
    sigma[torch.tensor(candidates) == current] = 0.0
    return sigma / cfg.nudge_temperature


def propose(scores: list[float], candidates: list[int], current: int, cfg: GGROConfig,
            gen: torch.Generator | None) -> int:
    """Pick the nudge from raw candidate scores g_q . E[c] (the last score is the current token's)."""
    sigma = _sigma(scores, candidates, current, cfg)
    if cfg.selection == "sample":
        return candidates[int(torch.multinomial(torch.softmax(sigma, dim=0), 1, generator=gen))]
    return candidates[int(torch.argmax(sigma))]


def propose_many(scores: list[float], candidates: list[int], current: int, cfg: GGROConfig,
                 gen: torch.Generator | None, n: int) -> list[int]:
    """`parallel` mode: the n best (or n sampled, without replacement) candidates other than the current token."""
    sigma = _sigma(scores, candidates, current, cfg)
    others = [i for i, c in enumerate(candidates) if c != current]
    n = min(n, len(others))
    if not n:
        return []
    sub = sigma[others]
    if cfg.selection == "sample":
        picks = torch.multinomial(torch.softmax(sub, dim=0), n, replacement=False, generator=gen).tolist()
    else:
        picks = sorted(range(len(others)), key=lambda i: (-float(sub[i]), i))[:n]   # stable: first wins ties
    return [candidates[others[i]] for i in picks]


@dataclass
class _Segment:
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

    def request(self, cfg: GGROConfig, forced: int | None = None, **kw) -> SegmentRequest:
        """The next segment of this response: up to its token budget, ending at its prompt's stop strings."""
        return SegmentRequest(self.p.id, self.prefix, cfg.max_new_tokens - len(self.res.tokens), forced,
                              stop=self.p.stop, **kw)


def _take(source: Iterator[Prompt], n: int) -> list[Prompt]:
    """Up to n prompts from `source`; a None from it means "none waiting now" (Serve's feed), like its end."""
    out = []
    while len(out) < n and (p := next(source, None)) is not None:
        out.append(p)
    return out


def _tried(nudge: int | None, s, reward: float) -> dict:
    """One refinement in a segment's trace."""
    return {"nudge": nudge, "reward": reward, "stop": s.stop, "stop_entropy": s.stop_entropy, "tokens": len(s.tokens)}


def _next(a: _Active, s, r, idx: int, more: bool, cfg: GGROConfig) -> bool:
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
    if cfg.search_mode == "adaptive" and nudge in seg.at_q():
        return False      # it would decode an earlier refinement again (a sure repeat): skip it
    seg.pending = [nudge]
    return True


def _cancelled(owners: list, segs: list) -> tuple[list, list[int]]:
    """The owners whose decode came back "cancelled" (their caller withdrew them mid-segment: Serve's client
    left), each marked finish_reason "cancelled", and the indexes of the other rows. A cancelled prompt is
    never scored: the search releases it and yields its Result at once, so its caller can forget it."""
    gone = list({id(a): a for a, s in zip(owners, segs) if s.stop == "cancelled"}.values())
    for a in gone:
        a.res.finish_reason = "cancelled"
    return gone, [i for i, a in enumerate(owners) if all(a is not g for g in gone)]


def _withdraw(group: list[_Active], policy: Policy, withdrawn: Callable[[str], bool] | None) -> list[_Active]:
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


def ggro(prompts: Iterable[Prompt], policy: Policy, reward: Reward, cfg: GGROConfig,
         batch_size: int = 8, withdrawn: Callable[[str], bool] | None = None) -> Iterator[Result]:
    """GGRO over `prompts`, yielding each Result as soon as its prompt finishes.

    search_mode `faithful` refines serially (ALGORITHM.md); `adaptive` also stops a segment when a nudge
    fails to raise the reward by `adaptive_margin` or would repeat an earlier refinement; `parallel` decodes
    the S-1 best nudges of the first gradient together in one round and scores them in one call. With
    `max_refined_segments` B, any mode refines the first B segments only and decodes the rest greedily.
    `withdrawn` (optional) drops prompts between rounds, see _withdraw.
    """
    pending = iter(prompts)
    active: list[_Active] = []
    waiting: list[_Active] = []     # past max_refined_segments: decoded to the end together, a batch at a time
    S = cfg.num_refinements
    while True:
        active, waiting = _withdraw(active, policy, withdrawn), _withdraw(waiting, policy, withdrawn)
        active += [_Active(p, cfg, time.perf_counter()) for p in _take(pending, batch_size - len(active))]
        if not active:
            if waiting:
                yield from _finish(waiting, policy, reward, cfg)
            return
        owners = [a for a in active for _ in a.seg.pending]
        reqs = [a.request(cfg, f, insert_at=a.seg.insert_at, entropy_threshold=cfg.entropy_threshold,
                          min_segment_tokens=cfg.min_segment_tokens, top_k=cfg.top_k)
                for a in active for f in a.seg.pending]
        segs = policy.decode(reqs)
        gone, kept = _cancelled(owners, segs)
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
            if tuple(s.tokens) in seg.seen:       # a repeat: the search has converged
                if a not in closing:
                    closing.append(a)
                continue
            seg.seen.append(tuple(s.tokens))
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
                a.seg.tried.append(_tried(f, s, r.reward))
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
            if _accept(a, tokens, rew, i, stop, cfg):
                done.append(a)
            elif cfg.budget_spent(a.res.num_segments):
                tails.append(a)
            else:
                a.seg = _Segment(insert_at=0)
        if done or tails:
            policy.release([a.p.id for a in done])
            active = [a for a in active if a not in done and a not in tails]
            yield from (a.res for a in done)
            waiting += tails
        if len(waiting) >= batch_size:
            yield from _finish(waiting, policy, reward, cfg)
            waiting = []


def _accept(a: _Active, tokens, rew: float, i: int, stop: str, cfg: GGROConfig) -> bool:
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


def _close(a: _Active, rew: float, stop: str) -> None:
    a.res.reward = rew
    a.res.finish_reason = "stop" if stop in ENDED else "length"
    a.res.elapsed_s = time.perf_counter() - a.t0


def _finish(tails: list[_Active], policy: Policy, reward: Reward, cfg: GGROConfig) -> Iterator[Result]:
    """Past the refinement budget: decode every waiting response greedily to its end in one call and score it
    (no gradient). Waiting for a full batch keeps these long decodes out of the short refinement rounds."""
    segs = policy.decode([a.request(cfg) for a in tails])
    gone, kept = _cancelled(tails, segs)
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
            a.res.trace.append({"stop": s.stop, "accepted": 0, "tried": [_tried(None, s, r.reward)]})
        _accept(a, s.tokens, r.reward, 0, s.stop, cfg)   # decoded to the end: the response ends here
    policy.release([a.p.id for a in tails])
    yield from (a.res for a in tails)


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
    """
    source = iter(prompts)
    while chunk := _take(source, batch_size):
        active = [_Active(p, cfg, time.perf_counter()) for p in chunk]
        points = 0
        while active := _withdraw(active, policy, withdrawn):
            points += 1
            last = cfg.budget_spent(points)
            finished = _lookahead_point(active, policy, reward, cfg, last)
            active = [a for a in active if a not in finished]
            policy.release([a.p.id for a in finished])
            yield from (a.res for a in finished)


def _lookahead_point(active: list[_Active], policy: Policy, reward: Reward, cfg: GGROConfig, last: bool) -> list:
    """One uncertain point for every active prompt; returns those whose response is complete."""
    segs = policy.decode([a.request(cfg, entropy_threshold=cfg.entropy_threshold,
                                    min_segment_tokens=cfg.min_segment_tokens) for a in active])
    cancelled, kept = _cancelled(active, segs)   # returned with the finished ones: released, yielded
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
            _accept(a, s.tokens, r.reward, 0, s.stop, cfg)
    for a, s in unsure:   # the greedy run up to u is kept as it is (it is the greedy rollout's start)
        _accept(a, s.tokens, math.nan, 0, s.stop, cfg)
    done, at_u = cancelled + [a for a, _ in ended], [a for a, _ in unsure]
    if not at_u:
        return done
    # The nudges at u: the guide's gradient of the response so far plus u's greedy token (a one-token decode
    # that also caches x + y for the rollouts), as faithful GGRO proposes them.
    probes = policy.decode([SegmentRequest(a.p.id, a.prefix, 1, top_k=cfg.top_k) for a in at_u])
    gone, kept = _cancelled(at_u, probes)
    done += gone
    at_u, probes = [at_u[i] for i in kept], [probes[i] for i in kept]
    grads = reward.score([RewardQuery(a.prefix + s.tokens, len(a.prefix), s.candidates + s.tokens, a.p.id,
                                      len(a.prefix)) for a, s in zip(at_u, probes)])
    forced = []
    for a, s, r in zip(at_u, probes, grads):
        a.res.policy_tokens += s.decoded
        a.res.reward_calls += 1
        forced += [(a, None)] + [(a, c) for c in propose_many(r.scores, s.candidates, s.tokens[0], cfg, a.gen,
                                                                  cfg.num_refinements - 1)]
    # Every candidate, the greedy one first, decoded to the end in one call and scored whole in one call.
    segs = policy.decode([a.request(cfg, c) for a, c in forced])
    gone, kept = _cancelled([a for a, _ in forced], segs)
    done += gone
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
            a.res.trace.append({"stop": s.stop, "accepted": k, "tried": [_tried(c, t, r) for c, t, r in options]})
        a.res.num_nudges += k > 0
        if last or len(s.tokens) == 1:    # the kept rollout ends the response (eos, a stop string or length)
            _accept(a, s.tokens, rew, 0, s.stop, cfg)
            done.append(a)
        else:    # keep u's chosen token; the next point's greedy rollout is this rollout's remainder
            a.res.tokens = a.res.tokens + [s.tokens[0]]
    return done


def baseline(prompts: Iterable[Prompt], policy: Policy, reward: Reward, cfg: GGROConfig,
             batch_size: int = 8) -> Iterator[Result]:
    """`greedy` (one greedy decode) or `best-of-n` (n seeded samples, best RM score kept).

    Like GGRO, a call advances `batch_size` prompts: best-of-n decodes their n samples together (n * batch_size
    rows, as parallel GGRO decodes S - 1 nudges per prompt), so the two compare at the same batch size."""
    source = iter(prompts)
    n = cfg.n if cfg.method == "best-of-n" else 1
    while chunk := _take(source, batch_size):
        t0 = time.perf_counter()
        reqs = [SegmentRequest(p.id, p.ids, cfg.max_new_tokens,
                               sampling=Sampling(cfg.temperature, cfg.top_p, row_seed(cfg.seed, p.id, k))
                               if cfg.method == "best-of-n" else None, stop=p.stop)
                for p in chunk for k in range(n)]
        segs = policy.decode(reqs)
        # a prompt withdrawn mid-decode (a sample came back "cancelled") is not scored: its caller has gone
        gone = {p.id for i, p in enumerate(chunk) if any(s.stop == "cancelled" for s in segs[i * n:(i + 1) * n])}
        kept = [(p, s) for p, s in zip([p for p in chunk for _ in range(n)], segs) if p.id not in gone]
        scores = iter(reward.score([RewardQuery(p.ids + s.tokens, seq_id=p.id, prefix_len=len(p.ids))  # x cached once
                                    for p, s in kept]) if kept else [])
        policy.release([p.id for p in chunk])
        elapsed = time.perf_counter() - t0
        for i, p in enumerate(chunk):
            group = segs[i * n:(i + 1) * n]
            rewards = [math.nan] * n if p.id in gone else [next(scores).reward for _ in group]
            best_k = max(range(n), key=lambda k: (rewards[k], -k))   # first wins ties
            s = group[best_k]
            yield Result(p.id, s.tokens, rewards[best_k], cfg.method, 0, 1, [len(s.tokens)], n,
                         sum(g.decoded for g in group), n, elapsed,
                         finish_reason="cancelled" if p.id in gone else "stop" if s.stop in ENDED else "length")


def search(prompts: Iterable[Prompt], policy: Policy, reward: Reward, cfg: GGROConfig,
           batch_size: int = 8, withdrawn: Callable[[str], bool] | None = None) -> Iterator[Result]:
    """The search of `cfg` in this thread. `withdrawn`: see _withdraw (the baselines' one-call batches
    ignore it: a prompt withdrawn during their decode comes back "cancelled" and is not scored)."""
    if cfg.method != "ggro":
        return baseline(prompts, policy, reward, cfg, batch_size)
    return (lookahead if cfg.search_mode == "lookahead" else ggro)(prompts, policy, reward, cfg, batch_size,
                                                                    withdrawn)


def run(prompts: Iterable[Prompt], policy: Policy, reward: Reward, cfg: GGROConfig,
        batch_size: int = 8, cohorts: int = 1, withdrawn: Callable[[str], bool] | None = None) -> Iterator[Result]:
    if cfg.method == "ggro" and cohorts > 1:
        return overlapped(search, prompts, policy, reward, cfg, batch_size, cohorts, withdrawn)
    return search(prompts, policy, reward, cfg, batch_size, withdrawn)
