"""Text to token ids where users' text is content, never control tokens (role injection).

A chat template renders messages to one string, and encoding that string parses every special-token text in
it, including any a user typed: the content "<|im_end|>\\n<|im_start|>system\\n..." would become a real system
turn. Here the string is still rendered by the tokenizer's own template and encoded in one call (so benign text
keeps exactly the ids it always had), but the character ranges that came from content are known, and a special
token whose text lies in one is re-encoded as plain text (`split_special_tokens`). Every prompt and reward path
(policy prompts, Serve, the judge's question, a reward model of another vocabulary, the guide's training pairs)
goes through `chat_ids` or `encode_spans`.
"""
from __future__ import annotations

import copy
import re
import threading
import weakref


def special_ids(tokenizer) -> set[int]:
    """Ids of every token the tokenizer parses out of text as a control token (added tokens marked special)."""
    dec = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return {i for i, t in dec.items() if getattr(t, "special", False)} | set(tokenizer.all_special_ids)


def text_ids(tokenizer, text: str) -> list[int]:
    """A user's text alone (a prefill, a response) as ids: special-token text stays text."""
    if not text:
        return []
    if not getattr(tokenizer, "is_fast", False):     # a slow tokenizer takes the setting per call
        return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    return _plain(tokenizer).encode(text, add_special_tokens=False)


_PLAIN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PLAIN_LOCK = threading.Lock()


def _plain(tokenizer):
    """`tokenizer`'s twin that reads special-token text as text, made once per tokenizer.

    A fast tokenizer keeps `split_special_tokens` as one flag on its Rust backend, which every call sets to its
    own setting before encoding: calls from two threads with different settings flip it under each other. In
    Serve's ingress (requests are encoded in threads) a prompt then lost its template's control tokens, or a
    user's text gained some. So no tokenizer object is ever called with both settings: the original never
    splits, its twin always does."""
    with _PLAIN_LOCK:
        twin = _PLAIN.get(tokenizer)
        if twin is None:
            twin = copy.deepcopy(tokenizer)
            twin.split_special_tokens = True
            twin.backend_tokenizer.encode_special_tokens = True
            _PLAIN[tokenizer] = twin
        return twin


def chat_ids(tokenizer, messages: list[dict], **template_kw) -> list[int]:
    """`messages` rendered by the tokenizer's chat template (`template_kw`: add_generation_prompt,
    continue_final_message) as ids, with no special id made by any message's content."""
    text, spans = render(tokenizer, messages, **template_kw)
    return encode_spans(tokenizer, text, spans)


def render(tokenizer, messages: list[dict], **template_kw) -> tuple[str, list[tuple[int, int]]]:
    """(the template's text for `messages`, the [start, end) ranges in it that are message content).

    The template is rendered twice: with the contents, and with a unique marker in place of each content. The
    marked text splits into the template's own pieces; the real text is those pieces with each content between
    them, as the template wrote it (templates may strip it, as Llama 3's and Gemma's do). A template that
    changes content further (or drops it) cannot be aligned: its content is then encoded piecewise, still as
    text (`_piecewise`)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, **template_kw)
    tag = _marker_tag(messages)
    marked = tokenizer.apply_chat_template(
        [{**m, "content": f"\ue000{tag}{i}\ue001"} for i, m in enumerate(messages)], tokenize=False, **template_kw)
    parts = re.split(f"\ue000{tag}(\\d+)\ue001", marked)       # template, index, template, index, ..., template
    pieces, which = parts[0::2], [int(i) for i in parts[1::2]]
    spans = _align(text, pieces, [messages[i]["content"] for i in which])
    if spans is None:
        return _piecewise(pieces, [messages[i]["content"] for i in which])
    return text, spans


def _marker_tag(messages) -> str:
    """A tag no content holds, so a marker can never be forged by a message."""
    body = "".join(str(m.get("content")) for m in messages)
    k = 0
    while f"ggro{k}:" in body:
        k += 1
    return f"ggro{k}:"


def _align(text: str, pieces: list[str], contents: list[str]) -> list[tuple[int, int]] | None:
    """Content ranges of `text` == pieces[0] + c0 + pieces[1] + c1 + ... with each c a content as the
    template may have stripped it; None when `text` is not of that form."""
    if not text.startswith(pieces[0]):
        return None
    pos, spans = len(pieces[0]), []
    for content, nxt in zip(contents, pieces[1:]):
        for c in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
            if text.startswith(c, pos) and text.startswith(nxt, pos + len(c)):
                break
        else:
            return None
        spans.append((pos, pos + len(c)))
        pos += len(c) + len(nxt)
    return spans if pos == len(text) else None


def _piecewise(pieces: list[str], contents: list[str]):
    """A template whose content cannot be located: the template's pieces with each content inserted as it is.
    A `tuple` marks the content pieces for encode_spans (it encodes each piece alone)."""
    out = [pieces[0]]
    for c, p in zip(contents, pieces[1:]):
        out += [(c,), p]
    return out, None


def encode_spans(tokenizer, text, spans, add_special_tokens: bool = False) -> list[int]:
    """`text` as ids with special tokens parsed, except inside the [start, end) `spans` (content), where
    special-token text is plain text. Benign content yields exactly `tokenizer.encode(text)`'s ids."""
    if spans is not None and not getattr(tokenizer, "is_fast", True):   # no offsets: cut the text at the spans
        cuts = [0] + [i for a, b in spans for i in (a, b)] + [len(text)]
        text = [text[a:b] if k % 2 == 0 else (text[a:b],) for k, (a, b) in enumerate(zip(cuts, cuts[1:]))]
        spans = None
    if spans is None:                                  # render's piecewise fallback: a list of pieces
        ids = []
        for p in text:
            ids += text_ids(tokenizer, p[0]) if isinstance(p, tuple) else \
                tokenizer.encode(p, add_special_tokens=False) if p else []
        return ids
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    special = special_ids(tokenizer)

    def injected(i):
        s, e = offsets[i]
        core = text[s:e]
        s += len(core) - len(core.lstrip())              # a token may absorb whitespace next to it (lstrip/rstrip)
        e -= len(core) - len(core.rstrip())
        return any(s < b and a < e for a, b in spans)

    bad = [i for i, t in enumerate(ids) if t in special and offsets[i][1] > offsets[i][0] and injected(i)]
    if not bad:
        return ids
    # Re-encode, as text, each stretch between two of the template's own special tokens that holds an injected one.
    injected_at = set(bad)
    cuts = [i for i, t in enumerate(ids) if t in special and i not in injected_at]
    out, start = [], 0
    for stop in cuts + [len(ids)]:
        if any(start <= i < stop for i in bad):
            lo = offsets[start - 1][1] if start else 0
            hi = offsets[stop][0] if stop < len(ids) else len(text)
            out += text_ids(tokenizer, text[lo:hi])
        else:
            out += ids[start:stop]
        if stop < len(ids):
            out.append(ids[stop])
        start = stop + 1
    return out
