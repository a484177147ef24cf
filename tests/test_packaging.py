"""How babymerge installs and imports, as a new user meets it: the console script run from outside
the repository, transformers' own ``kernels`` (Hugging Face's hub-kernels package, which
transformers >= 5.25 requires) imported from the repository root, and a built wheel's contents. The
only importable top-level name of ours is ``babymerge`` (DESIGN.md)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fixtures import world  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]


def _clean_env(**extra: str) -> dict[str, str]:
    """The user's environment: no PYTHONPATH pointing into the repository, offline hub."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "HF_HUB_OFFLINE": "1", **extra}


def _console_script() -> str:
    script = Path(sys.executable).with_name("babymerge")
    if not script.exists():
        found = shutil.which("babymerge")
        if found is None:
            pytest.fail("the `babymerge` console script is not installed (pip install -e .)")
        script = Path(found)
    return str(script)


def test_console_script_trains_a_vlm_step_from_outside_the_repository(world, tmp_path):
    """The README's first command failed here: the installed script's ``kernels`` resolved to the
    hub package, and the VLM's projector call (``kernels.project``) raised AttributeError."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    out = work / "vlm"
    cmd = [_console_script(), "train", "--kind", "vlm", "--text", str(world["text"]),
           "--captions", str(world["captions"]), "--features", str(world["features"]),
           "--tokenizer", str(world["tokenizer"]), "--out", str(out), "--preset", "tiny",
           "--seq-len", "32", "--batch-size", "4", "--epochs", "1", "--warmup-steps", "1",
           "--max-steps", "2", "--save-every", "0", "--log-every", "1", "--no-progress",
           "--cache-dir", str(work / "cache")]
    done = subprocess.run(cmd, cwd=work, env=_clean_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("step") == 2 for r in steps), steps
    assert (out / "resume").is_dir()  # stopped by --max-steps, resumably


def test_hub_kernels_package_is_the_one_imported_from_the_repository_root():
    """``python -m pytest`` puts the repository root on sys.path; transformers' hub-kernels
    integration must still import Hugging Face's ``kernels`` there, and our kernels stay reachable
    as ``babymerge.kernels``."""
    code = (
        "import importlib.util, os, site, sys, transformers\n"
        "import transformers.integrations.hub_kernels as hk\n"
        "from transformers.utils import is_kernels_available\n"
        "import babymerge.kernels as ours\n"
        "assert ours.__name__ == 'babymerge.kernels' and callable(ours.interpolate_)\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "if spec is None:  # transformers < 5.25 does not require the hub package\n"
        "    assert not is_kernels_available(); sys.exit(0)\n"
        "import kernels\n"
        "hub = os.path.realpath(kernels.__file__)\n"
        "root = os.path.realpath(sys.argv[1])\n"
        "assert not hub.startswith(os.path.join(root, 'kernels') + os.sep), hub\n"
        "assert any(hub.startswith(os.path.realpath(d) + os.sep) for d in site.getsitepackages())"
        ", hub\n"
        "assert hasattr(kernels, 'CUDAProperties'), 'not the hub package: ' + hub\n"
        "assert is_kernels_available()\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(REPO)], cwd=REPO, env=_clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_repository_root_has_no_importable_name_but_babymerge():
    """Anything importable at the root (a package folder or module) shadows an installed package
    of that name whenever the root is on sys.path, as ``kernels/`` did."""
    importable = sorted(p.name for p in REPO.iterdir()
                        if (p.is_dir() and (p / "__init__.py").exists())
                        or (p.is_file() and p.suffix == ".py"))
    assert importable == ["babymerge"]


@pytest.mark.slow
def test_wheel_installs_babymerge_kernels_and_no_top_level_kernels(tmp_path):
    """A non-editable build: the wheel's top-level names are ``babymerge`` and its dist-info only,
    and it carries every kernel module."""
    # built from a copy: setuptools builds in the source tree, and a stale build/ there (from
    # an earlier layout) would slip its files into the wheel
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "cache"))
    wheels = tmp_path / "wheels"
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                           str(wheels), str(source)], cwd=tmp_path, env=_clean_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = wheels.glob("babymerge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"babymerge"}, sorted(top)
    ours = {Path(n).name for n in names if n.startswith("babymerge/kernels/")}
    expected = {p.name for p in (REPO / "babymerge" / "kernels").glob("*.py")}
    assert expected <= ours, expected - ours
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["babymerge"]


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = text.split("```bash\n")[1:3]
    return [block.split("\n```")[0].strip() for block in blocks]


def test_both_readme_commands_and_ci_install_the_tested_set():
    """The README's two first commands and .ci/run install through requirements/ci.txt, and
    .ci/run runs exactly the README's test command."""
    demo, tests = _readme_commands()
    assert demo.endswith("babymerge demo --out demo_run") and tests.endswith("python -m pytest -q")
    for command in (demo, tests):
        assert "pip install -q torch==2.13.0 && pip install -q -c requirements/ci.txt -e " \
            in command
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert ci == tests


def test_the_lock_pins_every_dependency_inside_the_pyproject_ranges():
    """Each requirement of pyproject.toml that applies here (tests extra included, torch aside:
    the commands pin it) is pinned exactly once in requirements/ci.txt, inside its range; a lock
    outside a range would make the install fail, one without a pin would float."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]
              ["test"]]
    pins: dict[str, str] = {}
    for line in (REPO / "requirements" / "ci.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, pinned = line.partition("==")
            assert pinned, f"requirements/ci.txt: {line!r} is not an exact pin"
            assert canonicalize_name(name) not in pins, f"{name} pinned twice"
            pins[canonicalize_name(name)] = pinned.strip()
    for req in wanted:
        name = canonicalize_name(req.name)
        if (req.marker and not req.marker.evaluate()) or name == "torch":
            continue
        assert name in pins, f"{req.name} is not pinned in requirements/ci.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements/ci.txt pins {req.name}=={pins[name]}, outside pyproject's {req}")
    assert "torch" not in pins  # pinned by the commands, so a GPU user keeps their CUDA build
