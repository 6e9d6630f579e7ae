"""The models one ModelConfig names, decided once: the policy's tokenizer, the reward model's tokenizer and
whether it shares the policy's vocabulary (what each method may then do), the Reward the search calls, the
end-of-turn ids and the context window. Every holder of a job's models asks a ModelSet built from its
ModelConfig (in-process Engine, Ray workers and aligners, Serve's ingress and replicas); nobody re-derives.

Tokenizers load on first use, so a check that needs none (one model for both roles) loads nothing.
"""
from __future__ import annotations

from functools import cached_property

from . import models
from .config import ModelConfig, ModelLoadError, context_window
from .retokenize import Retokenized, vocab_refusal
from .seam import Reward

ANY_REWARD = " (--method greedy or best-of-n work with any reward model)"


class ModelSet:
    def __init__(self, mcfg: ModelConfig, tokenizer=None):
        """`tokenizer`: the policy's, when the caller already holds it (tests, a decoder built around one)."""
        self.mcfg = mcfg
        if tokenizer is not None:
            self.tokenizer = tokenizer

    @cached_property
    def tokenizer(self):
        """The policy's tokenizer: prompts are encoded and responses decoded with it."""
        m = self.mcfg
        return models.load_tokenizer(m.policy, **m.source(m.policy))

    @cached_property
    def _reward_vocab(self) -> tuple[object, str | None]:
        if self.mcfg.reward_model == self.mcfg.policy:
            return None, None
        return reward_vocab(self.mcfg, self.tokenizer)

    @property
    def reward_tokenizer(self):
        return self._reward_vocab[0] or self.tokenizer

    @property
    def vocab_problem(self) -> str | None:
        """How the reward model's vocabulary differs from the policy's (None: one vocabulary)."""
        return self._reward_vocab[1]

    def refusal(self, method: str) -> str | None:
        """Why `method` cannot run with this reward model (None: it can): only GGRO needs one vocabulary."""
        return vocab_refusal(self.vocab_problem, method)

    def check(self, method: str) -> None:
        """A ModelLoadError (before any weights load) when `method` cannot run with this reward model."""
        why = self.refusal(method)
        if why:
            raise ModelLoadError(why + ANY_REWARD)

    def reward_seam(self, inner: Reward) -> Reward:
        """`inner` (a reward model reading its own ids) as the Reward the search calls, in policy ids."""
        return reward_in_policy_ids(inner, self.mcfg, self.tokenizer, self.reward_tokenizer, self.vocab_problem)

    def eos_ids(self, model=None) -> list[int]:
        """The policy's end-of-turn ids: from its loaded `model`, else from its generation config on disk
        (Serve's ingress holds no weights)."""
        if model is not None:
            return models.eos_ids(self.tokenizer, model)
        from transformers import GenerationConfig
        where, kw = models.resolve(self.mcfg.policy, **self.mcfg.source(self.mcfg.policy))
        try:
            gen = GenerationConfig.from_pretrained(where, **kw)
        except (OSError, ValueError):   # no generation_config.json: the tokenizer's eos alone
            gen = None
        return models.eos_ids(self.tokenizer, generation_config=gen)

    def context(self, model=None) -> int:
        """The policy's context window: from its loaded `model`, else from its config on disk."""
        if model is not None:
            return context_window(model.config)
        from transformers import AutoConfig
        where, kw = models.resolve(self.mcfg.policy, **self.mcfg.source(self.mcfg.policy))
        return context_window(AutoConfig.from_pretrained(where, **kw))


def reward_vocab(mcfg: ModelConfig, policy_tok) -> tuple[object, str | None]:
    """The reward model's tokenizer, and how its vocabulary differs from the policy's (None: one vocabulary)."""
    spec = mcfg.reward_model
    if spec == mcfg.policy:
        return policy_tok, None
    tok = models.load_tokenizer(spec, **mcfg.source(spec))
    return tok, models.vocab_mismatch(policy_tok, tok, mcfg.policy, spec)


def reward_in_policy_ids(inner: Reward, mcfg: ModelConfig, policy_tok, reward_tok, problem: str | None) -> Reward:
    """`inner` (reading the reward model's own ids) as the search's Reward, which asks in policy ids: itself with
    one vocabulary, else wrapped to read each response in its own tokens and chat template (ggro.retokenize)."""
    if not problem:
        return inner
    return Retokenized(inner, policy_tok, reward_tok, mcfg.prompt_format, mcfg.reward_kind == "judge")
