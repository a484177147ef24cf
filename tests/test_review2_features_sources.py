"""Stage 1: extending a feature file with a longer range (or a glob) of the same .tar shards, as
the README's `extract-features shards/{00000..00331}.tar` does once more of a download has
arrived, is a resume of the same source, not a second source whose ids clash."""

import warnings

import pytest

from test_features import encoder_dir, extract  # noqa: F401 (a fixture)
from test_review_features_tar import write_shard


def test_longer_shard_range_is_the_same_source(tmp_path, encoder_dir):  # noqa: F811
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "00000.tar", 0, 2, seed=0)
    write_shard(shards / "00001.tar", 100, 2, seed=1)
    out = tmp_path / "f.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        extract(f"{shards}/{{00000..00000}}.tar", out, encoder_dir)
        # the download went on: the range is extended, the stored shard is resumed quietly
        summary = extract(f"{shards}/{{00000..00001}}.tar", out, encoder_dir)
        assert summary["rows"] == 4 and summary["skipped"] == 2
        assert extract(f"{shards}/*.tar", out, encoder_dir)["skipped"] == 4
        assert extract(str(shards), out, encoder_dir)["skipped"] == 4
    # shards of another download with the same keys still clash
    other = tmp_path / "other"
    other.mkdir()
    write_shard(other / "00000.tar", 0, 1, seed=5)
    with pytest.warns(UserWarning, match=r"1 image id\(s\) of SOURCE .*other.* are already in"):
        extract(f"{other}/{{00000..00000}}.tar", out, encoder_dir)
