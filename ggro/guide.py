"""A reward model from preference pairs: a Bradley-Terry head on a frozen causal LM's last-token features.

r(z) = head(h(z)), where h(z) is the backbone's final hidden state (after its last norm) at the last token
of z = chat(prompt) + response. A linear head, w . h(z), is exactly what a Hugging Face
`*ForSequenceClassification` computes with a `score` layer of one output and no bias, so it is saved as such
a model folder and guides GGRO as `--reward DIR --reward-kind classifier`. An MLP head (several fits averaged
into one; the shipped head is one) is saved beside its base model's files and loads the same way.

The backbone never trains: features are computed once (batched, cached on disk) and the head is fitted on
them, P(chosen > rejected) = sigmoid(head(h_c) - head(h_r)). GGRO scores partial responses while it
searches, so each response also yields features at a few truncation points (free: one causal forward gives
every position), and pairs are trained at equal truncations too.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .chat import chat_ids, text_ids
from .shipped import GUIDE_HEAD, HEAD_FILE
from .hf_folder import save_weights

# Response token counts at which a pair is also compared (both sides cut at the same length).
TRUNCATIONS = (8, 24)
MAX_RESPONSE_TOKENS = 160


@dataclass(frozen=True)
class Example:
    prompt_ids: list[int]      # x: the chat-formatted prompt, generation prompt included
    chosen_ids: list[int]      # response token ids (no end-of-turn)
    rejected_ids: list[int]
    group: str                 # split key: pairs of one prompt never straddle splits
    tag: str                   # what accuracy is reported by (source / kind)


def shipped_head() -> Path:
    """The head trained by the project on its default pairs (docs/reward-model.md), for the default backbone."""
    return Path(str(resources.files("ggro").joinpath(GUIDE_HEAD)))


@torch.no_grad()
def last_token_features(backbone, sequences: list[list[int]], positions: list[list[int]], batch_size: int = 16,
                        progress=None) -> list[torch.Tensor]:
    """h at each requested position of each sequence ([len(positions[i]), d] per sequence), in fp32.

    Sequences are right-padded; causal attention makes a position's state independent of what follows.
    """
    out: list[torch.Tensor | None] = [None] * len(sequences)
    dev = next(backbone.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))   # little padding per batch
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        L = max(len(sequences[i]) for i in idx)
        ids = torch.zeros(len(idx), L, dtype=torch.long, device=dev)
        mask = torch.zeros(len(idx), L, dtype=torch.long, device=dev)
        for b, i in enumerate(idx):
            ids[b, :len(sequences[i])] = torch.tensor(sequences[i])
            mask[b, :len(sequences[i])] = 1
        h = backbone(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        for b, i in enumerate(idx):
            out[i] = h[b, positions[i]].cpu()
        if progress is not None:
            progress.update(len(idx))
    return out


def pair_features(backbone, examples: list[Example], cache: Path | None = None, batch_size: int = 16,
                  progress=None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(chosen, rejected, example index) feature rows: each equal truncation, then the whole responses.

    With `cache`, features are kept per sequence (keyed by the backbone and the token ids), so a changed
    data mix only computes its new sequences."""
    seqs, poss, cuts = [], [], []
    for e in examples:
        n = min(len(e.chosen_ids), len(e.rejected_ids))
        cut = [t for t in TRUNCATIONS if t < n]
        cuts.append(cut)
        for resp in (e.chosen_ids, e.rejected_ids):
            seqs.append(e.prompt_ids + resp)
            poss.append([len(e.prompt_ids) + t - 1 for t in cut] + [len(seqs[-1]) - 1])
    name = str(getattr(backbone.config, "_name_or_path", ""))
    keys = [hashlib.sha256(json.dumps([name, s, p]).encode()).hexdigest()[:24] for s, p in zip(seqs, poss)]
    store = cache / f"features-{hashlib.sha256(name.encode()).hexdigest()[:12]}.pt" if cache is not None else None
    known = torch.load(store) if store is not None and store.exists() else {}
    todo = [i for i, k in enumerate(keys) if k not in known]
    if progress is not None:
        progress.update(len(seqs) - len(todo))
    for s in range(0, len(todo), 512):      # saved as it goes: an interrupted run keeps what it computed
        part = todo[s:s + 512]
        feats = last_token_features(backbone, [seqs[i] for i in part], [poss[i] for i in part], batch_size, progress)
        known.update({keys[i]: f for i, f in zip(part, feats)})
        if store is not None:
            store.parent.mkdir(parents=True, exist_ok=True)
            torch.save(known, store.with_suffix(".tmp"))
            store.with_suffix(".tmp").replace(store)
    ch, rj, owner = [], [], []
    for i, cut in enumerate(cuts):
        ch.append(known[keys[2 * i]])
        rj.append(known[keys[2 * i + 1]])
        owner += [i] * (len(cut) + 1)
    return torch.cat(ch), torch.cat(rj), owner


def split_of(group: str, heldout: float = 0.2, val: float = 0.1) -> str:
    """'train' | 'val' | 'test' by a stable hash of the prompt: the same prompt always lands in the same split."""
    u = int(hashlib.sha256(group.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if u < heldout else "val" if u < heldout + val else "train"


def train_head(dc: torch.Tensor, dr: torch.Tensor, vc: torch.Tensor, vr: torch.Tensor, weights: torch.Tensor | None = None,
               l2: float = 0.03, epochs: int = 1500, lr: float = 0.02, patience: int = 300, hidden: int = 0,
               fits: int = 1) -> tuple[torch.nn.Module, dict]:
    """The head, fitted on (chosen, rejected) feature rows and early-stopped on validation accuracy.

    hidden 0: a Bradley-Terry logistic regression, r = w . h. hidden N: `fits` small MLPs (hidden N, GELU),
    each from its own seed, averaged into one (mlp_head). `weights` weigh the training rows (truncated pairs
    count less than whole responses). Features are standardised for the optimiser and the scale is folded back
    in, so the returned head reads raw features."""
    if hidden:
        return mlp_head(dc, dr, vc, vr, weights, hidden, fits, epochs, patience)
    scale = torch.cat([dc, dr]).double().std(0) + 1e-6
    x, vx = (dc - dr).double() / scale, (vc - vr).double() / scale
    wt = _row_weights(weights, len(x))
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr)

    def step():
        opt.zero_grad()
        loss = (wt * torch.nn.functional.softplus(-(x @ w))).mean() + l2 * (w * w).sum()
        loss.backward()
        opt.step()
        return loss

    # (A bias would cancel in every pair, so there is none.)
    acc, best, best_epoch, ran = _early_stopped(
        step, lambda: float(((vx @ w) > 0).double().mean()) if len(vx) else None, lambda: w.detach().clone(),
        epochs, patience, every=10)
    return linear_head((best / scale).float()), {"val_accuracy": acc, "best_epoch": best_epoch, "epochs_run": ran}


def _early_stopped(step, val_accuracy, snapshot, epochs: int, patience: int, every: int = 1):
    """Run `step()` (one optimiser step, returning its loss) up to `epochs` times; every `every` epochs score
    `val_accuracy()` (-loss where it gives None: no validation rows), keep the best `snapshot()`, and stop
    `patience` epochs after the best. Returns (best accuracy, its snapshot, its epoch, epochs run).

    Accuracy, not loss: validation loss turned up within tens of epochs on the default data and stopping there
    cost accuracy; accuracy keeps improving for longer."""
    best = (-1.0, snapshot(), 0)
    for epoch in range(epochs):
        loss = step()
        if epoch % every == every - 1:
            with torch.no_grad():
                acc = val_accuracy()
            acc = -float(loss.detach()) if acc is None else acc
            if acc > best[0]:
                best = (acc, snapshot(), epoch + 1)
            elif epoch + 1 - best[2] >= patience:
                break
    return (*best, epoch + 1)


def _row_weights(weights: torch.Tensor | None, n: int) -> torch.Tensor:
    return torch.ones(n, dtype=torch.float64) if weights is None else weights.double() / weights.double().mean()


def mlp_head(dc, dr, vc, vr, weights, hidden: int, fits: int, epochs: int, patience: int, lr: float = 3e-3,
             weight_decay: float = 1e-2) -> tuple[torch.nn.Sequential, dict]:
    """`fits` MLPs Linear(d, hidden) - GELU - Linear(hidden, 1), full-batch AdamW on the Bradley-Terry loss, each
    kept at its best validation accuracy; returned as ONE MLP of fits x hidden units that outputs their mean.

    Averaging matters: out of family one fit's accuracy moved by +-4 points with its seed alone, their mean
    sat near the best of them (docs/reward-model.md). The feature standardisation folds into the first layer."""
    mu = torch.cat([dc, dr]).mean(0)
    sd = torch.cat([dc, dr]).std(0) + 1e-6
    x_c, x_r, v_c, v_r = ((t - mu) / sd for t in (dc, dr, vc, vr))
    wt = _row_weights(weights, len(dc)).float()
    nets, fit = [], {"val_accuracy": [], "best_epoch": [], "hidden": hidden, "fits": fits}
    for seed in range(1, fits + 1):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net = _mlp(dc.shape[1], hidden)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        margin = lambda a, b: (net(a) - net(b)).squeeze(-1)   # noqa: E731

        def step():
            opt.zero_grad()
            loss = (torch.nn.functional.softplus(-margin(x_c, x_r)) * wt).mean()
            loss.backward()
            opt.step()
            return loss

        acc, state, best_epoch, _ = _early_stopped(
            step, lambda: float((margin(v_c, v_r) > 0).float().mean()) if len(v_c) else None,
            lambda: {k: t.clone() for k, t in net.state_dict().items()}, epochs, patience)
        net.load_state_dict(state)
        nets.append(net)
        fit["val_accuracy"].append(acc)
        fit["best_epoch"].append(best_epoch)
    return average_mlps(nets, mu, sd), fit


@torch.no_grad()
def average_mlps(nets: list[torch.nn.Sequential], mu: torch.Tensor, sd: torch.Tensor) -> torch.nn.Sequential:
    """One MLP computing mean_k nets[k]((x - mu) / sd): the first layers stacked (standardisation folded in),
    the second layers side by side, scaled by 1/k."""
    head = _mlp(nets[0][0].in_features, sum(n[0].out_features for n in nets))
    w1 = torch.cat([n[0].weight for n in nets]) / sd
    head[0].weight.copy_(w1)
    head[0].bias.copy_(torch.cat([n[0].bias for n in nets]) - w1 @ mu)
    head[2].weight.copy_(torch.cat([n[2].weight for n in nets], 1) / len(nets))
    head[2].bias.copy_(sum(n[2].bias for n in nets) / len(nets))
    return head.requires_grad_(False).eval()


def _mlp(d: int, hidden: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1))


def linear_head(weight: torch.Tensor) -> torch.nn.Linear:
    """r = weight . h as a frozen Linear(hidden, 1) without bias (a Hugging Face classifier's `score`)."""
    layer = torch.nn.Linear(weight.numel(), 1, bias=False, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight.reshape(1, -1))
    return layer.requires_grad_(False)


def as_head(head: torch.nn.Module | torch.Tensor) -> torch.nn.Module:
    """A head module; a weight vector is the linear head."""
    return linear_head(head) if isinstance(head, torch.Tensor) else head


@torch.no_grad()
def accuracy(head: torch.nn.Module | torch.Tensor, c: torch.Tensor, r: torch.Tensor) -> float:
    """Share of pairs the head orders correctly (a tie counts half)."""
    if not len(c):
        return math.nan
    head = as_head(head).float()
    m = (head(c.float()) - head(r.float())).squeeze(-1)
    return float(((m > 0).float() + 0.5 * (m == 0).float()).mean())


# -- the head as a Hugging Face model -------------------------------------------------------------------

def classifier_config(causal_config):
    """The causal LM's config, turned into a one-label sequence classifier's (pad token set)."""
    cfg = causal_config.__class__.from_dict(causal_config.to_dict())
    cfg.num_labels = 1
    cfg.problem_type = "regression"
    cfg.architectures = [causal_config.architectures[0].replace("ForCausalLM", "ForSequenceClassification")] \
        if getattr(causal_config, "architectures", None) else None
    if getattr(cfg, "pad_token_id", None) is None:
        eos = cfg.eos_token_id
        cfg.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    return cfg


def with_head(causal_model, head: torch.nn.Module | torch.Tensor):
    """A `*ForSequenceClassification` whose backbone IS `causal_model`'s (one copy of the weights, two heads);
    its `score` is the head (the classifier reads it at the last token, whatever the module)."""
    from transformers import AutoModelForSequenceClassification
    cfg = classifier_config(causal_model.config)
    with torch.device("meta"):
        clf = AutoModelForSequenceClassification.from_config(cfg, dtype=causal_model.dtype)
    prefix = clf.base_model_prefix
    setattr(clf, prefix, getattr(causal_model, causal_model.base_model_prefix))
    clf.score = head_layer(causal_model, head)
    clf.requires_grad_(False)
    return clf.eval()


def head_layer(causal_model, head: torch.nn.Module | torch.Tensor) -> torch.nn.Module:
    """A frozen copy of the head (a module, or a linear head's weight vector) on `causal_model`'s device and dtype."""
    import copy
    param = next(causal_model.parameters())
    return copy.deepcopy(as_head(head)).to(device=param.device, dtype=param.dtype).requires_grad_(False).eval()


def save_head(head: torch.nn.Module | torch.Tensor, path: Path, meta: dict) -> None:
    """The head alone as a small safetensors file (`score.*`: a classifier's score layer), for a backbone that is
    already at hand."""
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {f"score.{k}": v.float().contiguous() for k, v in as_head(head).state_dict().items()}
    save_file(state, str(path), metadata={k: json.dumps(v) for k, v in meta.items()})


def shipped_guide(causal_model):
    """The shipped guide's head as a classifier on `causal_model` (the default backbone), sharing its weights
    (the guide as a whole adds the backbone as a judge: ggro.reward.HeadAndJudge)."""
    return with_head(causal_model, load_head(shipped_head()))


def load_head(path: Path) -> torch.nn.Module:
    """A head file's module: `score.weight` alone is the linear head, `score.{0,2}.*` the MLP (mlp_head)."""
    from safetensors.torch import load_file
    state = {k.removeprefix("score."): v for k, v in load_file(str(path)).items()}
    if set(state) == {"weight"}:
        return linear_head(state["weight"].reshape(-1))
    if set(state) == {"0.weight", "0.bias", "2.weight", "2.bias"}:
        head = _mlp(state["0.weight"].shape[1], state["0.weight"].shape[0])
        head.load_state_dict(state)
        return head.requires_grad_(False).eval()
    raise ValueError(f"{path}: not a guide head (keys {sorted(state)})")


def save_classifier(causal_model, tokenizer, head: torch.nn.Module | torch.Tensor, out: Path) -> None:
    """A folder that `--reward OUT --reward-kind classifier` loads. A linear head: a standard
    `*ForSequenceClassification` (weights, config with num_labels=1, tokenizer). An MLP head, which no standard
    score layer holds: the base causal LM's folder plus HEAD_FILE, which ggro.models.load_model puts together."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if isinstance(as_head(head), torch.nn.Linear):
        clf = with_head(causal_model, head)
        clf.config.pad_token_id = tokenizer.pad_token_id
        save_weights(clf, out)      # not save_pretrained: see save_weights
    else:
        save_weights(causal_model, out)
        save_head(head, out / HEAD_FILE, {"base": str(getattr(causal_model.config, "_name_or_path", ""))})
    tokenizer.save_pretrained(out)


# -- preference pairs (TRL's format) ---------------------------------------------------------------------

def _text(side, name: str) -> str:
    """A response as text: a string, or TRL's conversational list whose assistant turns are the response."""
    if isinstance(side, str):
        text = side
    elif isinstance(side, list) and side and all(isinstance(m, dict) for m in side):
        turns = [m.get("content") for m in side if m.get("role") == "assistant"]
        if not turns or not all(isinstance(t, str) for t in turns):
            raise ValueError(f"`{name}` must hold assistant messages with string content")
        text = "".join(turns)
    else:
        raise ValueError(f"`{name}` must be a string or a list of {{role, content}} messages")
    if not text.strip():
        raise ValueError(f"`{name}` is empty")
    return text


def _messages(prompt) -> list[dict]:
    if isinstance(prompt, str) and prompt.strip():
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user", "assistant")
            for m in prompt):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise ValueError("`prompt` must be a non-empty string or a list of {role, content} messages")


def parse_pair(obj, tokenizer) -> Example:
    """One TRL preference row -> token ids (x with the chat template's generation prompt, responses).
    Raises ValueError naming the field."""
    if not isinstance(obj, dict):
        raise ValueError(f"row is a {type(obj).__name__}, expected an object with prompt, chosen, rejected")
    for k in ("prompt", "chosen", "rejected"):
        if obj.get(k) is None:
            raise ValueError(f"missing `{k}`")
    msgs = _messages(obj["prompt"])
    chosen, rejected = _text(obj["chosen"], "chosen"), _text(obj["rejected"], "rejected")
    if chosen == rejected:
        raise ValueError("`chosen` and `rejected` are the same text")
    x = chat_ids(tokenizer, msgs, add_generation_prompt=True)
    enc = lambda t: text_ids(tokenizer, t)[:MAX_RESPONSE_TOKENS]
    tag = str(obj.get("kind") or obj.get("source") or "pairs")
    return Example(x, enc(chosen), enc(rejected), prompt_group(msgs), tag)


def prompt_group(messages: list[dict]) -> str:
    """The split key of a prompt: pairs (and evaluation prompts) of one prompt share a split."""
    return json.dumps([{"role": m["role"], "content": m["content"]} for m in messages], sort_keys=True)
