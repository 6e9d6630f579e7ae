"""Rows in, output records out: prompt encoding + the search, over any Policy and Reward."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

from . import guide, models
from .config import (DEFAULT_RUBRIC, JUDGE_WEIGHT, REWARD_CACHED, ConfigError, GGROConfig, ModelConfig, cached_prefixes,
                     config_hash)
from .modelset import ANY_REWARD, ModelSet
from .policy import SegmentDecoder
from .retokenize import Retokenized, vocab_refusal
from .reward import HeadAndJudge, RewardModel
from .rows import InputRow, encode
from .schema import output_record
from .search import run
from .seam import Policy, Reward


@dataclass
class Engine:
    tokenizer: object
    policy: Policy
    reward: Reward
    context: int            # policy context window, tokens
    mcfg: ModelConfig

    @classmethod
    def load(cls, mcfg: ModelConfig, gradient: bool = True) -> "Engine":
        """Load both models in this process (the judge shares the policy's weights when it is the same model).
        `gradient`: the methods to run need the reward model's gradient (GGRO), hence one shared vocabulary."""
        mcfg = models.here(mcfg).in_one_process()   # `auto` made concrete: the config hash names what ran
        ms = ModelSet(mcfg)
        if gradient:
            ms.check("ggro")       # before any weights load
        policy_model = models.load_model(mcfg.policy, "causal", mcfg.dtype, mcfg.device,
                                         **mcfg.source(mcfg.policy))
        policy = SegmentDecoder(policy_model, ms.eos_ids(policy_model), max_cached=cached_prefixes(mcfg),
                                tokenizer=ms.tokenizer)
        reward = load_reward(mcfg, ms.tokenizer, policy_model, gradient, prefixes=policy.prefixes, model_set=ms)
        return cls(ms.tokenizer, policy, reward, ms.context(policy_model), mcfg)

    def provenance(self, gcfg: GGROConfig) -> dict:
        return {"policy": self.mcfg.policy, "reward_model": self.mcfg.reward_model,
                "config_hash": config_hash(gcfg, self.mcfg), "seed": gcfg.seed}

    def align(self, rows: Iterable[InputRow], gcfg: GGROConfig) -> Iterator[dict]:
        """One output record per input row, in completion order; bad rows become error records."""
        if gcfg.method == "ggro" and isinstance(self.reward, Retokenized):
            raise ConfigError(f"{vocab_refusal('this reward model has its own vocabulary', 'ggro')}{ANY_REWARD}")
        prov = self.provenance(gcfg)
        by_id: dict[str, InputRow] = {}
        prompts = []
        for row in rows:
            if row.error is None:
                try:
                    prompts.append(encode(row, self.tokenizer, self.mcfg.prompt_format, gcfg.max_new_tokens,
                                          self.context))
                    by_id[row.id] = row
                    if isinstance(self.reward, Retokenized):
                        self.reward.register(row)
                    continue
                except ValueError as e:
                    row.error = str(e)
            yield output_record(row, None, self.tokenizer, prov, gcfg.method)
        in_flight = self.mcfg.prompts_per_call(gcfg)
        for res in run(prompts, self.policy, self.reward, gcfg, in_flight, min(self.mcfg.cohorts, in_flight)):
            if isinstance(self.reward, Retokenized):
                self.reward.forget(res.id)
            yield output_record(by_id[res.id], res, self.tokenizer, prov, gcfg.method)


def load_reward(mcfg: ModelConfig, policy_tok, policy_model=None, gradient: bool = True,
                policy_ids: bool = True, prefixes=None, model_set: ModelSet | None = None) -> Reward:
    """The reward model; on the policy's weights when the config says they are shared and they are at hand.

    With another vocabulary than the policy's it serves the methods that need no `gradient` (greedy,
    best-of-n); GGRO gets a ModelLoadError. `policy_ids` False: the plain model, queried in its own ids (Ray
    workers, whose callers translate). `prefixes`: the policy decoder's prefix cache, shared when the
    reward model runs on the policy's weights (RewardModel). `model_set`: the job's ModelSet, when built."""
    ms = model_set or ModelSet(mcfg, policy_tok)
    if gradient and policy_ids:
        ms.check("ggro")
    tok = ms.reward_tokenizer
    spec = mcfg.reward_model
    shared = mcfg.shares_policy_weights and policy_model is not None
    cached = max(REWARD_CACHED, cached_prefixes(mcfg))
    if mcfg.uses_shipped_guide:    # head + the backbone as judge
        causal = policy_model if shared else models.load_model(spec, "causal", mcfg.dtype, mcfg.device,
                                                               **mcfg.source(spec))
        eos = models.eos_ids(tok, causal)
        head = guide.head_layer(causal, guide.load_head(guide.shipped_head()))
        rm = HeadAndJudge(causal, tok, head, JUDGE_WEIGHT, DEFAULT_RUBRIC, eos, cached,
                          prefixes=prefixes if shared else None)    # x + y read from the policy's cache
        return ms.reward_seam(rm) if policy_ids else rm
    # past the shipped guide, sharing the policy's weights means the policy judging itself
    model = policy_model if shared else models.load_model(
        spec, "causal" if mcfg.reward_kind == "judge" else "classifier", mcfg.dtype, mcfg.device, **mcfg.source(spec))
    rm = RewardModel(model, tok, mcfg.reward_kind, mcfg.rubric, models.eos_ids(tok, model),
                     max_cached=cached, prefixes=prefixes if shared else None)
    return ms.reward_seam(rm) if policy_ids else rm
