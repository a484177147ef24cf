"""merge: two checkpoints whose tensors have the same names and shapes but whose configs compute
differently (feature_norm, attention heads) cannot be merged: the merged model runs with the
VLM's config, so the LM's weights would be scored in a computation they were not trained for."""

import dataclasses

import pytest
import torch
from evalmerge_fixtures import FEATURE_DIM, build_world

from babymerge.merge import MergeConfig, MergeError, merge
from babymerge.model import IMAGE_TOKEN, MODEL_PRESETS, build_model, save_checkpoint


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("cfgworld"))


def _checkpoint(world, directory, **changes):
    tok = world.tokenizer
    feature_norm = changes.pop("feature_norm", "none")
    preset = dataclasses.replace(MODEL_PRESETS["tiny"], feature_dim=FEATURE_DIM, **changes)
    model = build_model(preset, seed=1, vocab_size=len(tok),
                        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, feature_norm=feature_norm)
    if feature_norm == "standardize":
        with torch.no_grad():
            model.model.feature_mean.fill_(3.0)
    return save_checkpoint(model, directory, tok)


@pytest.mark.parametrize("changes, why", [
    ({"feature_norm": "standardize"}, r"feature_norm 'none' vs 'standardize'"),
    ({"num_heads": 2}, r"text_config.num_attention_heads 4 vs 2"),
])
def test_config_mismatch_with_equal_shapes_is_an_error(world, tmp_path, changes, why):
    vlm = _checkpoint(world, tmp_path / "vlm", **changes)
    out = tmp_path / "out"
    with pytest.raises(MergeError, match=why):
        merge(MergeConfig(lm=world.lm, vlm=[vlm], task=[world.specs["blimp"]],
                          features=world.features, out=out, alpha_grid="0,1", keep="none"))
    assert not out.exists()  # refused before any work
