"""The batched segment decoder (the Policy side of the seam) with per-sequence prefix KV caches.

All refinements of a segment share one prefix x + y: its KV cache and last logits are computed once
and kept per sequence id; when a segment is accepted only its new tokens are prefilled on top.
Batches are built by left-padding the cached prefixes; padding is masked and positions are explicit,
so a sequence decodes the same tokens whatever else shares its batch.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .seam import SegmentRequest, SegmentResult


@dataclass
class _Prefix:
    ids: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]   # per layer, [heads, len, head_dim]
    last_logits: torch.Tensor                     # next-token logits after `ids`, [vocab]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(softmax(logits)) in nats over the last dim, in fp32 or better."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    # On the CPU whatever the model's device: the seeded CPU generator then gives the same sample on any
    # device (a CUDA tensor with a CPU generator is an error in torch.multinomial).
    probs = torch.softmax(logits.double().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p   # smallest set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


def _left_pad_kv(prefixes: list[_Prefix], length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Stack per-sequence caches into [batch, heads, length, dim], right-aligned."""
    layers = []
    for li in range(len(prefixes[0].kv)):
        k0, v0 = prefixes[0].kv[li]
        k = k0.new_zeros(len(prefixes), k0.shape[0], length, k0.shape[2])
        v = v0.new_zeros(len(prefixes), v0.shape[0], length, v0.shape[2])
        for b, p in enumerate(prefixes):
            n = len(p.ids)
            k[b, :, length - n:] = p.kv[li][0]
            v[b, :, length - n:] = p.kv[li][1]
        layers.append((k, v))
    return layers


class SegmentDecoder:
    """Decodes one segment for each request of a batch (ALGORITHM.md "One segment")."""

    def __init__(self, model, eos_ids: list[int], max_cached: int = 64, pad_id: int = 0):
        self.model = model
        self.eos = set(eos_ids)
        self.max_cached = max_cached
        self.pad_id = pad_id
        self.device = next(model.parameters()).device
        self._cache: OrderedDict[str, _Prefix] = OrderedDict()

    # -- prefix cache ---------------------------------------------------------------------------
    def release(self, seq_ids) -> None:
        for s in seq_ids:
            self._cache.pop(s, None)

    def _prefixes(self, requests: list[SegmentRequest]) -> list[_Prefix]:
        """The cached prefix of every request, extending or (re)building caches in one batched call."""
        todo: dict[str, tuple[_Prefix | None, list[int]]] = {}
        for r in requests:
            if r.seq_id in todo:
                continue
            have = self._cache.get(r.seq_id)
            if have is not None and have.ids == r.prefix:
                self._cache.move_to_end(r.seq_id)
            elif have is not None and len(have.ids) < len(r.prefix) and r.prefix[:len(have.ids)] == have.ids:
                todo[r.seq_id] = (have, r.prefix[len(have.ids):])
            else:
                todo[r.seq_id] = (None, list(r.prefix))
        if todo:
            for seq_id, p in zip(todo, self._extend(list(todo.values()))):
                self._cache[seq_id] = p
                self._cache.move_to_end(seq_id)
        out = [self._cache[r.seq_id] for r in requests]
        while len(self._cache) > max(self.max_cached, len(todo)):
            self._cache.popitem(last=False)
        return out

    def _extend(self, items: list[tuple[_Prefix | None, list[int]]]) -> list[_Prefix]:
        """Prefill `new` tokens on top of each cached prefix (or from scratch), all in one forward.

        Layout per row: [pad | cached prefix | pad | new tokens]; left padding puts every row's last
        new token at the final position, so logits_to_keep=1 gives exactly the logits we need.
        """
        past_lens = [len(p.ids) if p else 0 for p, _ in items]
        new_lens = [len(n) for _, n in items]
        P, N, B = max(past_lens), max(new_lens), len(items)
        dev = self.device
        ids = torch.full((B, N), self.pad_id, dtype=torch.long, device=dev)
        mask = torch.zeros(B, P + N, dtype=torch.long, device=dev)
        pos = torch.zeros(B, N, dtype=torch.long, device=dev)
        for b, ((_, new), pl, nl) in enumerate(zip(items, past_lens, new_lens)):
            ids[b, N - nl:] = torch.tensor(new, device=dev)
            mask[b, P - pl:P] = 1
            mask[b, P + N - nl:] = 1
            pos[b, N - nl:] = torch.arange(pl, pl + nl, device=dev)
        cache = None
        if P:
            template = next(p for p, _ in items if p)
            blank = _Prefix([], [(k[:, :0], v[:, :0]) for k, v in template.kv], template.last_logits)
            cache = DynamicCache(ddp_cache_data=_left_pad_kv([p or blank for p, _ in items], P))
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        result = []
        for b, ((prev, new), pl, nl) in enumerate(zip(items, past_lens, new_lens)):
            keep = torch.cat([torch.arange(P - pl, P), torch.arange(P + N - nl, P + N)]).to(dev)
            result.append(_Prefix((prev.ids if prev else []) + list(new),
                                  [(k[b].index_select(1, keep), v[b].index_select(1, keep)) for k, v in kv],
                                  out.logits[b, -1].clone()))
        return result

    # -- decoding -------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, requests: list[SegmentRequest]) -> list[SegmentResult]:
        if not requests:
            return []
        prefixes = self._prefixes(requests)
        B = len(requests)
        P = max(len(p.ids) for p in prefixes)
        dev = self.device
        cache = DynamicCache(ddp_cache_data=_left_pad_kv(prefixes, P))
        mask = torch.zeros(B, P, dtype=torch.long, device=dev)
        for b, p in enumerate(prefixes):
            mask[b, P - len(p.ids):] = 1
        next_pos = torch.tensor([len(p.ids) for p in prefixes], device=dev)
        logits = torch.stack([p.last_logits for p in prefixes])
        gens = [torch.Generator().manual_seed(r.sampling.seed) if r.sampling else None for r in requests]

        emitted: list[list[int]] = [[] for _ in range(B)]
        results: list[SegmentResult | None] = [None] * B
        candidates: list[list[int] | None] = [None] * B
        rows = list(range(B))   # request index of each live batch row
        j = 0
        while rows:
            ent = entropy(logits).tolist()
            greedy = logits.argmax(-1).tolist()
            keep, feed = [], []
            for i, b in enumerate(rows):
                r = requests[b]
                if j == r.insert_at and r.top_k:
                    candidates[b] = logits[i].topk(min(r.top_k, logits.shape[-1])).indices.tolist()
                if r.forced is not None and j == r.insert_at:
                    tok = r.forced
                elif r.sampling is not None:
                    tok = sample_token(logits[i], r.sampling.temperature, r.sampling.top_p, gens[b])
                else:
                    tok = greedy[i]
                emitted[b].append(tok)
                stop = None
                if tok in self.eos:
                    stop = "eos"
                elif j + 1 >= r.max_tokens:
                    stop = "length"
                elif j + 1 >= r.min_segment_tokens and ent[i] >= r.entropy_threshold:
                    stop = "entropy"
                if stop is None:
                    keep.append(i)
                    feed.append(tok)
                    continue
                toks = emitted[b][:-1] if stop == "entropy" else emitted[b]
                results[b] = SegmentResult(toks, stop, ent[i], candidates[b], len(emitted[b]))
            if not keep:
                break
            if len(keep) < len(rows):
                sel = torch.tensor(keep, device=dev)
                cache.batch_select_indices(sel)
                mask, next_pos = mask[sel], next_pos[sel]
                rows = [rows[i] for i in keep]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            out = self.model(input_ids=torch.tensor(feed, device=dev)[:, None], attention_mask=mask,
                             position_ids=next_pos[:, None], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1]
            next_pos = next_pos + 1
            j += 1
        return results
