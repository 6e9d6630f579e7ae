"""The baselines GGRO is measured against: greedy decoding and best-of-n."""
from __future__ import annotations

import math
import time
from typing import Iterable, Iterator

from .config import GGROConfig
from .rounds import Result, row_seed, take
from .seam import ENDED, Policy, Prompt, Reward, RewardQuery, Sampling, SegmentRequest


def baseline(prompts: Iterable[Prompt], policy: Policy, reward: Reward, cfg: GGROConfig,
             batch_size: int = 8) -> Iterator[Result]:
    """`greedy` (one greedy decode) or `best-of-n` (n seeded samples, best RM score kept).

    Like GGRO, a call advances `batch_size` prompts: best-of-n decodes their n samples together (n * batch_size
    rows, as parallel GGRO decodes S - 1 nudges per prompt), so the two compare at the same batch size."""
    source = iter(prompts)
    n = cfg.n if cfg.method == "best-of-n" else 1
    while chunk := take(source, batch_size):
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
