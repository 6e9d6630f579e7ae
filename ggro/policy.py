"""The batched segment decoder (the Policy side of the seam) with per-sequence prefix KV caches.

All refinements of a segment share one prefix x + y: its KV cache and last logits are computed once
and kept per sequence id; when a segment is accepted only its new tokens are prefilled on top.
Batches are built by left-padding the cached prefixes; padding is masked and positions are explicit,
so a sequence decodes the same tokens whatever else shares its batch.
"""
from __future__ import annotations

import math
import threading

import torch

from .kvcache import Fork, PrefixCache, Slab, eager_attention, left_pad_kv
from .seam import SegmentRequest, SegmentResult
from .step import CODE, ENT, STOP_NAMES, TOKEN, TOPK, RowState, decode_step, entropy  # noqa: F401 (entropy: re-exported)


NEAR_CUT = 1e-5    # see sample_tokens


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator,
                 head: int = 256) -> int:
    """One seeded sample from softmax(logits / temperature) restricted to the top-p nucleus (one row)."""
    return sample_tokens(logits[None], [temperature], [top_p], [gen], head)[0]


def sample_tokens(logits: torch.Tensor, temperature: list[float], top_p: list[float],
                  gens: list[torch.Generator], head: int = 256) -> list[int]:
    """One seeded sample per row of `logits` [R, V] from softmax(row / temperature) within its top-p nucleus.

    The nucleus is found among the `head` most likely tokens (widened while it does not fit), never by sorting
    the whole vocabulary; the draw is over the nucleus in vocabulary order. The pass over the whole vocabulary
    (the softmax's normalizer) and the top-k run on the logits' device, all rows at once, in float32, and only
    the [R, head] heads cross to the host: a CPU round trip of the whole vocabulary per row made best-of-4 at
    batch 16 take 69x greedy's wall on a GPU, and the same pass in float64 was 11 % of best-of-8's CPU wall. The
    head's probabilities and the draw are float64 on the CPU with each row's seeded CPU generator, so a seed gives
    the same sample on any device. The float32 normalizer is good to ~1e-6: a row whose nucleus edge lies within
    NEAR_CUT of top_p, where that could move it, is decided by its whole row's float64 softmax (`_wide_nucleus`).
    """
    x = logits.float()
    temps = torch.tensor(temperature, dtype=torch.float64)[:, None]
    top, order = x.topk(min(head, x.shape[-1]))
    exps = (x - top[:, :1]).div_(temps.to(x.device, torch.float32)).exp_()
    # log of each row's normalizer: max / T + log sum exp((x - max) / T) (torch's float32 sum is pairwise)
    norm = top[:, :1].double().cpu() / temps + exps.sum(-1, keepdim=True).double().log().cpu()
    top, order = top.cpu(), order.cpu()
    tops = torch.tensor(top_p, dtype=torch.float64)[:, None]
    probs = torch.exp(top.double() / temps - norm)
    before = probs.cumsum(-1) - probs       # the mass of the tokens more likely than each
    keep = before < tops                    # the smallest set whose mass reaches top_p
    edge = keep.sum(-1, keepdim=True).clamp(max=keep.shape[1] - 1)
    settled = (~keep[:, -1] & ((before - tops).abs() >= NEAR_CUT).all(-1)     # in the head, its edge clear of top_p
               & (probs.gather(1, edge) != probs.gather(1, (edge - 1).clamp(min=0)))[:, 0])  # and no tie across it
    out = []
    for i, (t, p, gen) in enumerate(zip(temperature, top_p, gens)):
        if p >= 1.0:
            out.append(int(torch.multinomial(torch.softmax(logits[i].double() / t, -1).cpu(), 1, generator=gen)))
            continue
        ids, w = (order[i][keep[i]], probs[i][keep[i]]) if settled[i] else \
            _wide_nucleus(x[i], logits[i], t, p, norm[i], 4 * order.shape[1])
        ids, perm = ids.sort()
        out.append(int(ids[torch.multinomial(w[perm], 1, generator=gen)]))
    return out


def _wide_nucleus(x: torch.Tensor, logits: torch.Tensor, t: float, p: float, norm: torch.Tensor,
                  k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, probabilities) of one row's nucleus where its head did not settle it: the `k` most likely tokens,
    widened while the nucleus does not fit, and the row's float64 softmax where the edge lies near top_p. Tokens
    as likely as the last one kept, on both sides of the edge, are kept lowest id first (topk orders ties
    arbitrarily; bf16 logits tie often)."""
    V, exact = x.shape[-1], None
    while True:
        vals, o = (a.cpu() for a in x.topk(min(k, V)))
        v = exact[o] if exact is not None else torch.exp(vals.double() / t - norm)
        before = v.cumsum(0) - v
        if exact is None and (before - p).abs().min() < NEAR_CUT:
            exact = torch.softmax(logits.double() / t, -1).cpu()
            continue
        keep = before < p
        if not keep[-1] or len(o) == V:
            n = int(keep.sum())
            if n == len(o) or v[n] != v[n - 1]:
                return o[keep], v[keep]
            same = v[:n] == v[n - 1]
            tied = (x == x[o[n - 1]]).nonzero()[:, 0].cpu()[:int(same.sum())]
            return torch.cat([o[:n][~same], tied]), torch.cat([v[:n][~same], v[n - 1].expand(len(tied))])
        k *= 4


def compile_options(model) -> dict:
    """torch.compile's options for a static decoder's step (`--compile`): captured as CUDA graphs on a GPU, where
    kernel launches bound a step; inductor's defaults elsewhere."""
    return {"mode": "reduce-overhead"} if next(model.parameters()).device.type == "cuda" else {}


class SegmentDecoder:
    """Decodes one segment for each request of a batch (ALGORITHM.md "One segment")."""

    def __init__(self, model, eos_ids: list[int], max_cached: int = 64, pad_id: int = 0, tokenizer=None,
                 step=decode_step, static: bool = False, compile_options: dict | None = None):
        """`static`: decode over persistent key/value slabs (kvcache.Slab) with every shape fixed for the whole
        call (a finished row stays in the batch, unread), so the model's step compiles whole; `compile_options`:
        torch.compile's, for that step (on CUDA {"mode": "reduce-overhead"} captures it as CUDA graphs, one per
        slab bucket). Same tokens as the default (compiled: up to its kernels' rounding), which allocates each
        call's cache and drops finished rows: cheaper where launches do not dominate (a CPU)."""
        self.model = model
        # decode_step, or a compiled / captured form of it (torch.compile(decode_step, fullgraph=True)):
        # eager by default, since compiling pays only where launches dominate (a GPU at small batch)
        self.step = step
        self.static = static
        self._slabs: dict[tuple[int, int], Slab] = {}
        self._slab_lock = threading.Lock()   # one call at a time uses the slabs (cohorts call from two threads)
        self._model_step = self._static_step
        if compile_options is not None:
            # one compiled step per slab bucket (rows x length): a long run meets more than dynamo's default 8
            import torch._dynamo
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self._model_step = torch.compile(self._static_step, **{"fullgraph": True, "dynamic": False,
                                                                    **compile_options})
        self.eos = set(eos_ids)
        self.tokenizer = tokenizer      # only requests with stop strings need it
        self.device = next(model.parameters()).device
        self.prefixes = PrefixCache(self._forward, self.device, max_cached, pad_id, ragged=not eager_attention(model))
        self._cancelled: set[str] = set()
        self._cancel_lock = threading.Lock()

    def cancel(self, seq_ids) -> None:
        """Drop these sequences from any decode in progress (thread-safe; checked once per step): their rows end
        with stop "cancelled" and the tokens emitted so far. They stay cancelled until `release`."""
        with self._cancel_lock:
            self._cancelled.update(seq_ids)

    def release(self, seq_ids) -> None:
        seq_ids = list(seq_ids)
        with self._cancel_lock:
            self._cancelled.difference_update(seq_ids)
        self.prefixes.release(seq_ids)

    def _cancelled_now(self) -> frozenset[str]:
        with self._cancel_lock:
            return frozenset(self._cancelled)

    def _forward(self, ids, mask, pos, cache):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        return out.past_key_values, out.logits[:, -1]

    def _stopped(self, r: SegmentRequest, emitted: list[int]) -> bool:
        """Whether the token just emitted completes one of r's stop strings (checked as text, since a string
        has many tokenizations). The window spans enough tokens for the longest string and may reach back
        into the prefix, so a string split across segments is caught; one that was already complete
        without the new token is not counted again."""
        if self.tokenizer is None:
            raise ValueError("stop strings need the policy's tokenizer: build SegmentDecoder(..., tokenizer=tok)")
        w = max(map(len, r.stop)) + 1
        tail = (r.prefix[-w:] + emitted[-w - 1:])[-w - 1:]     # O(w) a step, however long the segment
        now, before = self.tokenizer.decode(tail), self.tokenizer.decode(tail[:-1])
        return any(s in now and s not in before for s in r.stop)

    @staticmethod
    def _draw(requests, rows, gens, logits, j) -> torch.Tensor:
        """The seeded sample of each sampling row at offset j as a [len(rows)] tensor on the logits' device,
        -1 for the rest (and for a static call's finished rows, None). A row whose forced token is due draws
        nothing, so its generator does not advance."""
        draw = [i for i, b in enumerate(rows) if b is not None and requests[b].sampling is not None
                and not (requests[b].forced is not None and j == requests[b].insert_at)]
        toks = [-1] * len(rows)
        if draw:
            drawn = sample_tokens(logits[draw], [requests[rows[i]].sampling.temperature for i in draw],
                                  [requests[rows[i]].sampling.top_p for i in draw], [gens[rows[i]] for i in draw])
            for i, t in zip(draw, drawn):
                toks[i] = t
        return torch.tensor(toks, dtype=torch.long, device=logits.device)

    def _offer(self, requests, prefixes, cache, logits, P: int, j: int, forked) -> None:
        """Offer the segments that just ended to the prefix cache, as far as they were fed (all of an entropy
        stop's kept tokens; all but the last of the others): the search accepts one of each segment's refinements
        and its next request extends the prefix without a forward over it, and a reward model on this backbone
        (`PrefixCache.scores_from_forks`) scores a finished segment from its fork (`PrefixCache.peek`), running
        only its last token (and a judge's question)."""
        idx = torch.tensor([i for i, _, _ in forked], device=self.device)
        kv = [(layer.keys[idx, :, P:P + j], layer.values[idx, :, P:P + j]) for layer in cache.layers]
        for r, (i, b, toks) in enumerate(forked):
            self.prefixes.offer(requests[b].seq_id, Fork(prefixes[b], list(toks), [(k[r], v[r]) for k, v in kv],
                                                          logits[i].clone()))

    # -- static decoding (persistent slabs, fixed shapes) ----------------------------------------
    SLAB_STEP = 128      # slab lengths are multiples of this: few shapes, so few compiled or captured steps
    MAX_SLABS = 8        # buckets kept, least recently used dropped (a new slab recompiles): rows x length K/V each

    def _slab(self, rows: int, length: int) -> Slab:
        key = (rows, -(-length // self.SLAB_STEP) * self.SLAB_STEP)
        slab = self._slabs.pop(key, None) or Slab(self.model.config, *key)
        self._slabs[key] = slab
        while len(self._slabs) > self.MAX_SLABS:
            self._slabs.pop(next(iter(self._slabs)))
        return slab

    def _static_step(self, feed, mask, pos, cache) -> torch.Tensor:
        """One token per row over a slab: its column joins the mask, the model writes its keys and values there."""
        mask.index_fill_(1, cache.layers[0].cumulative_length.view(1), 1)
        out = self.model(input_ids=feed[:, None], attention_mask=mask, position_ids=pos[:, None],
                         past_key_values=cache, use_cache=True)
        return out.logits[:, -1]

    def _narrow(self, keep: list[int], rows: list, cache, tensors: list) -> tuple[list, list]:
        """The batch cut to the rows at `keep`: a static call keeps its shapes and only forgets the others."""
        if self.static:
            live = set(keep)
            return [b if i in live else None for i, b in enumerate(rows)], tensors
        sel = torch.tensor(keep, device=self.device)
        cache.batch_select_indices(sel)
        return [rows[i] for i in keep], [t[sel] for t in tensors]

    # -- decoding -------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, requests: list[SegmentRequest]) -> list[SegmentResult]:
        if not requests:
            return []
        if self.static:
            with self._slab_lock:
                return self._decode(requests)
        return self._decode(requests)

    def _decode(self, requests: list[SegmentRequest]) -> list[SegmentResult]:
        prefixes = self.prefixes.get([(r.seq_id, r.prefix) for r in requests])
        B = len(requests)
        P = max(len(p.ids) for p in prefixes)
        dev = self.device
        room = max(r.max_tokens for r in requests)
        rows = list(range(B))   # request index of each live batch row
        if self.static:         # rows in a power-of-two bucket: the extra ones hold nothing and are never read
            rows += [None] * ((1 << (B - 1).bit_length()) - B)
            cache, mask = self._slab(len(rows), P + room).load(prefixes, P)
        else:
            cache = left_pad_kv(prefixes, P, room=room)
            mask = torch.zeros(B, P, dtype=torch.long, device=dev)
            for b, p in enumerate(prefixes):
                mask[b, P - len(p.ids):] = 1
        spare = len(rows) - B
        next_pos = torch.tensor([len(p.ids) for p in prefixes] + [P] * spare, device=dev)
        logits = torch.stack([p.last for p in prefixes] + [prefixes[0].last] * spare)
        gens = [torch.Generator().manual_seed(r.sampling.seed) if r.sampling else None for r in requests]
        state = RowState.of(requests + requests[:1] * spare, dev)
        eos = torch.tensor(sorted(self.eos), dtype=torch.long, device=dev)
        no_override = torch.full((len(rows),), -1, dtype=torch.long, device=dev)
        jt = torch.zeros((), dtype=torch.long, device=dev)     # j on the device, so the step reads no host int

        emitted: list[list[int]] = [[] for _ in range(B)]
        results: list[SegmentResult | None] = [None] * B
        candidates: list[list[int] | None] = [None] * B
        j = 0
        while rows:
            gone = self._cancelled_now()
            if gone and any(b is not None and requests[b].seq_id in gone for b in rows):
                for b in rows:
                    if b is not None and requests[b].seq_id in gone:
                        results[b] = SegmentResult(emitted[b], "cancelled", math.nan, candidates[b], len(emitted[b]))
                keep = [i for i, b in enumerate(rows) if b is not None and requests[b].seq_id not in gone]
                if not keep:
                    break
                rows, (mask, next_pos, logits, state) = self._narrow(keep, rows, cache, [mask, next_pos, logits, state])
            n = len(rows)
            want = {i for i, b in enumerate(rows) if b is not None and j == requests[b].insert_at and requests[b].top_k}
            k = min(max(requests[rows[i]].top_k for i in want), logits.shape[-1]) if want else 0
            override = self._draw(requests, rows, gens, logits, j) if any(
                b is not None and requests[b].sampling is not None for b in rows) else no_override[:n]
            # the one host sync of the step: token, stop code, entropy (and the top-k ids when due) per row
            packed_dev = self.step(logits, jt, state.forced, state.insert_at, state.min_segment_tokens,
                                    state.max_tokens, state.threshold, eos, override, k)
            packed = packed_dev.tolist()
            keep, forked = [], []
            for i, b in enumerate(rows):
                if b is None:           # a static call's finished row
                    continue
                r, row = requests[b], packed[i]
                if i in want:
                    candidates[b] = [int(t) for t in row[TOPK:TOPK + min(r.top_k, k)]]
                emitted[b].append(int(row[TOKEN]))
                stop = STOP_NAMES.get(int(row[CODE]))
                if stop != "eos" and r.stop and self._stopped(r, emitted[b]):
                    stop = "stop"       # a stop string outranks the length and entropy stops
                if stop is None:
                    keep.append(i)
                    continue
                toks = emitted[b][:-1] if stop == "entropy" else emitted[b]
                results[b] = SegmentResult(toks, stop, row[ENT], candidates[b], len(emitted[b]))
                # every token but the last was fed: its keys and values are cached
                if len(emitted[b]) > 1 and (stop == "entropy" or self.prefixes.scores_from_forks):
                    forked.append((i, b, emitted[b][:-1]))
            if forked:
                self._offer(requests, prefixes, cache, logits, P, j, forked)
            if not keep:
                break
            feed = packed_dev[:, TOKEN].long()
            if len(keep) < sum(b is not None for b in rows):
                rows, (mask, next_pos, feed, state) = self._narrow(keep, rows, cache, [mask, next_pos, feed, state])
            if self.static:
                logits = self._model_step(feed, mask, next_pos, cache)
            else:
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
                out = self.model(input_ids=feed[:, None], attention_mask=mask,
                                 position_ids=next_pos[:, None], past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                logits = out.logits[:, -1]
            next_pos = next_pos + 1
            jt = jt + 1
            j += 1
        return results
