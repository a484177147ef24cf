"""``--vlm`` takes a quoted glob for a checkpoint sweep (a list flag takes one value per flag, so
the shell's own expansion of an unquoted glob cannot be passed to it)."""

from pathlib import Path

import pytest

from babymerge.merge import MergeConfig


def _config(vlm: list[Path]) -> MergeConfig:
    return MergeConfig(lm=Path("lm"), vlm=vlm, task=["minimal_pairs:blimp/"])


def test_quoted_pattern_expands_to_checkpoint_folders(tmp_path):
    for name in ("words_10M", "words_1M", "final"):
        (tmp_path / "ckpt" / name).mkdir(parents=True)
    (tmp_path / "ckpt" / "notes.txt").write_text("not a checkpoint")
    cfg = _config([tmp_path / "ckpt" / "*", tmp_path / "other"])
    assert cfg.vlm == [tmp_path / "ckpt" / n for n in ("final", "words_10M", "words_1M")] + [
        tmp_path / "other"]
    literal = tmp_path / "odd[1]"  # an existing folder whose name has glob characters
    literal.mkdir()
    assert _config([literal]).vlm == [literal]
    with pytest.raises(ValueError, match=r"--vlm .*nothing\*: the pattern matches no checkpoint"):
        _config([tmp_path / "nothing*"])

