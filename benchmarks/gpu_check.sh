#!/usr/bin/env bash
# The GPU check (docs/gpu.md): install Ray and DeepSpeed from carried wheels, run the `gpu`-marked tests,
# DeepSpeed's AutoTP at tp=2 on the one GPU (benchmarks/gpu_tp2.py), then the methods benchmark at
# Llama-3.2-1B's shape, on the random and the peaked policy, and the `--compile` decoder (CUDA graphs) beside
# the eager one; every output lands in one folder. Its steps are capped at 150 + 90 + 270 + 180 s (plus the
# wheel install: ~12 minutes at worst); measured before tp2, compiled and the peaked variant: tests 73 s, one
# variant's benchmark ~150 s at 3 repeats. So a second run within 15 minutes of device time should take only
# the steps that failed. tp2's and compiled's times on a GPU are not measured yet.
#
#   bash benchmarks/gpu_check.sh [all|tests|tp2|bench|compiled]     # into $OUT if set, else ./out-gpu/
#   BENCH_ARGS="--tiny --device cpu" TP2_DEVICE=cpu bash benchmarks/gpu_check.sh    # the same steps on a CPU
#
# Wheels: bash benchmarks/gpu_wheels.sh fills .whl/ here; the device command carries it. Without them
# (or if Ray does not import) the Ray tests skip and the rest runs; the summary says so.
set -uo pipefail                      # no -e: a failing test run must not stop the benchmark
cd "$(dirname "$0")/.."
what=${1:-all}
out=${OUT:-out-gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" RAY_ENABLE_UV_RUN_RUNTIME_ENV=0
summary="$out/summary.txt"
: >"$summary"
note() { echo "== $*" | tee -a "$summary"; }
t0=$SECONDS

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c "import sys, torch, transformers; print('python', sys.version.split()[0]); print('torch', torch.__version__,
'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print('transformers', transformers.__version__)"
  $py -m pip list 2>/dev/null | grep -iE '^(accelerate|protobuf|packaging|pyarrow|pytest|ray|deepspeed) '
} 2>&1 | tee "$out/env.txt"

ray="yes (preinstalled)"
if ! $py -c "import ray, deepspeed" 2>/dev/null; then
    if ls .whl/ray-*.whl >/dev/null 2>&1; then
        # --target + PYTHONPATH: the machine's own packages stay as they are; Ray's workers inherit PYTHONPATH
        $py -m pip install -q --root-user-action=ignore --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        PYTHONPATH="/tmp/site:$PYTHONPATH" $py -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 \
            | grep -v WARNING | tee -a "$out/env.txt"
        if PYTHONPATH="/tmp/site:$PYTHONPATH" $py -c "import ray; print('ray', ray.__version__, ray.__file__)" 2>&1 \
                | tee -a "$out/env.txt"; then
            export PYTHONPATH="/tmp/site:$PYTHONPATH"
            ray="yes (from .whl/)"
        else
            ray="NO: Ray from .whl/ does not import (see env.txt)"
        fi
    else
        ray="NO: no .whl/ray-*.whl carried (bash benchmarks/gpu_wheels.sh, then carry .whl)"
    fi
fi
note "ray: $ray$([[ $ray == NO* ]] && echo '; running the non-Ray GPU parts only: the Ray tests skip')"

tests_rc=-
if [[ $what == all || $what == tests ]]; then
    # (the tp=2 test is the tp2 step below, run as the script itself)
    timeout 150 $py -m pytest -m gpu -k "not deepspeed_tp2" -v -rs -p no:cacheprovider tests/test_gpu.py 2>&1 \
        | tee "$out/gpu_tests.log"
    tests_rc=${PIPESTATUS[0]}
    note "gpu tests: exit $tests_rc ($(tail -1 "$out/gpu_tests.log"))"
fi

tp2_rc=-
if [[ $what == all || $what == tp2 ]]; then
    # two DeepSpeed AutoTP ranks on the one GPU over gloo vs the plain policy, fp32 (NCCL needs two GPUs)
    timeout 90 $py benchmarks/gpu_tp2.py --device ${TP2_DEVICE:-cuda} --json "$out/gpu_tp2.json" \
        >"$out/gpu_tp2.md" 2>"$out/gpu_tp2.log"
    tp2_rc=$?
    [[ $tp2_rc == 0 ]] || tail -n 30 "$out/gpu_tp2.log"
    note "deepspeed tp=2 on one device: exit $tp2_rc ($(tail -1 "$out/gpu_tp2.md"))"
fi

bench_rc=-
if [[ $what == all || $what == bench ]]; then
    # the Markdown table on stdout; progress and errors on stderr, into gpu_methods.log
    # the eager methods (the compiled decoder is the next step: its compiles must not eat this step's time)
    timeout 270 $py benchmarks/gpu_methods.py --repeats 2 --methods hf-generate,decoder,greedy,best-of-4,ggro,lookahead \
        ${BENCH_ARGS:-} --json "$out/gpu_methods.json" --csv "$out/gpu_methods.csv" \
        2>"$out/gpu_methods.log" | tee "$out/gpu_methods.md"
    bench_rc=$?
    [[ $bench_rc == 0 ]] || tail -n 30 "$out/gpu_methods.log"
    note "benchmark: exit $bench_rc (table: gpu_methods.md)"
fi

compiled_rc=-
if [[ $what == all || $what == compiled ]]; then
    # --compile's decoder (CUDA graphs) beside the eager one and HF generate, on the random 1B policy
    timeout 180 $py benchmarks/gpu_methods.py --repeats 3 --methods hf-generate,decoder,compiled --variants random \
        ${BENCH_ARGS:-} --json "$out/gpu_compiled.json" 2>"$out/gpu_compiled.log" | tee "$out/gpu_compiled.md"
    compiled_rc=$?
    [[ $compiled_rc == 0 ]] || tail -n 30 "$out/gpu_compiled.log"
    note "compiled decoder: exit $compiled_rc (table: gpu_compiled.md)"
fi

note "done in $((SECONDS - t0)) s; outputs in $out"
for rc in $tests_rc $tp2_rc $bench_rc $compiled_rc; do [[ $rc == - || $rc == 0 ]] || exit 1; done
