"""Static decoding (ggro.kvcache.Slab, SegmentDecoder(static=True), `--compile`): persistent key/value slabs and
fixed shapes for a whole decode call, so the model's step compiles whole (and is captured as CUDA graphs on a GPU).

- every search mode over a static decoder matches the oracle, as the default decoder does, with a reward model
  that reads the decoder's forks (the judge on the policy's backbone) and one with its own cache;
- segments equal the default decoder's for every request kind (greedy, entropy stops, forced tokens, top-k,
  seeded sampling, cache extension), with row buckets padded and slabs reused across calls; a cancelled row
  stays in the batch, unread;
- the whole model step compiles with `torch.compile(fullgraph=True)` on the CPU and decodes the same tokens;
- `--compile` reaches the decoder, and a tensor-parallel policy refuses it before any actor starts.
"""
from __future__ import annotations

import pytest
import torch

from ggro import models
from ggro.config import ConfigError, GGROConfig, ModelConfig, check_tp
from ggro.policy import SegmentDecoder
from ggro.reference import ReferenceReward, reference_baseline, reference_ggro, reference_lookahead
from ggro.reward import RewardModel
from ggro.search import run
from ggro.seam import Sampling, SegmentRequest
from test_engine import PROMPTS, assert_same, prompts_of


@pytest.fixture(scope="module")
def tiny(tiny_models):
    tok = models.load_tokenizer(tiny_models["policy"])
    return tok, models.load_model(tiny_models["policy"], "causal", "float64")


def static_decoder(policy, tok, **kw) -> SegmentDecoder:
    return SegmentDecoder(policy, [tok.eos_token_id], max_cached=16, static=True, **kw)


CASES = [
    ("own", dict()),
    ("forks", dict(num_refinements=3, entropy_threshold=2.0)),
    ("forks", dict(search_mode="lookahead", max_refined_segments=2, num_refinements=3, entropy_threshold=2.0)),
    ("own", dict(method="best-of-n", n=3, seed=4)),
    ("forks", dict(method="greedy")),
]


@pytest.mark.parametrize("reward_kind,over", CASES)
def test_static_decoder_matches_the_oracle(tiny, tiny_models, reward_kind, over):
    """`forks`: the judge runs on the policy's backbone and reads every finished segment from the decoder's
    forks, which a static call cuts from its slab."""
    tok, policy = tiny
    dec = static_decoder(policy, tok)
    if reward_kind == "forks":
        rm = RewardModel(policy, tok, "judge", rubric="is it good ? Yes or No", eos_ids=[tok.eos_token_id],
                         prefixes=dec.prefixes)
    else:
        rm = RewardModel(models.load_model(tiny_models["classifier"], "classifier", "float64"), tok, "classifier")
    cfg = GGROConfig(**{"max_new_tokens": 16, "num_refinements": 4, "entropy_threshold": 2.4, **over})
    prompts = prompts_of(tok, PROMPTS)
    got = {r.id: r for r in run(prompts, dec, rm, cfg, 3)}
    ref = ReferenceReward.of(rm)
    if cfg.method == "best-of-n":        # sampled: the oracle is the default decoder with the same seeds
        sampled = {r.id: r for r in run(prompts, SegmentDecoder(policy, [tok.eos_token_id], max_cached=16), rm, cfg, 3)}
    for p in prompts:
        if cfg.method == "best-of-n":
            want = sampled[p.id]
        elif cfg.method == "greedy":
            want = reference_baseline(p.id, p.ids, policy, ref, cfg, [tok.eos_token_id])
        elif cfg.search_mode == "lookahead":
            want = reference_lookahead(p.id, p.ids, policy, ref, cfg, [tok.eos_token_id])
        else:
            want = reference_ggro(p.id, p.ids, policy, ref, cfg, [tok.eos_token_id])
        assert_same(got[p.id], want)
    assert all(rows & (rows - 1) == 0 for rows, _ in dec._slabs)       # power-of-two row buckets
    assert all(length % SegmentDecoder.SLAB_STEP == 0 for _, length in dec._slabs)


def requests(tok, tag: str) -> list[SegmentRequest]:
    the = tok.convert_tokens_to_ids("the")
    out = []
    for i, text in enumerate(PROMPTS[:5]):
        ids = prompts_of(tok, [text])[0].ids
        out += [SegmentRequest(f"{tag}-g{i}", ids, 12, top_k=3),
                SegmentRequest(f"{tag}-e{i}", ids, 12, entropy_threshold=1.5, min_segment_tokens=2, top_k=5),
                SegmentRequest(f"{tag}-f{i}", ids, 12, forced=the, insert_at=2, entropy_threshold=2.0),
                SegmentRequest(f"{tag}-s{i}", ids, 12, sampling=Sampling(0.8, 0.9, seed=10 + i))]
    return out


def decode_twice(dec, reqs):
    """Two calls: the requests, then each sequence one accepted segment later (the cache-extension path)."""
    first = dec.decode(reqs)
    nxt = [SegmentRequest(r.seq_id, r.prefix + s.tokens, 6, entropy_threshold=2.0, top_k=2)
           for r, s in zip(reqs, first) if s.stop != "eos" and s.tokens]
    return first, dec.decode(nxt)


def same_segments(got, want) -> bool:
    """Equal tokens, stops, candidates and counts; entropies to float rounding (a static step attends over the
    whole slab, masked, so its sums run over more columns)."""
    flat = lambda calls: [s for call in calls for s in call]     # noqa: E731
    return len(flat(got)) == len(flat(want)) and all(
        (g.tokens, g.stop, g.candidates, g.decoded) == (w.tokens, w.stop, w.candidates, w.decoded)
        and g.stop_entropy == pytest.approx(w.stop_entropy, rel=1e-5, abs=1e-6)
        for g, w in zip(flat(got), flat(want)))


def test_static_segments_equal_the_default_decoders(tiny):
    tok, policy = tiny
    reqs = requests(tok, "r")                     # 20 rows: a bucket of 32, 12 of them empty
    want = decode_twice(SegmentDecoder(policy, [tok.eos_token_id], max_cached=64), reqs)
    dec = SegmentDecoder(policy, [tok.eos_token_id], max_cached=64, static=True)
    got = decode_twice(dec, reqs)
    assert same_segments(got, want)
    assert {s.stop for s in want[0]} >= {"entropy", "length", "eos"}
    slabs = {id(s) for s in dec._slabs.values()}
    assert same_segments(decode_twice(dec, requests(tok, "again")),
                         decode_twice(SegmentDecoder(policy, [tok.eos_token_id], max_cached=64), requests(tok, "again")))
    assert {id(s) for s in dec._slabs.values()} == slabs       # the same buckets: the same slabs, reused


def test_a_cancelled_row_ends_in_a_static_call_and_the_others_decode_as_alone(tiny):
    """A static call keeps its shapes: the cancelled row stays in the batch, unread, and ends "cancelled" with the
    tokens it had; the others decode what they decode alone (the cancel lands from a forward hook, so the step
    is known)."""
    tok, policy = tiny
    x, y = (p.ids for p in prompts_of(tok, ["the number of people who call", "I like people"]))
    alone = {k: SegmentDecoder(policy, [tok.eos_token_id]).decode([SegmentRequest(k, ids, 8)])[0]
             for k, ids in (("a", x), ("b", y))}
    dec = static_decoder(policy, tok)
    rows = []

    def hook(module, args, kwargs, out):
        rows.append(kwargs["input_ids"].shape[0])
        if len(rows) == 3:
            dec.cancel(["b"])
    handle = policy.register_forward_hook(hook, with_kwargs=True)
    try:
        got = dec.decode([SegmentRequest("a", x, 8), SegmentRequest("b", y, 8)])
    finally:
        handle.remove()
    assert same_segments([[got[0]]], [[alone["a"]]])
    assert got[1].stop == "cancelled" and got[1].tokens == alone["b"].tokens[:len(got[1].tokens)]
    assert 0 < len(got[1].tokens) < 8 and set(rows) == {2}      # every forward, after the cancel too, has both rows


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_the_whole_model_step_compiles_fullgraph_on_cpu(tiny_models, backend):
    """fullgraph: a graph break anywhere in the model's step over a slab is an error. fp32, as a GPU runs it;
    one row bucket and one slab length, so one graph (inductor builds its kernels once: ~20 s on 2 cores)."""
    tok = models.load_tokenizer(tiny_models["policy"])
    policy = models.load_model(tiny_models["policy"], "causal", "float32")
    torch._dynamo.reset()
    reqs = [r for r in requests(tok, "c") if not r.seq_id.split("-")[1].startswith("s")][:8]
    want = SegmentDecoder(policy, [tok.eos_token_id]).decode(reqs)
    dec = SegmentDecoder(policy, [tok.eos_token_id], static=True, compile_options={"backend": backend})
    got = dec.decode(reqs)
    assert same_segments([got], [want])


def test_the_compile_flag_reaches_the_decoder_and_tp_refuses_it(tiny_models):
    from ggro.engine import decoder, load_policy
    from ggro.modelset import ModelSet
    mcfg = ModelConfig(policy=tiny_models["policy"], reward=tiny_models["classifier"], reward_kind="classifier",
                       compile=True)
    ms = ModelSet(mcfg)
    _, dec = load_policy(mcfg, ms, 8)
    assert dec.static and dec._model_step is not dec._static_step        # the compiled form of the step
    assert not decoder(dec.model, ms, 8).static                          # eager by default
    check_tp(1, mcfg)
    with pytest.raises(ConfigError, match="--compile runs with --tp 1 only"):
        check_tp(2, mcfg)
