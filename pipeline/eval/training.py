"""Training the guide (a Bradley-Terry head, linear or a small MLP, on a frozen backbone's last-token features)
from preference pairs: the default pairs' base answers, the features, the fit with early stopping, the held-out, left-one-
family-out and out-of-family accuracies. `ggro train-reward` (jobs/train_reward.py) parses the flags into a
HeadFit and calls these; `ggro eval --pairs` reads pairs with `read_pairs`."""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class HeadFit:
    """How the head is fitted (`ggro train-reward`'s flags)."""
    l2: float = 0.03                 # L2 penalty on the standardised head weights
    truncated_weight: float = 0.35   # weight of the pairs cut at guide.TRUNCATIONS against whole responses
    batch_size: int = 16             # sequences per feature forward
    answer_tokens: int = 40          # default pairs: tokens of the base model's own answers
    rollout_tokens: tuple[int, ...] = (32,)  # default pairs: tokens of the policy's rollouts (rollout-* kinds), pairs at each
    rollout_k: int = 6               # ... one per top-k first token
    hidden: int = 0                  # 0: a linear head; N: MLPs of N hidden units (ggro.guide.mlp_head) ...
    fits: int = 1                    # ... this many, from their own seeds, averaged into one


def policy_rollouts(model, tok, rows: list[dict], max_tokens: int, batch: int, k: int = 0) -> dict[str, list[str]]:
    """What the policy writes for each prompt row (after the row's `prefill`, if any), as text after it: its
    greedy response first, then, with `k`, one greedy rollout after each other of its top-`k` first tokens (what
    lookahead GGRO can reach at a prefilled prompt's first point). Cached: the default data is rebuilt often."""
    from ggro import models
    from ggro.config import context_window
    from ggro.policy import SegmentDecoder
    from ggro.rows import InputRow, encode
    from ggro.seam import SegmentRequest
    from tqdm import tqdm
    key = hashlib.sha256(json.dumps([str(model.config._name_or_path), max_tokens, k,
                                     [(r["id"], r["prompt"], r.get("prefill")) for r in rows]]).encode()).hexdigest()[:16]
    cache = models.cache_dir() / f"rollouts-{key}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    dec = SegmentDecoder(model, models.eos_ids(tok, model), max_cached=batch)
    text = lambda seg: tok.decode(seg.tokens, skip_special_tokens=True)   # noqa: E731
    out, context = {}, context_window(model.config)
    for s in tqdm(range(0, len(rows), batch), desc="policy rollouts", unit="batch", file=sys.stderr):
        chunk = rows[s:s + batch]
        xs = [encode(InputRow(r["id"], [{"role": "user", "content": r["prompt"]}], prefill=r.get("prefill") or ""),
                     tok, "chat", max_tokens, context).ids for r in chunk]
        greedy = dec.decode([SegmentRequest(r["id"], x, max_tokens, top_k=k) for r, x in zip(chunk, xs)])
        # the alternatives share their row's seq_id: one cached prefix per prompt
        alt = [(r["id"], SegmentRequest(r["id"], x, max_tokens, forced=c)) for r, x, g in zip(chunk, xs, greedy)
               for c in (g.candidates or []) if g.tokens[:1] != [c]]
        for r, g in zip(chunk, greedy):
            out[r["id"]] = [text(g)]
        for (rid, _), seg in zip(alt, dec.decode([q for _, q in alt])):
            out[rid].append(text(seg))
        dec.release([r["id"] for r in chunk])
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out))
    return out


def read_pairs(path: str, tok) -> tuple[list, list[str], list[dict]]:
    """(examples, errors, rows): every bad row is named with its place and reason; `rows` are the good rows as
    read, one per example."""
    from ggro.guide import parse_pair
    from ggro.rows import InputRow, read_rows
    examples, errors, rows = [], [], []
    for item in read_rows(path, parse=lambda obj, where: (where, obj)):
        if isinstance(item, InputRow):          # a line that is not valid UTF-8 or JSON
            errors.append(f"{item.id}: {item.error}")
            continue
        where, obj = item
        try:
            examples.append(parse_pair(obj, tok))
            rows.append(obj)
        except ValueError as e:
            errors.append(f"{where}: {e}")
    return examples, errors, rows


def report_table(acc: dict[str, tuple[float, int]]) -> str:
    lines = ["| pairs | held-out accuracy | n |", "|---|---:|---:|"]
    lines += [f"| {k} | {a:.1%} | {n} |" for k, (a, n) in acc.items()]
    return "\n".join(lines)


def default_pairs_file(model, tok, out: Path, hs: HeadFit) -> Path:
    """No --input: build the default preference pairs (the base model answers the prompts) into OUT/pairs.jsonl
    (raises pipeline.eval.sources.MissingData when the wheels that hold the data are not installed)."""
    from pipeline.eval.prefs import default_pairs
    pairs = default_pairs(
        lambda rows: {i: v[0] for i, v in policy_rollouts(model, tok, rows, hs.answer_tokens, hs.batch_size).items()},
        lambda rows: [policy_rollouts(model, tok, rows, n, hs.batch_size, hs.rollout_k) for n in hs.rollout_tokens])
    out.mkdir(parents=True, exist_ok=True)
    path = out / "pairs.jsonl"
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    print(f"wrote {len(pairs)} default pairs to {path}", file=sys.stderr)
    return path


def features(model, examples, hs: HeadFit, desc: str = "features"):
    """(chosen, rejected, owner, full): feature rows of every pair (ggro.guide.pair_features, cached on disk),
    the example each row belongs to, and which rows are the whole responses (the last of each example)."""
    import torch
    from tqdm import tqdm
    from ggro import guide, models
    backbone = getattr(model, model.base_model_prefix)
    with tqdm(total=2 * len(examples), desc=desc, unit="seq", file=sys.stderr) as bar:
        c, r, owner = guide.pair_features(backbone, examples, models.cache_dir() / "features", hs.batch_size, bar)
    owner = torch.tensor(owner)
    full = torch.ones(len(owner), dtype=torch.bool)
    full[:-1] = owner[1:] != owner[:-1]
    return c, r, owner, full


def fit_head(model, examples, split: list[str], hs: HeadFit):
    """Fit the head on the train split; returns (head, fit, report split, {tag: (accuracy, n)} on whole responses,
    (accuracy, n) on responses cut at guide.TRUNCATIONS, {tag: (accuracy, n)} left one family out)."""
    import torch
    from ggro import guide
    c, r, owner, full = features(model, examples, hs)
    rows_in = lambda name: torch.tensor([split[i] == name for i in owner.tolist()])  # noqa: E731
    tr, va = rows_in("train"), rows_in("val") & full
    weights = torch.where(full, 1.0, hs.truncated_weight)
    w, fit = guide.train_head(c[tr], r[tr], c[va], r[va], weights[tr], l2=hs.l2, hidden=hs.hidden, fits=hs.fits)
    report_split = "test" if "test" in split else "val"
    acc = {}
    for tag in ["all"] + sorted({e.tag for e in examples}):
        sel = rows_in(report_split) & full & (torch.ones_like(full) if tag == "all" else
                                              torch.tensor([examples[i].tag == tag for i in owner.tolist()]))
        if sel.any():
            acc[tag] = (guide.accuracy(w, c[sel], r[sel]), int(sel.sum()))
    sel = rows_in(report_split) & ~full & (c != r).any(1)   # a cut inside a shared prefix is a tie: no test
    trunc = (guide.accuracy(w, c[sel], r[sel]), int(sel.sum())) if sel.any() else (None, 0)
    tags = torch.tensor([sorted({e.tag for e in examples}).index(examples[i].tag) for i in owner.tolist()])
    return w, fit, report_split, acc, trunc, leave_one_out(c, r, tags, full, tr, va, weights, examples, hs)


def leave_one_out(c, r, tags, full, tr, va, weights, examples, hs: HeadFit) -> dict[str, tuple[float, int]]:
    """For each family (tag): a head trained on the train split of the other families only (early-stopped on
    their validation split), tested on every whole-response pair of the left-out family: how well the guide
    generalizes to a kind of pair it never saw. Empty with fewer than two families."""
    from ggro import guide
    names = sorted({e.tag for e in examples})
    if len(names) < 2:
        return {}
    out = {}
    for k, name in enumerate(names):
        other = tags != k
        w, _ = guide.train_head(c[tr & other], r[tr & other], c[va & other], r[va & other], weights[tr & other],
                                l2=hs.l2, hidden=hs.hidden, fits=hs.fits)
        test = ~other & full
        out[name] = (guide.accuracy(w, c[test], r[test]), int(test.sum()))
    return out


def out_of_family(model, tok, w, hs: HeadFit) -> dict[str, tuple[float, int]]:
    """The head's accuracy per kind on the out-of-family validation set (pipeline/eval/prefs.py `oof_pairs`),
    overall and split into the kinds whose transformation the training pairs apply and the new ones."""
    import torch
    from ggro import guide
    from pipeline.eval.prefs import OOF_SPLIT, oof_pairs
    examples = [guide.parse_pair(p, tok) for p in oof_pairs()]
    c, r, owner, full = features(model, examples, hs, "out-of-family features")
    groups = {"all": None, **OOF_SPLIT, **{t: (t,) for t in sorted({e.tag for e in examples})}}
    out = {}
    for name, tags in groups.items():
        sel = full.clone()
        if tags is not None:
            sel &= torch.tensor([examples[i].tag in tags for i in owner.tolist()])
        out[name] = (guide.accuracy(w, c[sel], r[sel]), int(sel.sum()))
    return out
