"""Config fields listed once: flags, YAML keys, Serve's request knobs, `normalize` and the config hash are all
read from the fields' own metadata (ggro.config `knob`). These pin the derived lists to what the hand-written
ones of db9fe96 said, so outputs written before still resume and requests still group the same way."""
from __future__ import annotations

import dataclasses
import itertools

from ggro.config import GGROConfig, ModelConfig, knobs
from ggro.confighash import HASHED_WHEN_SET, NOT_HASHED, config_hash
from pipeline.serve.api import GGRO_KNOBS, normalize, uses_randomness


def test_the_config_hash_of_existing_outputs_is_unchanged():
    """The second hash was computed by db9fe96's own code (`git show db9fe96:ggro/config.py > old_config.py`,
    then `old_config.config_hash(...)` of the same pair), whose NOT_HASHED and HASHED_WHEN_SET were hand-written
    lists; resume compares this hash. The first, the all-defaults config, changed on purpose on 2026-12-03
    (it was e18150f2e636): it now hashes the shipped guide itself, which was retrained and blended with the
    judge that day, so an output of the old guide does not resume as if nothing had changed. It changed again on
    2026-12-04 (it was 6556f1314a18) when the guide was retrained on the policy's rollouts with judge weight 3, and
    on 2026-12-05 (it was 04c4ec59d92d) when the shipped head became an MLP, and on 2026-12-06 (it was
    66b46a70c6b0) when the guide's judge half got its own question and weight 1.5, again that day (it was
    92d2cd0227fa) when the head was retrained with every complying rollout in its rollout-refuse pairs, and again
    (it was 9a5b1ae7c3d6, which --top-k 25 still gives) when top_k's default became 10. The second, a best-of-n
    run with a judge asking the default rubric, did not change with any of them: best-of-n never reads top_k."""
    assert config_hash(GGROConfig(), ModelConfig()) == "d2282da40f9b"
    assert config_hash(GGROConfig(top_k=25), ModelConfig()) == "9a5b1ae7c3d6"
    g = GGROConfig(method="best-of-n", n=3, max_refined_segments=2, trace=True)
    m = ModelConfig(policy="p", revision="r1", trust_remote_code=True, batch_size=3, cohorts=2, fill=4)
    assert config_hash(g, m) == "190a3b81d86d"
    assert config_hash(g, dataclasses.replace(m, compile=True)) == "190a3b81d86d"   # same tokens: same outputs
    assert config_hash(dataclasses.replace(g, top_k=3), m) == "190a3b81d86d"   # best-of-n never reads top_k
    assert NOT_HASHED == ("batch_size", "cohorts", "compile", "fill")
    assert HASHED_WHEN_SET == {"max_refined_segments": None, "revision": None, "reward_revision": None,
                               "trust_remote_code": False}


def test_the_question_is_the_rubric_else_the_guides_or_the_default():
    """--rubric wins; without it the shipped guide's judge half asks GUIDE_QUESTION and any other judge DEFAULT_RUBRIC
    (what every judge asked before the guide got its own), and the hash reads the question asked."""
    from ggro.config import DEFAULT_RUBRIC
    from ggro.shipped import GUIDE_QUESTION
    assert ModelConfig().question == GUIDE_QUESTION != DEFAULT_RUBRIC
    assert ModelConfig(policy="p").question == ModelConfig(reward="default", reward_kind="judge").question == DEFAULT_RUBRIC
    assert ModelConfig(rubric="Is it short?").question == "Is it short?"
    judge = ModelConfig(policy="p")
    assert config_hash(GGROConfig(), judge) == config_hash(GGROConfig(), dataclasses.replace(judge, rubric=DEFAULT_RUBRIC))
    assert config_hash(GGROConfig(), ModelConfig()) == config_hash(GGROConfig(), ModelConfig(rubric=GUIDE_QUESTION))
    assert config_hash(GGROConfig(), ModelConfig()) != config_hash(GGROConfig(), ModelConfig(rubric=DEFAULT_RUBRIC))


def test_every_field_is_a_knob():
    """A field made without `knob` would have no flag, no YAML key and no hash rule."""
    for cls in (GGROConfig, ModelConfig):
        assert knobs(cls) == dataclasses.fields(cls)


def test_serve_request_knobs_are_db9fe96s():
    assert GGRO_KNOBS == {
        "method": str, "num_refinements": int, "entropy_threshold": (int, float), "top_k": int,
        "nudge_temperature": (int, float), "selection": str, "scoring": str, "min_segment_tokens": int,
        "initial_insertion_offset": int, "n": int, "prefill": str, "search_mode": str, "max_refined_segments": int,
        "adaptive_margin": (int, float)}


def old_normalize(cfg: GGROConfig) -> GGROConfig:
    """db9fe96's hand-written normalize, kept here as the reference the derived one must equal."""
    d = GGROConfig()
    if cfg.method != "best-of-n":
        cfg = dataclasses.replace(cfg, n=d.n, temperature=d.temperature, top_p=d.top_p)
    if cfg.method != "ggro":
        cfg = dataclasses.replace(cfg, num_refinements=d.num_refinements, entropy_threshold=d.entropy_threshold,
                                  top_k=d.top_k, nudge_temperature=d.nudge_temperature, selection=d.selection,
                                  scoring=d.scoring, min_segment_tokens=d.min_segment_tokens,
                                  initial_insertion_offset=d.initial_insertion_offset, search_mode=d.search_mode,
                                  adaptive_margin=d.adaptive_margin, max_refined_segments=d.max_refined_segments)
    if not uses_randomness(cfg):
        cfg = dataclasses.replace(cfg, seed=d.seed)
    return cfg


def test_normalize_resets_what_db9fe96s_reset():
    away = dict(num_refinements=7, entropy_threshold=0.5, top_k=3, nudge_temperature=0.3, scoring="taylor",
                min_segment_tokens=5, initial_insertion_offset=2, search_mode="adaptive", adaptive_margin=0.1,
                max_refined_segments=2, n=6, temperature=0.9, top_p=0.5, seed=11, max_new_tokens=9, trace=True)
    for method, selection in itertools.product(("ggro", "greedy", "best-of-n"), ("greedy", "sample")):
        cfg = GGROConfig(method=method, selection=selection, **away)
        assert normalize(cfg) == old_normalize(cfg), (method, selection)


def test_the_shipped_guide_is_in_the_hash(monkeypatch):
    """`--reward default` names whatever guide ships: a new judge weight (or head) is a new config; a reward model
    the user names is hashed by its name alone."""
    import ggro.shipped as C
    default, named = ModelConfig(), ModelConfig(reward="org/rm", reward_kind="classifier")
    before = config_hash(GGROConfig(), default), config_hash(GGROConfig(), named)
    monkeypatch.setattr(C, "JUDGE_WEIGHT", C.JUDGE_WEIGHT + 1)
    assert config_hash(GGROConfig(), default) != before[0]
    assert config_hash(GGROConfig(), named) == before[1]
