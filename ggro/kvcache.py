"""Per-sequence prefix KV caches, built and extended in batched forwards, and batch assembly.

Shared by the policy (all refinements of a segment decode from one cached x + y) and the reward
model (the RM pass over x + y runs once, without grad; only the new segment is differentiated).
A cache entry is validated by its token ids, so a stale or colliding key costs a rebuild, never a
wrong result.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .config import CALL_TOKENS


@dataclass
class Prefix:
    ids: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]   # per layer, [heads, len, head_dim]
    last: torch.Tensor | None                     # what `forward` returned for the last position


class BufferLayer(DynamicLayer):
    """A cache layer over buffers with room to grow: a decode step writes its token in place, where
    DynamicLayer would copy the whole cache (torch.cat) on every step."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, n: int):
        super().__init__()
        self.kbuf, self.vbuf, self.n = k, v, n
        self.dtype, self.device, self.is_initialized = k.dtype, k.device, True
        self._views()

    def _views(self):
        self.keys, self.values = self.kbuf[:, :, :self.n], self.vbuf[:, :, :self.n]

    def update(self, key_states, value_states, *args, **kwargs):
        q = key_states.shape[-2]
        if self.n + q > self.kbuf.shape[-2]:      # out of room: grow by doubling (rare)
            more = max(q, self.kbuf.shape[-2])
            self.kbuf = torch.cat([self.kbuf, self.kbuf.new_zeros(*self.kbuf.shape[:2], more, self.kbuf.shape[3])], 2)
            self.vbuf = torch.cat([self.vbuf, self.vbuf.new_zeros(*self.vbuf.shape[:2], more, self.vbuf.shape[3])], 2)
        self.kbuf[:, :, self.n:self.n + q] = key_states
        self.vbuf[:, :, self.n:self.n + q] = value_states
        self.n += q
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.n

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.kbuf, self.vbuf = self.kbuf[indices], self.vbuf[indices]
        self._views()


def right_align(k: torch.Tensor, v: torch.Tensor, prefixes: list[Prefix], li: int, length: int) -> None:
    """Copy each prefix's layer-`li` keys and values into its row of `k`, `v` [rows, heads, columns, dim], ending
    at column `length` (row b is prefixes[b]; columns before a prefix are left as they are)."""
    for b, p in enumerate(prefixes):
        n = len(p.ids)
        if n:
            k[b, :, length - n:length] = p.kv[li][0]
            v[b, :, length - n:length] = p.kv[li][1]


def left_pad_kv(prefixes: list[Prefix], length: int, room: int = 0) -> DynamicCache:
    """Stack per-sequence caches into one [batch, heads, length, dim] cache, right-aligned; with `room`, the
    buffers hold that many more positions so decoding appends in place (no autograd through them)."""
    layers = []
    for li in range(len(prefixes[0].kv)):
        k0, v0 = prefixes[0].kv[li]
        k = k0.new_zeros(len(prefixes), k0.shape[0], length + room, k0.shape[2])
        v = v0.new_zeros(len(prefixes), v0.shape[0], length + room, v0.shape[2])
        right_align(k, v, prefixes, li, length)
        layers.append(BufferLayer(k, v, length) if room else DynamicLayer())
        if not room:   # set directly: DynamicCache(ddp_cache_data=...) would copy each tensor once more
            layers[-1].lazy_initialization(k, v)
            layers[-1].keys, layers[-1].values = k, v
    cache = DynamicCache()
    cache.layers = layers
    return cache


class Slab:
    """One persistent key/value buffer per layer, [rows, heads, length, dim], reused by every decode call of one
    (rows, length) bucket, with its attention mask [rows, length]: a compiled or captured decode step (a CUDA
    graph) then reads and writes the same addresses every call, where `left_pad_kv` allocates a cache per call.
    Its layers are transformers' StaticLayer, whose write column is a device tensor (no host read per step);
    every step attends over all `length` columns, masked where a row has nothing."""

    def __init__(self, config, rows: int, length: int):
        from transformers import StaticCache
        self.rows, self.length = rows, length
        self.cache = StaticCache(config=config, max_cache_len=length)
        self.mask: torch.Tensor | None = None

    def load(self, prefixes: list[Prefix], length: int) -> tuple[DynamicCache, torch.Tensor]:
        """The prefixes right-aligned at column `length` (rows past len(prefixes) hold nothing): the cache and
        mask for the call. The next step writes column `length`."""
        layers = self.cache.layers
        if self.mask is None:      # shapes, dtype and device from the first prefix (all of them share them)
            for layer, (k, v) in zip(layers, prefixes[0].kv):
                layer.lazy_initialization(k.new_zeros(self.rows, k.shape[0], 1, k.shape[2]),
                                          v.new_zeros(self.rows, v.shape[0], 1, v.shape[2]))
            self.mask = torch.zeros(self.rows, self.length, dtype=torch.long, device=prefixes[0].kv[0][0].device)
            # the step writes its column in place: a CUDA graph may mutate only inputs at fixed addresses
            torch._dynamo.mark_static_address(self.mask)
        self.mask.zero_()
        for b, p in enumerate(prefixes):
            self.mask[b, length - len(p.ids):length] = 1
        for li, layer in enumerate(layers):
            right_align(layer.keys, layer.values, prefixes, li, length)
            layer.cumulative_length.fill_(length)
        return self.cache, self.mask


def call_groups(items: list, lengths: list[int], ragged: bool, call_tokens: int) -> list[list]:
    """`items` cut into forward calls, each padded to its longest length. With `ragged` False (eager attention,
    where padding may not be a query row) one call per length; else the cut of the length-sorted items that runs
    the fewest padded tokens plus `call_tokens` for each call, so one long prompt no longer pads every short one
    to its length. No group when there are none."""
    if not items:
        return []
    groups: dict[int, list] = {}
    for item, n in zip(items, lengths):
        groups.setdefault(n, []).append(item)
    if not ragged:
        return list(groups.values())
    sizes = sorted(groups)        # cut only between lengths: a call of the distinct lengths i..j-1 pads to sizes[j-1]
    rows = [0]
    for n in sizes:
        rows.append(rows[-1] + len(groups[n]))
    cost, cut = [0] + [math.inf] * len(sizes), [0] * (len(sizes) + 1)
    for j in range(1, len(sizes) + 1):
        for i in range(j):
            c = cost[i] + call_tokens + (rows[j] - rows[i]) * sizes[j - 1]
            if c < cost[j]:
                cost[j], cut[j] = c, i
    out, j = [], len(sizes)
    while j:
        out.append([item for n in sizes[cut[j]:j] for item in groups[n]])
        j = cut[j]
    return out[::-1]


def chunk_layout(past_lens: list[int], new_lens: list[int], device):
    """Mask and positions for rows laid out as [pad | past | pad | new] (every row ends at the last column).

    Left padding puts each row's last new token at the final position, so a model can keep only the
    last position's output for all rows; explicit positions make padding invisible.
    """
    P, N, B = max(past_lens), max(new_lens), len(new_lens)
    mask = torch.zeros(B, P + N, dtype=torch.long, device=device)
    pos = torch.zeros(B, N, dtype=torch.long, device=device)
    for b, (pl, nl) in enumerate(zip(past_lens, new_lens)):
        mask[b, P - pl:P] = 1
        mask[b, P + N - nl:] = 1
        pos[b, N - nl:] = torch.arange(pl, pl + nl, device=device)
    return mask, pos


# forward(input_ids [B, N], attention_mask, position_ids, past_key_values) -> (cache, last [B, ...] | None)
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache | None], tuple]


def eager_attention(model) -> bool:
    """Whether `model` runs eager attention, where a fully masked query row (left padding as a query) turns NaN
    and the NaN reaches other rows through 0 * NaN in the attention-weighted values."""
    return getattr(model.config, "_attn_implementation", None) == "eager"


@dataclass
class Fork:
    """A prefix a decoder has already run: `base` plus the tokens `new`, whose keys and values it computed while
    decoding them (per layer, [heads, len(new), head_dim]), and what `forward` would return after them."""
    base: Prefix
    new: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    last: torch.Tensor | None

    def prefix(self, n: int | None = None) -> Prefix:
        """`base` plus the first `n` new tokens (all by default); `last` only belongs to all of them."""
        n = len(self.new) if n is None else n
        return Prefix(self.base.ids + self.new[:n], [(torch.cat([k0, k[:, :n]], 1), torch.cat([v0, v[:, :n]], 1))
                                                     for (k0, v0), (k, v) in zip(self.base.kv, self.kv)],
                      self.last if n == len(self.new) else None)


class PrefixCache:
    """Per-sequence KV caches of prefixes, extended in batched forward calls. With `ragged` False (eager
    attention) a call only batches rows of one new length, so no padding is ever a query row.

    One cache may serve two callers on one backbone (the policy and a reward model on its weights: the same
    module over the same ids gives the same keys and values), from two threads (cohorts): calls take a lock,
    and an entry is never changed once returned (extending one makes a new Prefix).

    A decoder `offer`s each segment it ran (a Fork); when the search accepts one, the next request for that
    sequence finds its keys and values there instead of running the model over the segment again."""

    MAX_FORKS = 16      # per sequence: the refinements of one segment (a search asks for one of them next)
    # Set by a reward model that reads this cache (one on the policy's backbone): it scores a finished segment
    # from its fork, so decoders then offer finished segments too, not only those a search extends.
    scores_from_forks = False

    def __init__(self, forward: Forward, device, max_entries: int = 64, pad_id: int = 0, ragged: bool = True):
        self.forward, self.device, self.max_entries, self.pad_id = forward, device, max_entries, pad_id
        self.ragged = ragged
        self.call_tokens = CALL_TOKENS.get(torch.device(device).type, CALL_TOKENS["cuda"])
        self._entries: OrderedDict[str, Prefix] = OrderedDict()
        self._forks: dict[str, list[Fork]] = {}
        self._lock = threading.Lock()

    def release(self, keys) -> None:
        with self._lock:
            for k in keys:
                self._entries.pop(k, None)
                self._forks.pop(k, None)

    def offer(self, key: str, fork: Fork) -> None:
        """Keep `fork` for `key` until the key's entry next changes (the segment accepted or not)."""
        with self._lock:
            forks = self._forks.setdefault(key, [])
            forks.append(fork)
            del forks[:-self.MAX_FORKS]

    def peek(self, key: str, ids: list[int]) -> Prefix | None:
        """The keys and values of `ids` if a decoder already ran them: the entry, or any offered fork that starts
        with `ids` (cut to them). Changes nothing: the sequence's other forks stay on offer (a reward model scores
        every sample or rollout of one prompt from its own fork)."""
        with self._lock:
            have = self._entries.get(key)
            if have is not None and have.ids == ids:
                return have
            for f in self._forks.get(key, ()):
                n = len(ids) - len(f.base.ids)
                if 0 <= n <= len(f.new) and f.base.ids == ids[:len(f.base.ids)] and f.new[:n] == ids[len(f.base.ids):]:
                    return f.prefix(n)
            return None

    def get(self, keyed: list[tuple[str, list[int]]]) -> list[Prefix]:
        """The cached prefix of each (key, ids), extending or (re)building caches in one batched call."""
        with self._lock:
            return self._get(keyed)

    def _get(self, keyed: list[tuple[str, list[int]]]) -> list[Prefix]:
        todo: dict[str, tuple[Prefix | None, list[int]]] = {}
        for key, ids in keyed:
            if key in todo:
                continue
            have = self._entries.get(key)
            if have is not None and have.ids == ids:
                self._entries.move_to_end(key)
                continue
            ran = next((f for f in self._forks.pop(key, ()) if len(f.base.ids) + len(f.new) == len(ids)
                        and f.base.ids + f.new == ids), None)      # the entry changes: its forks go stale
            if ran is not None:
                self._entries[key] = ran.prefix()
                self._entries.move_to_end(key)
            elif have is not None and len(have.ids) < len(ids) and ids[:len(have.ids)] == have.ids:
                todo[key] = (have, ids[len(have.ids):])
            else:
                todo[key] = (None, list(ids))
        for keys in call_groups(list(todo), [len(todo[k][1]) for k in todo], self.ragged, self.call_tokens):
            for key, p in zip(keys, self._extend([todo[k] for k in keys])):
                self._entries[key] = p
                self._entries.move_to_end(key)
        out = [self._entries[key] for key, _ in keyed]
        while len(self._entries) > max(self.max_entries, len(todo)):
            self._forks.pop(self._entries.popitem(last=False)[0], None)
        return out

    @torch.no_grad()
    def _extend(self, items: list[tuple[Prefix | None, list[int]]]) -> list[Prefix]:
        past_lens = [len(p.ids) if p else 0 for p, _ in items]
        new_lens = [len(n) for _, n in items]
        P, N = max(past_lens), max(new_lens)
        ids = torch.full((len(items), N), self.pad_id, dtype=torch.long, device=self.device)
        for b, (_, new) in enumerate(items):
            ids[b, N - len(new):] = torch.tensor(new, device=self.device)
        mask, pos = chunk_layout(past_lens, new_lens, self.device)
        cache = None
        if P:
            empty = Prefix([], [(k[:, :0], v[:, :0]) for k, v in next(p for p, _ in items if p).kv], None)
            cache = left_pad_kv([p or empty for p, _ in items], P)
        out_cache, last = self.forward(ids, mask, pos, cache)
        kv = [(layer.keys, layer.values) for layer in out_cache.layers]
        result = []
        for b, ((prev, new), pl, nl) in enumerate(zip(items, past_lens, new_lens)):
            keep = torch.cat([torch.arange(P - pl, P), torch.arange(P + N - nl, P + N)]).to(self.device)
            result.append(Prefix((prev.ids if prev else []) + list(new),
                                 [(k[b].index_select(1, keep), v[b].index_select(1, keep)) for k, v in kv],
                                 None if last is None else last[b].clone()))
        return result
