"""What a job asks the cluster for: one Resources for align, dpo, serve and the `--dry-run` planner.

Ray-free on purpose: the entry points build it from flags/YAML and the planner sizes it without importing
Ray; actors.cluster places it. The field defaults here are the flags' defaults (jobs/ reads them).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from ggro.config import ModelConfig, cached_prefixes, knob

# Resources a mode fixes itself: no flag sets them there, so messages name the quantity instead.
FIXED = {"align": (), "serve": ("aligners", "aligner_cpus"),
         "local": ("policy_replicas", "reward_replicas", "aligners")}
SERVE_INGRESS_CPUS = 0.1              # serve's one ingress (pipeline.serve.app.ServeSettings.ingress_cpus)


def shares_weights(mcfg: ModelConfig, tp: int) -> bool:
    """The reward runs on the policy's workers (one copy of the weights, no reward actors): the policy judges or
    guides itself and is not sharded (a tp-sharded policy cannot be differentiated: AutoTP has no backward).
    The one rule for the batch workers (actors.cluster), Serve's deployments, `Resources.started` and the planner."""
    return mcfg.shares_policy_weights and tp == 1


class ClusterTooSmall(RuntimeError):
    """The cluster cannot fit the requested actors; the message says what is missing."""


class ClusterUnreachable(RuntimeError):
    """The driver cannot connect to the Ray cluster at --address / $RAY_ADDRESS (pipeline.batch.ray_align.connect)."""


def unreachable(address: str, e: BaseException) -> str:
    """What to tell a user whose driver could not connect: Ray's own exception (a ConnectionError after its
    retries, or an AuthenticationError) says little, and a cluster with token authentication refuses a
    driver without its token in the same words as an address where no cluster runs."""
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return (f"cannot connect to the Ray cluster at {address!r} ({e.__class__.__name__}: {first}). Check the address "
            "(`ray status` on the head node); a cluster started with token authentication (RAY_AUTH_MODE=token) "
            "needs RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) "
            "in this driver's environment too")


@dataclass(frozen=True)
class Resources:
    # the flags of align, dpo and serve (jobs/common.py `add_resource_args`), from each knob's help; the
    # aligners' two are align's and dpo's only (serve: its one ingress). `old_flag`: `ggro serve`'s old names,
    # hidden and still accepted (scripts use them), each setting the policy's and the reward's field
    tp: int = knob(1, "tensor-parallel degree of each policy replica (DeepSpeed AutoTP; gloo on CPU, NCCL on GPU)")
    policy_gpus_per_replica: float = knob(0, "GPUs per TP rank of a policy replica (0: CPU)", old_flag="replica_gpus")
    policy_replicas: int = knob(1, "policy replicas (each --tp rank actors)", old_flag="model_replicas")
    # fractional CPU shares: whole CPUs deadlock small clusters
    policy_cpus: float = knob(0.5, "CPU share per policy TP rank", old_flag="replica_cpus")
    reward_replicas: int = knob(1, "reward-model actors (batches split across them)", old_flag="model_replicas")
    reward_gpus: float = knob(0, "GPUs per reward actor (0: CPU)", old_flag="replica_gpus")
    reward_cpus: float = knob(0.5, "CPU share per reward actor", old_flag="replica_cpus")
    aligners: int = knob(1, "aligner actor pool size (Ray Data map_batches)")
    aligner_cpus: float = knob(0.25, "CPU share per aligner actor")
    io_cpus: float = 0.1                 # Ray Data write tasks
    # where the job runs, the one spelling of local vs Ray (AlignJob.local, the planner and find_cluster read it):
    mode: str = "align"                  # align: Ray actors; serve: Serve deployments; local: this process (--local)

    @classmethod
    def local(cls, mcfg: ModelConfig) -> Resources:
        """`--local`: one policy (and reward) in this process on --device; no Ray, so no CPU shares."""
        on_gpu = 1.0 if mcfg.device.startswith("cuda") else 0.0
        return cls(tp=1, policy_gpus_per_replica=on_gpu, policy_replicas=1, policy_cpus=0, reward_replicas=1,
                   reward_gpus=on_gpu, reward_cpus=0, aligners=1, aligner_cpus=0, io_cpus=0, mode="local")

    def started(self, mcfg: ModelConfig) -> Resources:
        """The actors the job really starts: a policy that is its own judge scores on its own weights (no
        reward actors) in every mode, but only unsharded (`shares_weights`)."""
        return dataclasses.replace(self, reward_replicas=0) if shares_weights(mcfg, self.tp) else self

    @property
    def policy_gpus(self) -> float:
        return self.policy_replicas * self.tp * self.policy_gpus_per_replica

    @property
    def reward_gpus_total(self) -> float:
        return self.reward_replicas * self.reward_gpus

    @property
    def cpus(self) -> float:
        """CPU shares of the actors (the write tasks' io_cpus apart)."""
        return (self.policy_replicas * self.tp * self.policy_cpus + self.reward_replicas * self.reward_cpus
                + self.aligners * self.aligner_cpus)

    def cached_prefixes(self, mcfg: ModelConfig) -> int:
        """Sequences a policy rank's prefix cache keeps in this job (the rule: ggro.config.cached_prefixes):
        a batch job's ranks are shared by its aligners; --local's and Serve's decoders serve one search."""
        return cached_prefixes(mcfg, shared=self.mode == "align")

    @property
    def judge_in_policy(self) -> bool:
        """No reward actors: the policy's own weights judge, so the judge's backward counts against the
        policy's memory."""
        return self.reward_replicas == 0

    def flag(self, field: str) -> str:
        """What sets `field` in this job's mode: its flag, else (fixed by the mode) the quantity's name."""
        return field.replace("_", " ") if field in FIXED[self.mode] else "--" + field.replace("_", "-")

    def needs(self) -> dict[str, float]:
        return {"CPU": self.cpus + self.io_cpus, "GPU": self.policy_gpus + self.reward_gpus_total}

    def problems(self) -> list[str]:
        """What is wrong with these resources as the flags set them, whatever the cluster: the one rule that the
        planner, `ggro serve`'s settings and a Ray job's start (`check`) apply. --local runs no actors."""
        if self.mode == "local":
            return []
        out = [f"{self.flag(f)} must be >= 1" for f in ("tp", "policy_replicas", "reward_replicas", "aligners")
               if getattr(self, f) < 1]
        # as ranges: NaN compares false (a NaN share reached the cluster check as "needs nan CPUs"), inf never fits
        out += [f"{self.flag(f)} must be >= 0" for f in ("policy_gpus_per_replica", "reward_gpus")
                if not 0 <= getattr(self, f) < math.inf]
        return out + [f"{self.flag(f)} must be > 0 (every actor needs an explicit CPU share; fractions such as 0.5 "
                      "are fine)" for f in ("policy_cpus", "reward_cpus", "aligner_cpus")
                      if not 0 < getattr(self, f) < math.inf]

    def check(self, available: dict, what: str = "available") -> None:
        """Fail fast (ClusterTooSmall) instead of leaving actors pending forever."""
        wrong = self.problems()
        if wrong:
            raise ClusterTooSmall("; ".join(wrong))
        short = [f"{k}: need {v:g}, {available.get(k, 0):g} {what}"
                 for k, v in self.needs().items() if v > available.get(k, 0) + 1e-9]
        if short:
            raise ClusterTooSmall(
                "the cluster cannot fit this job (" + "; ".join(short) + "). Need = policy-replicas x tp x "
                "(policy-cpus, policy-gpus-per-replica) + reward-replicas x (reward-cpus, reward-gpus) + "
                "aligners x aligner-cpus + 0.1 CPU for writes. Lower the shares/replicas or add nodes.")


def plan_auto(mcfg: ModelConfig, res: Resources | None = None) -> ModelConfig:
    """`auto` dtype and device as the job's model processes will get them, decided where the job is planned:
    on Ray and Serve cuda when the job gives its policy GPUs; for --local (`res` None or local) when this
    machine has an NVIDIA driver (no torch import). The workers then receive concrete values, and the config
    hash names them."""
    if "auto" not in (mcfg.dtype, mcfg.device):
        return mcfg
    local = res is None or res.mode == "local"
    return mcfg.resolved(os.path.isdir("/proc/driver/nvidia") if local else res.policy_gpus_per_replica > 0)
