"""Writing a Hugging Face model folder (config, generation config, one safetensors file) that `from_pretrained`
loads: the embedded model's converted copy (ggro.models) and a trained guide's classifier (ggro.guide)."""
from __future__ import annotations

from pathlib import Path


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
