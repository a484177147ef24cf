"""babymerge.config: dataclass fields as command-line flags and config-file keys (TOML, YAML,
JSON), the errors a config file can hold, and the paper's configs (configs/paper/*.toml), which
load through the CLI's own path (types, choices, validation) and hold the paper's set-up
(../shared/PAPER.md): DINOv2-large layer -2, 6 layers, hidden 768, vocabulary 30,000, 10 epochs,
one seed for both models, the poster's alphas 0, 0.3, 0.5, 0.8."""

import dataclasses
import importlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from babymerge.cli import main
from babymerge.config import (ConfigError, arg, build_config, config_command, load_config_file,
                              opt, save_config)
from babymerge.features import ExtractConfig
from babymerge.merge import MergeConfig, parse_alpha_grid, parse_keep
from babymerge.model import MODEL_PRESETS
from babymerge.tokenizer import TokenizerConfig
from babymerge.train import TrainConfig


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


def test_a_whole_float_in_a_file_is_an_int():
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


# ---------------------------------------------------------------------------------------------
# Config files that are null where a value is needed, or do not parse


@pytest.mark.parametrize("yaml_text, key", [
    ("corpus: [c.txt]\nout: null\n", "out"),          # a path field
    ("corpus: [c.txt]\nvocab_size: ~\n", "vocab_size"),  # a number field
    ("corpus: [c.txt, null]\n", "corpus"),           # a null inside a list field
    ("corpus: null\n", "corpus"),                    # the positional argument itself
])
def test_a_null_config_value_is_an_error_naming_the_key(tmp_path, yaml_text, key):
    # `babymerge tokenizer --config FILE.yaml` with `out: null` passed None to the stage, which
    # failed with a bare AttributeError traceback ('NoneType' object has no attribute 'mkdir')
    (tmp_path / "c.txt").write_text("a b c\n")
    cfg = tmp_path / "tok.yaml"
    cfg.write_text(yaml_text.replace("c.txt", str(tmp_path / "c.txt")))
    res = CliRunner().invoke(main, ["tokenizer", "--config", str(cfg), "--no-progress"])
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert f"{cfg}: {key} is null" in res.output


def test_a_null_value_for_an_optional_field_still_means_unset(tmp_path):
    # `image_root: ~` (Path | None) keeps its meaning: "the list's folder"
    from babymerge.config import build_config, load_config_file
    from babymerge.features import ExtractConfig

    cfg_file = tmp_path / "x.yaml"
    cfg_file.write_text("source: imgs.jsonl\nimage_root: null\nshard: ~\n")
    cfg = build_config(ExtractConfig, load_config_file(cfg_file), str(cfg_file))
    assert cfg.image_root is None and cfg.shard is None and cfg.source == "imgs.jsonl"


@pytest.mark.parametrize("name, content, says", [
    ("bad.toml", b"vocab_size = \n", "not valid TOML: Invalid value (at line 1, column 14)"),
    ("bad.json", b'{"vocab_size": }', "not valid JSON: Expecting value: line 1 column 16"),
    ("bad.yaml", b"vocab_size: [\n", "not valid YAML: while parsing a flow node"),
    ("bad.toml", b"\xff\xfe vocab_size = 3\n", "not UTF-8 text (invalid start byte at byte 0)"),
])
def test_a_config_file_that_does_not_parse_is_an_error_naming_it(tmp_path, name, content, says):
    # `babymerge tokenizer --config FILE` with a typo in FILE was the parser's traceback
    # (tomllib.TOMLDecodeError, json.JSONDecodeError, yaml's ParserError, UnicodeDecodeError)
    cfg = tmp_path / name
    cfg.write_bytes(content)
    res = CliRunner().invoke(main, ["tokenizer", "--config", str(cfg)])
    assert res.exit_code == 2, res.output
    assert f"Error: config file {cfg}: {says}" in res.output


# ---------------------------------------------------------------------------------------------
# configs/paper/*.toml

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"
CLASSES = {"extract": ("babymerge.features", "ExtractConfig"),
           "tokenizer": ("babymerge.tokenizer", "TokenizerConfig"),
           "train_lm": ("babymerge.train", "TrainConfig"),
           "train_vlm": ("babymerge.train", "TrainConfig"),
           "merge": ("babymerge.merge", "MergeConfig")}


@pytest.fixture()
def configs(tmp_path, monkeypatch):
    """Each paper config built as `babymerge STAGE --config FILE` builds it, run from a folder
    holding (empty stand-ins of) the data files the configs name, as the README lays out."""
    monkeypatch.chdir(tmp_path)
    for name in ("data/text/babylm_text_50M.txt", "data/text/captions_50M.txt",
                 "data/captions/ln_cc3m_captions.jsonl", "cache/features.h5"):
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).touch()
    Path("run/tokenizer").mkdir(parents=True)
    out = {}
    for name, (module, cls) in CLASSES.items():
        cls = getattr(importlib.import_module(module), cls)
        out[name] = build_config(cls, load_config_file(PAPER / f"{name}.toml"), f"{name}.toml")
    return out


def test_paper_configs_load_and_match_the_paper(configs):
    ext, tok, lm, vlm, merge = (configs[k] for k in CLASSES)
    assert ext.encoder == "facebook/dinov2-large" and ext.source  # SOURCE from the file
    assert tok.vocab_size == 30_000
    for train, kind in ((lm, "lm"), (vlm, "vlm")):
        assert train.kind == kind and train.epochs == 10 and train.preset == "paper"
        preset = MODEL_PRESETS[train.preset]
        assert (preset.num_layers, preset.hidden_size) == (6, 768)
        assert train.tokenizer == tok.out and train.features == Path(ext.out)
    assert lm.seed == vlm.seed  # one initial point for both models
    assert vlm.captions and not lm.captions
    assert merge.lm == lm.out and merge.vlm == [vlm.out]
    grid = parse_alpha_grid(merge.alpha_grid)
    assert grid[0] == 0.0 and grid[-1] == 1.0
    assert {0.0, 0.3, 0.5, 0.8} <= {round(a, 6) for a in grid}
    assert parse_keep(merge.keep)[0] == [0.3, 0.5, 0.8]


@pytest.mark.parametrize("name,cls", [("extract", ExtractConfig), ("tokenizer", TokenizerConfig),
                                      ("train_lm", TrainConfig), ("train_vlm", TrainConfig),
                                      ("merge", MergeConfig)])
def test_paper_configs_name_only_real_fields(name, cls):
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    data = tomllib.loads((PAPER / f"{name}.toml").read_text())
    fields = {f.name for f in dataclasses.fields(cls)}
    assert set(data) <= fields, set(data) - fields


@pytest.mark.parametrize("error, code, filename", [
    # the texts h5py and safetensors gave on a full tmpfs (tests/test_cli.py fills a real one)
    (RuntimeError("Disable slist on flush dest failure failed (file write failed: time = Mon Dec"
                  "  7 04:06:46 2026\n, filename = '/d/f.h5.tmp', file descriptor = 4, errno = "
                  "28, error message = 'No space left on device', buf = 0x5, total write size ="
                  " 4096)"), 28, "/d/f.h5.tmp"),
    (ValueError("Error while serializing: I/O error: No space left on device (os error 28)"),
     28, None),
    (OSError(30, "Read-only file system", "/d/x"), 30, "/d/x"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 7 vs 5"), None, None),
])
def test_the_machines_refusal_is_found_in_other_libraries_errors(error, code, filename):
    from babymerge.config import machine_refusal

    found = machine_refusal(error)
    if code is None:
        assert found is None
    else:
        assert (found.errno, found.filename) == (code, filename)
        assert found.strerror == os.strerror(code)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_atomic_writes_have_the_modes_a_plain_write_gives(tmp_path, umask):
    """results.json, metrics.jsonl, plots: mkstemp's private 0600 made them unreadable by the
    group; they get what open() gives under the user's umask."""
    import stat

    from babymerge.config import atomic_write_text, current_umask

    old = os.umask(umask)
    try:
        assert current_umask() == umask
        atomic_write_text(tmp_path / "results.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == 0o666 & ~umask
