"""The decode step as a pure tensor function (ggro/step.py).

- against a per-row transcription of ALGORITHM.md "One segment" on hand-built rows (every stop kind, their
  precedence, the min_segment_tokens gate, a forced token, a sampled override) and on random ones;
- `torch.compile(..., fullgraph=True)` on CPU builds it without graph breaks and gives eager's outputs;
- (gpu) captured as a CUDA graph and replayed on new inputs, it gives eager's outputs.
"""
from __future__ import annotations

import math

import pytest
import torch

from ggro import models
from ggro.policy import SegmentDecoder
from ggro.seam import Sampling, SegmentRequest
from ggro.step import (
    CODE,
    ENT,
    ENTROPY,
    EOS,
    LENGTH,
    NONE,
    TOKEN,
    TOPK,
    decode_step,
    entropy,
)

V, EOS_IDS = 8, [7, 6]


def reference(logits, j, forced, insert_at, min_seg, max_tokens, thr, override, k):
    """ALGORITHM.md "One segment", one row at a time in plain Python."""
    out = []
    for b in range(logits.shape[0]):
        row = logits[b]
        if forced[b] >= 0 and j == insert_at[b]:
            tok = forced[b]
        elif override[b] >= 0:
            tok = override[b]
        else:
            tok = int(row.argmax())
        h = float(entropy(row).double())
        if tok in EOS_IDS:
            code = EOS
        elif j + 1 >= max_tokens[b]:
            code = LENGTH
        elif j + 1 >= min_seg[b] and h >= thr[b]:
            code = ENTROPY
        else:
            code = NONE
        out.append((tok, code, h, [int(t) for t in row.topk(k).indices] if k else []))
    return out


def args(logits, j, forced, insert_at, min_seg, max_tokens, thr, override):
    """decode_step's positional tensors for these per-row lists."""
    col = lambda xs: torch.tensor(xs, dtype=torch.long)
    return (logits, torch.tensor(j), col(forced), col(insert_at), col(min_seg), col(max_tokens),
            torch.tensor(thr, dtype=torch.float64), torch.tensor(EOS_IDS), col(override))


def unpack(packed: torch.Tensor, k: int):
    return [(int(r[TOKEN]), int(r[CODE]), r[ENT], [int(t) for t in r[TOPK:TOPK + k]]) for r in packed.tolist()]


def peaked(tok: int) -> list[float]:
    return [10.0 if v == tok else 0.0 for v in range(V)]


FLAT = [0.0] * V      # H = ln 8 ~ 2.08 nats
# (logits, forced, insert_at, min_seg, max_tokens, threshold, override) -> expected (token, code), at j = 2
CASES = [
    (peaked(2), -1, 0, 1, 10, 1.0, -1, (2, NONE)),        # confident, far from the cap
    (peaked(7), -1, 0, 1, 3, 0.0, -1, (7, EOS)),          # eos outranks length and entropy
    (FLAT, -1, 0, 1, 3, 0.0, -1, (0, LENGTH)),            # length outranks entropy (j + 1 == max_tokens)
    (FLAT, -1, 0, 3, 10, 1.0, -1, (0, ENTROPY)),          # j + 1 == min_seg: the entropy stop applies
    (FLAT, -1, 0, 4, 10, 1.0, -1, (0, NONE)),             # j + 1 < min_seg: it does not
    (FLAT, -1, 0, 1, 10, math.inf, -1, (0, NONE)),        # inf threshold: plain decoding
    (peaked(2), 5, 2, 1, 10, 1.0, -1, (5, NONE)),         # the forced token at insert_at
    (peaked(2), 5, 1, 1, 10, 1.0, -1, (2, NONE)),         # ... and not elsewhere
    (peaked(2), 6, 2, 1, 10, 1.0, 3, (6, EOS)),           # forced outranks a sampled token; a forced eos stops
    (peaked(2), -1, 0, 1, 10, 1.0, 6, (6, EOS)),          # a sampled eos stops
    (FLAT, 4, 2, 1, 10, 1.0, -1, (4, ENTROPY)),           # H is the base distribution's, even when forced
]


def case_args(j=2):
    cols = list(zip(*CASES))
    return args(torch.tensor(cols[0]), j, *cols[1:7])


def random_args(gen, B=16, j=3):
    logits = torch.randn(B, V, generator=gen) * torch.rand(B, 1, generator=gen) * 6
    ri = lambda lo, hi: torch.randint(lo, hi, (B,), generator=gen).tolist()
    h = entropy(logits).double()
    thr = (h + torch.where(torch.rand(B, generator=gen) < 0.5, -0.1, 0.1)).tolist()   # never at the boundary
    forced = [f if f >= 0 else -1 for f in ri(-V, V)]
    override = [o if o >= 0 else -1 for o in ri(-V, V)]
    return args(logits, j, forced, ri(0, 6), ri(1, 6), ri(1, 8), thr, override)


def lists(a):
    return [a[0], int(a[1])] + [t.tolist() for t in a[2:7]] + [a[8].tolist()]


def test_step_follows_the_algorithm_on_every_stop_kind():
    a = case_args()
    got = unpack(decode_step(*a, k=3), 3)
    assert [(t, c) for t, c, _, _ in got] == [c[-1] for c in CASES]
    assert got == [(t, c, h, top) for t, c, h, top in reference(*lists(a), 3)]
    assert {c for _, c, _, _ in got} == {NONE, EOS, LENGTH, ENTROPY}


def test_step_matches_the_reference_on_random_rows():
    gen = torch.Generator().manual_seed(0)
    for j in range(6):
        a = random_args(gen, j=j)
        for k in (0, 4):
            assert unpack(decode_step(*a, k=k), k) == [tuple(r) for r in reference(*lists(a), k)]


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_step_compiles_fullgraph_on_cpu_and_matches_eager(backend):
    """aot_eager traces the whole step (fullgraph: any graph break is an error) in a second; inductor also
    generates and builds the C++ kernels, about a minute on 2 busy cores, so it is `slow`. One batch size and
    one k per graph: j, the rows and the thresholds are tensors, so new values reuse the compiled graph."""
    torch._dynamo.reset()
    step = torch.compile(decode_step, fullgraph=True, dynamic=False, backend=backend)
    gen = torch.Generator().manual_seed(1)
    B = len(CASES)
    for a in [case_args(), case_args(j=0), random_args(gen, B=B, j=1), random_args(gen, B=B, j=4)]:
        for k in (0, 3) if backend == "aot_eager" else (3,):     # k is static: one graph per k
            want, got = decode_step(*a, k=k), step(*a, k=k)
            assert torch.equal(got[:, [TOKEN, CODE]], want[:, [TOKEN, CODE]])
            assert torch.equal(got[:, TOPK:], want[:, TOPK:])
            torch.testing.assert_close(got[:, ENT], want[:, ENT], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_step_replays_as_a_cuda_graph_like_eager():
    """Capture once on static input buffers, then copy new rows in and replay: the CUDA-graph path of
    issue 21 (one launch per step). Warm-up runs on a side stream first, as torch.cuda.graphs requires."""
    gen = torch.Generator().manual_seed(2)
    cuda = lambda a: tuple(t.cuda() for t in a)
    batches = [cuda(random_args(gen, B=len(CASES), j=j)) for j in range(4)] + [cuda(case_args())]
    static = tuple(t.clone() for t in batches[0])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            decode_step(*static, k=3)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_step(*static, k=3)
    for a in batches:
        for buf, t in zip(static, a):
            buf.copy_(t)
        graph.replay()
        torch.cuda.synchronize()
        want = decode_step(*a, k=3)
        assert torch.equal(out[:, [TOKEN, CODE]], want[:, [TOKEN, CODE]])
        assert torch.equal(out[:, TOPK:], want[:, TOPK:])
        torch.testing.assert_close(out[:, ENT], want[:, ENT])


def test_decoder_with_a_compiled_step_decodes_the_same(tiny_models):
    """SegmentDecoder(step=...) runs the compiled step (rows leave mid-call, so the batch size varies:
    dynamic shapes) and returns what the eager step returns: greedy, forced, entropy stops, top-k, sampling."""
    tok = models.load_tokenizer(tiny_models["policy"])
    policy = models.load_model(tiny_models["policy"], "causal", "float64")
    ids = [tok.encode(t, add_special_tokens=False) for t in ["how do you make water ?", "a", "I like people"]]
    reqs = [SegmentRequest("g", ids[0], 6, top_k=3), SegmentRequest("f", ids[1], 5, forced=ids[0][0], insert_at=1),
            SegmentRequest("e", ids[2], 8, entropy_threshold=0.0, min_segment_tokens=2, top_k=2),
            SegmentRequest("s", ids[0], 4, sampling=Sampling(temperature=1.0, top_p=0.9, seed=3))]
    torch._dynamo.reset()
    compiled = torch.compile(decode_step, fullgraph=True, dynamic=True, backend="aot_eager")
    want = SegmentDecoder(policy, [tok.eos_token_id]).decode(reqs)
    got = SegmentDecoder(policy, [tok.eos_token_id], step=compiled).decode(reqs)
    assert [r.stop for r in want] == ["eos", "length", "entropy", "eos"]     # rows leave at offsets 1, 3 and 4
    assert want[1].tokens[1] == ids[0][0]
    assert got == want
