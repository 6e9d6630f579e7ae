"""The front door: rows in, output records out (prompt encoding + the search) over any Policy and Reward, and
loading a policy and a reward model the one way every holder of weights loads them."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Iterator

from . import guide, models
from .config import REWARD_CACHED, ConfigError, GGROConfig, ModelConfig, cached_prefixes
from .confighash import config_hash
from .modelset import ANY_REWARD, ModelSet
from .packed import pack_linears
from .policy import SegmentDecoder, compile_options
from .retokenize import Retokenized, vocab_refusal
from .reward import HeadAndJudge, RewardModel
from .rows import InputRow, encode
from .schema import output_record
from .search import Result, run
from .seam import Policy, Prompt, Reward
from .shipped import JUDGE_WEIGHT


@dataclass
class Engine:
    """The one front door to a job's models, wherever their weights are. The search calls `policy` and `reward`
    (ggro/seam.py); what a job knows about its models (tokenizers, the vocabulary decision, EOS ids, context) is
    `models`. Three backends build one:
      in this process   `Engine.load`: --local, bench, eval;
      Ray actors        `Engine.remote(mcfg, context, reward=pool)`, its policy a replica set per call
                        (pipeline/batch/ray_align.py);
      Serve handles     the ingress's Engine (its ModelSet, no backends: pipeline/serve/app.py), run
                        `over(handles)` by each search loop (pipeline/serve/hub.py).
    Batch calls `align(rows)`; Serve encodes with `prompt`, and its loops `hold` rows and run `search`."""
    models: ModelSet
    policy: Policy | None
    reward: Reward | None
    context: int            # policy context window, tokens
    mcfg: ModelConfig       # the run's settings (batch size, fill, cohorts): bench varies them per method

    @property
    def tokenizer(self):
        return self.models.tokenizer

    @classmethod
    def load(cls, mcfg: ModelConfig, gradient: bool = True) -> "Engine":
        """Load both models in this process (the judge shares the policy's weights when it is the same model).
        `gradient`: the methods to run need the reward model's gradient (GGRO), hence one shared vocabulary."""
        mcfg = models.here(mcfg).in_one_process()   # `auto` made concrete: the config hash names what ran
        ms = ModelSet(mcfg)
        if gradient:
            ms.check("ggro")       # before any weights load
        policy_model, policy = load_policy(mcfg, ms, cached_prefixes(mcfg))
        reward = load_reward(mcfg, ms.tokenizer, policy_model, gradient, prefixes=policy.prefixes, model_set=ms)
        return cls(ms, policy, reward, ms.context(policy_model), mcfg)

    @classmethod
    def remote(cls, mcfg: ModelConfig, context: int, policy: Policy | None = None,
               reward: Reward | None = None) -> "Engine":
        """An Engine over models held elsewhere (Ray actors, Serve deployments), with its own ModelSet: fast
        tokenizers are not safe to share across threads. `reward` reads its own ids (ModelSet.reward_seam)."""
        ms = ModelSet(mcfg)
        return cls(ms, policy, None if reward is None else ms.reward_seam(reward), context, mcfg)

    def over(self, policy: Policy | None = None, reward: Reward | None = None) -> "Engine":
        """This engine with `policy` and/or `reward` (a reward model reading its own ids) as its backends."""
        return replace(self, policy=policy or self.policy,
                       reward=self.reward if reward is None else self.models.reward_seam(reward))

    def provenance(self, gcfg: GGROConfig) -> dict:
        return {"policy": self.mcfg.policy, "reward_model": self.mcfg.reward_model,
                "config_hash": config_hash(gcfg, self.mcfg), "seed": gcfg.seed}

    def prompt(self, row: InputRow, max_new_tokens: int, prompt_format: str | None = None) -> Prompt:
        """`row` as the search's Prompt (ValueError: it cannot be one, e.g. too long for the context)."""
        return encode(row, self.tokenizer, prompt_format or self.mcfg.prompt_format, max_new_tokens, self.context)

    def hold(self, row: InputRow, prompt_format: str | None = None) -> None:
        """Before `row`'s prompt (under the id `row.id`) is searched: a reward model of another vocabulary reads
        the row itself, in the format the policy read it."""
        if isinstance(self.reward, Retokenized):
            self.reward.register(row, prompt_format)

    def forget(self, prompt_id: str) -> None:
        """After the prompt's result: a long-lived engine must not keep every row it saw."""
        if isinstance(self.reward, Retokenized):
            self.reward.forget(prompt_id)

    def search(self, prompts: Iterable[Prompt | None], gcfg: GGROConfig, in_flight: int | None = None,
               withdrawn=None) -> Iterator[Result]:
        """The search of `gcfg` over `prompts` (ggro.search.run), `in_flight` at a time (default: the config's
        filled calls); `withdrawn`: Serve's cancellation hook (ggro.rounds.withdraw)."""
        in_flight = in_flight or self.mcfg.prompts_per_call(gcfg)
        return run(prompts, self.policy, self.reward, gcfg, in_flight, min(self.mcfg.cohorts, in_flight), withdrawn)

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
                    prompts.append(self.prompt(row, gcfg.max_new_tokens))
                    by_id[row.id] = row
                    self.hold(row)
                    continue
                except ValueError as e:
                    row.error = str(e)
            yield output_record(row, None, self.tokenizer, prov, gcfg.method)
        for res in self.search(prompts, gcfg):
            self.forget(res.id)
            yield output_record(by_id[res.id], res, self.tokenizer, prov, gcfg.method)


def load_policy(mcfg: ModelConfig, ms: ModelSet, max_cached: int, on_host: bool = False):
    """(model, decoder): the policy's weights and its batched, cached decoder, as every holder of a policy loads
    them (Engine.load, actors.worker.ModelWorker). `on_host`: a tensor-parallel rank loads on the host and gets
    its decoder (`decoder`) once sharded, so no GPU holds more than its shard (decoder None)."""
    model = models.load_model(mcfg.policy, "causal", mcfg.dtype, "cpu" if on_host else mcfg.device,
                              **mcfg.source(mcfg.policy))
    if not on_host:
        packed(model, mcfg)
    return model, None if on_host else decoder(model, ms, max_cached, mcfg.compile)


def packed(model, mcfg: ModelConfig):
    """`model` with a CPU's fp32 layers on packed weights (ggro/packed.py; a GPU's as loaded), as every loader here
    leaves it; not with --compile, whose step traces F.linear and would leave the copies unused."""
    if not mcfg.compile:
        pack_linears(model)
    return model


def decoder(model, ms: ModelSet, max_cached: int, compiled: bool = False) -> SegmentDecoder:
    """The batched, cached segment decoder over a policy `model` (whole or one tp rank's shard); `compiled`
    (ModelConfig.compile): static slabs and a compiled step, captured as CUDA graphs on a GPU."""
    return SegmentDecoder(model, ms.eos_ids(model), max_cached=max_cached, tokenizer=ms.tokenizer,
                          static=compiled, compile_options=compile_options(model) if compiled else None)


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
        causal = policy_model if shared else packed(models.load_model(spec, "causal", mcfg.dtype, mcfg.device,
                                                                      **mcfg.source(spec)), mcfg)
        eos = models.eos_ids(tok, causal)
        head = guide.head_layer(causal, guide.load_head(guide.shipped_head()))
        rm = HeadAndJudge(causal, tok, head, JUDGE_WEIGHT, mcfg.question, eos, cached,
                          prefixes=prefixes if shared else None)    # x + y read from the policy's cache
        return ms.reward_seam(rm) if policy_ids else rm
    # past the shipped guide, sharing the policy's weights means the policy judging itself
    model = policy_model if shared else packed(models.load_model(
        spec, "causal" if mcfg.reward_kind == "judge" else "classifier", mcfg.dtype, mcfg.device, **mcfg.source(spec)),
        mcfg)
    rm = RewardModel(model, tok, mcfg.reward_kind, mcfg.question, models.eos_ids(tok, model),
                     max_cached=cached, prefixes=prefixes if shared else None)
    return ms.reward_seam(rm) if policy_ids else rm
