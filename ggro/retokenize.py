"""A reward model with another vocabulary than the policy's, for the baselines (greedy, best-of-n).

GGRO reads the reward model's input gradient back as policy tokens, which needs one shared vocabulary.
Greedy and best-of-n only need a reward per complete response, so a reward model with its own tokenizer can
read the conversation as its users feed it: the policy's response is detokenized, and the prompt's messages
plus that response are rendered with the reward model's own chat template and tokenized by it.
"""
from __future__ import annotations

from .chat import chat_ids, encode_spans
from .rows import InputRow
from .seam import Reward, RewardQuery, RewardResult


def vocab_refusal(problem: str | None, method: str) -> str | None:
    """Why `method` cannot use a reward model whose vocabulary differs from the policy's as `problem` says
    (ggro.modelset.ModelSet.vocab_problem; None: one vocabulary), or None when it can. Only GGRO reads the reward model's
    gradient, as policy tokens; greedy and best-of-n score whole responses, which Retokenized translates."""
    if problem and method == "ggro":
        return f"{problem}: GGRO reads the reward model's gradient as policy tokens and needs one shared vocabulary"
    return None


class Retokenized:
    """The Reward seam over `inner` (a reward model reading `reward_tok`'s ids) for queries in policy ids.

    Each prompt's row is registered first (`register`, under its prompt id: the queries' seq_id); a query's
    response is `tokens[prefix_len:]`, which is how the baselines ask (the prompt is their cached prefix). A
    classifier reads the closed conversation; a judge reads it with the assistant turn left open, since its
    question closes the turn itself.
    """

    def __init__(self, inner: Reward, policy_tok, reward_tok, prompt_format: str, judge: bool):
        self.inner, self.policy_tok, self.reward_tok = inner, policy_tok, reward_tok
        self.prompt_format, self.judge = prompt_format, judge
        self.rows: dict[str, tuple[InputRow, bool]] = {}     # prompt id -> (row, read raw)

    def register(self, row: InputRow, prompt_format: str | None = None) -> None:
        """`prompt_format`: how the policy read this row, when not as the constructor's (Serve's completions
        endpoint reads a raw prompt, its chat endpoint the messages, and one search may hold both)."""
        self.rows[row.id] = (row, (prompt_format or self.prompt_format) == "raw")

    def forget(self, row_id: str) -> None:
        """The row's response is scored and written: a long-lived aligner must not keep every row it saw."""
        self.rows.pop(row_id, None)

    def rm_ids(self, q: RewardQuery) -> list[int]:
        row, raw = self.rows[q.seq_id]
        response = row.prefill + self.policy_tok.decode(q.tokens[q.prefix_len:], skip_special_tokens=True)
        if raw:     # the raw prompt is its user's template text (ggro.rows.encode); the response is content
            text = row.prompt + response
            return encode_spans(self.reward_tok, text, [(len(row.prompt), len(text))], add_special_tokens=True)
        msgs = row.messages + [{"role": "assistant", "content": response}]
        return chat_ids(self.reward_tok, msgs, continue_final_message=self.judge)

    def score(self, queries: list[RewardQuery]) -> list[RewardResult]:
        if any(q.position is not None for q in queries):
            raise ValueError("candidate scores need one shared vocabulary (GGRO); this reward model has its own")
        return self.inner.score([RewardQuery(self.rm_ids(q)) for q in queries])
