"""GGRO's decisions made visible: one self-contained HTML page (no scripts, no external assets) per run.

For every prompt it shows each method's response side by side, the baseline (greedy) first. A GGRO
response with a trace (`--trace`: the output's `trace` column, written by the search: ggro/faithful.py,
ggro/lookahead.py) is split into its segments; each segment after the first starts at an uncertain token,
marked with the entropy that ended the previous segment, and a table lists the continuations tried there
(greedy and each nudge, with their rewards), the accepted one highlighted.

Every piece of text (prompts, responses, tokens, labels) is user content and is HTML-escaped; the page
carries no script and no link, so a hostile response can neither run code nor load anything.
"""
from __future__ import annotations

import json
from html import escape
from pathlib import Path

from pipeline.eval.metrics import refusal_phrase

ACCEPTED = "#39d353"        # the accepted continuation (tests look for this colour in a screenshot)
NUDGED = "#c6f6d5"          # a segment whose accepted continuation came from a nudge
UNCERTAIN = "#ffb020"       # the uncertain token that starts a segment

CSS = f"""
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 16px; color: #1d1d1f; background: #fff; }}
h1 {{ font-size: 20px; }} h2 {{ font-size: 16px; margin: 0 0 6px; }}
.row {{ border: 1px solid #ccc; border-radius: 6px; padding: 10px; margin: 14px 0; }}
.prompt {{ white-space: pre-wrap; background: #f3f3f3; padding: 6px; border-radius: 4px; }}
.prefill {{ color: #a00; }}
.cols {{ display: flex; gap: 12px; flex-wrap: wrap; }}
.col {{ flex: 1 1 440px; min-width: 300px; border-top: 3px solid #888; padding-top: 4px; overflow-x: auto; }}
.col.base {{ border-top-color: #4a7bd0; }}
.response {{ white-space: pre-wrap; }}
.seg {{ border-bottom: 2px solid #bbb; }}
.seg.nudged {{ background: {NUDGED}; }}
mark.uncertain {{ background: {UNCERTAIN}; }}
sup.h {{ color: #8a5a00; font-size: 10px; }}
table.tried {{ border-collapse: collapse; margin: 6px 0; font-size: 12px; }}
table.tried td, table.tried th {{ border: 1px solid #ddd; padding: 2px 6px; text-align: left; }}
tr.first td {{ border-top: 2px solid #777; }}
tr.accepted td {{ background: {ACCEPTED}; font-weight: bold; }}
.meta {{ color: #555; font-size: 12px; }}
"""


def _tokens(tokenizer, text: str) -> list[int] | None:
    if tokenizer is None or not text:
        return None
    from ggro.chat import text_ids
    return text_ids(tokenizer, text)   # the response as text, the same ids the search read


def _token_text(tokenizer, tok_id) -> str:
    if tok_id is None:
        return "greedy"
    if tokenizer is None:
        return f"token #{tok_id}"
    return repr(tokenizer.decode([tok_id]))


def segments(rec: dict, tokenizer) -> list[str]:
    """The response cut at its segment boundaries (token offsets, re-read by encoding the response: a
    tokenizer that does not round-trip its text shifts them slightly); one piece without a tokenizer."""
    text = rec.get("response") or ""
    ids = _tokens(tokenizer, text)
    bounds = rec.get("segment_boundaries") or []
    if ids is None or not bounds:
        return [text]
    out, start = [], 0
    for end in list(bounds[:-1]) + [len(ids)]:
        out.append(tokenizer.decode(ids[start:end], skip_special_tokens=True))
        start = end
    return out


def _trace(rec: dict) -> list[dict]:
    t = rec.get("trace")
    if not t:
        return []
    try:
        data = json.loads(t) if isinstance(t, str) else t
    except ValueError:
        return []
    return data if isinstance(data, list) else []


def _offset(rec: dict, trace: list) -> int:
    """Which segment trace entry 0 decides: 0 when every segment has its entry (faithful, adaptive, parallel:
    entry k holds segment k's refinements), 1 for lookahead (its greedy run up to the first uncertain token
    has none; entry k holds the rollouts from the token that starts segment k + 1)."""
    return max(0, (rec.get("num_segments") or len(trace)) - len(trace))


def _response_html(rec: dict, tokenizer) -> str:
    if rec.get("error"):
        return f'<div class="response error">error: {escape(str(rec["error"]))}</div>'
    trace = _trace(rec)
    pieces = segments(rec, tokenizer) if trace else [rec.get("response") or ""]
    off = _offset(rec, trace)
    parts = []
    for k, piece in enumerate(pieces):
        step = trace[k - off] if 0 <= k - off < len(trace) else {}
        cls = "seg nudged" if step.get("accepted") else "seg"
        body = escape(piece)
        if k > 0 and piece and trace:
            h = _entropy_before(trace, k - off - 1)
            lead = _lead(piece, tokenizer)
            h_txt = f"H={h:.2f}" if h is not None else ""
            body = (f'<mark class="uncertain" title="uncertain token{escape(", entropy " + h_txt + " nats" if h_txt else "")}">'
                    f'{escape(lead)}</mark><sup class="h">{escape(h_txt)}</sup>{escape(piece[len(lead):])}')
        parts.append(f'<span class="{cls}" data-segment="{k}">{body}</span>')
    return f'<div class="response">{"".join(parts)}</div>'


def _entropy_before(trace: list, j: int) -> float | None:
    """The entropy that ended the segment of trace entry j (its accepted continuation's), if it ended so."""
    if not 0 <= j < len(trace):
        return None
    tried, acc = trace[j].get("tried") or [], trace[j].get("accepted") or 0
    t = tried[acc] if acc < len(tried) else {}
    h = t.get("stop_entropy")
    return h if t.get("stop") == "entropy" and isinstance(h, (int, float)) else None


def _lead(piece: str, tokenizer) -> str:
    """The segment's first token as text (the uncertain token), or its first word without a tokenizer."""
    ids = _tokens(tokenizer, piece)
    if ids:
        lead = tokenizer.decode(ids[:1], skip_special_tokens=True)
        if piece.startswith(lead) and lead:
            return lead
    word = piece.split(" ", 2)
    return (" " + word[1]) if piece.startswith(" ") and len(word) > 1 else word[0]


def _decisions_html(rec: dict, tokenizer) -> str:
    trace = _trace(rec)
    if not trace:
        return ""
    off = _offset(rec, trace)
    out = ['<table class="tried"><tr><th>segment</th><th>ended by</th><th>entropy (nats)</th>'
           '<th>continuation tried</th><th>reward</th><th>tokens</th></tr>']
    for k, step in enumerate(trace):
        tried = step.get("tried") or []
        for j, t in enumerate(tried):
            acc = j == step.get("accepted")
            h = t.get("stop_entropy")
            cells = [str(k + off), str(t.get("stop", "")),
                     f"{h:.2f}" if isinstance(h, (int, float)) and t.get("stop") == "entropy" else "",
                     ("nudge " if t.get("nudge") is not None else "") + _token_text(tokenizer, t.get("nudge"))
                     + (" (accepted)" if acc else ""),
                     f"{t['reward']:.3f}" if isinstance(t.get("reward"), (int, float)) else "",
                     str(t.get("tokens", ""))]
            out.append(f'<tr class="{"accepted" if acc else "option"}{" first" if j == 0 else ""}">'
                       + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _column(label: str, rec: dict | None, tokenizer, base: bool) -> str:
    if rec is None:
        return f'<div class="col"><h2>{escape(label)}</h2><div class="meta">no row</div></div>'
    reward = rec.get("reward")
    meta = (f"reward {reward:.3f}" if isinstance(reward, (int, float)) else "no reward") + \
        f" · nudges {rec.get('num_nudges') or 0} · segments {rec.get('num_segments') or 0}"
    phrase = refusal_phrase(rec.get("response"))
    if phrase:      # what the keyword rule counted as a refusal, so a reader can check it
        meta += f" · refusal by the rule: \u201c{phrase}\u201d"
    return (f'<div class="col{" base" if base else ""}" data-method="{escape(label)}"><h2>{escape(label)}</h2>'
            f'<div class="meta">{escape(meta)}</div>{_response_html(rec, tokenizer)}'
            f'{_decisions_html(rec, tokenizer)}</div>')


def page(title: str, methods: list[tuple[str, list[dict]]], tokenizer=None, notes: str = "") -> str:
    """The page: `methods` is [(label, records)], the baseline first; rows are matched by id."""
    by_method = [(label, {r["id"]: r for r in recs}) for label, recs in methods]
    ids = list(dict.fromkeys(r["id"] for _, recs in methods for r in recs))
    body = [f"<h1>{escape(title)}</h1>",
            f'<p class="meta">{escape(notes)}</p>' if notes else "",
            '<p class="meta">Segments are underlined; a segment on a <span style="background:'
            f'{NUDGED}">green ground</span> kept a nudge. <mark class="uncertain">Marked</mark> tokens are the '
            'uncertain ones that start a segment, with the entropy that ended the previous one. In each table '
            'the accepted continuation is highlighted.</p>']
    for rid in ids:
        first = next(m[rid] for _, m in by_method if rid in m)
        prefill = next((m[rid]["prefill"] for _, m in by_method if rid in m and m[rid].get("prefill")), "")
        cols = "".join(_column(label, m.get(rid), tokenizer, i == 0) for i, (label, m) in enumerate(by_method))
        body.append(f'<section class="row" id="{escape(str(rid))}"><div class="meta">{escape(str(rid))}</div>'
                    f'<div class="prompt">{escape(first.get("prompt") or "")}'
                    + (f'<br><span class="prefill">prefill: {escape(prefill)}</span>' if prefill else "")
                    + f'</div><div class="cols">{cols}</div></section>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")


def write_page(path: Path, title: str, methods: list[tuple[str, list[dict]]], tokenizer=None, notes: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page(title, methods, tokenizer, notes), encoding="utf-8")
    return path


def load_tokenizer_for(records: list[dict]):
    """The policy's tokenizer named by the rows (their `policy` column), from disk or the local Hugging Face
    cache only (a report never downloads), or None when it is not here: the page then shows each response
    whole and nudges by token id."""
    import os
    specs = {r.get("policy") for r in records if r.get("policy")}
    if len(specs) != 1:
        return None
    from ggro import models
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        return models.load_tokenizer(specs.pop())
    except Exception:      # any failure only costs the page its segment split: it must still be written
        return None
    finally:
        if old is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = old
