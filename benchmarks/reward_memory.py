"""Peak memory of one reward call with the gradient, to check the planner's activation rule (docs/cluster.md).

    python benchmarks/reward_memory.py ROWS CACHED NEW

ROWS queries of random tokens on the default guide (fp32, CPU): CACHED tokens already in the prefix cache, NEW
tokens past them (the judge's question follows), the gradient asked at the first new token. Prints the rise of
the process's peak RSS (Linux: /proc/self/status VmHWM, reset through /proc/self/clear_refs) over the call.
"""
from __future__ import annotations

import gc
import sys
import time


def peak_gib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**20


def main(rows: int, cached: int, new: int) -> None:
    import torch
    from ggro.config import ModelConfig
    from ggro.engine import Engine
    from ggro.seam import RewardQuery
    from ggro.threads import torch_threads
    torch_threads()
    reward = Engine.load(ModelConfig()).reward
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(100, 40000, (cached + new,), generator=g).tolist() for _ in range(rows)]
    reward.score([RewardQuery(z, seq_id=f"s{i}", prefix_len=cached) for i, z in enumerate(seqs)])  # caches x
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base, t0 = peak_gib(), time.perf_counter()
    reward.score([RewardQuery(z, cached + 1, [1, 2, 3, 4], f"s{i}", cached) for i, z in enumerate(seqs)])
    print(f"{rows} rows, {cached} cached + {new} new tokens: peak RSS +{peak_gib() - base:.2f} GiB over "
          f"{base:.2f} GiB, {time.perf_counter() - t0:.1f} s, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:4]))
