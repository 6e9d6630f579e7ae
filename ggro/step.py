"""One decode step's token choice and stop test as a pure tensor function (ALGORITHM.md "One segment").

`decode_step` takes the step's logits and per-row tensors and returns, on the logits' device, one packed
float64 tensor per row: the emitted token, its stop code, the entropy of the distribution that produced it
and (when `k`) the top-k token ids. It has static shapes, no data-dependent control flow and no host
reads, so it compiles with `torch.compile(fullgraph=True)` and can be captured as a CUDA graph; the
decoder reads the packed tensor back in one transfer per step. Stop strings and seeded sampling need the
tokenizer and the CPU generators, so they stay on the host: a sampled token comes in as `override`, and a
stop string, which ranks between EOS and the length cap, is applied by the host over the returned code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(softmax(logits)) in nats over the last dim, in fp32 or better."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


# stop codes in the packed tensor, in precedence order (a stop string, host-side, sits between eos and length)
NONE, EOS, LENGTH, ENTROPY = 0, 1, 2, 3
STOP_NAMES = {EOS: "eos", LENGTH: "length", ENTROPY: "entropy"}
TOKEN, CODE, ENT, TOPK = 0, 1, 2, 3   # columns of the packed tensor (top-k ids from column TOPK on)


@dataclass
class RowState:
    """Per-row constants of one decode call, as device tensors of shape [B] (float64 for the threshold)."""
    forced: torch.Tensor          # long, -1: none
    insert_at: torch.Tensor       # long
    min_segment_tokens: torch.Tensor
    max_tokens: torch.Tensor
    threshold: torch.Tensor       # float64; inf: no entropy stop

    @classmethod
    def of(cls, requests, device) -> RowState:
        col = lambda xs, dt=torch.long: torch.tensor(xs, dtype=dt, device=device)
        return cls(col([-1 if r.forced is None else r.forced for r in requests]),
                   col([r.insert_at for r in requests]), col([r.min_segment_tokens for r in requests]),
                   col([r.max_tokens for r in requests]),
                   col([r.entropy_threshold for r in requests], torch.float64))

    def __getitem__(self, sel: torch.Tensor) -> RowState:
        """The rows at `sel` (an index tensor), like a tensor's."""
        return RowState(self.forced[sel], self.insert_at[sel], self.min_segment_tokens[sel],
                        self.max_tokens[sel], self.threshold[sel])


def decode_step(logits: torch.Tensor, j: torch.Tensor, forced: torch.Tensor, insert_at: torch.Tensor,
                min_segment_tokens: torch.Tensor, max_tokens: torch.Tensor, threshold: torch.Tensor,
                eos: torch.Tensor, override: torch.Tensor, k: int = 0) -> torch.Tensor:
    """The token each row emits at segment offset `j` (0-dim long tensor) and why it stops, packed as
    float64 [B, 3 + k]: token, stop code (NONE/EOS/LENGTH/ENTROPY), H(p_j), then the top-k ids of p_j.

    The token is `forced` where it is given and j == insert_at, else `override` where >= 0 (a host-sampled
    token), else argmax. Stops, first match wins: the token is in `eos` (ids [E]); j + 1 >= max_tokens;
    j + 1 >= min_segment_tokens and H >= threshold (an entropy stop: the caller drops the token).
    """
    ent = entropy(logits).double()
    force_now = (forced >= 0) & (insert_at == j)
    sampled = ~force_now & (override >= 0)
    # selects as sums of disjoint masks, not nested torch.where with scalar/tensor branches: torch 2.13's
    # inductor miscompiles those for AVX2 (wrong tokens and codes; AVX-512 and scalar builds are right)
    tok = (force_now.long() * forced + sampled.long() * override
           + (~force_now & ~sampled).long() * logits.argmax(-1))
    is_eos = (tok[:, None] == eos[None, :]).any(-1)
    # first match wins, as disjoint masks (see above)
    length = ~is_eos & (j + 1 >= max_tokens)
    high = ~is_eos & ~length & (j + 1 >= min_segment_tokens) & (ent >= threshold)
    code = is_eos.long() * EOS + length.long() * LENGTH + high.long() * ENTROPY + NONE
    cols = [tok.double()[:, None], code.double()[:, None], ent[:, None]]
    if k:
        cols.append(logits.topk(k).indices.double())
    return torch.cat(cols, dim=1)
