"""DeepSpeed-inference AutoTP at tp=2 on ONE device: the sharded policy's greedy tokens against the plain one's.

    python benchmarks/gpu_tp2.py                        # cuda:0 (a lent GPU), a tiny random policy, fp32
    python benchmarks/gpu_tp2.py --device cpu --policy default   # the embedded model on the CPU
    python benchmarks/gpu_tp2.py --policy DIR --dtype bfloat16 --prompts 8 --new-tokens 32 --json tp2.json

`--policy tiny` (the default) is the tests' tiny Llama (tests/conftest.py, 4 heads over 2 key-value heads) saved
to a temporary folder: the GPU machine cannot load the embedded default (it lacks gguf, and the model's wheel
would not fit beside Ray's in what travels there).

Production runs tp > 1 as Ray actors, one GPU per rank, over NCCL (actors/policy.py). NCCL refuses two ranks
on one device and the lent machine has one GPU and no Ray, so this script starts the two ranks itself
(torch.multiprocessing) on the same device and joins them over gloo (GGRO_DIST_BACKEND=gloo): DeepSpeed's
AutoTP then shards the weights and runs its all-reduces on CUDA tensors, through the very worker class Ray
runs (actors.worker.ModelWorker: load, shard, decode). What it cannot show: NCCL itself, and two GPUs.
Prints a Markdown table (equal rows, first differing offset, wall per decode) and exits 1 when a row differs.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import tempfile
import time
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ("Write a haiku about the sea.", "What is the capital of France?", "How do vaccines work?",
           "Give me three tips for a job interview.", "Explain recursion to a child.",
           "What causes the seasons on Earth?", "Name a famous painting and describe it.",
           "How do I boil an egg?", "Why is the sky blue?", "What is a prime number?",
           "Tell me a short story about a fox.", "How does a bicycle stay upright?")


def _requests(tok, n: int, new_tokens: int):
    from ggro.chat import chat_ids
    from ggro.seam import SegmentRequest
    return [SegmentRequest(f"tp2-{i}", chat_ids(tok, [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                               add_generation_prompt=True), new_tokens) for i in range(n)]


def _decode(worker, reqs, device: str) -> tuple[list[list[int]] | None, float]:
    import torch
    worker.decode(reqs[:1])                  # warm-up (the first call allocates), then one timed call
    worker.release([r.seq_id for r in reqs[:1]])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = worker.decode(reqs)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (None if out is None else [o.tokens for o in out]), time.perf_counter() - t0


def _rank(rank: int, port: int, mcfg, n: int, new_tokens: int, results) -> None:
    os.environ["GGRO_DIST_BACKEND"] = "gloo"     # two ranks on one device: NCCL would refuse
    from actors.worker import ModelWorker
    w = ModelWorker(mcfg, ("policy",), rank=rank, tp=2, threads=1)
    w.setup("127.0.0.1", port)
    tokens, wall = _decode(w, _requests(w.tok, n, new_tokens), mcfg.device)
    if rank == 0:
        results.put((tokens, wall))


def _wait(results, procs, limit_s: float = 600):
    """Rank 0's (tokens, wall), or None as soon as a rank exits without it (a crash must not hang the check)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        try:
            answer = results.get(timeout=2)
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs) or all(p.exitcode is not None for p in procs):
                break
            continue
        for p in procs:
            p.join(timeout=60)
        return answer
    for p in procs:
        p.kill()
    return None


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first offset where two token lists differ (their common length when one is a prefix), None if equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--policy", default="tiny", help="tiny (a random tiny Llama), default (the embedded model) "
                    "or a model folder")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    # DeepSpeed logs to stdout (imported here too, by transformers' checks): the table alone goes there
    table = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    from ggro.config import ModelConfig
    mcfg = ModelConfig(device=args.device, dtype=args.dtype, batch_size=args.prompts)
    with tempfile.TemporaryDirectory(prefix="ggro-tp2-") as tmp:
        if args.policy == "tiny":
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from conftest import save_tiny
            mcfg = replace(mcfg, policy=save_tiny(Path(tmp) / "policy", "causal", seed=1))
        elif args.policy != "default":
            mcfg = replace(mcfg, policy=args.policy)
        return _compare(mcfg, args, table)


def _compare(mcfg, args, table) -> int:
    import torch
    import torch.multiprocessing as mp
    from actors.worker import ModelWorker, _free_port as free_port
    t0 = time.perf_counter()
    plain = ModelWorker(mcfg, ("policy",), threads=1)
    want, plain_wall = _decode(plain, _requests(plain.tok, args.prompts, args.new_tokens), args.device)
    del plain
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    ctx = mp.get_context("spawn")            # CUDA cannot be re-initialized in a forked child
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, mcfg, args.prompts, args.new_tokens, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    answer = _wait(results, procs)
    if answer is None:
        print(f"a tp=2 rank failed (exit codes {[p.exitcode for p in procs]}): see its output above", file=sys.stderr)
        return 1
    got, tp_wall = answer
    diffs = [first_difference(g, w) for g, w in zip(got, want)]
    equal = sum(d is None for d in diffs)
    row = dict(device=args.device, dtype=args.dtype, policy=args.policy, deepspeed=version("deepspeed"),
               torch=torch.__version__, rows=len(want), equal_rows=equal, new_tokens=args.new_tokens,
               first_difference=[d for d in diffs if d is not None][:1] or None,
               plain_decode_s=round(plain_wall, 3), tp2_decode_s=round(tp_wall, 3),
               total_s=round(time.perf_counter() - t0, 1))
    print("| device | dtype | deepspeed | rows equal to the plain model | first differing offset | "
          "plain decode (s) | tp=2 over gloo, one device (s) |", file=table)
    print("|---|---|---|---:|---:|---:|---:|", file=table)
    print(f"| {args.device} | {args.dtype} | {row['deepspeed']} | {equal}/{len(want)} | "
          f"{row['first_difference'] or '-'} | {plain_wall:.3f} | {tp_wall:.3f} |", file=table, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1))
    return 0 if equal == len(want) else 1


if __name__ == "__main__":
    sys.exit(main())
