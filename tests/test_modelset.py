"""ModelSet (ggro/modelset.py): the one place a job's tokenizers, vocabulary decision, EOS ids and context
window are decided, on the tiny models (no Ray)."""
import pytest

from ggro import models
from ggro.config import ModelConfig, ModelLoadError
from ggro.modelset import ModelSet
from ggro.retokenize import Retokenized
from tests.conftest import save_other_vocab_rm


def test_one_vocabulary_needs_no_reward_tokenizer(tiny_models):
    ms = ModelSet(ModelConfig(policy=tiny_models["policy"], reward=tiny_models["classifier"],
                              reward_kind="classifier"))
    assert ms.vocab_problem is None and ms.refusal("ggro") is None
    ms.check("ggro")
    inner = object()
    assert ms.reward_seam(inner) is inner          # asked in policy ids as it is
    judge = ModelSet(ModelConfig(policy=tiny_models["policy"], reward_kind="judge"))   # the policy judges itself
    assert judge.vocab_problem is None and "_reward_vocab" in vars(judge) and "tokenizer" not in vars(judge)


def test_another_vocabulary_serves_the_baselines_only(tiny_models, tmp_path):
    rm = save_other_vocab_rm(tmp_path / "rm")
    ms = ModelSet(ModelConfig(policy=tiny_models["policy"], reward=str(rm), reward_kind="classifier"))
    assert ms.vocab_problem and ms.reward_tokenizer is not ms.tokenizer
    assert ms.refusal("greedy") is None and ms.refusal("best-of-n") is None
    assert ms.refusal("ggro").startswith(ms.vocab_problem)
    with pytest.raises(ModelLoadError, match="one shared vocabulary.*--method greedy or best-of-n"):
        ms.check("ggro")
    assert isinstance(ms.reward_seam(object()), Retokenized)


def test_eos_and_context_from_disk_equal_the_loaded_models(tiny_models):
    """Serve's ingress holds no weights and reads them from disk; workers read them from the loaded model."""
    mcfg = ModelConfig(policy=tiny_models["policy"])
    ms = ModelSet(mcfg)
    model = models.load_model(mcfg.policy)
    assert ms.eos_ids() == ms.eos_ids(model) == models.eos_ids(ms.tokenizer, model)
    assert ms.context() == ms.context(model) == model.config.max_position_embeddings
