"""Withdrawn rows leave the decode batch at the next step (SegmentDecoder.cancel), and the search lets them go.

Serve's abandoned streams call `cancel` from another thread while a decode runs; here the cancel is made from
a forward hook on the real model, so the step it lands on is known and the test is deterministic.
"""
from __future__ import annotations

import pytest

from ggro import models
from ggro.config import GGROConfig
from ggro.policy import SegmentDecoder
from ggro.search import run
from ggro.seam import SegmentRequest
from tests.test_engine import PROMPTS, assert_same, engine_results, prompts_of


@pytest.fixture(scope="module")
def setup(tiny_models):
    from ggro.reward import RewardModel
    tok = models.load_tokenizer(tiny_models["policy"])
    policy = models.load_model(tiny_models["policy"], "causal", "float64")
    reward = RewardModel(models.load_model(tiny_models["classifier"], "classifier", "float64"), tok, "classifier")
    return tok, policy, reward


def test_a_cancelled_row_leaves_the_batch_at_the_next_step(setup):
    tok, policy, _ = setup
    xs = [p.ids for p in prompts_of(tok, PROMPTS[:4])]
    reqs = [SegmentRequest(f"s{i}", x, 12) for i, x in enumerate(xs)]   # no entropy stop: up to 12 tokens
    alone = {r.seq_id: SegmentDecoder(policy, [tok.eos_token_id]).decode([r])[0] for r in reqs}
    victim = max(alone, key=lambda s: len(alone[s].tokens))     # the row that decodes longest
    assert len(alone[victim].tokens) > 4
    dec = SegmentDecoder(policy, [tok.eos_token_id])
    dec.decode([SegmentRequest(r.seq_id, r.prefix, 1) for r in reqs])   # prefixes cached: the hook sees steps only
    batches = []

    def step(module, args, kwargs, out):
        batches.append(kwargs["input_ids"].shape[0])
        if len(batches) == 3:           # two tokens fed back: the third step drops the victim
            dec.cancel([victim])
    hook = policy.register_forward_hook(step, with_kwargs=True)
    try:
        got = {r.seq_id: s for r, s in zip(reqs, dec.decode(reqs))}
    finally:
        hook.remove()
    assert got[victim].stop == "cancelled"
    assert got[victim].tokens == alone[victim].tokens[:3]        # the tokens so far, none decoded for it after
    assert all(b < batches[0] for b in batches[3:])              # no forward after the cancel carries its row
    for sid, s in got.items():
        if sid != victim:
            assert (s.tokens, s.stop) == (alone[sid].tokens, alone[sid].stop)
    # a later decode of a cancelled id stops at once, until release forgets the cancel
    again = next(r for r in reqs if r.seq_id == victim)
    assert dec.decode([again])[0].stop == "cancelled"
    dec.release([victim])
    assert dec.decode([again])[0].tokens == alone[victim].tokens


@pytest.mark.parametrize("method,mode", [("ggro", "faithful"), ("ggro", "lookahead"), ("ggro", "parallel"),
                                         ("best-of-n", "faithful"), ("greedy", "faithful")])
def test_the_search_yields_a_cancelled_prompt_and_keeps_the_others(setup, method, mode):
    """A prompt cancelled in the decoder comes back "cancelled" from its next decode: the search scores it no
    more, releases it and yields it (finish_reason "cancelled") so its caller can forget it; the others are
    unchanged."""
    tok, policy, reward = setup
    cfg = GGROConfig(method=method, max_new_tokens=16, num_refinements=4, entropy_threshold=2.0, search_mode=mode,
                     max_refined_segments=3 if mode == "lookahead" else None, n=2)
    prompts = prompts_of(tok, PROMPTS)
    full = engine_results(policy, reward, tok, prompts, cfg, 4)
    victim = prompts[1].id
    dec, released, calls, scored, mark = SegmentDecoder(policy, [tok.eos_token_id], max_cached=4), [], [], [], []

    class Cancelling:    # the real decoder; the victim is withdrawn before the search's second decode call
        def decode(self, reqs):
            calls.append([r.seq_id for r in reqs])
            if len(calls) == (2 if method == "ggro" else 1):
                dec.cancel([victim])
                mark.append(len(scored))       # the reward calls made before the cancel
            return dec.decode(reqs)

        def release(self, ids):
            released.extend(ids)
            dec.release(ids)

    class Recording:
        def score(self, queries):
            scored.append([q.seq_id for q in queries])
            return reward.score(queries)

    got = {r.id: r for r in run(prompts, Cancelling(), Recording(), cfg, 4)}
    assert set(got) == set(full)
    assert got[victim].finish_reason == "cancelled" and victim in released
    assert all(victim not in ids for ids in scored[mark[0]:])     # the baselines' one call too
    assert not dec._cancelled_now()                 # released: nothing cancelled stays behind
    for pid, r in got.items():
        if pid != victim:
            assert r.finish_reason != "cancelled"
            if method == "ggro":
                assert_same(r, full[pid])
            else:
                assert r.tokens == full[pid].tokens
