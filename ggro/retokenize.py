"""A reward model with another vocabulary than the policy's, for the baselines (greedy, best-of-n).

GGRO reads the reward model's input gradient back as policy tokens, which needs one shared vocabulary.
Greedy and best-of-n only need a reward per complete response, so a reward model with its own tokenizer can
read the conversation as its users feed it: the policy's response is detokenized, and the prompt's messages
plus that response are rendered with the reward model's own chat template and tokenized by it.
"""
from __future__ import annotations

from .rows import InputRow
from .seam import Reward, RewardQuery, RewardResult


class Retokenized:
    """The Reward seam over `inner` (a reward model reading `reward_tok`'s ids) for queries in policy ids.

    Each prompt's row is registered first (`register`); a query's response is `tokens[prefix_len:]`, which is
    how the baselines ask (the prompt is their cached prefix). A classifier reads the closed conversation; a
    judge reads it with the assistant turn left open, since its question closes the turn itself.
    """

    def __init__(self, inner: Reward, policy_tok, reward_tok, prompt_format: str, judge: bool):
        self.inner, self.policy_tok, self.reward_tok = inner, policy_tok, reward_tok
        self.raw, self.judge = prompt_format == "raw", judge
        self.rows: dict[str, InputRow] = {}

    def register(self, row: InputRow) -> None:
        self.rows[row.id] = row

    def forget(self, row_id: str) -> None:
        """The row's response is scored and written: a long-lived aligner must not keep every row it saw."""
        self.rows.pop(row_id, None)

    def rm_ids(self, q: RewardQuery) -> list[int]:
        row = self.rows[q.seq_id]
        response = row.prefill + self.policy_tok.decode(q.tokens[q.prefix_len:], skip_special_tokens=True)
        if self.raw:
            return self.reward_tok.encode(row.prompt + response)
        msgs = row.messages + [{"role": "assistant", "content": response}]
        text = self.reward_tok.apply_chat_template(msgs, tokenize=False, continue_final_message=self.judge)
        return self.reward_tok.encode(text, add_special_tokens=False)

    def score(self, queries: list[RewardQuery]) -> list[RewardResult]:
        if any(q.position is not None for q in queries):
            raise ValueError("candidate scores need one shared vocabulary (GGRO); this reward model has its own")
        return self.inner.score([RewardQuery(self.rm_ids(q)) for q in queries])
