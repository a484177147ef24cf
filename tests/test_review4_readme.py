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
