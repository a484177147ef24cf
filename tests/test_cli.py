"""babymerge.cli: every stage in COMMANDS is a working command."""

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
