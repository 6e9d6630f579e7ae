"""Scale benchmark of `ggro align` on Ray: driver peak RSS, rows/s, part files and resume time at N rows.

Tiny random policy and classifier RM built from configs (as in tests/conftest.py), --max-new-tokens 1,
so the numbers measure the data path (streaming read, prepare, aligner calls, writes, resume), not
the models. Starts one local Ray instance; each `python -m jobs.align` driver connects to it as a
separate process whose peak RSS (VmHWM) is sampled.

    GGRO_THREADS=1 python benchmarks/scale.py --n 10000 50000 --workdir /tmp/ggro-scale
    python benchmarks/scale.py --id-pass --n 10000 500000 2000000     # the driver's id pass alone
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_driver(argv: list[str], env: dict, cmd: tuple = ("-m", "jobs.align")) -> tuple[int, float, float, str]:
    """(exit code, wall s, peak RSS MB, stdout) of one `python -m jobs.align` (or `cmd`) process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *cmd, *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = [0.0]

    def sample():
        while proc.poll() is None:
            v = peak_rss_mb(proc.pid)
            if v:
                peak[0] = max(peak[0], v)
            time.sleep(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    th.join()
    return proc.returncode, time.perf_counter() - t0, peak[0], out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[10_000])
    p.add_argument("--workdir", default="/tmp/ggro-scale")
    p.add_argument("--rows-per-file", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray instance")
    p.add_argument("--id-pass", action="store_true", help="time only the driver's id pass (pipeline.batch.ray_align."
                   "scan_input) over each input: its peak RSS, no models")
    p.add_argument("--scan", help=argparse.SUPPRESS)     # the child process of --id-pass
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.scan:
        from pipeline.batch.ray_align import connect
        from pipeline.batch.ray_input import scan_input
        connect()
        print(scan_input(args.scan).count)
        return 0
    from tests.conftest import save_tiny
    import ray

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    models = {"policy": work / "policy", "rm": work / "rm"}
    if not (models["policy"] / "config.json").exists():
        save_tiny(models["policy"], "causal", seed=1)
        save_tiny(models["rm"], "classifier", seed=2)
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT)}
    results = []
    for n in args.n:
        inp = work / f"prompts-{n}.jsonl"
        if not inp.exists():
            with open(inp, "w") as f:
                for i in range(n):
                    f.write(json.dumps({"id": f"p{i}", "prompt": f"what is the number {i % 97} of people ?"}) + "\n")
        if args.id_pass:
            code, wall, rss, stdout = run_driver(["--scan", str(inp)], env, (__file__,))
            res = {"n": n, "exit": code, "id_pass_wall_s": round(wall, 1), "id_pass_peak_rss_mb": round(rss, 1),
                   "rows": stdout.strip()}
            print(json.dumps(res), flush=True)
            results.append(res)
            continue
        out = work / f"out-{n}"
        argv = ["--input", str(inp), "--output", str(out), "--overwrite", "--policy", str(models["policy"]),
                "--reward", str(models["rm"]), "--reward-kind", "classifier", "--max-new-tokens", "1",
                "--num-refinements", "1", "--batch-size", str(args.batch_size), "--rows-per-file",
                str(args.rows_per_file), "--policy-cpus", "0.5", "--reward-cpus", "0.5"]
        code, wall, rss, stdout = run_driver(argv, env)
        files = len(list(out.glob("part-*.parquet")))
        rcode, rwall, rrss, _ = run_driver([a for a in argv if a != "--overwrite"], env)
        res = {"n": n, "exit": code, "wall_s": round(wall, 1), "rows_per_s": round(n / wall, 1),
               "driver_peak_rss_mb": round(rss, 1), "part_files": files, "resume_exit": rcode,
               "resume_wall_s": round(rwall, 1), "resume_driver_peak_rss_mb": round(rrss, 1),
               "summary": stdout.strip().splitlines()[-2:] if stdout.strip() else []}
        print(json.dumps(res), flush=True)
        results.append(res)
    ray.shutdown()
    (work / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
