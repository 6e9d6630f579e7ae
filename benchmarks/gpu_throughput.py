"""Throughput of the GGRO building blocks on one device with a random-weight model of a real shape.

    python benchmarks/gpu_throughput.py                         # Llama-3.2-1B shape, bf16, cuda
    python benchmarks/gpu_throughput.py --batch-sizes 1,8,32 --prompt-tokens 512 --new-tokens 128 --json out.json
    python benchmarks/gpu_throughput.py --preset tiny --device cpu --dtype float32   (smoke test)

Measures, per batch size: the policy's prefill (tokens/s) and segment decode (generated tokens/s,
aggregate over the batch) through ggro.policy.SegmentDecoder, and the reward model's
reward + input-gradient candidate scoring (sequences/s) through ggro.reward.RewardModel
(classifier head on the same shape), with peak device memory. Weights are random (no download):
speed and memory depend on shapes, not values. Decoding never stops early (no EOS, no entropy stop).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ggro.policy import SegmentDecoder  # noqa: E402
from ggro.reward import RewardModel  # noqa: E402
from ggro.seam import RewardQuery, SegmentRequest  # noqa: E402

PRESETS = {
    # meta-llama/Llama-3.2-1B's config.json shapes (1.24B parameters, tied embeddings)
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                     tie_word_embeddings=True, rope_theta=500000.0),
    # the embedded default's shapes (SmolLM2-135M-Instruct: 135M parameters, tied embeddings)
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         tie_word_embeddings=True, rope_theta=100000.0),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                 tie_word_embeddings=True),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build(preset: str, kind: str, device: str, dtype: str, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification
    cfg = LlamaConfig(**{**PRESETS[preset], **overrides}, pad_token_id=0, eos_token_id=None, bos_token_id=None,
                      **({"num_labels": 1} if kind == "classifier" else {}))
    torch.manual_seed(0)
    cls = LlamaForSequenceClassification if kind == "classifier" else LlamaForCausalLM
    with torch.device(device):
        model = cls(cfg).to(DTYPES[dtype])
    model.requires_grad_(False)
    return model.eval()


def no_device(device: str, hint: str) -> bool:
    """True (after saying so) when `device` is CUDA and there is none: the benchmarks then exit 2."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"no CUDA device: pass --device cpu ({hint} for a quick check)", file=sys.stderr)
        return True
    return False


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_gib(device: str) -> float | None:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def bench_policy(model, device: str, batch: int, prompt_tokens: int, new_tokens: int, vocab: int, tag: str) -> dict:
    dec = SegmentDecoder(model, eos_ids=[], max_cached=4 * batch)
    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(4, vocab, (prompt_tokens,), generator=g).tolist() for _ in range(batch)]
    reqs = [SegmentRequest(f"{tag}-{i}", p, max_tokens=new_tokens) for i, p in enumerate(prompts)]
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    # prefill: a 1-token segment builds every sequence's prefix KV cache (the first token comes from the
    # cached last logits, so no decode step runs); public API only
    dec.decode([SegmentRequest(r.seq_id, r.prefix, max_tokens=1) for r in reqs])
    sync(device)
    t1 = time.perf_counter()
    out = dec.decode(reqs)                  # decode: prefix-cache hits, new_tokens steps
    sync(device)
    t2 = time.perf_counter()
    generated = sum(len(r.tokens) for r in out)
    assert generated == batch * new_tokens, generated
    return {"prefill_tok_s": batch * prompt_tokens / (t1 - t0), "decode_tok_s": generated / (t2 - t1),
            "decode_s": t2 - t1, "policy_peak_gib": peak_gib(device)}


def bench_reward(rm: RewardModel, device: str, batch: int, seq_tokens: int, vocab: int, top_k: int = 25) -> dict:
    g = torch.Generator().manual_seed(1000 + batch)
    queries = [RewardQuery(torch.randint(4, vocab, (seq_tokens,), generator=g).tolist(), position=seq_tokens // 2,
                           candidates=torch.randint(4, vocab, (top_k,), generator=g).tolist())
               for _ in range(batch)]
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    out = rm.score(queries)
    sync(device)
    dt = time.perf_counter() - t0
    assert all(r.scores is not None and len(r.scores) == top_k for r in out)
    return {"reward_seq_s": batch / dt, "reward_ms_per_batch": dt * 1e3, "reward_peak_gib": peak_gib(device)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama-1b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--skip-reward", action="store_true")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    if no_device(a.device, "with --preset tiny"):
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    sizes = [int(s) for s in a.batch_sizes.split(",")]
    vocab = PRESETS[a.preset]["vocab_size"]
    policy = build(a.preset, "causal", a.device, a.dtype)
    n_params = sum(t.numel() for t in policy.parameters())
    device_name = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else f"cpu x{torch.get_num_threads()}"
    print(f"# {a.preset} ({n_params / 1e9:.2f}B params, random weights), {a.dtype} on {device_name}; "
          f"prompt {a.prompt_tokens} tokens, {a.new_tokens} new tokens", file=sys.stderr)
    bench_policy(policy, a.device, 1, 16, 4, vocab, "warmup")
    rows = [{"batch": b, **bench_policy(policy, a.device, b, a.prompt_tokens, a.new_tokens, vocab, f"b{b}")}
            for b in sizes]
    del policy
    if not a.skip_reward:
        rm = RewardModel(build(a.preset, "classifier", a.device, a.dtype), None, "classifier")
        bench_reward(rm, a.device, 1, 16, vocab)
        for row in rows:
            row.update(bench_reward(rm, a.device, row["batch"], a.prompt_tokens + a.new_tokens, vocab))
    cols = ["batch", "prefill_tok_s", "decode_tok_s", "policy_peak_gib", "reward_seq_s", "reward_ms_per_batch",
            "reward_peak_gib"]
    cols = [c for c in cols if any(c in r for r in rows)]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join("-" if r.get(c) is None else f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c])
                                for c in cols) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps({"preset": a.preset, "params": n_params, "dtype": a.dtype,
                                            "device": device_name, "prompt_tokens": a.prompt_tokens,
                                            "new_tokens": a.new_tokens, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
