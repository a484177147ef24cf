"""merge: configs that compute differently cannot be merged (the merged model runs with the VLM's
config, so the LM's weights would be scored in a computation they were not trained for); a
checkpoint sweep runs in training order."""

import dataclasses
import json
import shutil

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


def test_base_config_mismatch_is_an_error(world, tmp_path):
    """--base is checked like the LM: its weights enter every merge of a task-vector method."""
    base = _checkpoint(world, tmp_path / "base", num_heads=2)
    out = tmp_path / "out"
    with pytest.raises(MergeError, match=r"--base .*base and --vlm .* compute differently "
                                         r"\(text_config.num_attention_heads 2 vs 4;"):
        merge(MergeConfig(lm=world.lm, vlm=[world.vlm], base=base, method="task-arithmetic",
                          task=[world.specs["blimp"]], features=world.features, out=out,
                          alpha_grid="0,1", keep="none"))
    assert not out.exists()


def test_checkpoint_sweep_runs_in_training_order(world, tmp_path):
    """train names word-count checkpoints words_1M ... words_100M; a shell glob passes them in
    lexicographic order. The sweep (records, plot axis, tie-break) follows the words they had
    seen (train_state.json); the final model, which has none, comes last."""
    given = []
    for name, words in (("words_100M", 100_000_000), ("words_10M", 10_000_000),
                        ("words_1M", 1_000_000)):
        d = shutil.copytree(world.vlm, tmp_path / "checkpoints" / name)
        (d / "train_state.json").write_text(json.dumps({"step": 1, "words": words}) + "\n")
        given.append(d)
    final = shutil.copytree(world.vlm, tmp_path / "final")
    results = merge(MergeConfig(lm=world.lm, vlm=[final, *given], task=[world.specs["blimp"]],
                                features=world.features, out=tmp_path / "out", alpha_grid="0.5",
                                keep="none"))
    order = ["words_1M", "words_10M", "words_100M", "final"]
    assert list(results["vlms"]) == order
    assert [r["vlm"] for r in results["records"]] == order
    # identical weights everywhere: the tie goes to the checkpoint earliest in training
    assert results["chosen_vlm"] == "words_1M"


def test_vlms_with_another_vocabulary_are_refused(world, tmp_path):
    """The tasks are tokenised once, with the first VLM's tokenizer: a second VLM whose
    vocabulary maps the same size of ids to other tokens would be scored on wrong ids."""
    other = shutil.copytree(world.vlm, tmp_path / "other")
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["▁red"], vocab["▁blue"] = vocab["▁blue"], vocab["▁red"]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    out = tmp_path / "out"
    with pytest.raises(MergeError, match="--vlm .*vlm and --vlm .*other have different tokenizer"):
        merge(MergeConfig(lm=world.lm, vlm=[world.vlm, other], task=[world.specs["blimp"]],
                          features=world.features, out=out, alpha_grid="0.5", keep="none"))
    assert not out.exists()
