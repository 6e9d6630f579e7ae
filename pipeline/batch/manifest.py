"""`.ggro_run.json`: what produced an output folder (configuration, versions, models, times, row counts)."""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

from pipeline.batch.output import MANIFEST, output_fs


def now() -> str:
    """UTC now, to the second, as the manifest and the lock record times."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_manifest(out_dir: str | Path, manifest: dict) -> None:
    """Write .ggro_run.json whole (tmp + move); earlier runs' start/end/counts are kept under `previous`."""
    fs, path = output_fs(out_dir)
    old = read_manifest(out_dir)
    if old and old.get("run_id") != manifest.get("run_id"):
        prev = old.pop("previous", [])
        manifest = {**manifest, "previous": (prev + [{k: old.get(k) for k in ("run_id", "started", "ended",
                                                                             "status", "rows", "config_hash")}])[-20:]}
    elif old and "previous" in old:
        manifest = {**manifest, "previous": old["previous"]}
    tmp = f"{path}/.{MANIFEST}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps(manifest, indent=2, default=str).encode())
    fs.move(tmp, f"{path}/{MANIFEST}")


def read_manifest(out_dir: str | Path) -> dict | None:
    fs, path = output_fs(out_dir)
    try:
        with fs.open_input_stream(f"{path}/{MANIFEST}") as f:
            m = json.loads(f.read())
    except (FileNotFoundError, ValueError):
        return None
    return m if isinstance(m, dict) else None      # a file of that name that ggro did not write


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for pkg in ("ggro", "torch", "transformers", "ray", "pyarrow", "deepspeed"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    import platform
    out["python"] = platform.python_version()
    return out
