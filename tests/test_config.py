import json
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from babymerge.config import (ConfigError, arg, build_config, config_command, opt, save_config)


@dataclass
class DemoCfg:
    sources: list[Path] = arg(help="inputs")
    batch_size: int = opt(8, "batch")
    dtype: str = opt("float16", "dtype", choices=("float16", "float32"))
    compile: bool = opt(False, "compile")
    alphas: list[float] = opt([0.0, 1.0], "alphas")


def _cli(seen):
    group = click.Group()
    group.add_command(config_command("run", DemoCfg, seen.append, "test"))
    return group


def test_flags_map_to_fields_and_file_is_overridden_by_flags(tmp_path):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('batch-size = 32\ndtype = "float32"\ncompile = true\n')
    seen = []
    res = CliRunner().invoke(_cli(seen), ["run", "a", "b", "--config", str(cfg_file),
                                          "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    cfg = seen[0]
    assert cfg.sources == [Path("a"), Path("b")]
    assert cfg.batch_size == 4 and cfg.dtype == "float32" and cfg.compile is True
    assert cfg.alphas == [0.0, 1.0]


def test_unknown_key_is_an_error(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("batch_sise: 3\n")
    res = CliRunner().invoke(_cli([]), ["run", "a", "--config", str(cfg_file)])
    assert res.exit_code != 0 and "batch_sise" in res.output
    with pytest.raises(ConfigError, match="expected int"):
        build_config(DemoCfg, {"sources": ["x"], "batch_size": "many"})


def test_save_config_records_versions(tmp_path):
    cfg = build_config(DemoCfg, {"sources": ["x"]})
    save_config(cfg, tmp_path / "config.json", stage="test")
    rec = json.loads((tmp_path / "config.json").read_text())
    assert rec["config"]["sources"] == ["x"] and rec["babymerge_version"] and rec["stage"] == "test"


@dataclass
class OneSourceCfg:
    source: str = arg(help="input")
    batch_size: int = opt(8, "batch")


def test_positional_argument_may_come_from_the_config_file(tmp_path):
    # README: `babymerge extract-features --config configs/paper/extract.toml`, SOURCE in the file
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('source = "data/images.jsonl"\n')
    seen = []
    group = click.Group()
    group.add_command(config_command("run", OneSourceCfg, seen.append, "test"))
    res = CliRunner().invoke(group, ["run", "--config", str(cfg_file)])
    assert res.exit_code == 0, res.output
    assert seen[0].source == "data/images.jsonl"
    res = CliRunner().invoke(group, ["run", "cli.jsonl", "--config", str(cfg_file)])
    assert res.exit_code == 0 and seen[1].source == "cli.jsonl"  # the command line wins
    # missing from both: a usage error naming it, not a TypeError traceback
    res = CliRunner().invoke(group, ["run", "--batch-size", "2"])
    assert res.exit_code == 2 and "SOURCE" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(_cli([]), ["run"])
    assert res.exit_code == 2 and "SOURCES" in res.output


@dataclass
class NamedCfg(DemoCfg):
    name: str = opt("run", "a free-form string option (no choices)")


@pytest.mark.parametrize("key,value,says", [
    ("batch_size", 32.7, "expected int, got 32.7"), ("batch_size", True, "expected int, got True"),
    # the message each check gives, not the choices check's or float()'s that would follow it
    ("dtype", ["float16"], r"expected one str, got \['float16'\]; write a list as one string"),
    ("alphas", [[0.0]], r"expected one float, got \[0.0\]"),
    ("sources", [5], "expected a path"),
    # without the check str() passed this on as "[0, 0.3]"
    ("name", [0, 0.3], r"expected one str, got \[0, 0.3\]; .*e.g. '0,0.3'")])
def test_file_values_of_the_wrong_shape_are_errors_naming_the_key(key, value, says):
    # int(32.7) == 32 and int(True) == 1 would change the run silently; str([...]) reached the
    # stage as "[...]" and failed far from the file
    with pytest.raises(ConfigError, match=f"c.toml: {key}: {says}"):
        build_config(NamedCfg, {"sources": ["x"], key: value}, source="c.toml")
    assert build_config(DemoCfg, {"sources": ["x"], "batch_size": 32.0}).batch_size == 32


def test_yaml_start_stop_step_stays_a_string(tmp_path):
    # YAML 1.1 (PyYAML) reads 0:1:0.1 as a base-60 number, 60.1: merge then refused alpha 60.1
    from babymerge.config import load_config_file

    cfg_file = tmp_path / "merge.yaml"
    cfg_file.write_text("alpha_grid: 0:1:0.1\nbatch_size: 16\nlr: 5.0e-4\nflag: true\n")
    assert load_config_file(cfg_file) == {"alpha_grid": "0:1:0.1", "batch_size": 16,
                                          "lr": 5e-4, "flag": True}


def test_config_help_says_where_relative_paths_start():
    res = CliRunner().invoke(_cli([]), ["run", "--help"])
    text = " ".join(res.output.split())  # click wraps the help text
    assert res.exit_code == 0 and "current directory" in text and "flags win" in text


def test_file_value_outside_the_choices_is_an_error_naming_the_key(tmp_path):
    # click checks --dtype's choices; the same value from a file went to the stage unchecked
    with pytest.raises(ConfigError, match="c.toml: dtype must be one of float16, float32"):
        build_config(DemoCfg, {"sources": ["x"], "dtype": "bf16"}, source="c.toml")
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('dtype = "bf16"\n')
    res = CliRunner().invoke(_cli([]), ["run", "a", "--config", str(cfg_file)])
    assert res.exit_code == 2 and "dtype must be one of" in res.output


def test_positional_argument_help_is_shown():
    # click prints no help for arguments; the field's help is added to the command's text
    res = CliRunner().invoke(_cli([]), ["run", "--help"])
    assert res.exit_code == 0 and "SOURCES: inputs" in res.output


def test_toml_file_reads_through_tomli_where_tomllib_is_missing(tmp_path, monkeypatch):
    # tomllib is Python 3.11+; pyproject allows 3.10, where the tomli backport reads the file
    import sys
    import tomllib

    from babymerge.config import load_config_file

    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` raises ImportError
    monkeypatch.setitem(sys.modules, "tomli", tomllib)  # the backport has the same API
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('batch_size = 16\nalpha_grid = "0:1:0.1"\n')
    assert load_config_file(cfg_file) == {"batch_size": 16, "alpha_grid": "0:1:0.1"}
