"""`ggro align` on Ray when worker nodes die mid-job (kill -9 of a raylet and every process on its node).

A cluster of its own (tests.ray_nodes: a head that runs no work and two 2-CPU worker raylets on this
machine, a lost node declared dead within seconds), jobs run as `python -m jobs.align` drivers with SIGINT
ignored, as a job started in the background by CI or nohup is. The policy judges itself (one model actor:
one model load a job). One job, then its resume:
  1. the node holding the policy replica dies once the replica is loaded, the other has room: the job carries
     on there (Ray restarts the replica on the other node, which aligns and writes the rows);
  2. once a part is written, that last worker node dies: no room is left, so the job stops within
     --ray-timeout with a clear message (exit 1) instead of waiting forever;
  3. a node comes back and the same command resumes: every id exactly once, the first run's rows kept.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ray_nodes import Nodes
from tests.test_ray_align import ROOT, rows_of

pytestmark = pytest.mark.slow
IDS = [f"r{i:02d}" for i in range(64)]    # ~0.1 s a row: the last kill lands with rows still to go
GRACE_S = 10          # --ray-timeout: how long a job waits for room it lost
BOUND_S = 480         # a job that runs longer than this has hung: the test fails (~1 min each on 2 idle cores,
                      # up to ~4 min on 2 cores shared with a load of 10-15)


def parts(out: Path) -> int:
    return len(list(out.glob("*.parquet")))


def job(nodes: Nodes, tiny, inp: Path, out: Path, kills: tuple[int, ...] = ()):
    """Run one align job on `nodes`; for each n in `kills`, once `out` holds n part files (0: at once), kill -9
    the node hosting the policy replica (once it is loaded). Returns the finished process and the kill answers."""
    argv = ["--input", str(inp), "--output", str(out), "--batch-size", "1", "--in-flight", "1",
            "--rows-per-file", "1", "--policy", tiny["policy"], "--reward", tiny["policy"],
            "--reward-kind", "judge", "--dtype", "float64", "--max-new-tokens", "8", "--num-refinements", "2",
            "--ray-timeout", str(GRACE_S), "--quiet"]
    env = {**os.environ, "RAY_ADDRESS": nodes.address, "PYTHONPATH": str(ROOT)}
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)    # inherited by the job: Ctrl-C has no effect there
    try:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.align", *argv], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    finally:
        signal.signal(signal.SIGINT, before)
    deadline, killed = time.monotonic() + BOUND_S, []
    try:
        for want in kills:
            while parts(out) < want and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert proc.poll() is None and parts(out) >= want, "the job finished or hung before its node was lost"
            killed.append(nodes.kill("ggro-policy-"))
            assert "error" not in killed[-1], killed[-1]
        stdout, stderr = proc.communicate(timeout=max(1, deadline - time.monotonic()))   # bounded: a hang fails
    except (AssertionError, subprocess.TimeoutExpired) as e:
        proc.kill()
        raise AssertionError(f"{e}\n--- the job's stderr ends with:\n{proc.communicate()[1][-3000:]}") from None
    finally:
        if proc.poll() is None:     # interrupted: never leave a job behind
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr), killed


def test_worker_nodes_lost_midjob(tiny_models, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": "how do you make water hot ?"}) + "\n" for i in IDS))
    out = tmp_path / "out"
    with Nodes(2) as nodes:
        stopped, killed = job(nodes, tiny_models, inp, out, kills=(0, 1))
        assert parts(out) >= 1 and killed[0]["killed"] != killed[1]["killed"], "the replica did not move on"
        assert stopped.returncode == 1, (stopped.stdout, stopped.stderr[-3000:])
        assert "lost nodes mid-job" in stopped.stderr and "rerun the same command" in stopped.stderr
        assert "Traceback" not in stopped.stderr, stopped.stderr[-2000:]
        partial = rows_of(out)                     # rows_of: no id twice
        assert 0 < len(partial) < len(IDS)
        nodes.add()
        resumed, _ = job(nodes, tiny_models, inp, out)
        assert resumed.returncode == 0, (resumed.stdout, resumed.stderr[-3000:])
        assert f"resuming: {len(partial)} of {len(IDS)} rows already in" in resumed.stderr
        final = rows_of(out)
        assert sorted(final) == IDS and all(final[i] == r for i, r in partial.items())
