#!/usr/bin/env bash
# Installs the newest releases that pyproject.toml's ranges admit into a throwaway venv and runs
# the fast tests there, to see upstream breakage before users do (transformers 5.25 starting to
# require Hugging Face's `kernels` was one). Not part of .ci/run: an upstream release must not
# block a submission. Prints which releases differ from requirements/ci.txt (the tested set).
#
#     scripts/check_latest_deps.sh            # torch stays at the CI pin (2.13.0, the CPU wheel)
#     LATEST_TORCH=1 scripts/check_latest_deps.sh   # torch too (on Linux: a multi-GB CUDA build)
#     KEEP_VENV=1 scripts/check_latest_deps.sh      # keep the venv for a look (path printed)
#     PINS='transformers==5.18.0' scripts/check_latest_deps.sh   # a lower bound, the rest newest
#     scripts/check_latest_deps.sh -k merge         # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d "${TMPDIR:-/tmp}/babymerge-latest.XXXXXX")
[ "${KEEP_VENV:-0}" = 1 ] || trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
. "$venv/bin/activate"
# torch is named in the upgrade itself, or the eager strategy would replace the pin with the
# newest torch the range admits (a CUDA build).
if [ "${LATEST_TORCH:-0}" = 1 ]; then torch=torch; else torch=torch==2.13.0; fi
pip install -q "$torch"
# --upgrade-strategy eager: every dependency at the newest admitted release, not merely one that
# satisfies what is already there.
pip install -q --upgrade --upgrade-strategy eager -e '.[test]' "$torch" ${PINS:-}
echo "== releases that differ from requirements/ci.txt (tested -> newest admitted)"
pip freeze --exclude-editable | python3 -c '
import re, sys
pin = lambda line: re.match(r"([A-Za-z0-9_.-]+)==(\S+)", line)
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
tested = {norm(m[1]): m[2] for m in map(pin, open("requirements/ci.txt")) if m}
for m in filter(None, map(pin, sys.stdin)):
    old = tested.get(norm(m[1]), "(not in the lock)")
    if old != m[2] and norm(m[1]) != "torch":
        print(f"  {m[1]}: {old} -> {m[2]}")
'
python -c 'import torch, transformers; print("== torch", torch.__version__, "transformers", transformers.__version__)'
python -m pytest -q -m "not slow" -p no:cacheprovider "$@"
[ "${KEEP_VENV:-0}" != 1 ] || echo "venv kept: $venv"
