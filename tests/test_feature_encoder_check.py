"""eval and merge warn when the task feature file comes from another encoder than the model's
(encoders of one width pass the width check; their features mean nothing to the projector)."""

import warnings

import h5py
import numpy as np
import pytest

from babymerge.evaluate import check_feature_encoder
from babymerge.model import MODEL_PRESETS, build_model, save_checkpoint
from test_data_fixtures import write_feature_file


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = build_model(MODEL_PRESETS["tiny"], seed=0, vocab_size=50, image_token_id=4,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    assert model.config.encoder == "facebook/dinov2-large"
    return save_checkpoint(model, tmp_path_factory.mktemp("ck") / "vlm")


def feature_file(path, encoder):
    write_feature_file(path, ["a"], np.zeros((1, 1024)), np.zeros(1024))
    with h5py.File(path, "a") as f:
        f.attrs["encoder"] = encoder
    return path


@pytest.mark.parametrize("encoder", ["facebook/dinov2-large", "/models/dinov2-large/",
                                     "FACEBOOK/DINOV2-LARGE"])
def test_same_encoder_by_another_name_is_quiet(checkpoint, tmp_path, encoder):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_feature_encoder(checkpoint, feature_file(tmp_path / "f.h5", encoder)) is None
    assert check_feature_encoder(checkpoint, None) is None


def test_another_encoder_of_the_same_width_warns(checkpoint, tmp_path):
    path = feature_file(tmp_path / "f.h5", "facebook/dinov2-with-registers-large")
    with pytest.warns(UserWarning, match="dinov2-with-registers-large.*dinov2-large"):
        check_feature_encoder(checkpoint, path)
