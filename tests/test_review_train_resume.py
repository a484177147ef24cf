"""Review findings on resuming and starting runs (stage 2): each test failed before its fix."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from babymerge.train import TrainConfig, TrainError, build_initial_model, make_optimizer, train
from babymerge.tokenizer import load_tokenizer
from test_data_fixtures import DIM, world  # noqa: F401  (world: fixture)
from test_train import lm_config, one_thread  # noqa: F401  (one_thread: autouse fixture)


def config(world, out, **kw) -> TrainConfig:
    return lm_config(world, out, **{"epochs": 1, "feature_norm": "standardize", **kw})


def test_standardize_run_resumes_to_identical_weights(world, tmp_path):
    # from_pretrained made the frozen feature statistics trainable again, so the resumed
    # optimizer had two more parameters than the saved state: load_state_dict raised
    full = train(config(world, tmp_path / "full"))
    out = tmp_path / "stopped"
    train(config(world, out, max_steps=3))
    train(config(world, out))
    ref, got = load_file(str(full / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_init_from_keeps_feature_statistics_out_of_the_optimizer(world, tmp_path):
    # a trainable parameter that never gets a gradient also stops DDP at its first step
    init = train(config(world, tmp_path / "init", max_steps=1, save_every=1))
    tok = load_tokenizer(world["tokenizer"])
    fresh = build_initial_model(config(world, tmp_path / "a"), tok, DIM)
    started = build_initial_model(config(world, tmp_path / "b", init_from=init / "resume"),
                                  tok, DIM)
    for model in (fresh, started):
        assert not model.model.feature_std.requires_grad
        assert not model.model.feature_mean.requires_grad
    sizes = [[len(g["params"]) for g in make_optimizer(m, config(world, tmp_path / "c"),
                                                        torch.device("cpu")).param_groups]
             for m in (fresh, started)]
    assert sizes[0] == sizes[1]


def test_resume_after_a_torn_metrics_line(world, tmp_path):
    # a node that dies mid-write leaves a partial last line (or NUL bytes after a power loss),
    # possibly cut inside a multi-byte character (not UTF-8 then); resuming read every line as
    # JSON and stopped with a JSONDecodeError
    out = tmp_path / "torn"
    train(config(world, out, feature_norm="none", max_steps=4))
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 6, "epoch": 0, "lo\x00\x00 \xe2\x82')
    train(config(world, out, feature_norm="none"))
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == sorted(set(steps)) and steps[-1] > 4


def test_resume_refuses_data_that_changed(world, tmp_path):
    # the saved step indexes the epoch plan of the data it was saved with; an appended corpus
    # made another plan and the run went on silently at the same step of other batches
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(world["text"].read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / "changed"
    train(config(world, out, text=[corpus], feature_norm="none", max_steps=2))
    with open(corpus, "a", encoding="utf-8") as f:
        f.write("the red cat sees the blue dog.\n" * 40)
    with pytest.raises(TrainError, match=r"training data changed.*text_sequences: \d+ -> \d+"):
        train(config(world, out, text=[corpus], feature_norm="none"))


def test_resume_refuses_captions_that_changed(world, tmp_path):
    # as many captions as before, one of them longer: only the caption token count tells
    lines = world["captions"].read_text(encoding="utf-8").splitlines()
    captions = tmp_path / "captions.jsonl"
    captions.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "changed"
    vlm = dict(kind="vlm", text=[], captions=[captions], feature_norm="none")
    train(config(world, out, max_steps=2, **vlm))
    first = json.loads(lines[0])
    first["caption"] += " the red cat sees the blue dog."
    captions.write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n", encoding="utf-8")
    with pytest.raises(TrainError, match=r"data changed since the run was saved "
                                         r"\(caption_tokens: \d+ -> \d+\)"):
        train(config(world, out, **vlm))


def test_init_from_refuses_another_tokenizer_of_the_same_size(world, tmp_path):
    # a retrained tokenizer keeps --vocab-size, so only the sizes were compared: the model went
    # on with every embedding row meaning another token
    init = train(config(world, tmp_path / "init", feature_norm="none", max_steps=1,
                        save_every=1)) / "resume"
    other = tmp_path / "other_tok"
    shutil.copytree(world["tokenizer"], other)
    spec = json.loads((other / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[-2:]  # two learned tokens trade ids
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(TrainError, match="another tokenizer"):
        train(config(world, tmp_path / "z", feature_norm="none", init_from=init,
                     tokenizer=other, max_steps=1))
    train(config(world, tmp_path / "same", feature_norm="none", init_from=init, max_steps=1))


def test_resume_after_a_kill_between_the_checkpoint_swaps_renames(world, tmp_path):
    # save_checkpoint moves the old directory aside, then renames the new one into place; a kill
    # between the two left no resume/ at all and the next run started from step 0
    full = train(config(world, tmp_path / "full"))
    out = tmp_path / "stopped"
    train(config(world, out, max_steps=3))
    resume = out / "resume"
    resume.rename(out / ".resume.old")
    with pytest.warns(UserWarning, match="stopped while saving"):
        train(config(world, out))
    ref, got = load_file(str(full / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    # resumed at step 3, not restarted: every logged step once
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[:2] == [2, 3]
