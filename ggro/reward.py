"""Reward backends (the Reward side of the seam): a scalar RM and its gradient at one position.

The gradient is taken with respect to the RM's input embeddings e = E[z]. The reference
differentiates w.r.t. the one-hot matrix, whose gradient is g @ E^T; we only ever need its entries
for k candidates at one position, g_q . E[c], so no [len, vocab] tensor exists. The RM pass over
the accepted prefix x + y is cached per sequence without grad (it cannot depend on e_q for q past
it); only the new segment (and the judge's question) runs with autograd.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .chat import encode_spans, render, text_ids
from .config import GRAD_TOKENS
from .kvcache import Prefix, PrefixCache, chunk_layout, eager_attention, left_pad_kv, call_groups
from .seam import RewardQuery, RewardResult


def grad_chunks(items: list, lengths: list[int], budget: int) -> list[list]:
    """`items` in order, cut so that rows x the longest length of each chunk stays within `budget` tokens (one
    row at least): the rows of one backward, whose activations grow with both."""
    out, cur, longest = [], [], 0
    for item, n in zip(items, lengths):
        if cur and (len(cur) + 1) * max(longest, n) > budget:
            out.append(cur)
            cur, longest = [], 0
        cur.append(item)
        longest = max(longest, n)
    return out + [cur] if cur else out


def judge_suffix(tokenizer, rubric: str) -> list[int]:
    """Token ids that close the assistant turn and ask the judge question as a new user turn.

    Rendered by the tokenizer's own chat template: the text after a placeholder assistant reply.
    """
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "\x00ANSWER\x00"},
            {"role": "user", "content": rubric}]
    text, spans = render(tokenizer, msgs, add_generation_prompt=True)
    if spans is None:                       # a template ggro cannot align: its pieces after the placeholder answer
        return encode_spans(tokenizer, text[text.index((msgs[1]["content"],)) + 1:], None)
    cut = spans[1][1]                       # the rubric is content: its control-token text stays text
    return encode_spans(tokenizer, text[cut:], [(a - cut, b - cut) for a, b in spans[2:]])


def first_token(tokenizer, word: str) -> int:
    return text_ids(tokenizer, word)[0]


class RewardModel:
    """kind 'classifier': a num_labels == 1 sequence classifier, scored at the last real token.
    kind 'judge': a chat LM asked `rubric` about the response; reward = logit(Yes) - logit(No)."""

    def __init__(self, model, tokenizer, kind: str, rubric: str | None = None, eos_ids=(), max_cached: int = 64,
                 prefixes: PrefixCache | None = None, grad_tokens: int = GRAD_TOKENS):
        """`prefixes`: the policy decoder's cache when this model runs on the policy's backbone (the shipped guide,
        a judge on the policy's weights): the search asks for x + y from the policy first, so the RM finds it
        cached instead of running the backbone over it again. `grad_tokens`: the most tokens (rows x padded
        rest) one backward runs over (ggro.config.GRAD_TOKENS)."""
        self.model, self.kind, self.grad_tokens = model, kind, grad_tokens
        self.embed = model.get_input_embeddings()
        self.device = self.embed.weight.device
        self.base = getattr(model, model.base_model_prefix)
        self.ragged = not eager_attention(model)
        self.prefixes = prefixes or PrefixCache(self._prefill, self.device, max_cached, ragged=self.ragged)
        if prefixes is not None:            # the policy decoder's cache: it keeps what it decodes for us
            prefixes.scores_from_forks = True
        self.suffix, self.eos = [], set(eos_ids)
        self.head = getattr(model, "score", None) if kind == "classifier" else None   # Llama, Qwen, Mistral, Gemma...
        if kind == "judge":
            self.suffix = judge_suffix(tokenizer, rubric)
            self.yes, self.no = first_token(tokenizer, "Yes"), first_token(tokenizer, "No")

    def _prefill(self, ids, mask, pos, cache):
        out = self.base(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        return out.past_key_values, None

    def rm_tokens(self, tokens: list[int]) -> list[int]:
        """What the RM reads for a policy sequence: the judge appends its question."""
        suffix = self.suffix
        if tokens and tokens[-1] in self.eos and suffix and suffix[0] == tokens[-1]:
            suffix = suffix[1:]   # the response already closed its turn
        return list(tokens) + suffix

    def _reward(self, embeds, mask, pos, cache, last: torch.Tensor) -> torch.Tensor:
        """The reward of each row; `last` [B]: the column of each row's last response token (the judge's
        question follows it)."""
        if self.kind == "judge":
            logits = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                                past_key_values=cache, logits_to_keep=1).logits[:, -1]
            return (logits[:, self.yes] - logits[:, self.no]).double()
        # Every row ends at the last column: pool there ourselves. HF's classifier cannot see padding in
        # inputs_embeds, and refuses batches outright when its config has no pad token.
        if self.head is None:
            return self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                              past_key_values=cache).logits[:, 0].double()
        h = self.base(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                      past_key_values=cache).last_hidden_state[:, -1]
        return self.head(h)[:, 0].double()

    def score(self, queries: list[RewardQuery]) -> list[RewardResult]:
        """One reward per query, and candidate scores where a position is given (eager attention: one call per
        length of the uncached rest, so no padding is a query row). Calls that need the gradient carry at most
        `grad_tokens` tokens: rows are independent, so the cut changes no result."""
        # The score is read at the response's last token, so that token must be in the pass: a query with
        # nothing past its cached prefix (an empty segment) runs uncached.
        queries = [replace(q, seq_id=None, prefix_len=0) if q.seq_id is not None and q.prefix_len >= len(q.tokens)
                   else q for q in queries]
        known: list[Prefix | None] = [None] * len(queries)
        for i, q in enumerate(queries):   # a response the policy just decoded on this backbone: read from its fork
            if q.position is None and q.seq_id is not None and len(q.tokens) - 1 > q.prefix_len:
                known[i] = self.prefixes.peek(q.seq_id, q.tokens[:-1])
                if known[i] is not None:
                    queries[i] = replace(q, prefix_len=len(q.tokens) - 1)
        rest = [len(self.rm_tokens(q.tokens)) - (q.prefix_len if q.seq_id is not None else 0) for q in queries]
        out: list[RewardResult | None] = [None] * len(queries)
        # The rows that need no gradient run in calls of their own: in a call with autograd every row's backward is
        # computed, wanted or not (with S=2, half of a faithful round's rows).
        for grad in (True, False):
            rows = [i for i, q in enumerate(queries) if (q.position is not None) == grad]
            for group in call_groups(rows, [rest[i] for i in rows], self.ragged, self.prefixes.call_tokens):
                for chunk in grad_chunks(group, [rest[i] for i in group], self.grad_tokens) if grad else [group]:
                    for i, r in zip(chunk, self._score([queries[i] for i in chunk], [known[i] for i in chunk])):
                        out[i] = r
        return out

    def _score(self, queries: list[RewardQuery], known: list[Prefix | None]) -> list[RewardResult]:
        dev = self.device
        cached = [(q.seq_id, q.tokens[:q.prefix_len]) for q, k in zip(queries, known)
                  if k is None and q.seq_id is not None and q.prefix_len]
        got = iter(self.prefixes.get(cached)) if cached else iter(())
        pasts = [k if k is not None else next(got) if q.seq_id is not None and q.prefix_len else None
                 for q, k in zip(queries, known)]
        read = [self.rm_tokens(q.tokens) for q in queries]
        rests = [z[len(p.ids) if p else 0:] for z, p in zip(read, pasts)]
        past_lens = [len(p.ids) if p else 0 for p in pasts]
        P, N = max(past_lens), max(map(len, rests))
        ids = torch.zeros(len(queries), N, dtype=torch.long, device=dev)
        for b, r in enumerate(rests):
            ids[b, N - len(r):] = torch.tensor(r, device=dev)
        mask, pos = chunk_layout(past_lens, [len(r) for r in rests], dev)
        last = torch.tensor([N - 1 - (len(z) - len(q.tokens)) for z, q in zip(read, queries)], device=dev)
        template = next((p for p in pasts if p), None)
        empty = Prefix([], [(k[:, :0], v[:, :0]) for k, v in template.kv], None) if template else None
        cache = left_pad_kv([p or empty for p in pasts], P) if P else None
        want = [b for b, q in enumerate(queries) if q.position is not None]
        with torch.no_grad():
            embeds = self.embed(ids)
        if not want:
            with torch.no_grad():
                rewards = self._reward(embeds, mask, pos, cache, last)
            return [RewardResult(float(r)) for r in rewards]
        embeds.requires_grad_(True)
        with torch.enable_grad():
            rewards = self._reward(embeds, mask, pos, cache, last)
            # Rows are independent, so d(sum)/d(e_b) is row b's own gradient.
            (grad,) = torch.autograd.grad(rewards[want].sum(), embeds)
        out = [RewardResult(float(r)) for r in rewards.detach()]
        for b in want:
            q = queries[b]
            g = grad[b, N - len(rests[b]) + q.position - past_lens[b]]
            with torch.no_grad():   # the embedding module's rows, scaling included (Gemma): the one-hot gradient
                E = self.embed(torch.tensor(q.candidates, device=dev))
            out[b].scores = (E.double() @ g.double()).tolist()
        return out


class HeadAndJudge(RewardModel):
    """The shipped guide: a trained head on the backbone's hidden state at the response's last token, plus
    `weight` x the backbone asked as a yes/no judge (logit Yes - logit No), in one pass over the response and
    the judge's question. The head alone knows refusals but not helpfulness or truth, the judge the reverse
    (docs/reward-model.md). Causal attention keeps the question from changing the hidden state the head reads,
    so one forward and one backward give both rewards and the gradient of their sum; as two models they cost
    two of each. `head`: a Linear(hidden, 1) (ggro.guide.head_layer)."""

    def __init__(self, model, tokenizer, head: torch.nn.Module, weight: float, rubric: str, eos_ids=(),
                 max_cached: int = 64, prefixes: PrefixCache | None = None):
        super().__init__(model, tokenizer, "judge", rubric, eos_ids, max_cached, prefixes)
        self.guide_head, self.weight = head, weight
        self.lm_head = model.get_output_embeddings()

    def _reward(self, embeds, mask, pos, cache, last: torch.Tensor) -> torch.Tensor:
        h = self.base(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                      past_key_values=cache).last_hidden_state
        logits = self.lm_head(h[:, -1])
        judge = (logits[:, self.yes] - logits[:, self.no]).double()
        head = self.guide_head(h[torch.arange(len(h), device=h.device), last])[:, 0].double()
        return head + self.weight * judge
