"""Digests of ids and of what rows ask, 16 bytes each ('S16' numpy arrays), and lookups in sorted ones: how the
driver knows a prompt set and an output folder row by row without holding their text (docs/streaming.md)."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa


def id_digests(ids, chunk: int = 1 << 16) -> np.ndarray:
    """16-byte digests of ids (a list or pyarrow array of str), as a numpy 'S16' array: 16 B per id,
    whatever the id's length, with no practical chance of two ids colliding. Arrow arrays are hashed a
    chunk at a time, so no Python object per id outlives its chunk."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    n = len(ids)
    out = np.empty(n, dtype="S16")
    for s in range(0, n, chunk):
        part = ids.slice(s, chunk).to_pylist() if isinstance(ids, pa.Array) else ids[s:s + chunk]
        out[s:s + len(part)] = [hashlib.blake2b(i.encode(), digest_size=16).digest() for i in part]
    return out


NO_DIGEST = b"\0" * 16     # an error row's content: never compared (--retry-errors decides what becomes of it)


def asked(messages, prefill) -> str:
    """What a row asks, as one text: its chat messages (role and content) and its prefill (none = ""). Two rows of
    one id answer the same question when these are equal (resume, dpo's join, report)."""
    return json.dumps([[(x["role"], x["content"]) for x in messages or ()], prefill or ""], ensure_ascii=False)


def content_digests(messages, prefills) -> np.ndarray:
    """16-byte digests of what each row asks (`asked`), as id_digests' 'S16' array: an id that is resumed must
    still ask what its written row answered."""
    out = np.empty(len(messages), dtype="S16")
    for i, (m, p) in enumerate(zip(messages, prefills)):
        out[i] = hashlib.blake2b(asked(m, p).encode(), digest_size=16).digest()
    return out


def lookup(sorted_digests: np.ndarray, digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position in `sorted_digests` (sorted, as from np.sort), found) of each of `digests`."""
    if len(sorted_digests) == 0 or len(digests) == 0:
        return np.zeros(len(digests), dtype=np.int64), np.zeros(len(digests), dtype=bool)
    i = np.searchsorted(sorted_digests, digests).clip(0, len(sorted_digests) - 1)
    return i, sorted_digests[i] == digests


def contains(sorted_digests: np.ndarray, digests: np.ndarray) -> np.ndarray:
    """Boolean mask: which of `digests` are in `sorted_digests` (sorted, as from np.sort)."""
    return lookup(sorted_digests, digests)[1]
