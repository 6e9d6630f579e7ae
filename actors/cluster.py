"""Start the policy replicas and the reward pool after checking that the cluster can hold them."""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass

import ray

from actors.policy import PolicyReplica, launch_policy_replica, wire
from actors.resources import ClusterTooSmall, Resources, shares_weights
from actors.reward import RewardPool, launch_reward_pool
from ggro.config import ModelConfig


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


def needed(mcfg: ModelConfig, res: Resources) -> Resources:
    """What the job holds on the cluster: with shared weights no reward actors start, so their GPUs are not
    needed (their small CPU share still is: Resources.check insists every share is > 0)."""
    return dataclasses.replace(res, reward_gpus=0) if shares_weights(mcfg, res.tp) else res


def while_placeable(fn, res: Resources, grace_s: float, poll_s: float = 1.0):
    """fn() (a job's pipeline, in the main thread), stopped with ClusterTooSmall if the whole cluster cannot hold
    `res` for `grace_s` in a row: a node was lost and no other has room, so Ray would wait for its actors'
    restarts forever. Losing a node the others can stand in for costs time only (Ray restarts the actors there).

    The stop is a real SIGINT sent to the main thread, as Ctrl-C is (it wakes a thread blocked in a wait; Ray
    Data then shuts its executor down), taken by a handler of our own: a process whose SIGINT is ignored (started
    in the background by a non-interactive shell, or under nohup, as CI runners do) is stopped too, while a
    SIGINT from outside keeps its old effect. `_thread.interrupt_main` did nothing in such a process, and the
    job waited forever. Should fn() still not return `grace_s` after the stop (a wait that no signal breaks),
    the message is printed and the process exits with code 1: the part files are whole, the lock is stale."""
    short, done = [], threading.Event()
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT) if main else None   # None: not ours to take (see below)

    def watch():
        since = None
        while not done.wait(poll_s):
            try:
                res.check(ray.cluster_resources(), "in the whole cluster")
                since = None
            except ClusterTooSmall as e:
                since = since or time.monotonic()
                if time.monotonic() - since > grace_s:
                    short.append(_lost_room(str(e), grace_s))
                    if before is not None:
                        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                    if not done.wait(grace_s):
                        print(f"ggro: error: {short[0]}", file=sys.stderr, flush=True)
                        os._exit(1)
                    return

    def on_sigint(signum, frame):
        if short:
            raise KeyboardInterrupt
        if callable(before):
            return before(signum, frame)
        if before != signal.SIG_IGN:
            raise KeyboardInterrupt
    if before is not None:
        signal.signal(signal.SIGINT, on_sigint)
    watcher = threading.Thread(target=watch, daemon=True, name="ggro-capacity")
    watcher.start()
    try:
        return fn()
    except KeyboardInterrupt:
        if not short:      # the user's Ctrl-C
            raise
        raise ClusterTooSmall(short[0]) from None
    finally:
        done.set()
        if before is not None:
            signal.signal(signal.SIGINT, before)


def _lost_room(why: str, grace_s: float) -> str:
    return (f"the cluster lost nodes mid-job and has had no room for this job for {grace_s:.0f}s (--ray-timeout): "
            f"{why} Stopped; the part files written so far are kept: rerun the same command once the cluster has "
            "room again and it aligns only the rows not yet written")


def start_workers(mcfg: ModelConfig, res: Resources, timeout_s: float = 120) -> Workers:
    """Start the policy replicas and the reward pool. With shared weights the pool is the replicas' workers
    (--reward-replicas and the reward shares are then unused), as in Serve's one deployment for both roles.
    Every actor is launched before any is waited for, so they load side by side: a job starts in about
    one model load, not one per replica."""
    shared = shares_weights(mcfg, res.tp)
    wait_for_room(needed(mcfg, res), timeout_s)
    roles = ("policy", "reward") if shared else ("policy",)
    policies, reward, tag = [], None, uuid.uuid4().hex[:8]
    try:
        for i in range(res.policy_replicas):
            policies.append(launch_policy_replica(mcfg, res.tp, res.policy_gpus_per_replica, res.policy_cpus,
                                                  timeout_s=timeout_s, name=f"ggro-policy-{tag}-{i}", roles=roles))
        reward = (RewardPool([p.ranks[0] for p in policies], owned=False) if shared else
                  launch_reward_pool(mcfg, res.reward_replicas, res.reward_gpus, res.reward_cpus))
        for p in policies:
            wire(p)
        reward.ready()
    except BaseException:
        for p in policies:
            p.shutdown()
        if reward is not None:
            reward.shutdown()
        raise
    return Workers(policies, reward, policies[0].context)
