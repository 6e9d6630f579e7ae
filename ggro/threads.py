"""How many torch threads a process that runs models uses."""
from __future__ import annotations

import os


def torch_threads(cohorts: int = 1) -> None:
    """Use every core we were given (Ray sets OMP_NUM_THREADS=1 in workers otherwise), shared by the cohorts:
    oversubscribed OpenMP threads spin-wait for each other and run many times slower. GGRO_THREADS overrides."""
    import torch
    n = int(os.environ.get("GGRO_THREADS", "0")) or os.cpu_count() or 1
    torch.set_num_threads(max(1, n // cohorts))
