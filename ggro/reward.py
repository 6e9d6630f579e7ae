"""Reward backends (the Reward side of the seam): a scalar RM and its gradient at one position.

The gradient is taken with respect to the RM's input embeddings e = E[z]. The reference
differentiates w.r.t. the one-hot matrix, whose gradient is g @ E^T; we only ever need its entries
for k candidates at one position, g_q . E[c], so no [len, vocab] tensor exists.
"""
from __future__ import annotations

import torch

from .seam import RewardQuery, RewardResult


def judge_suffix(tokenizer, rubric: str) -> list[int]:
    """Token ids that close the assistant turn and ask the judge question as a new user turn.

    Rendered by the tokenizer's own chat template: the text after a placeholder assistant reply.
    """
    marker = "\x00ANSWER\x00"
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": marker},
            {"role": "user", "content": rubric}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text.split(marker, 1)[1], add_special_tokens=False)


def first_token(tokenizer, word: str) -> int:
    return tokenizer.encode(word, add_special_tokens=False)[0]


class RewardModel:
    """kind 'classifier': a num_labels == 1 sequence classifier, scored at the last real token.
    kind 'judge': a chat LM asked `rubric` about the response; reward = logit(Yes) - logit(No)."""

    def __init__(self, model, tokenizer, kind: str, rubric: str | None = None, eos_ids=()):
        self.model, self.kind = model, kind
        self.embed = model.get_input_embeddings()
        self.device = self.embed.weight.device
        if kind == "judge":
            self.suffix = judge_suffix(tokenizer, rubric)
            self.eos = set(eos_ids)
            self.yes, self.no = first_token(tokenizer, "Yes"), first_token(tokenizer, "No")
        else:
            self.suffix = []

    def _rm_tokens(self, tokens: list[int]) -> list[int]:
        if self.kind != "judge":
            return tokens
        suffix = self.suffix
        if tokens and tokens[-1] in self.eos and suffix and suffix[0] == tokens[-1]:
            suffix = suffix[1:]   # the response already closed its turn
        return tokens + suffix

    def _forward(self, embeds, mask, pos) -> torch.Tensor:
        if self.kind == "judge":
            logits = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                                logits_to_keep=1).logits[:, -1]
            return (logits[:, self.yes] - logits[:, self.no]).double()
        # Left padding puts every row's last real token at the last position, where HF pools.
        return self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits[:, 0].double()

    def score(self, queries: list[RewardQuery]) -> list[RewardResult]:
        if not queries:
            return []
        seqs = [self._rm_tokens(q.tokens) for q in queries]
        B, L, dev = len(seqs), max(map(len, seqs)), self.device
        ids = torch.zeros(B, L, dtype=torch.long, device=dev)
        mask = torch.zeros(B, L, dtype=torch.long, device=dev)
        pos = torch.zeros(B, L, dtype=torch.long, device=dev)
        for b, s in enumerate(seqs):
            ids[b, L - len(s):] = torch.tensor(s, device=dev)
            mask[b, L - len(s):] = 1
            pos[b, L - len(s):] = torch.arange(len(s), device=dev)
        want = [b for b, q in enumerate(queries) if q.position is not None]
        with torch.no_grad():
            embeds = self.embed(ids)
        if not want:
            with torch.no_grad():
                rewards = self._forward(embeds, mask, pos)
            return [RewardResult(float(r)) for r in rewards]
        embeds.requires_grad_(True)
        with torch.enable_grad():
            rewards = self._forward(embeds, mask, pos)
            # Rows are independent, so d(sum)/d(e_b) is row b's own gradient.
            (grad,) = torch.autograd.grad(rewards[want].sum(), embeds)
        out = [RewardResult(float(r)) for r in rewards.detach()]
        E = self.embed.weight
        for b in want:
            q = queries[b]
            g = grad[b, L - len(seqs[b]) + q.position]
            cand = torch.tensor(q.candidates, device=dev)
            out[b].scores = (E[cand].double() @ g.double()).tolist()
        return out
