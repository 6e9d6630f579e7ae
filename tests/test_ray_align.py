"""`ggro align` on Ray: equals --local row for row (written to S3), bad rows, resume after a killed driver, a killed
reward actor, a killed rank of a tp=2 replica, and failing fast when the cluster is too small. Real Ray cluster, tiny models, real Parquet."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.batch.output import read_output

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

ROWS = [
    {"id": "a", "prompt": "how do you make water hot ?"},
    {"id": "b", "prompt": "what is the number of people ?"},
    {"id": "c", "messages": [{"role": "user", "content": "can you write a word ?"}]},
    {"id": "d", "prompt": ""},                                   # bad: empty prompt
    {"id": "e", "prompt": "tell me about the day", "prefill": "Yes"},
    {"id": "f", "prompt": "which way is down ?", "topic": "x"},
]


def write_input(path: Path, extra_lines=("not json",)) -> Path:
    with open(path, "w") as f:
        for r in ROWS:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def model_flags(tiny) -> list[str]:
    return ["--policy", tiny["policy"], "--reward", tiny["classifier"], "--reward-kind", "classifier",
            "--dtype", "float64", "--max-new-tokens", "12", "--num-refinements", "3",
            "--max-error-fraction", "0.5"]   # ROWS and the bad line: 2 error rows of 7


def align(argv) -> int:
    from jobs.align import main
    return main(argv)


def rows_of(out: Path | str) -> dict:
    t = read_output(out).drop(["elapsed_s"])
    recs = t.to_pylist()
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)), "an id was written twice"
    return {r["id"]: r for r in recs}


def test_ray_equals_local_and_bad_rows(ray_cluster, tiny_models, tmp_path, s3):
    """The Ray run writes to S3: its part files come from Ray Data write tasks in worker processes."""
    inp = write_input(tmp_path / "in.jsonl")
    flags = ["--input", str(inp), "--batch-size", "2"] + model_flags(tiny_models)   # batch size is in the config hash
    assert align(flags + ["--output", str(tmp_path / "local"), "--local"]) == 0
    assert align(flags + ["--output", s3("ray-equals-local"), "--in-flight", "2",
                          "--reward-replicas", "2", "--reward-cpus", "0.25"]) == 0
    local, dist = rows_of(tmp_path / "local"), rows_of(s3("ray-equals-local"))
    assert len(dist) == len(ROWS) + 1            # rows in == rows out, the bad ones included
    # Row for row, provenance included. Rewards agree to the last bits only: the RM sees differently
    # composed (padded) batches and other thread counts in its actors, so float sums round differently.
    diff = [(i, k, local[i][k], dist[i][k]) for i in local for k in local[i]
            if k != "reward" and local[i][k] != dist[i][k]]
    assert not diff
    for i in local:
        assert (local[i]["reward"] is None) == (dist[i]["reward"] is None)
        if local[i]["reward"] is not None:
            assert dist[i]["reward"] == pytest.approx(local[i]["reward"], rel=1e-12, abs=1e-12)
    assert "empty" in dist["d"]["error"]
    assert "not valid JSON" in dist["in.jsonl:line-7"]["error"]
    assert sum(r["error"] is None for r in dist.values()) == 5
    assert {r["config_hash"] for r in dist.values()} == {dist["a"]["config_hash"]}
    # the aligner actors' metrics reach the node's Prometheus endpoint (docs/metrics.md)
    from tests.conftest import metric_total, wait_for_metrics
    batch = {"source": "batch", "method": "ggro"}
    want = [("ray_ggro_batch_rows_total", {"status": "ok"}), ("ray_ggro_batch_rows_total", {"status": "error"}),
            ("ray_ggro_responses_total", batch), ("ray_ggro_reward_calls_total", batch),
            ("ray_ggro_nudges_count", batch), ("ray_ggro_reward_count", batch)]
    samples = wait_for_metrics(want)
    for name, labels in want:
        assert metric_total(samples, name, **labels) > 0, (name, labels, sorted({s.name for s in samples}))


def test_cluster_too_small_fails_fast(ray_cluster, tiny_models, tmp_path, capsys):
    inp = write_input(tmp_path / "in.jsonl", ())
    t0 = time.time()
    with pytest.raises(SystemExit) as e:
        align(["--input", str(inp), "--output", str(tmp_path / "o"), "--policy-replicas", "64"]
              + model_flags(tiny_models))
    assert e.value.code == 1 and time.time() - t0 < 60
    assert "cannot fit" in capsys.readouterr().err


def test_resume_after_killed_driver(ray_cluster, tiny_models, tmp_path):
    """Kill the driver (`python -m jobs.align`, connected to the cluster) part-way, rerun: every id once."""
    import ray
    inp = write_input(tmp_path / "in.jsonl")
    out = tmp_path / "out"
    argv = ["--input", str(inp), "--output", str(out), "--batch-size", "1", "--in-flight", "1",
            "--rows-per-file", "1"] + model_flags(tiny_models)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.align", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and len(list(out.glob("*.parquet"))) < 2 and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, "the job finished before it could be interrupted"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    partial = rows_of(out)
    assert 0 < len(partial) < len(ROWS) + 1
    assert align(argv) == 0                       # resumes: only the remaining rows
    final = rows_of(out)
    assert len(final) == len(ROWS) + 1
    assert all(final[i] == r for i, r in partial.items())


def align_killing(argv, out: Path, *find_pids) -> None:
    """Run `align(argv)` while a thread SIGKILLs, one after another, the process each `find_pid()` names (None: not
    up yet), the k-th once k part files are in `out` and others are still to come. Every input id must come out
    once."""
    killed = []

    def killer():
        deadline = time.time() + 300
        for k, find_pid in enumerate(find_pids, 1):
            while time.time() < deadline:
                pid = find_pid() if len(list(out.glob("*.parquet"))) >= k else None
                if pid:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    break
                time.sleep(0.2)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    assert align(argv + ["--output", str(out), "--rows-per-file", "1"]) == 0
    th.join(5)
    assert len(killed) == len(find_pids), "the job finished before every process could be killed"
    assert sorted(rows_of(out)) == sorted(r["id"] for r in ROWS)


def named_actor_pid(prefix: str, suffix: str = "", replicas: int = 1) -> int | None:
    import ray
    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["name"].startswith(prefix) and a["name"].endswith(suffix))
    return ray.get(ray.get_actor(names[0]).pid.remote()) if len(names) >= replicas else None


def test_tp2_replica_rank_killed_midjob(ray_cluster, tiny_models, tmp_path):
    """SIGKILL one rank of a tp=2 replica while rows are in flight: the replica cannot rejoin its world, so
    the aligner marks it dead and reruns its rows on the other replica."""
    inp = write_input(tmp_path / "in.jsonl", ())
    flags = ["--input", str(inp), "--batch-size", "1", "--in-flight", "1", "--tp", "2", "--policy-replicas", "2",
             "--policy-cpus", "0.25"] + model_flags(tiny_models)
    with pytest.raises(SystemExit) as e:           # DeepSpeed has no float64: a clear error, no traceback
        align(flags + ["--output", str(tmp_path / "f64")])
    assert e.value.code == 1
    align_killing(flags + ["--dtype", "float32"], tmp_path / "out",
                  lambda: named_actor_pid("ggro-policy-", "-rank1", replicas=2))     # both replicas up


def test_reward_and_aligner_actors_killed_midjob(ray_cluster, tiny_models, tmp_path):
    """SIGKILL the reward actor's process while rows are in flight (it restarts, its calls are retried), then the
    Ray Data aligner actor between blocks (Ray Data restarts it and retries its block). One job for both: each
    job costs a driver and a set of model workers."""
    def aligner_pid():
        pids = subprocess.run(["pgrep", "-f", r"ray::MapWorker\(MapBatches\(Aligner"], capture_output=True,
                              text=True).stdout.split()
        return int(pids[0]) if pids else None
    inp = write_input(tmp_path / "in.jsonl", ())
    align_killing(["--input", str(inp), "--batch-size", "1", "--in-flight", "1"] + model_flags(tiny_models),
                  tmp_path / "out", lambda: named_actor_pid("ggro-reward-"), aligner_pid)


def test_streamed_folder_equals_local(ray_cluster, tiny_models, tmp_path, capsys):
    """A folder of mixed files streams through Ray Data: the same rows as --local (BOM, a .json array,
    an upper-case .PARQUET, a repeated id, a bad line), the skipped file named, whole parts of
    --rows-per-file rows but the tail, and --limit cutting at the same row."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in ROWS[:3]).encode()
                                + b"{broken\n" + json.dumps({"id": "a", "prompt": "the same id again"}).encode())
    (d / "b.json").write_text(json.dumps(ROWS[3:5] + [{"id": "a", "prompt": "and a third copy"}]))
    pq.write_table(pa.Table.from_pylist([{"prompt": "what is hot ?"}, ROWS[5]]), d / "c.PARQUET")
    (d / "notes.txt").write_text("not an input")
    flags = ["--input", str(d), "--rows-per-file", "3", "--max-error-fraction", "1"] + model_flags(tiny_models)
    assert align(flags + ["--output", str(tmp_path / "local"), "--local"]) == 0
    assert align(flags + ["--output", str(tmp_path / "ray")]) == 0
    assert "skipped notes.txt in --input" in capsys.readouterr().err
    local, dist = rows_of(tmp_path / "local"), rows_of(tmp_path / "ray")
    assert sorted(local) == sorted(dist) and len(dist) == 10
    assert {"a#dup2", "a#dup3", "a.jsonl:line-4"} <= set(dist) and dist["a#dup3"]["error"].startswith("duplicate id")
    for i in local:
        assert {k: v for k, v in local[i].items() if k != "reward"} == {k: v for k, v in dist[i].items() if k != "reward"}
    sizes = sorted(pq.read_metadata(p).num_rows for p in (tmp_path / "ray").glob("part-*.parquet"))
    assert sum(sizes) == 10 and all(n >= 3 for n in sizes[1:])          # whole parts; only one may be smaller
    assert align(flags + ["--output", str(tmp_path / "lim"), "--limit", "4"]) == 0
    assert align(flags + ["--output", str(tmp_path / "lim-local"), "--limit", "4", "--local"]) == 0
    assert sorted(rows_of(tmp_path / "lim")) == sorted(rows_of(tmp_path / "lim-local")) == ["a", "a.jsonl:line-4", "b", "c"]
    # a rerun resumes (nothing left); the same ids asking something else are refused on Ray as --local, untouched
    assert align(flags + ["--output", str(tmp_path / "ray")]) == 0 and "resuming: 10 of 10" in capsys.readouterr().err
    (d / "b.json").write_text(json.dumps(ROWS[3:4] + [{**ROWS[4], "prefill": "No"}, {"id": "a", "prompt": "a third"}]))
    for mode, out in (["--local"], "local"), ([], "ray"):
        with pytest.raises(SystemExit) as e:
            align(flags + mode + ["--output", str(tmp_path / out)])
        assert e.value.code == 1 and "holds 1 id(s) of --input answered for other messages or another prefill (e.g. 'e')" in capsys.readouterr().err
        assert rows_of(tmp_path / out)["e"]["prefill"] == "Yes"


def test_reward_model_of_another_vocabulary_on_ray(ray_cluster, tiny_models, tmp_path, capsys):
    """The baselines take a reward model of another vocabulary on Ray as in --local (its workers hold it plain,
    the aligners ask it in its own ids); GGRO refuses it before any actor starts."""
    from tests.conftest import save_other_vocab_rm
    inp = write_input(tmp_path / "in.jsonl", ())
    other = save_other_vocab_rm(tmp_path / "rm")
    flags = ["--input", str(inp), "--policy", tiny_models["policy"], "--reward", other, "--reward-kind", "classifier",
             "--dtype", "float64", "--max-new-tokens", "8", "--method", "greedy", "--max-error-fraction", "0.5"]
    assert align(flags + ["--output", str(tmp_path / "local"), "--local"]) == 0
    assert align(flags + ["--output", str(tmp_path / "ray"), "--reward-cpus", "0.25"]) == 0
    local, dist = rows_of(tmp_path / "local"), rows_of(tmp_path / "ray")
    assert local.keys() == dist.keys() and sum(r["error"] is None for r in dist.values()) == 5
    for i in local:
        assert local[i]["response"] == dist[i]["response"]
        assert (local[i]["reward"] is None) == (dist[i]["reward"] is None)
        if local[i]["reward"] is not None:
            assert dist[i]["reward"] == pytest.approx(local[i]["reward"], rel=1e-9)
    with pytest.raises(SystemExit) as e:
        align([f for f in flags if f not in ("--method", "greedy")] + ["--output", str(tmp_path / "ggro")])
    assert e.value.code == 1 and "one shared vocabulary" in capsys.readouterr().err


def test_id_pass_equals_the_local_reader_at_every_limit(ray_cluster, tmp_path):
    """The driver's id pass (digests and keys only) finds the same output ids as the in-process reader: copies
    of an id across and within files numbered in file order, and --limit cutting anywhere among them."""
    from ggro.rows import dedupe, read_rows
    from pipeline.batch.digests import id_digests
    from pipeline.batch.ray_input import scan_input
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.jsonl").write_text("".join(json.dumps({"id": i, "prompt": "p"}) + "\n" for i in "xyxzx") + "{bad\n")
    (d / "b.jsonl").write_text("".join(json.dumps({"id": i, "prompt": "q"}) + "\n" for i in "zwyx"))
    # real ids that a copy's generated name would take (d1, d1, d1#dup2 gave two rows d1#dup2)
    (d / "c.jsonl").write_text("".join(json.dumps({"id": i, "prompt": "r"}) + "\n"
                                       for i in ["x#dup4", "d1", "d1", "d1#dup2", "x#dup2", "x"]))
    local = [r.id for r in dedupe(read_rows(d))]
    assert local[:7] == ["x", "y", "x#dup2.2", "z", "x#dup3", "a.jsonl:line-6", "z#dup2"]     # the rule itself
    assert local[9:] == ["x#dup4.2", "x#dup4", "d1", "d1#dup2.2", "d1#dup2", "x#dup2", "x#dup5"]
    assert len(set(local)) == len(local)
    for limit in (None, 1, 3, 5, 7, 8, 12, 15, len(local), len(local) + 4):
        plan = scan_input(str(d), limit)
        want = local[:limit]
        assert plan.count == len(want) and plan.ids.tolist() == np.sort(id_digests(want)).tolist(), limit
        assert sorted(plan.dup_names.tolist()) == sorted(i for i in want if "#dup" in i and i not in
                                                         ("x#dup4", "d1#dup2", "x#dup2"))
