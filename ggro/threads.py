"""How many torch threads a process that runs models uses."""
from __future__ import annotations

import os


def torch_threads(cohorts: int = 1) -> None:
    """Use every core we were given (Ray sets OMP_NUM_THREADS=1 in workers otherwise), shared by the cohorts:
    oversubscribed OpenMP threads spin-wait for each other and run many times slower. GGRO_THREADS overrides."""
    import torch
    n = env_threads() or os.cpu_count() or 1
    torch.set_num_threads(max(1, n // cohorts))


def env_threads() -> int:
    """GGRO_THREADS as a number of threads (0: unset, use the cores). Raises ValueError naming it."""
    raw = os.environ.get("GGRO_THREADS", "").strip()
    if not raw:
        return 0
    try:
        return max(0, int(raw))
    except ValueError:
        raise ValueError(f"GGRO_THREADS must be a whole number of torch threads, got {raw!r}") from None
