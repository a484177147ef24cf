"""eval/merge's encoder check: an encoder given as its hub cache snapshot folder (what offline
clusters point --encoder at: .../models--facebook--dinov2-large/snapshots/<commit>) is the hub
model it caches; its last path part is a commit hash, which warned against the hub id."""

import warnings

import pytest

from babymerge.evaluate import check_feature_encoder
from test_feature_encoder_check import checkpoint, feature_file  # noqa: F401 (a fixture)

SNAPSHOT = ("/scratch/hf/hub/models--facebook--dinov2-large/snapshots/"
            "47b73eefe95e8d44ec3623f8890bd894b6ea2d6c")


def test_hub_cache_snapshot_is_the_hub_model(checkpoint, tmp_path):  # noqa: F811
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_feature_encoder(checkpoint, feature_file(tmp_path / "f.h5", SNAPSHOT)) is None
        assert check_feature_encoder(checkpoint,
                                     feature_file(tmp_path / "g.h5", SNAPSHOT + "/")) is None
    other = SNAPSHOT.replace("dinov2-large", "dinov2-with-registers-large")
    with pytest.warns(UserWarning, match="dinov2-with-registers-large"):
        check_feature_encoder(checkpoint, feature_file(tmp_path / "h.h5", other))
