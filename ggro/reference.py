"""A deliberately plain implementation of docs/algorithm.md: one prompt at a time, no KV cache, the full
prefix re-run for every token, and the reference's dense one-hot gradient.

It exists as the oracle the engine is tested against (identical tokens, rewards to float tolerance,
nudges and boundaries) and as the baseline `ggro bench` times the engine against. Never optimize it.
"""
from __future__ import annotations

import torch

from .config import GGROConfig
from .rounds import Result, row_seed


class ReferenceReward:
    """r(z) and the dense gradient d r / d onehot(z), [len, vocab], for one unpadded sequence."""

    def __init__(self, model, kind: str, suffix: list[int] = (), yes: int = 0, no: int = 0, eos=()):
        self.model, self.kind, self.suffix, self.yes, self.no, self.eos = model, kind, list(suffix), yes, no, set(eos)

    @classmethod
    def of(cls, reward_model):
        """Mirror the configuration of an engine RewardModel (same model, suffix and answer tokens)."""
        r = reward_model
        if r.kind == "judge":
            return cls(r.model, "judge", r.suffix, r.yes, r.no, r.eos)
        return cls(r.model, "classifier")

    def _reward(self, embeds: torch.Tensor) -> torch.Tensor:
        out = self.model(inputs_embeds=embeds[None]).logits
        if self.kind == "judge":
            return (out[0, -1, self.yes] - out[0, -1, self.no]).double()
        return out[0, 0].double()

    def __call__(self, tokens: list[int], need_grad: bool):
        suffix = self.suffix
        if self.kind == "judge" and tokens and tokens[-1] in self.eos and suffix and suffix[0] == tokens[-1]:
            suffix = suffix[1:]
        z = torch.tensor(list(tokens) + suffix)
        embed = self.model.get_input_embeddings()
        with torch.no_grad():   # the rows the model really reads (Gemma scales its embeddings in the module)
            E = embed(torch.arange(embed.weight.shape[0]))
        onehot = torch.nn.functional.one_hot(z, E.shape[0]).to(E.dtype).requires_grad_(need_grad)
        with torch.set_grad_enabled(need_grad):
            r = self._reward(onehot @ E)
            grad = torch.autograd.grad(r, onehot)[0] if need_grad else None
        return float(r.detach()), grad


@torch.no_grad()
def _logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0, -1]


def _entropy(logits: torch.Tensor) -> float:
    p = torch.softmax(logits.double(), -1)
    return float(-(p * torch.log(p)).nansum())


def decode_segment(model, prefix, x_len, cfg: GGROConfig, eos, forced=None, insert_at=0, tau=None):
    """docs/algorithm.md "Decoding one segment": returns (tokens, stop, base logits per offset, emitted count)."""
    tau = cfg.entropy_threshold if tau is None else tau
    out, base = [], []
    j = 0
    while True:
        logits = _logits(model, list(prefix) + out)
        base.append(logits)
        tok = forced if forced is not None and j == insert_at else int(torch.argmax(logits))
        out.append(tok)
        if tok in eos:
            return out, "eos", base, j + 1
        if len(prefix) + j + 1 == x_len + cfg.max_new_tokens:
            return out, "length", base, j + 1
        if j + 1 >= cfg.min_segment_tokens and _entropy(logits) >= tau:
            return out[:-1], "entropy", base, j + 1
        j += 1


def reference_ggro(prompt_id: str, x: list[int], model, reward: ReferenceReward, cfg: GGROConfig,
                   eos, has_prefill: bool = False) -> Result:
    res = Result(prompt_id, [], float("nan"), "ggro")
    gen = torch.Generator().manual_seed(row_seed(cfg.seed, prompt_id)) if cfg.selection == "sample" else None
    first = True
    while True:
        y = res.tokens
        if cfg.budget_spent(res.num_segments):
            s, stop, _, emitted = decode_segment(model, x + y, len(x), cfg, eos, tau=float("inf"))
            res.reward, _ = reward(x + y + s, need_grad=False)   # past the budget: greedy to the end
            res.tokens, res.refinements, res.policy_tokens = y + s, res.refinements + 1, res.policy_tokens + emitted
            res.reward_calls, res.num_segments = res.reward_calls + 1, res.num_segments + 1
            res.segment_boundaries.append(len(res.tokens))
            return res
        insert_at = cfg.initial_insertion_offset if first and not has_prefill else 0
        first = False
        best, seen, forced = None, [], [None]
        i = 0
        while forced and i < cfg.num_refinements:
            batch, forced = forced, []
            for nudge in batch:
                s, stop, base, emitted = decode_segment(model, x + y, len(x), cfg, eos, nudge, insert_at)
                if s in seen:
                    break     # converged; not counted: the engine sees a repeat coming and does not decode it
                res.refinements += 1
                res.policy_tokens += emitted
                seen.append(s)
                # parallel mode takes one gradient, of the first refinement, and decodes its S-1 best nudges
                grad_ok = i == 0 if cfg.search_mode == "parallel" else True
                more = i + 1 < cfg.num_refinements and insert_at < len(s) and grad_ok
                r, grad = reward(x + y + s, need_grad=more)
                res.reward_calls += 1
                gain = r - best[1] if best is not None else float("inf")
                if best is None or r > best[1]:
                    best = (s, r, i, stop)
                i += 1
                if cfg.search_mode == "parallel" and i > 1:
                    continue      # the second round: every nudge of the first gradient is decoded and scored
                if not more or (cfg.search_mode == "adaptive" and i > 1 and gain < cfg.adaptive_margin):
                    break
                cands, scores, current = _candidates(grad[len(x + y) + insert_at], base[insert_at], s[insert_at], cfg)
                if cfg.search_mode == "parallel":
                    forced = _best_others(cands, scores, current, cfg, gen)
                    break
                if cfg.selection == "sample":
                    nudge = int(cands[torch.multinomial(torch.softmax(scores, 0), 1, generator=gen)])
                else:
                    nudge = int(cands[torch.argmax(scores)])
                forced = [nudge]
        s, r, i, stop = best
        res.tokens = y + s
        res.num_segments += 1
        res.num_nudges += i > 0
        res.segment_boundaries.append(len(res.tokens))
        if stop == "eos" or len(res.tokens) >= cfg.max_new_tokens:
            res.reward = r
            return res


def _candidates(g, base_logits, current: int, cfg: GGROConfig):
    """The top-k candidates at the insertion position and their scores sigma / T."""
    cands = torch.topk(base_logits, cfg.top_k).indices
    g = g.double()
    if cfg.scoring == "taylor":
        scores = g[cands] - g[current]
    else:   # the reference's 1e-10 factor on the current token, taken to its limit
        scores = torch.where(cands == current, 0.0, g[cands])
    return cands, scores / cfg.nudge_temperature, current


def _best_others(cands, scores, current: int, cfg: GGROConfig, gen) -> list[int]:
    """The S-1 best (or sampled) candidates other than the current token."""
    keep = cands != current
    cands, scores = cands[keep], scores[keep]
    n = min(cfg.num_refinements - 1, len(cands))
    if cfg.selection == "sample":
        pick = torch.multinomial(torch.softmax(scores, 0), n, replacement=False, generator=gen)
    else:
        pick = sorted(range(len(cands)), key=lambda c: (-float(scores[c]), c))[:n]
    return [int(cands[c]) for c in pick]


def reference_lookahead(prompt_id: str, x: list[int], model, reward: ReferenceReward, cfg: GGROConfig,
                        eos, has_prefill: bool = False) -> Result:
    """`lookahead` mode, one prompt at a time: greedy to the next uncertain point u (the first point of a
    prefilled prompt: right after its prefill); the S-1 best nudges of the gradient of x + y + argmax at u;
    the greedy and the nudged continuations decoded to the end; the best kept."""
    res = Result(prompt_id, [], float("nan"), "ggro")
    gen = torch.Generator().manual_seed(row_seed(cfg.seed, prompt_id)) if cfg.selection == "sample" else None
    points = 0
    while True:
        if not (has_prefill and points == 0):
            s, stop, _, emitted = decode_segment(model, x + res.tokens, len(x), cfg, eos)
            res.policy_tokens += emitted
            res.tokens = res.tokens + s
            res.num_segments += 1
            res.segment_boundaries.append(len(res.tokens))
            if stop != "entropy":
                res.reward, _ = reward(x + res.tokens, need_grad=False)
                res.reward_calls += 1
                return res
        y = res.tokens
        points += 1
        base = _logits(model, x + y)
        t_u = int(torch.argmax(base))
        _, grad = reward(x + y + [t_u], need_grad=True)
        res.policy_tokens += 1
        res.reward_calls += 1
        cands, scores, current = _candidates(grad[len(x + y)], base, t_u, cfg)
        tried = []
        for nudge in [None] + _best_others(cands, scores, current, cfg, gen):
            roll, _, _, emitted = decode_segment(model, x + y, len(x), cfg, eos, nudge, 0, tau=float("inf"))
            tried.append((roll, reward(x + y + roll, need_grad=False)[0], emitted))
        res.refinements += len(tried)
        res.reward_calls += len(tried)
        res.policy_tokens += sum(e for _, _, e in tried)
        k = max(range(len(tried)), key=lambda i: (tried[i][1], -i))
        res.num_nudges += k > 0
        best, r, _ = tried[k]
        if cfg.budget_spent(points) or len(best) == 1:
            res.tokens = y + best
            res.num_segments += 1
            res.segment_boundaries.append(len(res.tokens))
            res.reward = r
            return res
        res.tokens = y + best[:1]


def reference_baseline(prompt_id: str, x: list[int], model, reward: ReferenceReward, cfg: GGROConfig, eos) -> Result:
    """Greedy decoding (best-of-n is sampled, so it is checked against the engine's own seeds instead)."""
    s, _, _, emitted = decode_segment(model, x, len(x), cfg, eos, tau=float("inf"))
    r, _ = reward(x + s, need_grad=False)
    return Result(prompt_id, s, r, "greedy", 0, 1, [len(s)], 1, emitted, 1)
