#!/usr/bin/env bash
# One prepared pass for a lent GPU (device tool): the kernel tests without the Triton interpreter,
# then every benchmark at its CUDA defaults. Results land in $OUT (the device tool's folder) or
# ./gpu_results: gpu_tests.txt and one JSON per benchmark. Needs a CUDA build of torch installed.
set -uo pipefail
out=${OUT:-gpu_results}
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
TRITON_INTERPRET=0 timeout 240 python -m pytest -q -m gpu tests/ > "$out/gpu_tests.txt" 2>&1
echo "gpu tests: exit $?"
for bench in bench_kernels bench_merge bench_eval bench_train bench_extract; do
    timeout 120 python "scripts/$bench.py" > "$out/$bench.json" 2> "$out/$bench.err"
    echo "$bench: exit $?"
done
