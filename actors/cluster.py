"""Start the policy replicas and the reward pool after checking that the cluster can hold them."""
from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass

import ray

from actors.policy import PolicyReplica, start_policy_replica
from actors.reward import RewardPool, start_reward_pool
from actors.worker import shares_weights
from ggro.config import ModelConfig
from pipeline.resources import ClusterTooSmall, Resources


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
