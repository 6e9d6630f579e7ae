#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu_check.sh installs on the GPU machine, into .whl/ (git-ignored).
#
#   bash benchmarks/gpu_wheels.sh            # Python 3.12 x86_64 wheels into .whl/
#   PYVER=3.11 bash benchmarks/gpu_wheels.sh /tmp/whl311    # the same set for another Python (tests here)
#
# The GPU machine has torch, transformers, accelerate, pyarrow, pytest and Ray's other needs, but no Ray,
# and reaches no package registry. Everything that travels there (work tree + wheels) must stay under
# 64 MiB, and Ray's wheel is 75.6 MiB: 30.7 MiB of it is ray/jars/ray_dist.jar, the Java workers,
# which Python never loads. So Ray's wheel is repacked without ray/jars/ (its RECORD too): 45 MiB.
# DeepSpeed (for benchmarks/gpu_tp2.py: AutoTP at tp=2 on the one GPU) has only an sdist on PyPI: built here
# into a pure-Python wheel (DS_BUILD_OPS=0, no compiled ops), with the needs the machine lacks.
# Not carried: gguf (only the embedded default model), transformers (the machine's 5.17 runs the GPU tests;
# see docs/gpu.md).
set -euo pipefail
dest=${1:-.whl}
pyver=${PYVER:-3.12}
mkdir -p "$dest"
rm -f "$dest"/*.whl            # one version of each: two of one package stop the whole install
# ray, and jsonschema (a Ray need missing there) with its needs, at the versions installed here. Ray's
# other needs (click, filelock, msgpack, packaging, protobuf >= 3.20.3, pyyaml, requests) are there.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dest" \
    ray==2.60.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==0.30.0
# DeepSpeed's needs missing there (psutil, numpy, tqdm, msgpack, packaging are there): pure-Python but pydantic-core
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dest" \
    einops==0.8.2 hjson==3.1.0 ninja==1.13.2 py-cpuinfo==9.0.0 pydantic==2.13.4 pydantic-core==2.46.4 \
    annotated-types==0.7.0 typing-inspection==0.4.2
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w "$dest"
full=$(ls "$dest"/ray-*.whl)
python3 - "$full" <<'EOF'
import os, sys, zipfile
src = sys.argv[1]
tmp = src + ".slim"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if item.filename.startswith("ray/jars/"):
            continue
        data = zin.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line for line in data.splitlines(True) if not line.startswith(b"ray/jars/"))
        zout.writestr(item, data)      # keeps each entry's mode bits: gcs_server and raylet stay executable
os.replace(tmp, src)
EOF
ls -l "$dest"/*.whl | awk '{printf "%8.1f MiB  %s\n", $5 / 1048576, $NF}'
du -cb "$dest"/*.whl | awk 'END {printf "%8.1f MiB  total (the work tree travels too: 64 MiB in all)\n", $1 / 1048576}'
