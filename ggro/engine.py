"""Rows in, output records out: prompt encoding + the search, over any Policy and Reward."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Iterator

from . import guide, models
from .config import LOCAL_FILL, ConfigError, GGROConfig, ModelConfig, config_hash
from .policy import SegmentDecoder
from .retokenize import Retokenized, vocab_refusal
from .reward import RewardModel
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
        mcfg = models.here(mcfg)       # `auto` dtype/device made concrete: the config hash names what ran
        if mcfg.fill is None:          # one CPU process: fill GGRO's decode calls (ModelConfig.decode_rows)
            mcfg = replace(mcfg, fill=LOCAL_FILL if mcfg.device == "cpu" else 1)
        tok = models.load_tokenizer(mcfg.policy, **mcfg.source(mcfg.policy))
        policy_model = models.load_model(mcfg.policy, "causal", mcfg.dtype, mcfg.device,
                                         **mcfg.source(mcfg.policy))
        policy = SegmentDecoder(policy_model, models.eos_ids(tok, policy_model), max_cached=cached(mcfg),
                                tokenizer=tok)
        return cls(tok, policy, load_reward(mcfg, tok, policy_model, gradient, prefixes=policy.prefixes),
                   context_window(policy_model.config), mcfg)

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


def cached(mcfg: ModelConfig) -> int:
    """Prefix-cache entries per model: twice the prompts a GGRO search keeps in flight (one entry each), so
    the least-recently-used one evicted is never in use."""
    return max(4, 2 * (mcfg.fill or 1)) * mcfg.batch_size


def reward_vocab(mcfg: ModelConfig, policy_tok) -> tuple[object, str | None]:
    """The reward model's tokenizer, and how its vocabulary differs from the policy's (None: one vocabulary)."""
    spec = mcfg.reward_model
    if spec == mcfg.policy:
        return policy_tok, None
    tok = models.load_tokenizer(spec, **mcfg.source(spec))
    return tok, models.vocab_mismatch(policy_tok, tok, mcfg.policy, spec)


ANY_REWARD = " (--method greedy or best-of-n work with any reward model)"


def check_vocab(problem: str | None, gradient: bool) -> None:
    """GGRO (`gradient`) reads the reward model's gradient as policy tokens: one vocabulary or an error."""
    why = vocab_refusal(problem, "ggro") if gradient else None
    if why:
        raise models.ModelLoadError(why + ANY_REWARD)


def reward_in_policy_ids(inner: Reward, mcfg: ModelConfig, policy_tok, reward_tok, problem: str | None) -> Reward:
    """`inner` (reading the reward model's own ids) as the search's Reward, which asks in policy ids: itself with
    one vocabulary, else wrapped to read each response in its own tokens and chat template (ggro.retokenize)."""
    if not problem:
        return inner
    return Retokenized(inner, policy_tok, reward_tok, mcfg.prompt_format, mcfg.reward_kind == "judge")


def load_reward(mcfg: ModelConfig, policy_tok, policy_model=None, gradient: bool = True,
                policy_ids: bool = True, prefixes=None) -> Reward:
    """The reward model; on the policy's weights when the config says they are shared and they are at hand.

    With another vocabulary than the policy's it serves the methods that need no `gradient` (greedy,
    best-of-n); GGRO gets a ModelLoadError. `policy_ids` False: the plain model, queried in its own ids (Ray
    workers, whose callers translate). `prefixes`: the policy decoder's prefix cache, shared when the
    reward model runs on the policy's weights (RewardModel)."""
    tok, problem = reward_vocab(mcfg, policy_tok)
    check_vocab(problem, gradient and policy_ids)
    spec = mcfg.reward_model
    shared = mcfg.shares_policy_weights and policy_model is not None
    if not shared:
        model = models.load_model(spec, "causal" if mcfg.reward_kind == "judge" else "classifier", mcfg.dtype,
                                  mcfg.device, **mcfg.source(spec))
    elif mcfg.reward_kind == "judge":
        model = policy_model
    else:
        model = guide.shipped_guide(policy_model)
    rm = RewardModel(model, tok, mcfg.reward_kind, mcfg.rubric, models.eos_ids(tok, model),
                     max_cached=max(64, cached(mcfg)), prefixes=prefixes if shared else None)
    return reward_in_policy_ids(rm, mcfg, policy_tok, tok, problem) if policy_ids else rm


def context_window(config) -> int:
    return int(getattr(config, "max_position_embeddings", None) or 2048)
