"""The batched, cached engine against the plain oracle (ggro/reference.py), on tiny float64 models."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from ggro import models
from ggro.config import GRAD_TOKENS, ConfigError, GGROConfig
from ggro.kvcache import call_groups
from ggro.policy import SegmentDecoder
from ggro.reference import ReferenceReward, reference_baseline, reference_ggro, reference_lookahead
from ggro.reward import RewardModel, grad_chunks
from ggro.search import Prompt, run
from ggro.seam import RewardQuery, SegmentRequest

PROMPTS = ["how do you make water ?", "what is the time", "write a long word", "I like people",
           "tell me about the first day", "a", "why is the sound so long ?"]


@pytest.fixture(scope="module")
def setup(tiny_models):
    tok = models.load_tokenizer(tiny_models["policy"])
    policy = models.load_model(tiny_models["policy"], "causal", "float64")
    rewards = {
        "classifier": RewardModel(models.load_model(tiny_models["classifier"], "classifier", "float64"), tok, "classifier"),
        "judge": RewardModel(models.load_model(tiny_models["judge"], "causal", "float64"), tok, "judge",
                             rubric="is it good ? Yes or No", eos_ids=[tok.eos_token_id]),
    }
    return tok, policy, rewards


def prompts_of(tok, texts, prefill=""):
    out = []
    for i, t in enumerate(texts):
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                 add_generation_prompt=True), add_special_tokens=False)
        if prefill:
            ids += tok.encode(prefill, add_special_tokens=False)
        out.append(Prompt(f"p{i}", ids, has_prefill=bool(prefill)))
    return out


def engine_results(policy_model, reward, tok, prompts, cfg, batch_size):
    dec = SegmentDecoder(policy_model, [tok.eos_token_id], max_cached=batch_size)
    return {r.id: r for r in run(prompts, dec, reward, cfg, batch_size)}


def assert_same(got, want):
    assert got.tokens == want.tokens
    assert got.segment_boundaries == want.segment_boundaries
    assert got.num_nudges == want.num_nudges and got.num_segments == want.num_segments
    assert got.refinements == want.refinements and got.policy_tokens == want.policy_tokens
    assert got.reward_calls == want.reward_calls
    assert got.reward == pytest.approx(want.reward, rel=1e-9, abs=1e-9)


CASES = [
    # (reward kind, cfg overrides, batch size)
    ("classifier", dict(), 4),
    ("classifier", dict(num_refinements=1), 3),
    ("classifier", dict(num_refinements=6, entropy_threshold=2.0, top_k=5), 7),
    ("judge", dict(num_refinements=3, entropy_threshold=2.5), 2),
    ("judge", dict(initial_insertion_offset=4, entropy_threshold=2.2), 5),
    ("classifier", dict(scoring="taylor", entropy_threshold=2.3, max_new_tokens=20), 4),
    ("classifier", dict(selection="sample", nudge_temperature=1.0, seed=7, entropy_threshold=2.3), 3),
    ("judge", dict(min_segment_tokens=2, entropy_threshold=1.8, max_new_tokens=9), 1),
    ("classifier", dict(num_refinements=8, top_k=2, entropy_threshold=2.0), 6),
]
# The cheaper search modes against the same plain oracle: parallel tries exactly the S-1 best (or sampled)
# nudges of the first gradient; adaptive stops on a nudge that gains less than the margin.
MODE_CASES = [
    ("classifier", dict(search_mode="parallel"), 4),
    ("judge", dict(search_mode="parallel", num_refinements=3, initial_insertion_offset=4), 3),
    ("classifier", dict(search_mode="parallel", selection="sample", nudge_temperature=1.0, seed=3), 5),
    ("classifier", dict(search_mode="adaptive", num_refinements=6), 2),
    ("judge", dict(search_mode="adaptive", adaptive_margin=0.01, entropy_threshold=2.0), 4),
    # a budget of B refined segments, then greedy to the end (waiting rows are decoded a batch at a time)
    ("classifier", dict(max_refined_segments=1), 3),
    ("judge", dict(search_mode="adaptive", max_refined_segments=2, entropy_threshold=2.0), 2),
    ("classifier", dict(search_mode="parallel", max_refined_segments=2), 4),
    # lookahead: greedy to u, then the greedy rollout and the S-1 best nudges of its gradient, decoded to the end
    ("classifier", dict(search_mode="lookahead", max_refined_segments=1), 3),
    ("judge", dict(search_mode="lookahead", max_refined_segments=2, num_refinements=3, entropy_threshold=2.0), 2),
    ("classifier", dict(search_mode="lookahead", selection="sample", nudge_temperature=1.0, seed=5), 4),
]


@pytest.mark.parametrize("kind,over,bs", CASES + MODE_CASES)
def test_engine_matches_oracle(setup, kind, over, bs):
    tok, policy, rewards = setup
    cfg = GGROConfig(**{"max_new_tokens": 16, "num_refinements": 4, "entropy_threshold": 2.4, **over})
    prompts = prompts_of(tok, PROMPTS)
    got = engine_results(policy, rewards[kind], tok, prompts, cfg, bs)
    ref = ReferenceReward.of(rewards[kind])
    for p in prompts:
        if cfg.search_mode == "lookahead":
            want = reference_lookahead(p.id, p.ids, policy, ref, cfg, [tok.eos_token_id])
        else:
            want = reference_ggro(p.id, p.ids, policy, ref, cfg, [tok.eos_token_id])
        assert_same(got[p.id], want)


def test_cases_exercise_every_path(setup):
    """The oracle cases must actually hit nudges, repeats, EOS, length caps and entropy stops."""
    tok, policy, rewards = setup
    results = []
    for over in (dict(), dict(top_k=2)):
        cfg = GGROConfig(max_new_tokens=16, num_refinements=4, entropy_threshold=2.4, trace=True, **over)
        results += engine_results(policy, rewards["classifier"], tok, prompts_of(tok, PROMPTS), cfg, 4).values()
    stops = {seg["stop"] for r in results for seg in r.trace}
    assert {"entropy", "length", "eos"} <= stops
    assert sum(r.num_nudges for r in results) > 0
    # with insert_at 0 a segment tries fewer than S candidates only when one repeats
    assert any(len(seg["tried"]) < 4 for r in results for seg in r.trace)
    # and the repeat is seen coming, never decoded: every refinement decoded was scored
    assert all(r.refinements == sum(len(seg["tried"]) for seg in r.trace) for r in results)


def test_prefill_and_batching_invariance(setup):
    tok, policy, rewards = setup
    cfg = GGROConfig(max_new_tokens=12, initial_insertion_offset=3, entropy_threshold=2.3)
    prompts = prompts_of(tok, PROMPTS[:5], prefill="the water is")
    one = engine_results(policy, rewards["judge"], tok, prompts, cfg, 1)
    many = engine_results(policy, rewards["judge"], tok, prompts, cfg, 5)
    ref = ReferenceReward.of(rewards["judge"])
    for p in prompts:
        assert_same(many[p.id], one[p.id])
        assert_same(many[p.id], reference_ggro(p.id, p.ids, policy, ref, cfg, [tok.eos_token_id], has_prefill=True))
    # lookahead: a prefilled prompt's first point is right after its prefill, as faithful's first nudge
    cfg = dataclasses.replace(cfg, search_mode="lookahead", max_refined_segments=2, trace=True)
    got = engine_results(policy, rewards["judge"], tok, prompts, cfg, 5)
    for p in prompts:
        assert_same(got[p.id], reference_lookahead(p.id, p.ids, policy, ref, cfg, [tok.eos_token_id], has_prefill=True))
    later = [reference_lookahead(p.id, p.ids, policy, ref, cfg, [tok.eos_token_id]) for p in prompts]
    assert any(got[p.id].tokens != w.tokens for p, w in zip(prompts, later))     # the rule changes responses


def test_greedy_baseline_matches_oracle(setup):
    tok, policy, rewards = setup
    cfg = GGROConfig(method="greedy", max_new_tokens=14)
    prompts = prompts_of(tok, PROMPTS)
    got = engine_results(policy, rewards["classifier"], tok, prompts, cfg, 4)
    ref = ReferenceReward.of(rewards["classifier"])
    for p in prompts:
        assert_same(got[p.id], reference_baseline(p.id, p.ids, policy, ref, cfg, [tok.eos_token_id]))


def test_best_of_n_is_seeded_and_batch_independent(setup):
    tok, policy, rewards = setup
    cfg = GGROConfig(method="best-of-n", n=3, max_new_tokens=10, seed=5)
    prompts = prompts_of(tok, PROMPTS[:4])
    a = engine_results(policy, rewards["classifier"], tok, prompts, cfg, 12)
    b = engine_results(policy, rewards["classifier"], tok, prompts, cfg, 3)
    greedy = engine_results(policy, rewards["classifier"], tok, prompts, GGROConfig(method="greedy", max_new_tokens=10), 4)
    for p in prompts:
        assert_same(a[p.id], b[p.id])
        assert a[p.id].reward_calls == 3 and a[p.id].refinements == 3
        # the kept sample is the best of its n: at least as good as any one of them alone
        single = engine_results(policy, rewards["classifier"], tok, [p], GGROConfig(method="best-of-n", n=1, max_new_tokens=10, seed=5), 1)
        assert a[p.id].reward >= single[p.id].reward - 1e-12
    assert any(a[p.id].tokens != greedy[p.id].tokens for p in prompts)


def test_sparse_candidate_scores_equal_dense_onehot_gradient(setup):
    tok, policy, rewards = setup
    for kind, rm in rewards.items():
        z = prompts_of(tok, ["how do you make water ?"])[0].ids + [10, 20, 30, 40, 50]
        q, cands = len(z) - 3, list(range(4, 60, 3))
        # batch it with a longer and a shorter sequence so padding is exercised too
        res = rm.score([RewardQuery(z + [7, 8, 9]), RewardQuery(z, q, cands), RewardQuery(z[:9], 4, [5, 6])])
        r, dense = ReferenceReward.of(rm)(z, need_grad=True)
        assert res[1].reward == pytest.approx(r, rel=1e-10)
        assert res[1].scores == pytest.approx(dense[q, cands].tolist(), rel=1e-8, abs=1e-12)
        assert res[0].scores is None and len(res[2].scores) == 2
        # the same through the RM's prefix cache (x + y without grad, only the rest differentiated),
        # twice: a cold cache, then a warm one extended by the new tokens
        for prefix_len in (len(z) - 6, len(z) - 3):
            cached = rm.score([RewardQuery(z, q, cands, "seq", prefix_len), RewardQuery(z[:9], 4, [5, 6])])
            assert cached[0].reward == pytest.approx(r, rel=1e-10)
            assert cached[0].scores == pytest.approx(dense[q, cands].tolist(), rel=1e-8, abs=1e-12)
            assert cached[1].scores == pytest.approx(res[2].scores, rel=1e-10)


def test_grad_calls_cut_into_chunks_score_the_same(setup):
    """A reward call that needs the gradient runs at most `grad_tokens` tokens per backward (so its memory is
    bounded whatever the fill); rows are independent, so cutting it changes no reward and no candidate score."""
    tok, _, rewards = setup
    rm = rewards["judge"]
    prompts = prompts_of(tok, PROMPTS[:5])
    qs = [RewardQuery(p.ids + [10, 20, 30][: 1 + i % 3], len(p.ids), [5, 6, 7]) for i, p in enumerate(prompts)]
    qs.append(RewardQuery(prompts[0].ids + [9]))      # one that needs no gradient rides along
    whole = rm.score(qs)
    calls = []
    rm.grad_tokens, score = 1, rm._score
    rm._score = lambda group, known: calls.append(len(group)) or score(group, known)
    try:
        cut = rm.score(qs)
    finally:
        rm.grad_tokens, rm._score = GRAD_TOKENS, score
    assert max(calls) == 1 and len(calls) == len(qs)     # one row per backward at the smallest budget
    for a, b in zip(whole, cut):
        assert b.reward == pytest.approx(a.reward, rel=1e-10)
        assert (a.scores is None and b.scores is None) or b.scores == pytest.approx(a.scores, rel=1e-8, abs=1e-12)
    assert grad_chunks(list("abcde"), [3, 3, 5, 1, 1], 10) == [["a", "b"], ["c", "d"], ["e"]]


def test_rows_without_a_gradient_never_ride_in_a_backward(setup):
    """A call with autograd runs every row's backward, wanted or not, so rows that need no gradient (a faithful
    round's last refinements) run in calls of their own: no call mixes the two, and each row scores as alone."""
    tok, _, rewards = setup
    rm = rewards["judge"]
    prompts = prompts_of(tok, PROMPTS[:4])
    qs = [RewardQuery(p.ids + [10, 20], len(p.ids), [5, 6, 7]) if i % 2 else RewardQuery(p.ids + [10, 20])
          for i, p in enumerate(prompts)]
    calls, score = [], rm._score
    rm._score = lambda group, known: calls.append({q.position is None for q in group}) or score(group, known)
    try:
        mixed = rm.score(qs)
    finally:
        rm._score = score
    assert all(len(kinds) == 1 for kinds in calls) and set().union(*calls) == {False, True}   # none mixes
    for q, got in zip(qs, mixed):
        (alone,) = rm.score([q])
        assert got.reward == pytest.approx(alone.reward, rel=1e-10)
        assert (got.scores is None) == (q.position is None)
        assert got.scores is None or got.scores == pytest.approx(alone.scores, rel=1e-8, abs=1e-12)


def test_rows_of_different_lengths_run_in_separate_calls(setup):
    """Prefills and reward calls cut rows by length where that saves more padded tokens than a call costs
    (ggro.kvcache.call_groups): every row once, a long prompt alone, and the same results as one padded call."""
    assert call_groups(list("abcdef"), [5, 5, 6, 40, 41, 5], True, 8) == [["a", "b", "f", "c"], ["d", "e"]]
    assert call_groups(list("abcdef"), [5, 5, 6, 40, 41, 5], True, 10**6) == [list("abfcde")]
    assert call_groups(list("abc"), [3, 4, 3], False, 10**6) == [["a", "c"], ["b"]]    # eager: one length a call
    assert call_groups([], [], True, 8) == []
    tok, policy, rewards = setup
    prompts = prompts_of(tok, PROMPTS)
    prompts[2] = Prompt("long", prompts[2].ids * 4)          # one prompt four times as long as the others
    cfg = GGROConfig(max_new_tokens=12, num_refinements=3, entropy_threshold=2.3)
    rm = rewards["judge"]
    got, shared = {}, rm.prefixes.call_tokens
    for each in (0, 10**6):            # 0: a call per length; 10**6: one padded call, as before
        dec = SegmentDecoder(policy, [tok.eos_token_id], max_cached=8)
        dec.prefixes.call_tokens = rm.prefixes.call_tokens = each
        calls = []
        forward = dec.prefixes.forward
        dec.prefixes.forward = lambda *a: calls.append(tuple(a[0].shape)) or forward(*a)
        try:
            got[each] = {r.id: r for r in run(prompts, dec, rm, cfg, 7)}
        finally:
            rm.prefixes.call_tokens = shared      # the module's reward model, as it was
        lengths = sorted({len(p.ids) for p in prompts})
        first = calls[:len(lengths) if each == 0 else 1]           # the prompts' prefill
        assert sum(rows for rows, _ in first) == len(prompts)
        assert sorted(n for _, n in first) == (lengths if each == 0 else [lengths[-1]])
    ref = ReferenceReward.of(rm)
    for p in prompts:
        assert_same(got[0][p.id], got[10**6][p.id])
        assert_same(got[0][p.id], reference_ggro(p.id, p.ids, policy, ref, cfg, [tok.eos_token_id]))


def test_segment_decoder_cache_reuse_is_exact(setup):
    """Extending a cached prefix gives the same tokens as decoding it fresh."""
    tok, policy, _ = setup
    x = prompts_of(tok, ["the number of people who call"])[0].ids
    dec = SegmentDecoder(policy, [tok.eos_token_id])
    first = dec.decode([SegmentRequest("s", x, 6)])[0]
    extended = dec.decode([SegmentRequest("s", x + first.tokens, 6, top_k=5)])[0]
    fresh = SegmentDecoder(policy, [tok.eos_token_id]).decode([SegmentRequest("t", x + first.tokens, 6, top_k=5)])[0]
    assert extended == fresh


def test_an_accepted_segment_is_not_run_again(setup):
    """A segment that ended on an entropy stop leaves its keys and values in the prefix cache: asking for the
    prefix plus that segment runs no forward, and gives what a fresh prefill gives; asking for another extension
    runs one and drops the stale forks."""
    tok, policy, _ = setup
    x = prompts_of(tok, ["the number of people who call"])[0].ids
    dec = SegmentDecoder(policy, [tok.eos_token_id])
    calls = []
    forward = dec.prefixes.forward
    dec.prefixes.forward = lambda *a: calls.append(a[0].shape) or forward(*a)
    segs = dec.decode([SegmentRequest("s", x, 20, entropy_threshold=0.0, min_segment_tokens=3)] * 2
                      + [SegmentRequest("t", x, 20, entropy_threshold=0.0, min_segment_tokens=2)])
    assert [s.stop for s in segs] == ["entropy"] * 3 and len(segs[0].tokens) == 2 and len(segs[2].tokens) == 1
    calls.clear()
    (got,) = dec.prefixes.get([("s", x + segs[0].tokens)])
    assert calls == [] and "s" not in dec.prefixes._forks
    (want,) = SegmentDecoder(policy, [tok.eos_token_id]).prefixes.get([("u", x + segs[0].tokens)])
    assert got.ids == want.ids and torch.allclose(got.last, want.last, atol=1e-10)
    assert all(torch.allclose(a, b, atol=1e-10) for (ka, va), (kb, vb) in zip(got.kv, want.kv)
               for a, b in ((ka, kb), (va, vb)))
    dec.prefixes.get([("t", x + segs[0].tokens)])          # not the segment "t" ran: a forward over it
    assert len(calls) == 1 and "t" not in dec.prefixes._forks


def test_cancel_drops_rows_mid_decode_and_release_clears_it(setup):
    """cancel() from another thread (here a forward hook, so the step is deterministic): the row ends "cancelled"
    with the tokens it had, the others decode as if alone; after release the id decodes normally again."""
    tok, policy, _ = setup
    x, y = (p.ids for p in prompts_of(tok, ["the number of people who call", "I like people"]))
    dec = SegmentDecoder(policy, [tok.eos_token_id])
    alone = {k: SegmentDecoder(policy, [tok.eos_token_id]).decode([SegmentRequest(k, ids, 8)])[0]
             for k, ids in (("a", x), ("b", y))}
    calls = []
    hook = policy.register_forward_hook(lambda *_: calls.append(1) if len(calls) < 3 else dec.cancel(["b"]))
    try:
        got = dec.decode([SegmentRequest("a", x, 8), SegmentRequest("b", y, 8)])
    finally:
        hook.remove()
    assert got[0] == alone["a"]
    assert got[1].stop == "cancelled" and 0 < len(got[1].tokens) < 8
    assert got[1].tokens == alone["b"].tokens[:len(got[1].tokens)]
    assert dec.decode([SegmentRequest("b", y, 8)])[0].stop == "cancelled"    # cancelled until released
    dec.release(["b"])
    assert dec.decode([SegmentRequest("b", y, 8)])[0] == alone["b"]


@pytest.mark.parametrize("kind,over", [("classifier", dict()), ("judge", dict(entropy_threshold=2.0)),
                                       ("classifier", dict(search_mode="lookahead", max_refined_segments=1))])
def test_reward_on_the_policys_backbone_shares_its_prefix_cache(setup, kind, over):
    """A guide head on the policy's backbone (or the policy as its own judge) reads x + y from the decoder's prefix
    cache, never running the backbone over it again, and the search still matches the oracle."""
    from ggro import guide
    tok, policy, _ = setup
    dec = SegmentDecoder(policy, [tok.eos_token_id], max_cached=8)
    w = torch.randn(policy.config.hidden_size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = guide.with_head(policy, w) if kind == "classifier" else policy
    rm = RewardModel(model, tok, kind, rubric="is it good ? Yes or No", eos_ids=[tok.eos_token_id],
                     prefixes=dec.prefixes)
    runs = []
    rm.prefixes.forward = lambda *a, f=rm.prefixes.forward: runs.append(1) or f(*a)   # count backbone prefills
    cfg = GGROConfig(**{"max_new_tokens": 16, "num_refinements": 4, "entropy_threshold": 2.4, **over})
    prompts = prompts_of(tok, PROMPTS)
    got = {r.id: r for r in run(prompts, dec, rm, cfg, 4)}
    ref = ReferenceReward.of(rm)
    oracle = reference_lookahead if cfg.search_mode == "lookahead" else reference_ggro
    for p in prompts:
        assert_same(got[p.id], oracle(p.id, p.ids, policy, ref, cfg, [tok.eos_token_id]))
    assert runs and sum(r.refinements for r in got.values()) > 0
    seg = dec.decode([SegmentRequest("q", prompts[0].ids, 4)])[0]
    dec.prefixes.forward = None          # the prefix the RM asks for is the one the policy just decoded from
    rm.score([RewardQuery(prompts[0].ids + seg.tokens, seq_id="q", prefix_len=len(prompts[0].ids))])


@pytest.mark.parametrize("kind", ["classifier", "judge"])
def test_a_decoded_response_is_scored_from_its_fork(setup, kind):
    """A reward on the policy's backbone scores the responses the policy just decoded under one id (best-of-n's
    samples, lookahead's rollouts) from the decoder's forks of them: no prefill, a pass over each response's last
    token (and a judge's question) only, and the rewards a reward model with a cache of its own gives."""
    from ggro import guide
    from ggro.seam import Sampling
    tok, policy, _ = setup
    x = prompts_of(tok, ["the number of people who call"])[0].ids
    dec = SegmentDecoder(policy, [tok.eos_token_id])
    w = torch.randn(policy.config.hidden_size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = guide.with_head(policy, w) if kind == "classifier" else policy
    make = lambda **kw: RewardModel(model, tok, kind, rubric="is it good ? Yes or No",  # noqa: E731
                                    eos_ids=[tok.eos_token_id], **kw)
    rm = make(prefixes=dec.prefixes)
    samples = dec.decode([SegmentRequest("s", x, 8, sampling=Sampling(1.0, 1.0, seed)) for seed in range(4)])
    assert len({tuple(s.tokens) for s in samples}) > 1 and all(len(s.tokens) > 1 for s in samples)
    dec.prefixes.forward = None                      # any prefill would fail: every sample comes from its fork
    widths = []
    rm._reward = lambda embeds, *a, f=rm._reward: widths.append(embeds.shape[1]) or f(embeds, *a)
    got = rm.score([RewardQuery(x + s.tokens, seq_id="s", prefix_len=len(x)) for s in samples])
    assert widths and max(widths) <= 1 + len(rm.suffix)
    want = make().score([RewardQuery(x + s.tokens, seq_id="t", prefix_len=len(x)) for s in samples])
    assert [g.reward for g in got] == pytest.approx([v.reward for v in want], rel=1e-6, abs=1e-9)
    assert dec.prefixes.peek("s", x + samples[0].tokens[:-1]) is not None     # peeking took no fork away
    plain = SegmentDecoder(policy, [tok.eos_token_id])          # no reward model reads its cache
    assert plain.decode([SegmentRequest("p", x, 8)])[0].stop != "entropy" and "p" not in plain.prefixes._forks


@pytest.mark.parametrize("bad", [dict(min_segment_tokens=1), dict(num_refinements=0), dict(method="beam"),
                                 dict(top_p=0), dict(entropy_threshold=math.nan)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ConfigError):
        GGROConfig(**bad)


def test_adaptive_without_a_margin_is_faithful(setup):
    """With the margin at -inf adaptive mode is faithful's search: the same responses, rewards and refinements
    (neither decodes a sure repeat); and no mode accepts less than its first refinement."""
    tok, policy, rewards = setup
    base = dict(max_new_tokens=16, num_refinements=5, entropy_threshold=2.2, trace=True)
    prompts = prompts_of(tok, PROMPTS)
    faithful = engine_results(policy, rewards["classifier"], tok, prompts, GGROConfig(**base), 4)
    for mode, margin in (("adaptive", -math.inf), ("adaptive", 0.0), ("parallel", 0.0)):
        cfg = GGROConfig(**base, search_mode=mode, adaptive_margin=margin)
        got = engine_results(policy, rewards["classifier"], tok, prompts, cfg, 4)
        for p in prompts:
            g, f = got[p.id], faithful[p.id]
            if margin == -math.inf:
                assert g.tokens == f.tokens and g.reward == pytest.approx(f.reward) and g.refinements == f.refinements
            for seg in g.trace:
                rewards_tried = [t["reward"] for t in seg["tried"]]
                assert rewards_tried[seg["accepted"]] == max(rewards_tried) >= rewards_tried[0]


def test_budget_refines_first_segments_only(setup):
    """max_refined_segments B: the first B segments are faithful GGRO's own, then one greedy tail to the end
    (at most B + 1 segments); B = 1 tries nudges at the first position only."""
    tok, policy, rewards = setup
    base = dict(max_new_tokens=16, num_refinements=4, entropy_threshold=2.2, trace=True)
    prompts = prompts_of(tok, PROMPTS)
    faithful = engine_results(policy, rewards["classifier"], tok, prompts, GGROConfig(**base), 3)
    for B in (1, 2):
        got = engine_results(policy, rewards["classifier"], tok, prompts,
                             GGROConfig(**base, max_refined_segments=B), 3)
        tails = 0
        for p in prompts:
            g, f = got[p.id], faithful[p.id]
            assert g.num_segments <= B + 1
            assert g.segment_boundaries[:B] == f.segment_boundaries[:B]      # the refined part is faithful's
            assert g.tokens[:g.segment_boundaries[min(B, g.num_segments) - 1]] == \
                f.tokens[:g.segment_boundaries[min(B, g.num_segments) - 1]]
            if g.num_segments == B + 1:
                tails += 1
                assert [t["nudge"] for t in g.trace[-1]["tried"]] == [None] and g.trace[-1]["stop"] != "entropy"
        assert tails, "no response reached its greedy tail: the case does not test the budget"


def test_lookahead_keeps_the_best_complete_response(setup):
    """Each uncertain point tries the greedy rollout first and keeps the best-scored complete response, so a
    second point never ends below the first point's choice (its greedy rollout is that choice)."""
    tok, policy, rewards = setup
    base = dict(max_new_tokens=16, num_refinements=4, entropy_threshold=2.0, search_mode="lookahead", trace=True)
    prompts = prompts_of(tok, PROMPTS)
    one, two = (engine_results(policy, rewards["classifier"], tok, prompts,
                               GGROConfig(**base, max_refined_segments=b), 4) for b in (1, 2))
    assert sum(r.num_nudges for r in one.values()) > 0
    for p in prompts:
        for seg in one[p.id].trace + two[p.id].trace:
            tried = [t["reward"] for t in seg["tried"]]
            assert seg["tried"][0]["nudge"] is None and tried[seg["accepted"]] == max(tried)
            assert all(t["stop"] != "entropy" for t in seg["tried"])          # rollouts run to the end
        assert two[p.id].reward >= one[p.id].reward - 1e-9


@pytest.mark.parametrize("mode", ["faithful", "lookahead"])
def test_withdrawn_prompt_leaves_the_search(setup, mode):
    """Serve withdraws a prompt whose client disconnected: asked between rounds, the search drops it for good
    (no Result, its cache released once) and the other prompts' results are unchanged."""
    tok, policy, rewards = setup
    cfg = GGROConfig(max_new_tokens=16, num_refinements=4, entropy_threshold=2.0, search_mode=mode,
                     max_refined_segments=3 if mode == "lookahead" else None)
    prompts = prompts_of(tok, PROMPTS)
    full = engine_results(policy, rewards["classifier"], tok, prompts, cfg, 4)
    # more refinements than one round (faithful) or one uncertain point (lookahead) makes: still searching
    # when it is asked the second time
    victim = next(p.id for p in prompts if full[p.id].refinements > cfg.num_refinements)
    dec, released, asked = SegmentDecoder(policy, [tok.eos_token_id], max_cached=4), [], {}

    class Recording:    # the real decoder, with the released ids written down
        decode = dec.decode

        def release(self, ids):
            released.extend(ids)
            dec.release(ids)

    def withdrawn(pid):
        asked[pid] = asked.get(pid, 0) + 1
        return pid == victim and asked[pid] == 2

    got = {r.id: r for r in run(prompts, Recording(), rewards["classifier"], cfg, 4, withdrawn=withdrawn)}
    assert asked[victim] == 2 and set(got) == set(full) - {victim}
    assert released.count(victim) == 1
    for pid, r in got.items():
        assert_same(r, full[pid])


@pytest.mark.parametrize("scale", [4.0, 0.01])   # peaked: a small nucleus; flat: wider than the first head
def test_sample_token_draws_from_the_nucleus(scale):
    from ggro.policy import sample_token
    logits = torch.randn(3000, generator=torch.Generator().manual_seed(1)) * scale
    probs = torch.softmax(logits.double() / 0.7, -1)
    sorted_p, order = probs.sort(descending=True)
    nucleus = order[sorted_p.cumsum(0) - sorted_p < 0.9]
    want = torch.zeros_like(probs).scatter(0, nucleus, probs[nucleus])
    want /= want.sum()
    gen = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_token(logits, 0.7, 0.9, gen, head=64) for _ in range(4000)])
    assert set(draws.tolist()) <= set(nucleus.tolist())
    got = torch.bincount(draws, minlength=len(probs)).double() / len(draws)
    assert (got - want).abs().sum() < 0.12 if scale > 1 else len(set(draws.tolist())) > 500
    again = torch.Generator().manual_seed(0)
    assert [sample_token(logits, 0.7, 0.9, again, head=64) for _ in range(50)] == draws[:50].tolist()


def test_batched_samples_are_the_plain_float64_nucleus_draws():
    """sample_tokens finds each row's nucleus from a float32 pass over the vocabulary; its draws equal the plain
    definition's (the whole row's float64 softmax, sorted), seed for seed: peaked, flat (the head widens),
    bf16 logits (ties across the edge: the lowest ids kept), top_p 1, and nucleus edges placed right at top_p
    (where float32 could move them)."""
    from ggro.policy import sample_tokens

    def plain(row, t, p, gen):
        probs = torch.softmax(row.double() / t, -1)
        v, o = probs.sort(descending=True, stable=True)     # ties: the lowest id first
        if p >= 1.0:
            return int(torch.multinomial(probs, 1, generator=gen))
        ids, perm = o[v.cumsum(0) - v < p].sort()
        return int(ids[torch.multinomial(v[v.cumsum(0) - v < p][perm], 1, generator=gen)])

    g = torch.Generator().manual_seed(3)
    rows = torch.randn(12, 3000, generator=g) * torch.tensor([4.0, 0.01, 1.0] * 4)[:, None]
    rows[9, :3] = torch.tensor([0.5, 0.3, 0.2]).log()           # the edge at 0.8, top_p's value
    rows[9, 3:] = -1e4
    rows[10] = rows[10].bfloat16().float()
    temps = [0.7, 1.0, 0.4, 1.3] * 3
    tops = [0.9, 0.95, 1.0, 0.5, 0.9, 0.8, 0.99, 0.3, 0.95, 0.8, 0.9, 0.4]
    temps[9] = 1.0
    for seed in range(20):
        gens = [torch.Generator().manual_seed(seed * 100 + i) for i in range(12)]
        again = [torch.Generator().manual_seed(seed * 100 + i) for i in range(12)]
        got = sample_tokens(rows, temps, tops, gens, head=16)
        assert got == [plain(r, t, p, a) for r, t, p, a in zip(rows, temps, tops, again)]


ARCHITECTURES = {   # (config class, causal LM, classifier, config overrides): each a tiny random model
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "Qwen2ForSequenceClassification", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "Qwen3ForSequenceClassification", dict(head_dim=12)),
    "mistral": ("MistralConfig", "MistralForCausalLM", "MistralForSequenceClassification", dict(sliding_window=None)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", "Gemma3TextForSequenceClassification",
               dict(head_dim=12, sliding_window=64)),     # scales its input embeddings inside the module
    "phi3": ("Phi3Config", "Phi3ForCausalLM", "Phi3ForSequenceClassification", {}),
    # eager attention only: batched calls group rows so that no left padding is a query row (NaN there leaks)
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", "Gemma2ForSequenceClassification", dict(head_dim=12)),
}


def tiny_arch(classes: tuple, kind: str, seed: int, tok):
    import transformers
    conf, lm, cls, extra = classes
    base = dict(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.4, tie_word_embeddings=False,
                pad_token_id=0, eos_token_id=3, bos_token_id=None)
    config = getattr(transformers, conf)(**{**base, **extra, **({"num_labels": 1} if kind == "classifier" else {})})
    torch.manual_seed(seed)
    return getattr(transformers, cls if kind == "classifier" else lm)(config)


def eager_attention_in_model_dtype(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                   softcap=None, **kw):
    """Gemma 2's eager attention (transformers' modeling_gemma2.eager_attention_forward) with its softmax in the
    model's dtype. transformers computes it with dtype=float32 whatever the model's dtype, so a float64 Gemma 2 is
    float32 inside its softmax, and the softmax's sum runs over a different number of keys in the engine (a
    cached, padded batch) than in the oracle (the whole sequence, causal mask): its float32 rounding follows the
    CPU's vector width (AVX2 or AVX-512 lanes), rewards then differ by ~1e-7 and a near-tie can flip a token.
    The other architectures run SDPA, whose softmax is float64 here. Their RMSNorms (and Gemma 2's) are float32
    too, but per row over the hidden size, the same shape in both, so they round alike on any CPU."""
    from transformers.models.gemma2.modeling_gemma2 import repeat_kv
    k, v = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
    w = torch.matmul(query, k.transpose(2, 3)) * (scaling if scaling is not None else module.head_dim ** -0.5)
    if softcap is not None:
        w = torch.tanh(w / softcap) * softcap
    if attention_mask is not None:
        w = w + attention_mask
    w = torch.softmax(w, dim=-1)
    return torch.matmul(w, v).transpose(1, 2).contiguous(), w


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architectures_match_the_oracle(setup, arch, monkeypatch):
    """Policies and classifier RMs of each supported architecture run GGRO exactly as the oracle (float64)."""
    if arch == "gemma2":    # float64 all through, so equality does not depend on the CPU (see the function)
        from transformers.models.gemma2 import modeling_gemma2
        monkeypatch.setattr(modeling_gemma2, "eager_attention_forward", eager_attention_in_model_dtype)
    tok = setup[0]
    policy = tiny_arch(ARCHITECTURES[arch], "causal", 1, tok).double().eval().requires_grad_(False)
    rm = RewardModel(tiny_arch(ARCHITECTURES[arch], "classifier", 2, tok).double().eval().requires_grad_(False), tok, "classifier")
    cfg = GGROConfig(max_new_tokens=12, num_refinements=3, entropy_threshold=2.4)
    prompts = prompts_of(tok, PROMPTS[:5])
    got = engine_results(policy, rm, tok, prompts, cfg, 3)
    ref = ReferenceReward.of(rm)
    wants = [reference_ggro(p.id, p.ids, policy, ref, cfg, [tok.eos_token_id]) for p in prompts]
    for p, want in zip(prompts, wants):
        assert_same(got[p.id], want)
    assert sum(w.num_nudges for w in wants) > 0


def test_stop_strings_end_decoding_where_they_appear(setup):
    """A stop string ends the response at the token that completes it, checked while decoding (the tokens after
    it are never decoded), for the baselines and for GGRO, also when it spans two tokens or two segments."""
    tok, policy, rewards = setup
    prompts = prompts_of(tok, PROMPTS[:4])
    cfg = GGROConfig(method="greedy", max_new_tokens=14)
    free = engine_results(policy, rewards["classifier"], tok, prompts, cfg, 4)
    y0 = free[prompts[0].id].tokens
    stop = tok.decode(y0[3:5])             # two tokens from the middle of one greedy response
    stopped = [dataclasses.replace(p, stop=(stop,)) for p in prompts]

    def with_stops(c):
        dec = SegmentDecoder(policy, [tok.eos_token_id], max_cached=4, tokenizer=tok)
        return {r.id: r for r in run(stopped, dec, rewards["classifier"], c, 4)}

    got = with_stops(cfg)
    for p in prompts:
        want = free[p.id].tokens
        cut = next((j + 1 for j in range(len(want)) if stop in tok.decode(want[:j + 1])), None)
        assert got[p.id].tokens == (want if cut is None else want[:cut])
        if cut is not None:
            assert got[p.id].finish_reason == "stop" and got[p.id].policy_tokens == cut
    assert len(got[prompts[0].id].tokens) <= 5 < len(y0)
    # GGRO with one refinement per segment is greedy decoding cut into segments at uncertain points: the stop
    # must cut it at the same token, whichever segment that falls in
    segmented = with_stops(GGROConfig(max_new_tokens=14, num_refinements=1, entropy_threshold=1.0))
    assert segmented[prompts[0].id].tokens == got[prompts[0].id].tokens
    assert segmented[prompts[0].id].num_segments > 1
    for c in (GGROConfig(max_new_tokens=14, entropy_threshold=2.0),
              GGROConfig(max_new_tokens=14, search_mode="lookahead", max_refined_segments=2)):
        for r in with_stops(c).values():
            text = tok.decode(r.tokens)
            if stop in text:     # the response ends at the stop string's first appearance
                assert text.endswith(stop) and stop not in tok.decode(r.tokens[:-1]) and r.finish_reason == "stop"
    with pytest.raises(ValueError, match="tokenizer"):
        run(stopped[:1], SegmentDecoder(policy, [tok.eos_token_id]), rewards["classifier"], cfg, 1).__next__()


def test_a_reward_model_with_its_own_vocabulary_scores_the_baselines(setup, tiny_models, tmp_path):
    """Greedy and best-of-n score each response with the RM's own tokenizer and chat template; GGRO, which reads
    the RM's gradient as policy tokens, refuses that RM with a message saying which methods work."""
    from transformers import AutoTokenizer
    from tests.conftest import save_other_vocab_rm
    from ggro.config import ModelConfig
    from ggro.engine import Engine
    from ggro.models import ModelLoadError
    from ggro.rows import InputRow
    tok = setup[0]
    rm_dir = save_other_vocab_rm(tmp_path / "rm")
    other = AutoTokenizer.from_pretrained(rm_dir)
    assert other.encode("the water") != tok.encode("the water")
    mcfg = ModelConfig(policy=tiny_models["policy"], reward=str(rm_dir), reward_kind="classifier", dtype="float64")
    with pytest.raises(ModelLoadError, match="one shared vocabulary.*--method greedy or best-of-n"):
        Engine.load(mcfg)
    engine = Engine.load(mcfg, gradient=False)
    rows = [InputRow(f"r{i}", [{"role": "user", "content": t}]) for i, t in enumerate(PROMPTS[:3])]
    rm = RewardModel(models.load_model(str(rm_dir), "classifier", "float64"), other, "classifier")
    for cfg in (GGROConfig(method="greedy", max_new_tokens=8), GGROConfig(method="best-of-n", n=2, max_new_tokens=8)):
        recs = {r["id"]: r for r in engine.align(rows, cfg)}
        for row in rows:
            rec = recs[row.id]
            assert rec["error"] is None
            conv = row.messages + [{"role": "assistant", "content": rec["response"]}]
            ids = other.encode(other.apply_chat_template(conv, tokenize=False), add_special_tokens=False)
            assert rec["reward"] == pytest.approx(rm.score([RewardQuery(ids)])[0].reward, rel=1e-9)
    with pytest.raises(ConfigError, match="its own vocabulary"):
        list(engine.align(rows, GGROConfig(max_new_tokens=8)))
