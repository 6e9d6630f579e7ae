"""GGRO's methods side by side on one device, with random-weight models of a real shape.

    python benchmarks/gpu_methods.py --json m.json --csv m.csv     # Llama-3.2-1B shape, bf16, cuda, batch 1 and 16
    python benchmarks/gpu_methods.py --tiny --device cpu           # tiny shape, fp32 on the CPU (smoke test)

Policy: a random-weight LlamaForCausalLM with Llama-3.2-1B's shapes (1.24B parameters); reward model:
its LlamaForSequenceClassification twin (num_labels=1). For each batch size b, b prompts of random
token ids (--prompt-tokens each) get --new-tokens tokens from every method, b rows per decode call
(the engine's --batch-size; best-of-4 decodes b/4 prompts x 4 samples per call, 4 rows at b=1):

  hf-generate  transformers' model.generate, greedy: the yardstick for our decoder
  decoder      ggro.policy.SegmentDecoder, one greedy segment per prompt (no reward model)
  compiled     the same over persistent KV slabs with the model's step compiled whole and captured as CUDA
               graphs (`--compile`: SegmentDecoder(static=True), torch.compile mode reduce-overhead); in the
               default list on CUDA only (on a CPU each shape costs an inductor build)
  greedy       ggro.search.run(method=greedy): the decoder plus one reward per prompt
  best-of-4    ggro.search.run(method=best-of-n, n=4)
  ggro         ggro.search.run(method=ggro), default search settings (S=4, tau=1.5, top-k 10)
  lookahead    ggro with --search-mode lookahead --max-refined-segments 1 (S=4): the mode that beats
               best-of-N on the CPU (docs/performance.md)

Random weights give near-uniform next-token distributions (entropy ~ ln(vocab), far above tau), so
every GGRO segment ends at min_segment_tokens: the most segments and reward calls per token, a
pessimistic case for GGRO's cost. So every method runs on two policies (--variants): `random`, and
`peaked`, the same weights with the final norm's gain scaled so that logits scale by one factor s, found
by bisection so that a fraction --uncertain (0.2) of greedy positions has entropy >= tau, as on
the embedded model (segments of ~5 tokens); the rows' `seg_len` column is what GGRO then decoded. The models have no EOS, so every response has --new-tokens tokens.
Each (method, batch) runs --repeats times after a short warm-up; the table has the median wall. Also checks that fp32 tokens are identical on
the CPU and on --device for a tiny model (decoder and GGRO), prints a Markdown table and the targets
of docs/gpu.md, and writes --json / --csv.
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_throughput import PRESETS, build, no_device, peak_gib, reset_peak, sync  # noqa: E402

from ggro.config import GGROConfig  # noqa: E402
from ggro.policy import SegmentDecoder, compile_options  # noqa: E402
from ggro.reward import RewardModel  # noqa: E402
from ggro.search import Prompt, run  # noqa: E402
from ggro.seam import SegmentRequest  # noqa: E402

METHODS = ("hf-generate", "decoder", "greedy", "best-of-4", "ggro", "lookahead")
COMPILED = "compiled"
ALL_METHODS = METHODS + (COMPILED,)
_compiled: dict[int, SegmentDecoder] = {}      # one compiled decoder per policy: its graphs are reused


def compiled_decoder(policy) -> SegmentDecoder:
    if id(policy) not in _compiled:
        _compiled[id(policy)] = SegmentDecoder(policy, eos_ids=[], static=True, compile_options=compile_options(policy))
    return _compiled[id(policy)]
# docs/performance.md, 24 held-out prompts on the default model and guide: faithful GGRO S=4 took 8.3x
# greedy's wall time on the CPU.
CPU_RATIO = 8.3
# what each search method runs, as GGROConfig settings over the benchmark's own
SEARCH = {"greedy": {"method": "greedy"}, "best-of-4": {"method": "best-of-n"}, "ggro": {"method": "ggro"},
          "lookahead": {"method": "ggro", "search_mode": "lookahead", "max_refined_segments": 1}}


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (length,), generator=g).tolist() for _ in range(n)]


def hf_generate(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    ids = torch.tensor(prompts, device=model.device)       # one prompt length: no padding needed
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=0)
    return [row[ids.shape[1]:].tolist() for row in out]


def peak(policy, prompts: list[list[int]], new_tokens: int, tau: float, uncertain: float) -> float:
    """Scale `policy`'s logits (its final norm's gain, so tied embeddings stay as they are) by the factor s at
    which a fraction `uncertain` of its greedy continuations' positions has next-token entropy >= tau; returns
    s. Scaling changes no argmax, so the greedy continuation is the same at every s, and entropy falls
    monotonically as logits scale up, so bisection (in log s) finds it."""
    from ggro.policy import entropy
    dev = next(policy.parameters()).device
    gen = hf_generate(policy, prompts, new_tokens)
    with torch.no_grad():
        full = torch.tensor([p + g for p, g in zip(prompts, gen)], device=dev)
        z = policy(input_ids=full).logits[:, len(prompts[0]) - 1:-1].float().flatten(0, 1)
        frac = lambda s: float((entropy(z * s) >= tau).float().mean())
        lo, hi = 1e-3, 1e3
        for _ in range(40):
            mid = (lo * hi) ** 0.5
            lo, hi = (mid, hi) if frac(mid) > uncertain else (lo, mid)
        s = (lo * hi) ** 0.5
        policy.model.norm.weight.mul_(s)
    return s


def one(method: str, policy, dec: SegmentDecoder, rm: RewardModel, prompts, cfg: GGROConfig, tag: str):
    """Run `method` on all prompts as one batch: (response tokens per prompt, policy tokens, RM calls,
    segments). `tag` makes sequence ids unique, so no run finds another's prefix caches."""
    if method == "hf-generate":
        toks = hf_generate(policy, prompts, cfg.max_new_tokens)
        return toks, sum(map(len, toks)), 0, 0
    if method in ("decoder", COMPILED):
        dec = compiled_decoder(policy) if method == COMPILED else dec
        reqs = [SegmentRequest(f"{tag}-{i}", p, cfg.max_new_tokens) for i, p in enumerate(prompts)]
        out = dec.decode(reqs)
        dec.release([r.seq_id for r in reqs])
        return [r.tokens for r in out], sum(r.decoded for r in out), 0, 0
    search = dataclasses.replace(cfg, **SEARCH[method])
    res = {r.id: r for r in run([Prompt(f"{tag}-{i}", p) for i, p in enumerate(prompts)], dec, rm, search,
                                len(prompts))}
    ordered = [res[f"{tag}-{i}"] for i in range(len(prompts))]
    return ([r.tokens for r in ordered], sum(r.policy_tokens for r in ordered),
            sum(r.reward_calls for r in ordered), sum(r.num_segments for r in ordered))


def measure(method, models, prompts, cfg, device, tag, repeats: int) -> tuple[dict, list[list[int]]]:
    """`repeats` timed runs (fresh sequence ids each, so no run reuses another's caches); the median wall.
    One run is not enough on a shared host: a first GPU run had the decoder alone slower than greedy."""
    walls = []
    for k in range(repeats):
        reset_peak(device)
        sync(device)
        t0 = time.perf_counter()
        toks, policy_tokens, rm_calls, segments = one(method, *models, prompts, cfg, f"{tag}-r{k}")
        sync(device)
        walls.append(time.perf_counter() - t0)
    wall = sorted(walls)[len(walls) // 2]
    n = sum(map(len, toks))
    return {"batch": len(prompts), "method": method, "wall_s": wall, "tokens": n, "tok_s": n / wall,
            "prompts_s": len(prompts) / wall, "policy_tok_s": policy_tokens / wall, "rm_calls": rm_calls,
            "seg_len": n / segments if segments else None,
            "peak_gib": peak_gib(device), "walls": [round(w, 3) for w in walls]}, toks


def fp32_check(device: str, cfg: GGROConfig) -> dict:
    """Identical fp32 tokens on the CPU and on `device`: the decoder (greedy) and GGRO, tiny shape.
    initializer_range 0.4 makes next-token distributions range from peaked to flat (entropy stops vary)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False      # TF32 matmuls differ from the CPU in the 3rd decimal
    try:
        base = [build("tiny", kind, "cpu", "float32", initializer_range=0.4) for kind in ("causal", "classifier")]
        prompts = random_prompts(8, 16, PRESETS["tiny"]["vocab_size"], seed=7)
        check = dataclasses.replace(cfg, max_new_tokens=24, num_refinements=3, top_k=5)
        got = {}
        for dev in ("cpu", device):
            policy, cls = (copy.deepcopy(m).to(dev) for m in base)    # the same weights on both devices
            models = (policy, SegmentDecoder(policy, eos_ids=[]), RewardModel(cls, None, "classifier"))
            got[dev] = {m: one(m, *models, prompts, check, f"check-{m}")[0] for m in ("decoder", "ggro")}
            del models, policy, cls
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return {m: f"{sum(a == b for a, b in zip(got['cpu'][m], got[device][m]))}/{len(prompts)}"
            for m in ("decoder", "ggro")}


def targets(rows: list[dict], cpu_ratio: float) -> list[dict]:
    """docs/gpu.md's targets, read off the rows of the smallest and the largest batch (those measured): the
    decoder's and GGRO's on the random model, GGRO's and lookahead's against greedy on the peaked one."""
    peaked = {(r["batch"], r["method"]): r for r in rows if r["model"] == "peaked"}
    by = {(r["batch"], r["method"]): r for r in rows if r["model"] == "random"}
    lo, hi = min(r["batch"] for r in rows), max(r["batch"] for r in rows)
    out = []
    for b, word, goal in ((lo, "within 2x of", 0.5), (hi, "faster than", 1.0)):
        if (b, "decoder") in by and (b, "hf-generate") in by:
            speed = by[b, "decoder"]["tok_s"] / by[b, "hf-generate"]["tok_s"]
            out.append({"target": f"decoder {word} HF generate tokens/s at batch {b}", "value": f"{speed:.2f}x",
                        "met": speed >= goal if goal < 1 else speed > goal})
    for b, goal in ((1, 800), (16, 8000)):      # issue 21's, for the 1B shape in bf16 on an H200
        if (b, COMPILED) in by:
            out.append({"target": f"compiled decoder >= {goal} tokens/s at batch {b}",
                        "value": f"{by[b, COMPILED]['tok_s']:.0f}", "met": by[b, COMPILED]["tok_s"] >= goal})
    if (hi, "ggro") in by and (hi, "greedy") in by:
        ratio = by[hi, "ggro"]["wall_s"] / by[hi, "greedy"]["wall_s"]
        out.append({"target": f"GGRO/greedy wall ratio at batch {hi} <= the CPU's {cpu_ratio:g}x",
                    "value": f"{ratio:.1f}x", "met": ratio <= cpu_ratio})
    hi = max((r["batch"] for r in rows if r["model"] == "peaked"), default=None)
    for m, goal in (("ggro", 4.0), ("lookahead", 2.0)):
        if (hi, m) in peaked and (hi, "greedy") in peaked:
            ratio = peaked[hi, m]["wall_s"] / peaked[hi, "greedy"]["wall_s"]
            out.append({"target": f"peaked model: {m}/greedy wall at batch {hi} <= {goal:g}x", "value": f"{ratio:.1f}x",
                        "met": ratio <= goal})
    return out


def profile(method, models, prompts, cfg, tag, rows: int = 12) -> str:
    """One more run under torch.profiler: where the wall goes (ops by self device time, then by host time)
    and how busy the device was. A device busy for a small part of the wall means launch/host bound."""
    from torch.profiler import ProfilerActivity, profile as prof
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    t0 = time.perf_counter()
    with prof(activities=acts) as p:
        one(method, *models, prompts, cfg, tag)
        sync(next(models[0].parameters()).device.type)
    wall = time.perf_counter() - t0
    ev = p.key_averages()
    busy = sum(getattr(e, "self_device_time_total", 0) for e in ev) / 1e6
    return (f"## profile {method} batch {len(prompts)}: wall {wall:.3f} s (profiled), device busy {busy:.3f} s\n"
            + (ev.table(sort_by="self_device_time_total", row_limit=rows) if busy else "")
            + ev.table(sort_by="cpu_time_total", row_limit=rows))


def run_sizes(variant: str, models, sizes, methods, cfg, a, vocab) -> list[dict]:
    """Every method at every batch size on one policy: one row each."""
    rows = []
    for b in sizes:
        prompts = random_prompts(b, a.prompt_tokens, vocab, seed=b)
        for m in methods:       # warm-up: kernels, allocator and cuBLAS handles for this batch's shapes
            one(m, *models, prompts, dataclasses.replace(cfg, max_new_tokens=4), f"warm-{variant}-{m}-{b}")
        here, got = {}, {}
        for m in methods:
            here[m], got[m] = measure(m, models, prompts, cfg, a.device, f"{variant}-{m}-{b}", a.repeats)
            here[m]["model"] = variant
            print(f"# {variant} batch {b} {m}: {here[m]['walls']} s", file=sys.stderr)
            if a.profile:
                print(profile(m, models, prompts, cfg, f"prof-{variant}-{m}-{b}"), file=sys.stderr)
        for row in here.values():
            row["x_greedy_wall"] = row["wall_s"] / here["greedy"]["wall_s"] if "greedy" in here else None
        for m in ("decoder", COMPILED):
            if m in here and "hf-generate" in here:
                same = sum(x == y for x, y in zip(got[m], got["hf-generate"]))
                here[m]["same_tokens_as_hf"] = f"{same}/{b}"
        rows += here.values()
    return rows


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny shape instead of Llama-3.2-1B's (CPU smoke test)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="the models' shape [llama-1b; tiny with --tiny]")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="[bfloat16 on cuda, float32 on the CPU]")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32, help="32: the CPU figure's setting [%(default)s]")
    p.add_argument("--refinements", type=int, default=4, help="GGRO's S [%(default)s]")
    p.add_argument("--entropy-threshold", type=float, default=1.5)
    p.add_argument("--methods", help=f"a comma list of {', '.join(ALL_METHODS)} [all; {COMPILED} "
                   "on CUDA only]")
    p.add_argument("--variants", default="random,peaked", help="policies: random weights, and/or peaked "
                   "(logits scaled to the embedded model's uncertainty, see above) [%(default)s]")
    p.add_argument("--uncertain", type=float, default=0.2,
                   help="peaked: the fraction of positions with entropy >= tau [%(default)s]")
    p.add_argument("--profile", action="store_true", help="profile one more run of each (to stderr)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per (method, batch); the median [%(default)s]")
    p.add_argument("--cpu-ratio", type=float, default=CPU_RATIO, help="GGRO/greedy wall ratio measured on the CPU")
    p.add_argument("--json", help="write setting, rows, check and targets here")
    p.add_argument("--csv", help="write the rows here")
    a = p.parse_args(argv)
    if no_device(a.device, "with --tiny"):
        return 2
    if os.environ.get("GGRO_THREADS"):
        torch.set_num_threads(int(os.environ["GGRO_THREADS"]))
    dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    preset = a.preset or ("tiny" if a.tiny else "llama-1b")
    sizes = [int(s) for s in a.batch_sizes.split(",")]
    methods = a.methods.split(",") if a.methods else list(METHODS) + [COMPILED] * a.device.startswith("cuda")
    if set(methods) - set(ALL_METHODS):
        print(f"--methods: unknown {sorted(set(methods) - set(ALL_METHODS))}; known: {', '.join(ALL_METHODS)}",
              file=sys.stderr)
        return 2
    cfg = GGROConfig(max_new_tokens=a.new_tokens, num_refinements=a.refinements,
                     entropy_threshold=a.entropy_threshold, n=4)
    import transformers
    device_name = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else f"cpu x{torch.get_num_threads()}"

    check = fp32_check(a.device, cfg)
    print(f"# fp32 tiny model, identical tokens cpu vs {a.device}: {check}", file=sys.stderr)

    variants = a.variants.split(",")
    if set(variants) - {"random", "peaked"}:
        print(f"--variants: random and/or peaked, not {a.variants}", file=sys.stderr)
        return 2
    policy = build(preset, "causal", a.device, dtype)
    rm = RewardModel(build(preset, "classifier", a.device, dtype), None, "classifier")
    n_params = sum(t.numel() for t in policy.parameters())
    setting = {"preset": preset, "params": n_params, "dtype": dtype, "device": device_name,
               "torch": torch.__version__, "transformers": transformers.__version__,
               "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens, "refinements": a.refinements,
               "entropy_threshold": a.entropy_threshold, "top_k": cfg.top_k, "repeats": a.repeats,
               "uncertain": a.uncertain}
    print(f"# {preset} ({n_params / 1e9:.2f}B params, random weights), {dtype} on {device_name}; prompt "
          f"{a.prompt_tokens} tokens, {a.new_tokens} new tokens, GGRO S={a.refinements}", file=sys.stderr)
    vocab = PRESETS[preset]["vocab_size"]
    rows = []
    for variant in variants:    # random first: peak() scales the one policy in place
        if variant == "peaked":
            s = peak(policy, random_prompts(8, a.prompt_tokens, vocab, seed=99), a.new_tokens, a.entropy_threshold,
                     a.uncertain)
            setting["peak_scale"] = s
            print(f"# peaked: logits x{s:.3g}", file=sys.stderr)
        models = (policy, SegmentDecoder(policy, eos_ids=[], max_cached=4 * max(sizes)), rm)
        rows += run_sizes(variant, models, sizes, methods, cfg, a, vocab)

    cols = ["model", "batch", "method", "wall_s", "tok_s", "prompts_s", "policy_tok_s", "rm_calls", "peak_gib",
            "x_greedy_wall", "seg_len", "same_tokens_as_hf"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    goals = targets(rows, a.cpu_ratio)
    print(f"\nfp32 tiny model, identical tokens cpu vs {a.device}: decoder {check['decoder']}, ggro {check['ggro']}\n")
    print("| target | measured | met |\n|---|---|---|")
    for t in goals:
        print(f"| {t['target']} | {t['value']} | {'yes' if t['met'] else 'NO'} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"setting": setting, "rows": rows, "fp32_identical_tokens": check,
                                            "targets": goals}, indent=1))
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
