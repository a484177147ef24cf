"""babymerge.cli: every stage in COMMANDS is a working command."""

import importlib
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from babymerge.cli import COMMANDS, main
from fixtures import encoder_dir, eval_world, world  # noqa: F401  (fixtures)


def test_every_stage_is_listed_and_its_help_loads():
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0
    assert all(name in res.output for name, *_ in COMMANDS)
    assert "export" in [name for name, *_ in COMMANDS]


@pytest.mark.parametrize("name", [name for name, *_ in COMMANDS])
def test_command_help_resolves_its_module_config_and_function(name):
    # get_command imports the module and looks up the config class and run function by name: a
    # typo in COMMANDS shows only when the command is used
    res = CliRunner().invoke(main, [name, "--help"])
    assert res.exit_code == 0, res.output
    assert f"Usage: main {name}" in res.output and "--config" in res.output


def test_export_command_runs_the_export_stage(tmp_path):
    # `babymerge export CHECKPOINT`: the stage's own error about a folder that is no checkpoint
    res = CliRunner().invoke(main, ["export", str(tmp_path), "--out", str(tmp_path / "out")])
    assert res.exit_code == 1 and f"Error: {tmp_path}: not a checkpoint directory" in res.output
    res = CliRunner().invoke(main, ["export"])
    assert res.exit_code == 2 and "CHECKPOINT" in res.output


@pytest.mark.parametrize("command, errno_, says", [
    ("merge", "ENOSPC", "disk full writing /out/metrics.jsonl (No space left on device); free "
                        "space, then run the same merge command: it goes on"),
    ("train", "ENOSPC", "disk full writing /out/metrics.jsonl"),
    ("extract-features", "ENOSPC", "run the same extract-features command"),
    ("merge", "EROFS", "cannot write /out/metrics.jsonl: Read-only file system"),
])
def test_the_machines_refusals_are_one_line(command, errno_, says, tmp_path, monkeypatch):
    """A disk that fills up, or a read-only one, while a stage writes: one line saying what and
    where, and that the same command goes on from what was saved."""
    import errno
    import os

    from babymerge.cli import COMMANDS
    from babymerge.config import config_command

    name, module, cfg_name, _, help_text = next(c for c in COMMANDS if c[0] == command)
    mod = importlib.import_module(module)
    code = getattr(errno, errno_)

    def refuse(cfg):
        raise OSError(code, os.strerror(code), "/out/metrics.jsonl")

    cmd = config_command(name, getattr(mod, cfg_name), refuse, help_text)
    for name_ in ("t.txt", "f.h5"):
        (tmp_path / name_).write_text("x")
    (tmp_path / "images").mkdir()
    monkeypatch.chdir(tmp_path)
    args = {"merge": ["--lm", "lm", "--vlm", "vlm", "-t", "minimal_pairs:x"],
            "train": ["--kind", "lm", "--text", "t.txt", "--features", "f.h5", "--out", "o",
                      "--tokenizer", "tok"],
            "extract-features": ["images", "--out", "f.h5"]}[command]
    res = CliRunner().invoke(cmd, args)
    assert res.exit_code == 1 and res.exception is None or isinstance(res.exception, SystemExit)
    assert says in " ".join(res.output.split()) and res.output.startswith("Error: "), res.output
    assert "Traceback" not in res.output


def test_an_out_that_is_a_file_is_one_line(tmp_path):
    """--out naming an existing file: merge, train and tokenizer say so before any work."""
    target = tmp_path / "taken.txt"
    target.write_text("mine")
    corpus = tmp_path / "c.txt"
    corpus.write_text("a b c\n")
    features = tmp_path / "f.h5"
    features.write_text("x")
    for args in (["tokenizer", str(corpus), "--out", str(target), "--no-progress"],
                 ["train", "--kind", "lm", "--text", str(corpus), "--features", str(features),
                  "--tokenizer", str(tmp_path), "--out", str(target), "--no-progress"]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 1 and f"--out {target}: a file, not a folder" in res.output, \
            res.output
    assert target.read_text() == "mine"


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a chosen size (``small_disk(bytes)``; ``.grow()`` frees space in place):
    a real full disk, whose refusals reach babymerge through h5py, safetensors and torch as
    exceptions of their own. Needs the right to mount (root); skipped elsewhere."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    mounted = []

    def mount(size: int) -> Path:
        size = max(4096, size // 4096 * 4096)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                               str(mountpoint)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
        mounted.append(mountpoint)
        return mountpoint

    def grow() -> None:
        subprocess.run(["mount", "-o", "remount,size=256m", str(mountpoint)], check=True)

    mount.grow = grow
    yield mount
    if mounted:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.mark.parametrize("stage", ["extract-features", "train", "merge"])
def test_a_full_disk_is_one_line_and_the_same_command_finishes_the_job(
        stage, small_disk, tmp_path, world, eval_world, encoder_dir):
    """On a real full disk (half of what the stage writes) each stage stops with "disk full
    writing PATH ... run the same command" and no traceback (HDF5, safetensors and torch.save
    each reported it their own way: a RuntimeError, a SafetensorError, "unexpected pos"); once
    space is freed, the same command ends with what an uninterrupted run gives."""
    from safetensors.torch import load_file

    from babymerge.featurefile import FeatureTable
    from fixtures import write_images

    if stage == "extract-features":
        write_images(tmp_path / "imgs", [f"i{k}.png" for k in range(40)])
        args = ["extract-features", str(tmp_path / "imgs"), "--encoder", str(encoder_dir),
                "--batch-size", "4", "--num-workers", "0"]
        name = "f.h5"
    elif stage == "train":
        args = ["train", "--kind", "lm", "--text", str(world["text"]), "--features",
                str(world["features"]), "--tokenizer", str(world["tokenizer"]), "--preset",
                "tiny", "--seq-len", "32", "--batch-size", "8", "--epochs", "2",
                "--checkpoint-unit", "2000", "--save-every", "3", "--cache-dir",
                str(tmp_path / "cache")]
        name = "run"
    else:
        args = ["merge", "--lm", str(eval_world.lm), "--vlm", str(eval_world.vlm), "--features",
                str(eval_world.features), "--alpha-grid", "0:1:0.25", "--keep", "0,0.5,1"]
        args += [a for spec in eval_world.specs.values() for a in ("-t", spec)]
        name = "sweep"
    args.append("--no-progress")
    reference = tmp_path / "reference" / name
    res = CliRunner().invoke(main, [*args, "--out", str(reference)])
    assert res.exit_code == 0, res.output
    size = (reference.stat().st_size if reference.is_file() else folder_bytes(reference))

    out = small_disk(size // 2) / name
    res = CliRunner().invoke(main, [*args, "--out", str(out)])
    said = " ".join(res.output[res.output.find("Error: "):].split())  # after merge's points
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    # PATH: the file, or (safetensors names none) the --out it was writing under
    assert re.match(f"Error: disk full writing (under )?{re.escape(str(out))}", said), res.output
    assert said.endswith(f"(No space left on device); free space, then run the same {stage} "
                         "command: it goes on from what it had saved"), res.output
    small_disk.grow()
    res = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    if stage == "extract-features":
        ours, theirs = FeatureTable(out), FeatureTable(reference)
        assert ours.ids == theirs.ids and torch.equal(ours.features, theirs.features)
    elif stage == "train":
        ours, theirs = (load_file(str(d / "model.safetensors")) for d in (out, reference))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    else:
        ours, theirs = (json.loads((d / "results.json").read_text()) for d in (out, reference))
        assert ([{k: v for k, v in r.items() if not k.endswith("_s")} for r in ours["records"]]
                == [{k: v for k, v in r.items() if not k.endswith("_s")}
                    for r in theirs["records"]])
        kept = sorted(p.name for p in out.glob("alpha_*") if p.is_dir())
        assert kept == ["alpha_0.0", "alpha_0.5", "alpha_1.0"]
    assert not [p for p in out.parent.rglob("*") if ".tmp" in p.name or "killed" in p.name]
