#!/usr/bin/env bash
# Issue 9's GPU measurements in one call, for a session that is lent a GPU for a few minutes:
# correctness checks first, then the MFU ceiling of the model shape, then orpo's speed options
# against TRL on the 0.5B model. Every part has its own time limit and a failed part does not stop
# the next; results go to $OUT (the device tool's output folder) or ./gpu-results. The limits add up to
# 540 s, under the device tool's 600 s per call.
#
#   bash benchmarks/gpu_session.sh
#
# Device images without datasets / trl / liger-kernel: put their wheels in .whl/ (pip download
# --no-deps -d .whl ...); they are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD/src"
fi
export TRL_EXPERIMENTAL_SILENCE=1

part() {  # part NAME SECONDS COMMAND...: run, keep the output's tail, note a failure and go on
    local name=$1 seconds=$2
    shift 2
    echo "== $name"
    timeout "$seconds" "$@" > "$out/$name.log" 2>&1
    local status=$?
    tail -n 25 "$out/$name.log"
    [ "$status" -eq 0 ] || echo "!! $name exited with status $status"
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
part gpu_check 120 python3 benchmarks/gpu_check.py --json "$out/gpu_check.json"
part mfu_ceiling 60 python3 benchmarks/bench_mfu_ceiling.py --scenario gpu-0.5b --json "$out/ceiling.json"
# The key comparison first, the other options second: each invocation writes its own results.
part vs_trl_flex 180 python3 benchmarks/bench_vs_trl.py --scenario gpu-0.5b --repeats 1 \
    --impls orpo-flex orpo trl --json "$out/vs_trl_flex.json"
part vs_trl_options 180 python3 benchmarks/bench_vs_trl.py --scenario gpu-0.5b --repeats 1 \
    --impls orpo-liger orpo-compiled orpo --json "$out/vs_trl_options.json"
