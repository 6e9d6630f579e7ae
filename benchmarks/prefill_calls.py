"""The prompts' prefill as one padded call, cut by length (ggro.kvcache.call_groups, the default), and one call a
prompt: wall time and padded tokens, on the default model (docs/performance.md).

    GGRO_THREADS=2 python benchmarks/prefill_calls.py PROMPTS.jsonl [LONG]

LONG > 0 adds one prompt of LONG tokens (the first prompt's ids repeated): a long prompt among short ones, which
one padded call runs at every row. Medians of 3; run it alone on the machine.
"""
from __future__ import annotations

import statistics
import sys
import time


def main(path: str, long: int = 0) -> None:
    from ggro.config import CALL_TOKENS, ModelConfig
    from ggro.engine import Engine
    from ggro.kvcache import call_groups
    from ggro.threads import torch_threads
    from pipeline.batch.driver import read_input
    from pipeline.eval.bench import encode_rows
    import torch
    torch_threads()
    engine = Engine.load(ModelConfig())
    seqs = [(r.id, r.ids) for r in encode_rows(engine, read_input(path, None), 1)]
    if long:
        seqs.append(("long", (seqs[0][1] * (long // len(seqs[0][1]) + 1))[:long]))
    cache = engine.policy.prefixes
    lengths = [len(ids) for _, ids in seqs]
    print(f"{len(seqs)} prompts, {sum(lengths)} tokens (longest {max(lengths)}), "
          f"{torch.get_num_threads()} torch threads")
    print("| prefill | calls | padded tokens | wall (s), median of 3 |\n|---|---:|---:|---:|")
    for name, per_call in (("one padded call", 10**12), (f"cut by length ({CALL_TOKENS['cpu']} tokens a call)",
                                                          CALL_TOKENS["cpu"]), ("one call a prompt", 0)):
        cache.call_tokens = per_call
        groups = call_groups(lengths, lengths, True, per_call) if per_call else [[n] for n in lengths]
        walls = []
        for _ in range(3):
            cache.release([k for k, _ in seqs])
            t0 = time.perf_counter()
            if per_call:
                cache.get(seqs)
            else:
                for s in seqs:
                    cache.get([s])
            walls.append(time.perf_counter() - t0)
        print(f"| {name} | {len(groups)} | {sum(len(g) * max(g) for g in groups)} | {statistics.median(walls):.2f} |")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
