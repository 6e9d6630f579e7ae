"""A real `ray start --head` + `ray job submit --working-dir . -- python -m jobs.dpo ...` (the batch
driver of `jobs.align`, twice, then the pairing) on tiny models. The head gets its own ports and --temp-dir and only it is stopped."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.batch.output import read_output

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def ray_head():
    """`ray start --head --block` in its own session; teardown stops that process group only."""
    temp = tempfile.mkdtemp(prefix="ggro-ray-", dir="/tmp")   # short: Ray's socket paths have a length limit
    gcs, dash, client, agent, metrics, rtenv = free_ports(6)
    # token auth on both sides: the CLI then reads the token `ray start` uses (~/.ray/auth_token)
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    cmd = ["ray", "start", "--head", "--block", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
           "--dashboard-agent-listen-port", str(agent), "--metrics-export-port", str(metrics),
           "--runtime-env-agent-port", str(rtenv), "--num-cpus", "2", "--num-gpus", "0",
           "--temp-dir", temp, "--include-dashboard", "true", "--disable-usage-stats"]
    head = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(url + "/api/version", timeout=2)
                break
            except urllib.error.HTTPError:   # e.g. 401 with token auth: the dashboard is up
                break
            except OSError:
                if time.time() > deadline or head.poll() is not None:
                    raise RuntimeError("ray head did not come up")
                time.sleep(1)
        yield url, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)   # --block: ray start stops its node's processes on SIGTERM
        try:
            head.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        # anything of this node still alive (it runs with our --temp-dir): stop it by pid
        out = subprocess.run(["pgrep", "-f", temp], capture_output=True, text=True).stdout.split()
        for pid in map(int, out):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)


def submit(url, env, module, argv):
    cmd = ["ray", "job", "submit", "--address", url, "--working-dir", str(ROOT), "--", "python", "-m", module, *argv]
    deadline = time.time() + 180
    while True:
        res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
        # the head answers before its job agent is up ("No available agent"): retry until it is
        if res.returncode == 0 or "No available agent" not in res.stderr + res.stdout or time.time() > deadline:
            break
        time.sleep(3)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def test_ray_job_submit_dpo(ray_head, tiny_models, tmp_path):
    """One `ray job submit` of `jobs.dpo`: GGRO and greedy both aligned on the cluster by the batch driver that
    `jobs.align` runs (a bad row becomes an error row), then paired. One job, not one per entry point: each costs a
    driver and a set of model workers, and the in-process `jobs.align` on Ray is tests/test_ray_align.py's."""
    url, env = ray_head
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "prompt": "how do you make water hot ?"},
        {"id": "b", "prompt": "what is the number of people ?"},
        {"id": "bad", "messages": "not a list"}]) + "\n")
    models = ["--policy", tiny_models["policy"], "--reward", tiny_models["classifier"], "--reward-kind",
              "classifier", "--dtype", "float64", "--max-new-tokens", "8", "--num-refinements", "2",
              "--max-error-fraction", "0.5"]      # 1 bad row of 3: the job still succeeds
    dpo = tmp_path / "dpo"
    log = submit(url, env, "jobs.dpo", ["--input", str(inp), "--output", str(dpo), "--min-margin", "-1000", "--keep-truncated",
                                      *models])
    assert "rows: 3 out (2 ok, 1 error) / 3 in [OK]" in log
    assert "pairs: 2 of 3 rows" in log
    assert log.count("ggro: started 1 policy replica(s)") == 1       # both methods ran on one set of workers
    t = read_output(dpo / "__aligned-ggro")
    assert sorted(t.column("id").to_pylist()) == ["a", "b", "bad"]
    assert set(t.column("method").to_pylist()) == {"ggro"}
    pairs = pq.read_table(dpo / "pairs.parquet")
    assert sorted(pairs.column("id").to_pylist()) == ["a", "b"]
