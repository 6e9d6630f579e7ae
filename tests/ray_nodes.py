"""A throwaway multi-node Ray cluster on this machine, for the node-loss fault tests.

`python -m tests.ray_nodes N` starts a head that runs no work (0 CPUs, as on a real cluster) and N worker
raylets of 2 CPUs each (ray.cluster_utils.Cluster: no `ray start`, so no other process on this machine
finds it by accident), prints {"address": ...} and then answers one command per stdin line with one JSON
line:
    kill ACTOR_NAME_PREFIX   kill -9 the raylet (and so every worker) of the node that hosts that named actor
                             (waiting for the actor to exist and be constructed)
    add                      start another 2-CPU worker node
EOF on stdin stops the whole cluster. `Nodes` is the test side of it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ANSWER = "ray_nodes: "      # the prefix of the answer lines
# A killed raylet is declared dead after missing this many health checks. Ray's defaults (every 3 s, 10 s
# timeout, 5 misses) take 15 s or more, and longer on a loaded machine; here a node is dead in ~3-5 s.
DEATH_DETECTION = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
                   "health_check_timeout_ms": 2000, "health_check_failure_threshold": 3}


def _serve(workers: int) -> None:
    # Answers get stdout to themselves: Ray's threads print too (a lost node's warning), and a print from
    # another thread can land between an answer and its newline. Everything else goes to stderr.
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def answer(obj: dict) -> None:
        answers.write(ANSWER + json.dumps(obj) + "\n")
        answers.flush()

    import ray
    from ray.cluster_utils import Cluster
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "_system_config": DEATH_DETECTION})
    ray.init(address=cluster.address, log_to_driver=False)
    for _ in range(workers):
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    answer({"address": cluster.address})
    try:
        for line in sys.stdin:
            cmd, *args = line.split()
            if cmd == "kill":
                try:
                    killed = _kill(cluster, args[0])
                except Exception as e:  # noqa: BLE001 - answered: the test fails with it, not with a dead cluster
                    killed = {"error": f"{e.__class__.__name__}: {e}"}
                answer(killed)
            elif cmd == "add":
                cluster.add_node(num_cpus=2)
                cluster.wait_for_nodes()
                answer({"nodes": len(cluster.worker_nodes)})
    finally:
        ray.shutdown()
        cluster.shutdown()


def _kill(cluster, prefix: str, wait_s: float = 120) -> dict:
    """kill -9 the node of the first named actor whose name starts with `prefix`, once it exists and has
    finished its constructor (a policy replica: once its model is loaded)."""
    import ray
    deadline = time.monotonic() + wait_s
    while not (named := sorted((a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
                               if a["name"].startswith(prefix))):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no actor named {prefix}* after {wait_s}s")
        time.sleep(0.2)
    actor = ray.get_actor(named[0][0], namespace=named[0][1])
    where = ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()), timeout=wait_s)
    cluster.remove_node(next(n for n in cluster.worker_nodes if n.node_id == where), allow_graceful=False)
    return {"killed": where, "actor": named[0][0]}


class Nodes:
    """The test side: `with Nodes(2) as n: n.address; n.kill("ggro-policy-"); n.add()`."""

    def __init__(self, workers: int):
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.ray_nodes", str(workers)], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.address = self._answer()["address"]

    def _answer(self) -> dict:
        while line := self.proc.stdout.readline():
            if line.startswith(ANSWER):
                return json.loads(line[len(ANSWER):])
        raise RuntimeError(f"tests.ray_nodes exited ({self.proc.wait()})")

    def kill(self, actor_prefix: str) -> dict:
        self.proc.stdin.write(f"kill {actor_prefix}\n")
        self.proc.stdin.flush()
        return self._answer()

    def add(self) -> dict:
        self.proc.stdin.write("add\n")
        self.proc.stdin.flush()
        return self._answer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.stdin.close()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
