"""babymerge.cli: every stage in COMMANDS is a working command."""

import importlib

import pytest
from click.testing import CliRunner

from babymerge.cli import COMMANDS, main


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
