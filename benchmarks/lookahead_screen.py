"""Would lookahead GGRO save decoding by screening its rollouts early? At each prompt's first uncertain point, decode
the greedy rollout and the S - 1 best nudges to the end (lookahead's own functions), score every rollout whole and cut
at k tokens, and print what keeping only the m best-scored at k would have kept: mean reward and rollout tokens
against lookahead's (which scores whole rollouts only) at S = 4, 6, 8 and S.

    GGRO_THREADS=2 python benchmarks/lookahead_screen.py PROMPTS [S [MAX_NEW_TOKENS]]     (S 16, 64 tokens: ~4 min
                                                                                      for 24 prompts on 2 cores)
"""
from __future__ import annotations

import sys

CUTS = (2, 4, 8, 16)


def rollouts(prompts, S: int, tokens: int) -> list[dict]:
    """Each prompt's candidates at its first uncertain point: tokens, whole reward and reward cut at each of CUTS
    (a prompt that ended before any uncertain point: its reward alone)."""
    from dataclasses import replace

    from ggro.config import GGROConfig, ModelConfig
    from ggro.engine import Engine
    from ggro.lookahead import _nudges_at, _to_uncertain_point
    from ggro.rounds import Active
    from pipeline.eval.bench import encode_rows
    eng = Engine.load(ModelConfig())
    cfg = replace(GGROConfig(), search_mode="lookahead", num_refinements=S, max_new_tokens=tokens)
    out = []
    encoded = encode_rows(eng, prompts, tokens)
    for i in range(0, len(encoded), 8):
        active = [Active(p, cfg, 0.0) for p in encoded[i:i + 8]]
        done, at_u = _to_uncertain_point(active, eng.policy, eng.reward, cfg)
        out += [{"reward": a.res.reward} for a in done]
        if at_u:
            _, at_u, forced = _nudges_at(at_u, eng.policy, eng.reward, cfg)
            segs = eng.policy.decode([a.request(cfg, c) for a, c in forced])
            whole = scores(eng, forced, segs, None)
            cut = {k: scores(eng, forced, segs, k) for k in CUTS}
            cands = {id(a): [] for a in at_u}
            for j, ((a, _), s) in enumerate(zip(forced, segs)):
                cands[id(a)].append({"len": len(s.tokens), "whole": whole[j], **{k: cut[k][j] for k in CUTS}})
            out += [{"cands": c} for c in cands.values()]
        eng.policy.release([a.p.id for a in active])
    return out


def scores(eng, forced, segs, k):
    from ggro.seam import RewardQuery
    return [r.reward for r in eng.reward.score([RewardQuery(a.prefix + s.tokens[:k], seq_id=a.p.id,
                                                            prefix_len=len(a.prefix)) for (a, _), s in zip(forced, segs)])]


def kept(c: list[dict], S: int, k: int | None = None, m: int | None = None) -> tuple[float, int]:
    """(reward of the rollout kept, rollout tokens decoded) among the first S candidates, screened at k to the m best
    (k None: no screening). Ties go to the earlier candidate, greedy's first, as lookahead breaks them."""
    c = c[:S]
    left = range(len(c)) if k is None else sorted(range(len(c)), key=lambda i: (-c[i][k], i))[:m]
    decoded = sum(x["len"] for x in c) if k is None else \
        sum(min(x["len"], k) for x in c) + sum(c[i]["len"] - min(c[i]["len"], k) for i in left)
    return c[max(left, key=lambda i: (c[i]["whole"], -i))]["whole"], decoded


def main(path: str, S: int = 16, tokens: int = 64) -> None:
    from ggro.threads import torch_threads
    from pipeline.batch.driver import read_input
    torch_threads()
    recs = rollouts(list(read_input(path, None)), S, tokens)
    print("| rollouts kept | mean reward | rollout tokens | same pick as S=8 |\n|---|---:|---:|---:|")
    settings = [(s, None, None) for s in sorted({4, 6, 8, S})]
    settings += [(s, k, m) for s in sorted({8, S}) for k in CUTS for m in (2, 4)]
    base = [kept(r["cands"], 8) for r in recs if "cands" in r]
    for s, k, m in settings:
        got = [kept(r["cands"], s, k, m) if "cands" in r else (r["reward"], 0) for r in recs]
        same = sum(g[0] == b[0] for g, b in zip([g for g, r in zip(got, recs) if "cands" in r], base))
        name = f"all {s}" if k is None else f"the {m} best of {s} at {k} tokens"
        print(f"| {name} | {sum(g[0] for g in got) / len(got):.3f} | {sum(g[1] for g in got)} | {same} / {len(base)} |")


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:]))
