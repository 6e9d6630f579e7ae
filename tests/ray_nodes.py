"""A throwaway multi-node Ray cluster on this machine, for the node-loss fault tests.

`python -m tests.ray_nodes N` starts a head that runs no work (0 CPUs, as on a real cluster) and N worker
raylets of 2 CPUs each (ray.cluster_utils.Cluster: no `ray start`, so no other process on this machine
finds it by accident), prints {"address": ...} and then answers one command per stdin line with one JSON
line:
    kill ACTOR_NAME_PREFIX   kill -9 the raylet (and so every worker) of the node that hosts that named actor
    add                      start another 2-CPU worker node
EOF on stdin stops the whole cluster. `Nodes` is the test side of it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

ANSWER = "ray_nodes: "      # the prefix of the answer lines (Ray may print other lines on stdout)


def _serve(workers: int) -> None:
    import ray
    from ray.cluster_utils import Cluster
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    ray.init(address=cluster.address, log_to_driver=False)
    for _ in range(workers):
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    print(ANSWER + json.dumps({"address": cluster.address}), flush=True)
    try:
        for line in sys.stdin:
            cmd, *args = line.split()
            if cmd == "kill":
                names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                               if a["name"].startswith(args[0]))
                actor = ray.get_actor(names[0], namespace=next(
                    a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == names[0]))
                where = ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))
                node = next(n for n in cluster.worker_nodes if n.node_id == where)
                cluster.remove_node(node, allow_graceful=False)
                print(ANSWER + json.dumps({"killed": where, "actor": names[0]}), flush=True)
            elif cmd == "add":
                cluster.add_node(num_cpus=2)
                cluster.wait_for_nodes()
                print(ANSWER + json.dumps({"nodes": len(cluster.worker_nodes)}), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


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
