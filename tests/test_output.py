"""Output folders on any pyarrow filesystem: whole part files, resume and --overwrite on a real S3
endpoint (tests/conftest.py `s3`), and `ggro align` / `ggro dpo` writing s3:// URIs."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from pyarrow import fs as pafs

from pipeline.batch.lock import OutputLock
from pipeline.batch.output import (OutputConflict, OutputError, OutputLocked, child, clear_output,
                             Summary, done_ids, drop_error_rows, id_digests, output_fs, output_index, prepare_output,
                             read_output, write_part)


def rec(i: str, h: str = "h1") -> dict:
    return {"id": i, "prompt": "q", "response": f"answer {i}", "reward": 1.0, "method": "ggro", "config_hash": h}


def listing(uri: str) -> list[str]:
    fs, path = output_fs(uri)
    return sorted(f.base_name for f in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))


def test_parts_resume_and_overwrite_on_s3(s3):
    out = s3("unit/out")
    assert read_output(out).num_rows == 0 and done_ids(out, "h1") == set()   # nothing there yet
    prepare_output(out)
    write_part(out, [rec("a"), rec("b")])
    write_part(out, [rec("c")])
    names = listing(out)
    assert len(names) == 2 and all(n.startswith("part-") and n.endswith(".parquet") for n in names)  # no tmp left
    assert sorted(read_output(out).column("id").to_pylist()) == ["a", "b", "c"]
    assert done_ids(out, "h1") == {"a", "b", "c"}
    with pytest.raises(OutputConflict, match="another configuration"):
        done_ids(out, "h2")
    with OutputLock(out):
        assert clear_output(out) == 2
        assert listing(out) == [".ggro.lock"]
    assert listing(out) == [] and read_output(out).num_rows == 0


def test_overwrite_refuses_foreign_files_and_deletes_only_ggros(tmp_path):
    out = tmp_path / "out"
    write_part(out, [rec("a")])
    (out / ".part-0123456789ab.parquet.tmp").write_bytes(b"half")      # a killed writer's temp file
    (out / ".ggro_run.json").write_text("{}")
    (out / "prompts.jsonl").write_text('{"prompt": "keep me"}\n')      # not ours
    (out / "part-00000-c000.snappy.parquet").write_bytes(b"spark")     # not ours either
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(OutputError, match=r"holds files ggro did not write \(part-00000-c000.snappy.parquet, "
                                          r"prompts.jsonl\); nothing was deleted"):
        clear_output(out)
    assert sorted(p.name for p in out.iterdir()) == before
    (out / "prompts.jsonl").unlink()
    (out / "part-00000-c000.snappy.parquet").unlink()
    assert clear_output(out) == 3 and list(out.iterdir()) == []


def test_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path):
    import os
    import socket
    import subprocess
    import time
    out = tmp_path / "out"
    prepare_output(out)
    with OutputLock(out) as held:
        with pytest.raises(OutputLocked, match=rf"being written by another run \(host {socket.gethostname()}, "
                                               rf"pid {os.getpid()}"):
            OutputLock(out).acquire()
        assert (out / ".ggro.lock").exists() and held.holder()["pid"] == os.getpid()
    assert not (out / ".ggro.lock").exists()          # released
    dead = subprocess.Popen(["true"])
    dead.wait()                                      # a pid on this host that no longer runs
    (out / ".ggro.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "x"}))
    lock = OutputLock(out).acquire()                 # stale: taken over
    assert lock.holder()["token"] == lock.token
    lock.release()
    # killed but not yet reaped (a zombie: `kill -9` and an immediate rerun): its pid still answers kill(0)
    from pipeline.batch.lock import _proc_start
    zombie = subprocess.Popen(["true"])
    while open(f"/proc/{zombie.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.01)
    (out / ".ggro.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": zombie.pid,
                                                "proc_start": _proc_start(zombie.pid), "started": "x"}))
    OutputLock(out).acquire().release()
    zombie.wait()
    # another host: stale only once its holder stopped refreshing the file for stale_after_s
    (out / ".ggro.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "x"}))
    with pytest.raises(OutputLocked, match="host elsewhere"):
        OutputLock(out).acquire()
    old = time.time() - 3600
    os.utime(out / ".ggro.lock", (old, old))
    OutputLock(out).acquire().release()


def test_a_lock_whose_write_fails_is_not_left_behind(tmp_path):
    """A full disk: the lock file is created (O_EXCL) but its content cannot be written. The failed run must
    remove it, or the next run is refused as "being written by another run (host ?, pid ?)". The full disk is
    real to the process: RLIMIT_FSIZE 0 makes every write of a byte fail (EFBIG, SIGXFSZ ignored)."""
    import subprocess
    import sys
    out = tmp_path / "out"
    prepare_output(out)
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))\n"
            "from pipeline.batch.lock import OutputLock\n"
            "from pipeline.batch.output import OutputError\n"
            "try:\n    OutputLock(sys.argv[1]).acquire()\n"
            "except OutputError as e:\n    print(e)\n    sys.exit(1)\n")
    run = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "cannot write --output" in run.stdout and "File too large" in run.stdout, run
    assert not (out / ".ggro.lock").exists()
    OutputLock(out).acquire().release()
    # a lock left empty by a run killed in the instant between creating and writing it (or by an older ggro):
    # a live holder writes its lock at once, so an empty one that old has no holder and is taken over
    (out / ".ggro.lock").write_bytes(b"")
    with pytest.raises(OutputLocked):
        OutputLock(out).acquire()                    # just made: it may be a run writing it right now
    old = time.time() - 60
    os.utime(out / ".ggro.lock", (old, old))
    OutputLock(out).acquire().release()


def test_a_manifest_name_holding_something_else_is_no_manifest(tmp_path):
    """`.ggro_run.json` that is not a JSON object (not ggro's) reads as no manifest, not an AttributeError."""
    from pipeline.batch.manifest import read_manifest, write_manifest
    prepare_output(tmp_path / "out")
    (tmp_path / "out" / ".ggro_run.json").write_text("[1]")
    assert read_manifest(tmp_path / "out") is None
    write_manifest(tmp_path / "out", {"run_id": "r"})
    assert read_manifest(tmp_path / "out") == {"run_id": "r"}


def test_drop_error_rows_rewrites_parts_whole(tmp_path):
    out = tmp_path / "out"
    write_part(out, [rec("a"), {**rec("b"), "error": "boom", "response": None}])
    write_part(out, [{**rec("c"), "error": "boom", "response": None}])
    idx = output_index(out, "h1")
    assert (idx.rows, len(idx.done), len(idx.errors), idx.duplicates) == (3, 3, 2, 0)
    assert drop_error_rows(out, lambda ids: [i != "c" for i in ids]) == 1     # only the ids asked for
    assert sorted(read_output(out).column("id").to_pylist()) == ["a", "c"]
    assert drop_error_rows(out) == 1
    assert read_output(out).column("id").to_pylist() == ["a"]
    assert len(list(out.glob("*.parquet"))) == 1 and not list(out.glob(".*"))   # the emptied part is gone


def test_summary_of_this_inputs_rows_counts_duplicates_across_parts(tmp_path):
    out = tmp_path / "out"
    write_part(out, [rec("a"), {**rec("b"), "reward": 3.0, "num_nudges": 2}, {**rec("x"), "reward": 100.0}])
    write_part(out, [rec("a"), {**rec("c"), "error": "boom", "response": None, "reward": None}, rec("c")])
    write_part(out, [rec("b"), rec("b")])
    ids = np.sort(id_digests(["a", "b", "c", "d"]))           # x: another input's row; d: not written
    s = Summary.of_output(out, ids)
    assert (s.rows, s.ok, s.errors, s.duplicates) == (7, 6, 1, 4)  # a once more, c once more, b twice more
    assert s.error_examples == [("c", "boom")] and s.mean_reward == pytest.approx((1 + 3 + 1 + 1 + 1 + 1) / 6)
    assert s.mean_nudges == pytest.approx(2 / 6) and "MISMATCH: 4 rows in, 4 duplicate rows" in s.render(4)


def test_missing_bucket_fails_before_any_work(s3):
    with pytest.raises(OutputError, match=r"cannot write --output s3://.*no-such-bucket.*Bucket"):
        prepare_output(s3("out", bucket="no-such-bucket"))


def test_child_keeps_scheme_credentials_and_options(s3, tmp_path):
    uri = s3("dpo")
    sub = child(uri, "aligned-ggro")
    assert sub.startswith("s3://test:test@ggro-test/dpo/aligned-ggro?endpoint_override=http://127.0.0.1:")
    assert sub.split("?")[1] == uri.split("?")[1]
    assert child(tmp_path / "x", "y") == str(tmp_path / "x" / "y")


def test_align_and_dpo_write_s3(s3, tiny_models, tmp_path, capsys):
    from jobs.cli import main
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "prompt": "how do you make water hot ?"},
        {"id": "b", "prompt": "what is the number of people ?"},
        {"id": "bad", "prompt": ""}]) + "\n")
    models = ["--input", str(inp), "--policy", tiny_models["policy"], "--reward", tiny_models["classifier"],
              "--reward-kind", "classifier", "--dtype", "float64", "--max-new-tokens", "8",
              "--num-refinements", "2", "--local", "--max-error-fraction", "0.5"]
    out = s3("cli/aligned")
    assert main(["align", *models, "--output", out]) == 0
    first = read_output(out)
    assert sorted(first.column("id").to_pylist()) == ["a", "b", "bad"]
    assert "rows: 3 out (2 ok, 1 error) / 3 in [OK]" in capsys.readouterr().out
    assert main(["align", *models, "--output", out]) == 0             # resume: nothing left to do
    err = capsys.readouterr().err
    assert "resuming: 3 of 3 rows already in" in err and "ggro: loading" not in err
    assert read_output(out).num_rows == 3

    dpo = s3("cli/dpo")
    assert main(["dpo", *models, "--output", dpo, "--min-margin", "-1000", "--keep-truncated"]) == 0
    fs, path = output_fs(dpo)
    assert {"__aligned-ggro", "__aligned-greedy", "pairs.parquet", ".ggro_run.json"} == set(listing(dpo))
    pairs = pq.read_table(f"{path}/pairs.parquet", filesystem=fs)
    assert sorted(pairs.column("id").to_pylist()) == ["a", "b"]


def test_two_runs_taking_over_one_stale_lock_never_both_hold_it(tmp_path):
    """Two runs that find the same stale lock at the same moment: exactly one takes the folder, whatever the
    interleaving (the other sees the winner's live lock), and nothing is left beside the lock."""
    import socket
    import subprocess
    import threading
    out = tmp_path / "out"
    prepare_output(out)
    dead = subprocess.Popen(["true"])
    dead.wait()
    for _ in range(25):         # interleavings vary from round to round
        (out / ".ggro.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "x"}))
        start, held, refused = threading.Barrier(2), [], []

        def take():
            lock = OutputLock(out)
            start.wait()
            try:
                held.append(lock.acquire())
            except OutputLocked:
                refused.append(lock)
        threads = [threading.Thread(target=take) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(held) == 1 and len(refused) == 1
        assert held[0].holder()["token"] == held[0].token
        assert sorted(p.name for p in out.iterdir()) == [".ggro.lock"]
        held[0].release()
