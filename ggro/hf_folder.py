"""Writing a Hugging Face model folder (config, generation config, one safetensors file) that `from_pretrained`
loads: the embedded model's converted copy (ggro.models) and a trained guide's classifier (ggro.guide); and reading
a safetensors file's header without torch (the planner's counts, a guide head's width)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from .config import ModelLoadError


def save_weights(model, out: Path) -> None:
    """A Hugging Face model folder (config, generation config, one safetensors file) that from_pretrained loads.
    Not `save_pretrained`: it imports DeepSpeed when installed (accelerate's unwrap check), which prints a
    "Setting accelerator to CPU" warning into a user's first run. A tied weight is stored once, under its first
    name; the config's tie_word_embeddings ties it again on load."""
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]     # as save_pretrained records it
    model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:      # a classifier has none
        model.generation_config.save_pretrained(out)
    seen, state = set(), {}
    for name, t in model.state_dict().items():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            state[name] = t.contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


def safetensors_shapes(path: Path) -> dict[str, dict]:
    """A safetensors file's tensors (name -> dtype, shape, offsets) from its JSON header: no tensor data read."""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > path.stat().st_size - 8:      # a damaged file's first bytes: never allocate what they say
                raise ValueError(f"its header claims {n} bytes")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError(f"its header is a {type(header).__name__}")
        header.pop("__metadata__", None)
        if not all(isinstance(t, dict) and isinstance(t.get("shape"), list)
                   and all(isinstance(d, int) and d >= 0 for d in t["shape"]) for t in header.values()):
            raise ValueError("a tensor in its header has no shape")
    except (OSError, ValueError, struct.error) as e:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({e})") from None
    return header


def check_head(spec: str, path: Path, hidden: int) -> None:
    """A guide head file (ggro.guide.save_head: `score.weight` or `score.0.weight`) that reads `hidden` features,
    else a ModelLoadError: one trained on another backbone fails here, not at the first score deep in a search.
    The planner (no weights) and ggro.models.load_model both ask it."""
    shapes = safetensors_shapes(path)
    first = shapes.get("score.weight") or shapes.get("score.0.weight")
    if first is None:
        raise ModelLoadError(f"{path}: not a guide head (tensors {sorted(shapes)})")
    if first["shape"][-1] != hidden:
        raise ModelLoadError(f"{spec}: its guide head {path.name} reads {first['shape'][-1]} features, but the "
                             f"model's hidden size is {hidden}: the head was trained on another backbone")
