#!/usr/bin/env bash
# One prepared pass for a lent GPU (device tool): the GPU tests without the Triton interpreter,
# the benchmarks at GPU sizes, and the demo on CUDA. Runs from the repository root on the Python
# that holds a CUDA torch, with the package on PYTHONPATH (nothing is installed: the GPU machines
# have no package index). Phases as arguments (default: every phase but profile and pipeline):
#     scripts/gpu_checks.sh [tests] [kernels] [merge] [extract] [demo] [train] [eval] [profile]
#         [pipeline]
# Results land in $OUT (the device tool's folder) or ./gpu_results, at most 8 files: log.txt
# (versions, nvidia-smi, each phase's exit status and stderr), gpu_tests.txt, bench_<phase>.json,
# demo.txt, profile.txt. Phase limits are about twice what each took on an H100 (2026-11-27); one
# device command may run 600 s, so `tests profile kernels` (240 + 120 + 220 s) fit one call.
# profile and kernels keep Triton's autotuning results on disk (TRITON_CACHE_AUTOTUNING=1), as its
# compiled kernels always are: profile's step at M = 1024 bf16 compiles and tunes ~43 configs (both
# forward plans, three weight-gradient splits) that bench_kernels' M = 1024 bf16 row then reuses,
# so after profile the kernels phase needs less (220 s instead of 280 s alone). The tests phase
# keeps tuning in memory: its 8 workers share the GPU, and their timings would pick the blocks of
# the benchmarks' shapes (the tuning key is M's power-of-two bucket: 1000 rows tune 1024's).
set -uo pipefail
out=${OUT:-gpu_results}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 \
    HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
log=$out/log.txt
phases=${*:-tests kernels merge extract demo train eval}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    $py -c "import sys, torch, triton, transformers; print(sys.version.split()[0], torch.__version__,
torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
    $py -c "import torchvision; print('torchvision', torchvision.__version__)" 2>&1
} >> "$log" 2>&1

# pytest plugins the tests phase uses when the machine has them (the GPU image lists both): pytest
# stops at once on an option no plugin defines, which would lose the whole phase.
pytest_opts() {
    local opts="-v -m gpu -p no:cacheprovider --continue-on-collection-errors"
    if $py -c "import xdist" 2> /dev/null; then
        opts+=" -n 8"
    else
        echo "tests: no pytest-xdist, the tests run in one process" >> "$log"
    fi
    if $py -c "import pytest_timeout" 2> /dev/null; then
        opts+=" --timeout 180"
    else
        echo "tests: no pytest-timeout, no per-test limit" >> "$log"
    fi
    echo "$opts"
}

run() {  # run NAME SECONDS COMMAND...: stdout to $out/NAME, stderr to the log
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    echo "== $name" >> "$log"
    timeout "$limit" "$@" > "$out/$name" 2>> "$log"
    echo "== $name: exit $? in $((SECONDS - t0)) s" | tee -a "$log"
}

profiled=0
for phase in $phases; do
    case $phase in
        # -v: one named PASSED/FAILED line per test, so a run cut short still says which failed;
        # a test module that fails to import (a package this machine lacks) costs its own tests,
        # not the phase
        # shellcheck disable=SC2046
        tests) run gpu_tests.txt 240 $py -m pytest $(pytest_opts) tests/ ;;
        # bench_kernels prints each result to stderr (log.txt) as it is measured, the merge
        # first: a phase cut short still leaves what it measured
        kernels) run bench_kernels.json $((profiled ? 220 : 280)) \
            env TRITON_CACHE_AUTOTUNING=1 $py scripts/bench_kernels.py ;;
        merge) run bench_merge.json 60 $py scripts/bench_merge.py ;;
        extract) run bench_extract.json 150 $py scripts/bench_extract.py --shape large \
            --images 2048 --batch-size 256 ;;
        demo) run demo.txt 150 bash -c "$py -m babymerge.cli demo --out /tmp/demo_run \
            --no-progress && cat /tmp/demo_run/report.txt" ;;
        train) run bench_train.json 150 $py scripts/bench_train.py ;;
        eval) run bench_eval.json 60 $py scripts/bench_eval.py ;;
        profile) run profile.txt 120 env TRITON_CACHE_AUTOTUNING=1 $py scripts/profile_projector.py
            profiled=1 ;;
        pipeline) run bench_pipeline.json 200 $py scripts/bench_pipeline.py --quick --device cuda \
            --out /tmp/bench_pipeline_run ;;
        *) echo "unknown phase $phase" | tee -a "$log" ;;
    esac
done
