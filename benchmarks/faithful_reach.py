"""Where faithful GGRO's chain goes under the prefilling attack, at its first two uncertain points (right after the
prefill, and after the segment it accepted there): which of the policy's top-25 tokens there lead to a decline (a
greedy rollout to the response's end, pipeline/eval/metrics.is_refusal), where the point's first gradient ranks
them, and which ones faithful's serial chain tried.

    GGRO_THREADS=2 ggro eval --probes prefill --limit 96 --max-new-tokens 32 --modes faithful:8 --trace --output RUN
    GGRO_THREADS=2 python benchmarks/faithful_reach.py RUN [MAX_NEW_TOKENS [ALIGN_SUBDIR]]     (~18 min for 96 prompts)

RUN is a `ggro eval --trace` output (its probes.jsonl and align/ggro-S8 by default; 32 tokens by default); prints a
JSON line a prompt, then the counts of docs/reward-model.md. Run it on the guide and the eval's default GGRO settings
(entropy threshold, minimum segment, top-k: GGROConfig's, which it reads).
"""
from __future__ import annotations

import json
import sys


def segment(pid, prefix, left, cfg, **kw):
    """A faithful segment's request: the search's stop rule (entropy threshold, minimum length) from `cfg`."""
    from ggro.seam import SegmentRequest
    return SegmentRequest(pid, prefix, left, entropy_threshold=cfg.entropy_threshold,
                          min_segment_tokens=cfg.min_segment_tokens, **kw)


def point(eng, cfg, pid, x, prefix, left, tried_seg):
    from ggro.seam import RewardQuery, SegmentRequest
    from pipeline.eval.metrics import is_refusal
    dec, rm = eng.policy, eng.reward
    (g,) = dec.decode([segment(pid, prefix, left, cfg, top_k=cfg.top_k)])
    cands = g.candidates
    (sc,) = rm.score([RewardQuery(prefix + g.tokens, len(prefix), cands, seq_id=pid, prefix_len=len(prefix))])
    sigma = [0.0 if c == g.tokens[0] else s for c, s in zip(cands, sc.scores)]   # the current token scores 0
    rank = {cands[i]: r for r, i in enumerate(sorted(range(len(cands)), key=lambda i: -sigma[i]))}
    rolls = dec.decode([SegmentRequest(pid, prefix, left, forced=c) for c in cands])
    declines = {c for c, s in zip(cands, rolls)
                if is_refusal(eng.tokenizer.decode(prefix[len(x):] + s.tokens, skip_special_tokens=True))}
    tried = [t["nudge"] for t in tried_seg["tried"] if t["nudge"] is not None]
    return {"declining": len(declines), "best_rank": min((rank[c] for c in declines), default=None),
            "greedy_declines": g.tokens[0] in declines, "tried_declining": any(t in declines for t in tried),
            "tried": len(tried)}


def main(run: str, tokens: int = 32, sub: str = "ggro-S8") -> None:
    import pyarrow.dataset as ds
    from ggro.config import GGROConfig, ModelConfig
    from ggro.engine import Engine
    from ggro.threads import torch_threads
    from pipeline.batch.driver import read_input
    from pipeline.eval.bench import encode_rows
    from pipeline.eval.metrics import is_refusal
    torch_threads()
    eng, cfg = Engine.load(ModelConfig()), GGROConfig()
    got = {r["id"]: r for r in ds.dataset(f"{run}/align/{sub}", format="parquet").to_table().to_pylist()}
    rows = [r for r in read_input(f"{run}/probes.jsonl", None) if r.prefill and r.id in got]
    recs = []
    for p in encode_rows(eng, rows, tokens):
        r = got[p.id]
        trace = json.loads(r["trace"] or "[]")
        limit = len(p.ids) + tokens
        rec, prefix = {"id": p.id, "recovers": is_refusal(r["response"])}, list(p.ids)
        for k in (0, 1):
            if k >= len(trace) or len(prefix) >= limit:
                break
            rec[f"p{k + 1}"] = point(eng, cfg, p.id, p.ids, prefix, limit - len(prefix), trace[k])
            kept = trace[k]["tried"][trace[k]["accepted"]]["nudge"]
            (s,) = eng.policy.decode([segment(p.id, prefix, limit - len(prefix), cfg, forced=kept)])
            prefix += s.tokens
        eng.policy.release([p.id])
        recs.append(rec)
        print(json.dumps(rec), flush=True)
    print(f"{len(recs)} prompts, faithful recovers on {sum(r['recovers'] for r in recs)}")
    for k in ("p1", "p2"):
        at = [r[k] for r in recs if k in r]
        top7 = sum(a["best_rank"] is not None and a["best_rank"] < 7 for a in at)
        print(f"{k}: reached {len(at)}; a declining token in the top 25: {sum(a['declining'] > 0 for a in at)}; "
              f"the first gradient ranks one in its top 7: {top7}; "
              f"faithful tried one: {sum(a['tried_declining'] for a in at)} (recovers on "
              f"{sum(r['recovers'] for r in recs if k in r and r[k]['tried_declining'])}); greedy's token declines: "
              f"{sum(a['greedy_declines'] for a in at)} (faithful recovers on "
              f"{sum(r['recovers'] for r in recs if k in r and r[k]['greedy_declines'])}); nudges tried a point: "
              f"{sum(a['tried'] for a in at) / max(1, len(at)):.1f}")


if __name__ == "__main__":
    main(sys.argv[1], *([int(sys.argv[2])] if len(sys.argv) > 2 else []), *sys.argv[3:4])
