"""eval and merge warn when the task feature file comes from another encoder than the model's
(encoders of one width pass the width check; their features mean nothing to the projector)."""

import shutil
import warnings

import h5py
import numpy as np
import pytest

from evalmerge_fixtures import build_world

from babymerge.evaluate import EvalConfig, check_feature_encoder, evaluate
from babymerge.merge import MergeConfig, merge
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


def test_eval_and_merge_warn_on_another_encoders_features(tmp_path):
    """The check is made by both commands (not only callable): their models were trained on
    dinov2-large's features (the preset's encoder)."""
    world = build_world(tmp_path / "world")
    features = tmp_path / "other.h5"
    shutil.copyfile(world.features, features)
    with h5py.File(features, "a") as f:
        f.attrs["encoder"] = "facebook/dinov2-with-registers-large"
    specs = [world.specs["wg"]]
    with pytest.warns(UserWarning, match="dinov2-with-registers-large"):
        evaluate(EvalConfig(model=world.vlm, task=specs, features=features, device="cpu"))
    with pytest.warns(UserWarning, match="dinov2-with-registers-large"):
        merge(MergeConfig(lm=world.lm, vlm=[world.vlm], task=specs, features=features,
                          out=tmp_path / "merge", alpha_grid="0.5", keep="none", device="cpu"))
