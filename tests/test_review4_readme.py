"""Defects found by following README.md literally (fourth review)."""

import pytest
from click.testing import CliRunner

from babymerge.cli import main


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
