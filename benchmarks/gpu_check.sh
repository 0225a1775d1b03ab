#!/usr/bin/env bash
# The GPU check of the CUDA path, in one run on a GPU machine (the device machine: an
# H100/H200 with Python 3.12, torch, CUDA, pandas, pyarrow, pytest and lightning, but no
# Prefect and no network). It runs the GPU tests and the GPU benchmark and writes under $OUT:
#
#   env.txt          nvidia-smi, torch/CUDA versions, the device name
#   gpu-tests.log    pytest tests/gpu -m gpu (with -rA: every test's outcome by name)
#   gpu-tests.xml    the same as JUnit XML
#   bench.jsonl      benchmarks/gpu.py: one JSON line per case as it finishes, then {"summary": ...}
#   bench.err        the benchmark's progress log
#
# How to run it (from a session that has the device tool):
#   1. here, once, in the repository root: bash shared/tools/device-wheels.sh
#      (or /work/shared/tools/device-wheels.sh): Prefect and its dependencies as wheels in .whl/
#   2. run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
#   The tests take about 2-3 minutes and the benchmark under 3 on an H200; each step has its
#   own time limit below so that both report within the 10-minute limit of one command.
# GPU_CHECK_PARTS="tests" or "bench" runs one half only (default: "tests bench"), for a rerun
# on what is left of the session's device time.
# Without $OUT (e.g. trying it on a CPU machine, where the gpu tests skip and the benchmark
# runs --quick --device cpu) the files go to a new /tmp/gpu-check-out.* folder, named at the end.
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${OUT:-$(mktemp -d /tmp/gpu-check-out.XXXX)}
mkdir -p "$out"
py=${PYTHON:-python3}

if ! "$py" -c "import prefect" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "Prefect is not importable and there is no .whl/ to install it from:" \
             "run shared/tools/device-wheels.sh here and carry .whl" | tee "$out/env.txt"
        exit 3
    fi
    site=/tmp/prefect-torch-site
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || { echo "installing the carried wheels failed" | tee "$out/env.txt"; exit 3; }
    export PYTHONPATH="$site:$root${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
fi
PREFECT_HOME=$(mktemp -d)
# The benchmark's flows start Prefect's temporary server: give a loaded machine time.
export PREFECT_HOME PREFECT_SERVER_ANALYTICS_ENABLED=false PYTHONUNBUFFERED=1 PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120

{
    date -u
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    "$py" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)")
for name in ("prefect", "lightning", "pytorch_lightning"):
    try:
        module = __import__(name)
        print(name, module.__version__)
    except ImportError:
        print(name, "not importable")
EOF
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

if "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    bench_args=()
else
    bench_args=(--quick --device cpu)  # no GPU: check the script's structure only
fi

parts=${GPU_CHECK_PARTS:-tests bench}
tests_rc=skipped
bench_rc=skipped
if [[ " $parts " == *" tests "* ]]; then
    echo "== pytest tests/gpu -m gpu"
    timeout 330 "$py" -m pytest tests/gpu -m gpu -q -rA -p no:cacheprovider --junitxml="$out/gpu-tests.xml" \
        > "$out/gpu-tests.log" 2>&1
    tests_rc=$?
    tail -n 40 "$out/gpu-tests.log"
fi

if [[ " $parts " == *" bench "* ]]; then
    echo "== python benchmarks/gpu.py ${bench_args[*]:-}"
    timeout 230 "$py" benchmarks/gpu.py ${bench_args[@]+"${bench_args[@]}"} > "$out/bench.jsonl" 2> "$out/bench.err"
    bench_rc=$?
    tail -n 5 "$out/bench.err"
    cat "$out/bench.jsonl"
fi

echo "== exit codes: tests $tests_rc, benchmark $bench_rc (124: cut off by its time limit); files in $out"
[[ $tests_rc == 0 || $tests_rc == skipped ]] && [[ $bench_rc == 0 || $bench_rc == skipped ]]
