"""Policy replicas on Ray: tp=2 (DeepSpeed-inference over gloo) decodes the same tokens as tp=1 and
as the in-process SegmentDecoder."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from ggro.config import ModelConfig
from ggro.seam import SegmentRequest

pytestmark = pytest.mark.slow


def _requests(tok):
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    prompts = ["how do you make water hot ?", "what is the number of people ?", "can you write a word"]
    reqs = [SegmentRequest(f"s{i}", enc(p), max_tokens=10, top_k=5) for i, p in enumerate(prompts)]
    # a nudged refinement and an entropy-stopped one reuse the cached prefixes
    reqs += [SegmentRequest("s0", enc(prompts[0]), max_tokens=10, forced=enc("water")[0], insert_at=1, top_k=5),
             SegmentRequest("s1", enc(prompts[1]), max_tokens=10, entropy_threshold=2.0, min_segment_tokens=2)]
    return reqs


def test_tp2_equals_tp1(ray_cluster, tiny_models):
    from actors.policy import start_policy_replica
    from ggro import models
    from ggro.policy import SegmentDecoder

    mcfg = ModelConfig(policy=tiny_models["policy"], dtype="float32", batch_size=4)
    tok = models.load_tokenizer(mcfg.policy)
    reqs = _requests(tok)
    model = models.load_model(mcfg.policy, "causal", "float32")
    want = SegmentDecoder(model, models.eos_ids(tok, model)).decode(reqs)

    t0 = time.time()
    r1 = start_policy_replica(mcfg, tp=1, cpus_per_rank=0.5, name="t-tp1")
    r2 = start_policy_replica(mcfg, tp=2, cpus_per_rank=0.5, timeout_s=60, name="t-tp2")
    try:
        got1, got2 = r1.decode(reqs), r2.decode(reqs)
        r2.release(["s0"])
        again2 = r2.decode(reqs[:1])   # cache rebuilt after release: same tokens
        # DeepSpeed's CPU all-reduce buffers (66 MB a rank, in RAM) are mapped but no longer named: a killed
        # rank cannot leave them behind in /dev/shm
        leftover = [p for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*") if p.stat().st_mtime >= t0 - 1]
    finally:
        r1.shutdown()
        r2.shutdown()
    assert leftover == []
    assert [g.tokens for g in got1] == [w.tokens for w in want]
    assert [g.candidates for g in got1] == [w.candidates for w in want]
    assert [(g.tokens, g.stop) for g in got2] == [(w.tokens, w.stop) for w in want]
    assert [set(g.candidates or []) for g in got2] == [set(w.candidates or []) for w in want]
    assert again2[0].tokens == want[0].tokens


def test_self_judge_runs_on_the_policy_workers(ray_cluster, tiny_models):
    """A policy that is its own judge (tp 1): batch's reward pool is the policy replicas' workers, each with one
    copy of the weights for both roles, and it decodes and scores like the in-process models."""
    import ray
    from actors.cluster import Resources, start_workers
    from actors.worker import class_path
    from ggro import models
    from ggro.engine import load_reward
    from ggro.policy import SegmentDecoder
    from ggro.seam import RewardQuery

    mcfg = ModelConfig(policy=tiny_models["policy"], reward_kind="judge", dtype="float64", batch_size=4,
                       rubric="is it good ? Yes or No")
    tok = models.load_tokenizer(mcfg.policy)
    reqs = _requests(tok)
    model = models.load_model(mcfg.policy, "causal", "float64")
    want_seg = SegmentDecoder(model, models.eos_ids(tok, model)).decode(reqs)
    queries = [RewardQuery(r.prefix + w.tokens, seq_id=r.seq_id) for r, w in zip(reqs, want_seg)]
    want = load_reward(mcfg, tok).score(queries)

    workers = start_workers(mcfg, Resources(policy_replicas=2, policy_cpus=0.25, reward_cpus=0.25))
    try:
        ranks = [p.ranks[0] for p in workers.policies]
        pids = ray.get([r.pid.remote() for r in ranks])
        pool_pids = ray.get([w.pid.remote() for w in workers.reward.workers])
        classes = ray.get([r.__ray_call__.remote(class_path) for r in ranks])
        # asked inside each actor (a local function: pickled by value): does its reward read the very
        # embedding tensor its decoder does?
        shared = ray.get([r.__ray_call__.remote(
            lambda w: w.reward.embed.weight is w.decoder.model.get_input_embeddings().weight) for r in ranks])
        got_seg = workers.policies[1].decode(reqs)
        got = workers.reward.score(queries)
    finally:
        workers.shutdown()
    assert pool_pids == pids and len(set(pids)) == 2        # no reward actors of their own
    assert classes == ["actors.worker.ModelWorker"] * 2 and shared == [True, True]
    assert [g.tokens for g in got_seg] == [w.tokens for w in want_seg]
    assert [g.reward for g in got] == pytest.approx([w.reward for w in want], rel=1e-9, abs=1e-9)
