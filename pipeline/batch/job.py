"""One `ggro align` run, resolved: the frozen config the driver (pipeline/batch/driver.py) and the Ray
pipeline (pipeline/batch/ray_align.py) read. jobs/ builds it from flags + YAML; nothing below jobs/ sees argparse."""
from __future__ import annotations

from dataclasses import dataclass, field

from ggro.config import ConfigError, GGROConfig, ModelConfig
from actors.resources import Resources

DEFAULT_MAX_ERROR_FRACTION = 0.1
DEFAULT_ROWS_PER_FILE = 10_000
DEFAULT_IN_FLIGHT = 2
DEFAULT_RAY_TIMEOUT_S = 120.0


class JobFailed(Exception):
    """A run that cannot go on, with what to tell the user and the exit code (1: the job could not run;
    2: bad input). The entry points (jobs/) print it as `ggro: error: ...` and exit with `code`."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class AlignJob:
    gcfg: GGROConfig
    mcfg: ModelConfig
    input: str
    output: str | None = None
    limit: int | None = None                  # only the first N input rows
    overwrite: bool = False
    retry_errors: bool = False
    max_error_fraction: float = DEFAULT_MAX_ERROR_FRACTION
    rows_per_file: int = DEFAULT_ROWS_PER_FILE
    resources: Resources = field(default_factory=Resources)   # its mode says where: "local" (this process) or Ray
    address: str | None = None                # Ray cluster; None: $RAY_ADDRESS, else a local Ray
    ray_timeout: float = DEFAULT_RAY_TIMEOUT_S   # seconds to wait for placement groups
    in_flight: int = DEFAULT_IN_FLIGHT        # sub-batches each aligner keeps in flight
    log_to_driver: bool = True                # Ray workers' logs reach the driver (`ray job logs`); --quiet: off

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {self.limit}")
        if self.rows_per_file < 1:
            raise ConfigError("--rows-per-file must be >= 1")
        if not 0 <= self.max_error_fraction <= 1:
            raise ConfigError("--max-error-fraction must be between 0 and 1")

    @property
    def local(self) -> bool:
        """--local: this process instead of Ray (the one spelling is `Resources.mode`)."""
        return self.resources.mode == "local"

    def cluster(self) -> dict:
        """The manifest's record of where a Ray run ran (empty for --local)."""
        if self.local:
            return {}
        r = self.resources
        return {"address": self.address, "tp": r.tp, "policy_gpus_per_replica": r.policy_gpus_per_replica,
                "policy_replicas": r.policy_replicas, "policy_cpus": r.policy_cpus,
                "reward_replicas": r.reward_replicas, "reward_gpus": r.reward_gpus, "reward_cpus": r.reward_cpus,
                "aligners": r.aligners, "aligner_cpus": r.aligner_cpus, "in_flight": self.in_flight}
