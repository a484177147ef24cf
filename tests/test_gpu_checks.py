"""scripts/gpu_checks.sh as the next GPU session runs it: `gpu_checks.sh tests profile kernels`, one
device command of at most 600 s, on the GPU image's own Python (no `datasets`, plugins as the image
has them). A stand-in Python and `timeout` record what each phase would run, so no GPU is needed."""

import ast
import os
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_checks.sh"
DEVICE_COMMAND_S = 600  # the device tool's limit for one command
PREAMBLE_S = 10  # nvidia-smi and two Python imports (torch, triton, transformers; torchvision)

# A stand-in interpreter: `-c "import xdist"` / `-c "import pytest_timeout"` succeed only when the
# test says the plugin is there; everything else (the version print) succeeds.
FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1" = -c ]; then
    case $2 in
        *"import xdist"*) exit "$HAVE_XDIST" ;;
        *"import pytest_timeout"*) exit "$HAVE_TIMEOUT" ;;
    esac
fi
exit 0
"""
# `timeout LIMIT CMD...` records its arguments (one per line, a blank line after) and runs nothing
FAKE_TIMEOUT = """#!/usr/bin/env bash
printf '%s\\n' "$@" >> "$CALLS"
echo >> "$CALLS"
"""


def _run_script(tmp_path, phases, have_xdist=True, have_timeout=True) -> list[list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("python3", FAKE_PYTHON), ("timeout", FAKE_TIMEOUT)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", OUT=str(tmp_path / "out"),
               CALLS=str(calls), HAVE_XDIST="0" if have_xdist else "1",
               HAVE_TIMEOUT="0" if have_timeout else "1")
    env.pop("PYTHON", None)
    done = subprocess.run(["bash", str(SCRIPT), *phases], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [block.splitlines() for block in calls.read_text().split("\n\n") if block.strip()]


@pytest.mark.parametrize("have_xdist, have_timeout", [(True, True), (False, False),
                                                      (True, False)])
def test_tests_phase_uses_only_the_plugins_the_machine_has(tmp_path, have_xdist, have_timeout):
    """pytest exits at once on `-n` without pytest-xdist or `--timeout` without pytest-timeout:
    the whole tests phase would be lost. The phase passes each flag only when its plugin imports,
    and a test module that cannot import costs its own tests, not the phase."""
    (call,) = _run_script(tmp_path, ["tests"], have_xdist, have_timeout)
    limit, *command = call
    assert command[1:3] == ["-m", "pytest"] and command[-1] == "tests/"
    assert ("-n" in command) == have_xdist
    assert ("--timeout" in command) == have_timeout
    assert "--continue-on-collection-errors" in command and "gpu" in command
    log = (tmp_path / "out" / "log.txt").read_text()
    assert ("no pytest-xdist" in log) == (not have_xdist)


def test_tests_profile_kernels_fit_one_device_command(tmp_path):
    """The next GPU session runs `tests profile kernels` as one command. profile's first step at
    M = 1024 bf16 compiles and tunes both forward plans and three weight-gradient splits (~43
    autotune configs; 34 s for 19 of them on the H100, 2026-11-27): 60 s did not cover it. Its
    tuning is kept on disk for the kernels phase, whose M = 1024 bf16 row then re-tunes nothing;
    the tests phase tunes in memory (8 workers share the GPU: their timings must not pick the
    benchmarks' blocks)."""
    calls = _run_script(tmp_path, ["tests", "profile", "kernels"])
    limits = [int(call[0]) for call in calls]
    assert sum(limits) + PREAMBLE_S <= DEVICE_COMMAND_S, limits
    tests, profile, kernels = calls
    assert not any("TRITON_CACHE_AUTOTUNING" in arg for arg in tests)
    for call, script in ((profile, "scripts/profile_projector.py"),
                         (kernels, "scripts/bench_kernels.py")):
        assert call[1:3] == ["env", "TRITON_CACHE_AUTOTUNING=1"] and call[-1] == script
    assert int(profile[0]) >= 100
    # alone, the kernels phase compiles and tunes everything itself: its full limit
    (alone,) = _run_script(tmp_path, ["kernels"])
    assert int(alone[0]) > int(kernels[0])


# Packages the project depends on that the GPU image lacks (/work/.library/device/KINDS.md's list,
# 2026-11-17: no `datasets`). A module-level import of one in any test module, or in what the
# GPU pass's scripts import, fails that module on the GPU machine.
ABSENT_ON_GPU_IMAGE = {"datasets"}


def _module_level_imports(path: Path) -> set[str]:
    """Top-level package names imported when ``path`` is imported (not inside functions)."""
    names = set()

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if not nested and isinstance(child, ast.Import):
                names.update(alias.name.split(".")[0] for alias in child.names)
            elif not nested and isinstance(child, ast.ImportFrom) and child.level == 0:
                names.add(child.module.split(".")[0])
            visit(child, nested)

    visit(ast.parse(path.read_text(), str(path)), False)
    return names


def test_gpu_pass_imports_nothing_the_gpu_image_lacks():
    files = [*sorted((ROOT / "tests").glob("*.py")), ROOT / "scripts" / "bench_kernels.py",
             ROOT / "scripts" / "profile_projector.py",
             *sorted((ROOT / "babymerge").rglob("*.py"))]
    bad = {str(f.relative_to(ROOT)): sorted(_module_level_imports(f) & ABSENT_ON_GPU_IMAGE)
           for f in files}
    assert not {f: names for f, names in bad.items() if names}
