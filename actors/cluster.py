"""Start the policy replicas and the reward pool after checking that the cluster can hold them."""
from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass

import ray

from actors.policy import ClusterTooSmall, PolicyReplica, start_policy_replica
from actors.reward import RewardPool, start_reward_pool
from actors.worker import shares_weights
from ggro.config import ModelConfig


@dataclass(frozen=True)
class Resources:
    tp: int = 1                          # tensor-parallel ranks per policy replica
    policy_gpus_per_replica: float = 0   # GPUs per TP rank (0: CPU)
    policy_replicas: int = 1
    policy_cpus: float = 0.5             # CPU share per TP rank
    reward_replicas: int = 1
    reward_gpus: float = 0               # GPUs per reward actor
    reward_cpus: float = 0.5
    aligners: int = 1
    aligner_cpus: float = 0.25
    io_cpus: float = 0.1                 # Ray Data write tasks

    def needs(self) -> dict[str, float]:
        cpu = (self.policy_replicas * self.tp * self.policy_cpus + self.reward_replicas * self.reward_cpus
               + self.aligners * self.aligner_cpus + self.io_cpus)
        gpu = self.policy_replicas * self.tp * self.policy_gpus_per_replica + self.reward_replicas * self.reward_gpus
        return {"CPU": cpu, "GPU": gpu}

    def check(self, available: dict, what: str = "available") -> None:
        """Fail fast (ClusterTooSmall) instead of leaving actors pending forever."""
        if self.tp < 1 or self.policy_replicas < 1 or self.reward_replicas < 1 or self.aligners < 1:
            raise ClusterTooSmall("--tp, --policy-replicas, --reward-replicas and --aligners must be >= 1")
        for name, v in (("--policy-cpus", self.policy_cpus), ("--reward-cpus", self.reward_cpus),
                        ("--aligner-cpus", self.aligner_cpus)):
            if v <= 0:
                raise ClusterTooSmall(f"{name} must be > 0 (every actor needs an explicit CPU share)")
        need = self.needs()
        short = [f"{k}: need {v:g}, {available.get(k, 0):g} {what}"
                 for k, v in need.items() if v > available.get(k, 0) + 1e-9]
        if short:
            raise ClusterTooSmall(
                "the cluster cannot fit this job (" + "; ".join(short) + "). Need = policy-replicas x tp x "
                "(policy-cpus, policy-gpus-per-replica) + reward-replicas x (reward-cpus, reward-gpus) + "
                "aligners x aligner-cpus + 0.1 CPU for writes. Lower the shares/replicas or add nodes.")


@dataclass
class Workers:
    policies: list[PolicyReplica]
    reward: RewardPool
    context: int

    def shutdown(self) -> None:
        for p in self.policies:
            p.shutdown()
        self.reward.shutdown()


def wait_for_room(res: Resources, timeout_s: float) -> None:
    """Fail at once when the whole cluster is too small; otherwise wait (up to timeout_s) for
    resources still held by others or by a just-finished run (actors are released asynchronously)."""
    res.check(ray.cluster_resources(), "in the whole cluster")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return res.check(ray.available_resources())
        except ClusterTooSmall as e:
            if time.monotonic() > deadline:
                raise ClusterTooSmall(f"{e} (the cluster is big enough, but other work still holds these "
                                      f"resources after {timeout_s:.0f}s)") from None
            time.sleep(0.5)


def start_workers(mcfg: ModelConfig, res: Resources, timeout_s: float = 120) -> Workers:
    """Start the policy replicas and the reward pool. With shared weights the pool is the replicas' workers
    (--reward-replicas and the reward shares are then unused), as in Serve's one deployment for both roles."""
    shared = shares_weights(mcfg, res.tp)
    # no reward actors start then, so their GPUs must not be waited for (their small CPU share still is:
    # Resources.check insists every share is > 0)
    wait_for_room(dataclasses.replace(res, reward_gpus=0) if shared else res, timeout_s)
    roles = ("policy", "reward") if shared else ("policy",)
    policies, tag = [], uuid.uuid4().hex[:8]
    try:
        for i in range(res.policy_replicas):
            policies.append(start_policy_replica(mcfg, res.tp, res.policy_gpus_per_replica, res.policy_cpus,
                                                 timeout_s=timeout_s, name=f"ggro-policy-{tag}-{i}", roles=roles))
        if shared:
            reward = RewardPool([p.ranks[0] for p in policies], owned=False)
        else:
            reward = start_reward_pool(mcfg, res.reward_replicas, res.reward_gpus, res.reward_cpus)
    except BaseException:
        for p in policies:
            p.shutdown()
        raise
    return Workers(policies, reward, policies[0].context)
