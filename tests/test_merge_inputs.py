"""babymerge.merge_inputs: --alpha-grid and --keep parsing, the --vlm list (quoted patterns), the
order of a checkpoint sweep (training order), and the checks made before any work that the
checkpoints can be merged: shapes and tensor names, tokenizer vocabularies, and configs that
compute alike (the merged model runs with the VLM's config, so the LM's weights would be scored in
a computation they were not trained for)."""

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from babymerge.merge import MergeConfig, merge
from babymerge.merge_inputs import MergeError, format_alpha, parse_alpha_grid, parse_keep
from babymerge.model import IMAGE_TOKEN, MODEL_PRESETS, build_model, save_checkpoint
from fixtures import FEATURE_DIM, eval_world  # noqa: F401  (eval_world: fixture)


# ---------------------------------------------------------------------------------------------
# --alpha-grid and --keep


def test_alpha_grid_parsing():
    assert parse_alpha_grid("0:1:0.1") == [i / 10 for i in range(11)]
    assert parse_alpha_grid("0:1:0.1")[3] == 0.3  # exact decimals, not 0.30000000000000004
    assert parse_alpha_grid("0:1:0.3") == [0.0, 0.3, 0.6, 0.9]  # stop only when on the grid
    assert parse_alpha_grid("1:0:-0.5") == [0.0, 0.5, 1.0]
    assert parse_alpha_grid("0.8, 0, 0.3,0.5") == [0.0, 0.3, 0.5, 0.8]
    assert parse_alpha_grid("0.5:0.5:0.1") == [0.5]
    assert parse_alpha_grid("-0.5:1.5:0.5", allow_extrapolation=True)[0] == -0.5
    assert parse_keep("none") == ([], False)
    assert parse_keep("0.8,chosen,0.3") == ([0.3, 0.8], True)
    for bad, why in [("", "empty"), ("0:1", "START:STOP:STEP"), ("0:1:0.1:2", "START:STOP:STEP"),
                     ("0:1:0", "non-zero"), ("1:0:0.1", "non-zero"), ("a:1:0.1", "not a number"),
                     ("0,,1", "not a number"), ("0,nan", "finite"), ("0,0.5,0.50", "repeated"),
                     ("0:1:0.0001", "points"), ("0,1.2", "--allow-extrapolation"),
                     ("-0.1:1:0.1", "--allow-extrapolation")]:
        with pytest.raises(MergeError, match=why):
            parse_alpha_grid(bad)
    with pytest.raises(MergeError, match="--keep.*--allow-extrapolation"):
        parse_keep("1.5")


def test_negative_zero_is_zero():
    """A typed -0 is alpha 0.0 (not -0.0, which named its kept folder alpha_-0.0 and read "-0.0"
    in the results)."""
    for grid in ("-0,0.5", "-0:1:0.5", "-0.0:0.5:0.5"):
        alphas = parse_alpha_grid(grid)
        assert alphas[0] == 0.0 and math.copysign(1.0, alphas[0]) == 1.0, grid
        assert format_alpha(alphas[0]) == "0.0"
    kept, _ = parse_keep("-0,chosen")
    assert math.copysign(1.0, kept[0]) == 1.0
    grid = parse_alpha_grid("0:1:0.1")
    assert len(grid) == 11 and grid[-1] == 1.0 and [format_alpha(a) for a in grid][3] == "0.3"


def test_alpha_grid_absurd_numbers_are_clear_errors():
    with pytest.raises(MergeError, match="--alpha-grid"):
        parse_alpha_grid("0:1:1e-99999999")  # was decimal.Overflow, naming nothing
    with pytest.raises(MergeError, match="--alpha-grid.*finite"):
        parse_alpha_grid("0,1e400", allow_extrapolation=True)  # was alpha = inf


# ---------------------------------------------------------------------------------------------
# --vlm


def _patterns_config(vlm: list[Path]) -> MergeConfig:
    return MergeConfig(lm=Path("lm"), vlm=vlm, task=["minimal_pairs:blimp/"])


def test_quoted_pattern_expands_to_checkpoint_folders(tmp_path):
    """``--vlm`` takes a quoted glob for a checkpoint sweep (a list flag takes one value per flag,
    so the shell's own expansion of an unquoted glob cannot be passed to it)."""
    for name in ("words_10M", "words_1M", "final"):
        (tmp_path / "ckpt" / name).mkdir(parents=True)
    (tmp_path / "ckpt" / "notes.txt").write_text("not a checkpoint")
    cfg = _patterns_config([tmp_path / "ckpt" / "*", tmp_path / "other"])
    assert cfg.vlm == [tmp_path / "ckpt" / n for n in ("final", "words_10M", "words_1M")] + [
        tmp_path / "other"]
    literal = tmp_path / "odd[1]"  # an existing folder whose name has glob characters
    literal.mkdir()
    assert _patterns_config([literal]).vlm == [literal]
    with pytest.raises(ValueError, match=r"--vlm .*nothing\*: the pattern matches no checkpoint"):
        _patterns_config([tmp_path / "nothing*"])


# ---------------------------------------------------------------------------------------------
# Checkpoints that cannot be merged are refused before any work; a sweep in training order


def test_mismatched_checkpoints_fail_before_any_work(eval_world, tmp_path):
    preset = dataclasses.replace(MODEL_PRESETS["tiny"], feature_dim=FEATURE_DIM, hidden_size=32)
    tok = eval_world.tokenizer
    narrow = build_model(preset, seed=0, vocab_size=len(tok), image_token_id=4, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    save_checkpoint(narrow, tmp_path / "narrow", tok)
    extra = shutil.copytree(eval_world.lm, tmp_path / "extra")
    tensors = load_file(extra / "model.safetensors")
    save_file({**tensors, "model.adapter.weight": torch.zeros(2)}, extra / "model.safetensors",
              metadata={"format": "pt"})
    retok = shutil.copytree(eval_world.lm, tmp_path / "retok")
    spec = json.loads((retok / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["▁red"], vocab["▁blue"] = vocab["▁blue"], vocab["▁red"]  # same size, other rows
    (retok / "tokenizer.json").write_text(json.dumps(spec))
    both = [shutil.copytree(d, tmp_path / f"both_{d.name}")
            for d in (eval_world.lm, eval_world.vlm)]
    for d in both:  # in both files, so names and shapes match, but no parameter of the model
        save_file({**load_file(d / "model.safetensors"), "model.adapter.weight": torch.zeros(2)},
                  d / "model.safetensors", metadata={"format": "pt"})
    # a tensor the config does not describe: refused from the headers, before any loading
    with pytest.raises(MergeError, match=r"--lm .*both_lm: config.json disagrees with its weights "
                                         r"\(in the weights but not the config: model.adapter"):
        merge(MergeConfig(lm=both[0], vlm=[both[1]], task=[eval_world.specs["blimp"]],
                          features=eval_world.features, out=tmp_path / "out_both"))
    v = len(tok)
    for lm, why in [(tmp_path / "narrow", rf"shape mismatch\(es\).*embed_tokens.weight \({v}, 32\) "
                                          rf"vs \({v}, 64\)"),
                    (extra, r"--lm .*extra: config.json disagrees with its weights"),
                    (tmp_path / "nothing", "no model.safetensors"),
                    (retok, "different tokenizer vocabularies")]:
        out = tmp_path / "out"
        with pytest.raises(MergeError, match=why):
            merge(MergeConfig(lm=lm, vlm=[eval_world.vlm], task=[eval_world.specs["blimp"]],
                              features=eval_world.features, out=out))
        assert not out.exists()


def _checkpoint(eval_world, directory, **changes):
    tok = eval_world.tokenizer
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
def test_config_mismatch_with_equal_shapes_is_an_error(eval_world, tmp_path, changes, why):
    vlm = _checkpoint(eval_world, tmp_path / "vlm", **changes)
    out = tmp_path / "out"
    with pytest.raises(MergeError, match=why):
        merge(MergeConfig(lm=eval_world.lm, vlm=[vlm], task=[eval_world.specs["blimp"]],
                          features=eval_world.features, out=out, alpha_grid="0,1", keep="none"))
    assert not out.exists()  # refused before any work


def test_base_config_mismatch_is_an_error(eval_world, tmp_path):
    """--base is checked like the LM: its weights enter every merge of a task-vector method."""
    base = _checkpoint(eval_world, tmp_path / "base", num_heads=2)
    out = tmp_path / "out"
    with pytest.raises(MergeError, match=r"--base .*base and --vlm .* compute differently "
                                         r"\(text_config.num_attention_heads 2 vs 4;"):
        merge(MergeConfig(lm=eval_world.lm, vlm=[eval_world.vlm], base=base,
                          method="task-arithmetic",
                          task=[eval_world.specs["blimp"]], features=eval_world.features, out=out,
                          alpha_grid="0,1", keep="none"))
    assert not out.exists()


def test_checkpoint_sweep_runs_in_training_order(eval_world, tmp_path):
    """train names word-count checkpoints words_1M ... words_100M; a shell glob passes them in
    lexicographic order. The sweep (records, plot axis, tie-break) follows the words they had
    seen (train_state.json); the final model, which has none, comes last."""
    given = []
    for name, words in (("words_100M", 100_000_000), ("words_10M", 10_000_000),
                        ("words_1M", 1_000_000)):
        d = shutil.copytree(eval_world.vlm, tmp_path / "checkpoints" / name)
        (d / "train_state.json").write_text(json.dumps({"step": 1, "words": words}) + "\n")
        given.append(d)
    final = shutil.copytree(eval_world.vlm, tmp_path / "final")
    results = merge(MergeConfig(lm=eval_world.lm, vlm=[final, *given],
                                task=[eval_world.specs["blimp"]], features=eval_world.features,
                                out=tmp_path / "out", alpha_grid="0.5", keep="none"))
    order = ["words_1M", "words_10M", "words_100M", "final"]
    assert list(results["vlms"]) == order
    assert [r["vlm"] for r in results["records"]] == order
    # identical weights everywhere: the tie goes to the checkpoint earliest in training
    assert results["chosen_vlm"] == "words_1M"


def test_vlms_with_another_vocabulary_are_refused(eval_world, tmp_path):
    """The tasks are tokenised once, with the first VLM's tokenizer: a second VLM whose
    vocabulary maps the same size of ids to other tokens would be scored on wrong ids."""
    other = shutil.copytree(eval_world.vlm, tmp_path / "other")
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["▁red"], vocab["▁blue"] = vocab["▁blue"], vocab["▁red"]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    out = tmp_path / "out"
    with pytest.raises(MergeError, match="--vlm .*vlm and --vlm .*other have different tokenizer"):
        merge(MergeConfig(lm=eval_world.lm, vlm=[eval_world.vlm, other],
                          task=[eval_world.specs["blimp"]], features=eval_world.features, out=out,
                          alpha_grid="0.5", keep="none"))
    assert not out.exists()


def test_an_lm_with_fewer_layers_is_refused(eval_world, tmp_path):
    """Names are compared in both directions: the VLM's extra layer would stay unmerged and the
    curve's alpha = 1 would not be the LM."""
    shallow = _checkpoint(eval_world, tmp_path / "shallow", num_layers=1)
    out = tmp_path / "out"
    with pytest.raises(MergeError, match=r"tensor\(s\) of --vlm .* not in --lm .*shallow: "
                                         r"model.language_model.layers.1"):
        merge(MergeConfig(lm=shallow, vlm=[eval_world.vlm], task=[eval_world.specs["blimp"]],
                          features=eval_world.features, out=out, alpha_grid="0,1", keep="none"))
    assert not out.exists()


def test_a_config_that_disagrees_with_its_weights_is_refused(eval_world, tmp_path):
    lm = shutil.copytree(eval_world.lm, tmp_path / "lm")
    config = json.loads((lm / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 3  # the weights hold 2
    (lm / "config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError, match=r"--lm .*lm: config.json disagrees with its weights "
                                         r"\(in the config but not the weights: "
                                         r"model.language_model.layers.2"):
        merge(MergeConfig(lm=lm, vlm=[eval_world.vlm], task=[eval_world.specs["blimp"]],
                          features=eval_world.features, out=tmp_path / "out", alpha_grid="0,1",
                          keep="none"))


def test_keep_off_the_grid_is_an_error():
    with pytest.raises(ValueError, match=r"--keep 0.35: not on --alpha-grid '0,1'"):
        MergeConfig(lm=Path("lm"), vlm=[Path("vlm")], task=["minimal_pairs:x"],
                    alpha_grid="0,1", keep="0.35")
    MergeConfig(lm=Path("lm"), vlm=[Path("vlm")], task=["minimal_pairs:x"], alpha_grid="0:1:0.05",
                keep="0.35,chosen")
