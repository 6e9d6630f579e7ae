"""The `ggro` command starts fast: declaring the flags imports no torch, transformers or Ray."""
from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "ray", "deepspeed", "fastapi", "matplotlib")


def test_building_the_parser_imports_no_heavy_module():
    code = ("import sys, json; import jobs.cli; jobs.cli.build_parser(); "
            f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_help_imports_no_heavy_module():
    for argv in (["--help"], ["align", "--help"], ["serve", "--help"]):
        code = ("import sys, json\nfrom jobs.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
                f"    pass\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))")
        proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("usage: ggro") and json.loads(proc.stdout.splitlines()[-1]) == [], argv


def test_version_is_the_packages_and_imports_no_heavy_module():
    import re
    from pathlib import Path
    want = re.search(r'^version\s*=\s*"([^"]+)"', (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(),
                     re.M).group(1)
    code = ("import sys, json\nfrom jobs.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n"
            f"    pass\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"ggro {want}" and json.loads(lines[-1]) == []


def test_ggro_package_exports_load_on_first_use():
    import ggro
    from ggro.search import Prompt, run
    assert ggro.run is run and ggro.Prompt is Prompt
    assert set(ggro.__all__) <= set(dir(ggro)) | {"Prompt", "Result", "ggro", "baseline", "run"}


def test_dry_run_on_a_cpu_machine_imports_no_model_library(tmp_path):
    """`ggro align --dry-run` reads metadata only: on a machine without an NVIDIA driver it loads no torch."""
    import os
    import pytest
    if os.path.isdir("/proc/driver/nvidia"):
        pytest.skip("this machine has an NVIDIA driver: the planner asks torch about its GPUs")
    code = ("import sys, json\nfrom jobs.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
            f"    pass\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))")
    proc = subprocess.run([sys.executable, "-c", code, "align", "--dry-run", "--max-new-tokens", "8",
                           "--output", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert "FITS" in proc.stdout, proc.stdout + proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == []


def test_log_level_and_quiet_flags(capsys):
    """Every job command takes --log-level (default INFO) and --quiet (Ray workers' logs reach the driver
    unless given); the `ggro` logger prints at or above the level to the current stderr."""
    from jobs.cli import build_parser
    from jobs.logs import _Stderr, log, log_to_driver, setup_logging
    for command in ("align", "dpo", "serve"):
        args = build_parser().parse_args([command])
        assert (args.log_level, args.quiet, log_to_driver(args)) == ("INFO", False, True), command
        assert not log_to_driver(build_parser().parse_args([command, "--quiet"]))
    setup_logging(build_parser().parse_args(["align", "--log-level", "WARNING"]))
    log.info("an info line")
    log.warning("a warning line")
    setup_logging(build_parser().parse_args(["align"]))
    log.info("shown at INFO")
    err = capsys.readouterr().err
    assert "a warning line" in err and "shown at INFO" in err and "an info line" not in err
    # set up twice, one stderr handler (pytest may add its own capture handlers): no line printed twice
    assert sum(isinstance(h, _Stderr) for h in log.handlers) == 1


def test_metrics_are_harmless_without_ray():
    """Recording with no Ray instance (no metrics agent) neither raises nor starts Ray; zero counts, a
    negative and a NaN reward are fine too."""
    code = ("import ray\nfrom pipeline import telemetry as t\n"
            "t.record_request('', 'completions', 200, 0.5, 3, 0); t.record_request('', 'completions', 499, 1.0)\n"
            "t.record_first_token('', 'completions', 0.1); t.record_queue_depth('', 0); t.record_cancelled('', 2)\n"
            "t.record_response('serve', 'ggro', -1.5, 2, 9); t.record_response('serve', 'greedy', float('nan'), 0, 1)\n"
            "t.record_rows([{'error': None, 'method': 'ggro', 'reward': 0.3, 'num_nudges': 1, 'reward_calls': 4},"
            " {'error': 'bad', 'method': 'ggro'}])\n"
            "print(ray.is_initialized(), sorted(t._broken))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[0] == "False []"
