"""babymerge.train: the BabyLM word-count checkpoint schedule, an LM that learns and a VLM that
uses its images, resuming (stopped, SIGKILLed, torn logs, changed data, another tokenizer) to the
weights of an uninterrupted run, DDP against single-process accumulation, bad inputs, bf16
autocast, the black feature in checkpoints, standardised features, and training on features read
out of core."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from babymerge.cli import main
from babymerge.data import DataError
from babymerge.featurefile import FEATURES, FeatureFileError, FeatureTable
from babymerge.model import image_prefix_ids, load_model
from babymerge.tokenizer import load_tokenizer
from babymerge.train import (TrainConfig, TrainError, build_initial_model, checkpoint_schedule,
                             feature_memory_budget, make_optimizer, train, words_label)
from fixtures import DIM, caption_of, world, write_feature_file  # noqa: F401  (world: fixture)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Two threads on a shared 2-core machine make tiny steps ~10x slower, not faster.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def lm_config(world, out, **kw) -> TrainConfig:
    base = dict(kind="lm", text=[world["text"]], features=world["features"],
                tokenizer=world["tokenizer"], out=out, preset="tiny", seq_len=32, batch_size=8,
                epochs=2, lr=3e-3, warmup_steps=3, checkpoint_unit=10**6, log_every=2,
                save_every=0, cache_dir=world["root"] / "cache", progress=False)
    return TrainConfig(**{**base, **kw})


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "full"
    train(lm_config(world, out, checkpoint_unit=2000))
    return out


def test_checkpoint_schedule_is_babylm():
    sched = checkpoint_schedule()
    names = [words_label(w) for w in sched]
    assert names[:10] == [f"{k}M" for k in range(1, 10)] + ["10M"]
    assert names[9:19] == [f"{k}0M" for k in range(1, 10)] + ["100M"]
    assert names[-2:] == ["900M", "1B"] and len(sched) == len(set(sched)) == 28
    assert words_label(1500) == "1500" and words_label(2000) == "2K"


def test_lm_learns_writes_word_checkpoints_that_load(world, uninterrupted):
    out = uninterrupted
    steps = [r for r in records(out) if "loss" in r]
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0
    assert {"lr", "words", "tokens", "tokens_per_s", "grad_norm"} <= set(steps[0])
    final_words = steps[-1]["words"]
    want = [f"words_{words_label(w)}" for w in checkpoint_schedule(2000) if w <= final_words]
    got = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert got == sorted(want) and len(want) >= 2
    tok = load_tokenizer(out / "checkpoints" / want[0])
    ids = torch.tensor([image_prefix_ids(tok)
                        + tok("the red cat.", add_special_tokens=False).input_ids])
    black = FeatureTable(world["features"], dtype=torch.float32).black[None]
    for d in [out / "checkpoints" / want[0], out]:
        model = AutoModelForImageTextToText.from_pretrained(d)
        assert model(input_ids=ids, pixel_values=black).logits.shape[-1] == len(tok)
    ck = weights(out / "checkpoints" / want[0])
    assert any(not torch.equal(ck[k], v) for k, v in weights(out).items())
    state = json.loads((out / "resume" / "state.json").read_text())
    assert state["finished"] and state["words"] == final_words


def test_stopped_run_resumes_to_identical_weights(world, uninterrupted, tmp_path):
    out = tmp_path / "stopped"
    train(lm_config(world, out, checkpoint_unit=2000, max_steps=7))
    assert not (out / "model.safetensors").exists()
    assert json.loads((out / "resume" / "state.json").read_text())["step"] == 7
    train(lm_config(world, out, checkpoint_unit=2000))  # same command, no limit: resumes
    ref, got = weights(uninterrupted), weights(out)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    steps = [r["step"] for r in records(out) if "loss" in r]
    assert steps == sorted(set(steps))  # no step logged twice
    with pytest.raises(ValueError, match="another config"):
        train(lm_config(world, out, checkpoint_unit=2000, lr=1e-3))


def test_sigkilled_cli_run_resumes_to_identical_weights(world, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    cfg = lm_config(world, out, checkpoint_unit=2000, save_every=2)
    argv = [sys.executable, "-m", "babymerge.cli", "train", "--kind", "lm", "--text",
            str(world["text"]), "--features", str(world["features"]), "--tokenizer",
            str(world["tokenizer"]), "--out", str(out), "--preset", "tiny", "--seq-len", "32",
            "--batch-size", "8", "--epochs", "2", "--lr", "3e-3", "--warmup-steps", "3",
            "--checkpoint-unit", "2000", "--log-every", "2", "--save-every", "2",
            "--cache-dir", str(cfg.cache_dir), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = out / "resume" / "state.json"
    deadline = time.time() + 60
    while not state.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    # killed mid-run, or the test would not be testing a resume
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert state.is_file(), "the run saved no resume state before the deadline"
    assert not json.loads(state.read_text())["finished"]
    train(cfg)
    ref, got = weights(uninterrupted), weights(out)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_vlm_scores_captions_higher_with_their_own_images(world, tmp_path):
    out = tmp_path / "vlm"
    cfg = lm_config(world, out, kind="vlm", text=[], captions=[world["captions"]], epochs=12,
                    batch_size=16, lr=5e-3, log_every=10)
    with pytest.warns(UserWarning) as caught:
        train(cfg)
    messages = " ".join(str(w.message) for w in caught)
    assert "at most 10 epochs" in messages and "1 image id not in feature file" in messages
    samples = json.loads((out / "train_config.json").read_text())["samples"]
    assert samples["captions_skipped"] == {"image id not in feature file": 1,
                                           "image failed in feature extraction": 1}
    assert samples["captions_truncated"] == {"captions": 0, "tokens": 0}
    model, tok = load_model(out), load_tokenizer(out)
    feats = torch.tensor(world["feats"], dtype=torch.float32)
    n = len(feats)
    texts = [image_prefix_ids(tok) + tok(caption_of(i), add_special_tokens=False).input_ids
             for i in range(n)]
    ids = torch.tensor(texts)  # all captions have the same length here

    @torch.no_grad()
    def logprob(f: torch.Tensor) -> torch.Tensor:
        lp = model(input_ids=ids, pixel_values=f).logits.log_softmax(-1)
        return lp[:, 1:-1].gather(-1, ids[:, 2:, None]).squeeze(-1).sum(1)

    right = logprob(feats)
    shuffled = logprob(feats[torch.tensor([(i + 5) % n for i in range(n)])])
    assert (right > shuffled).float().mean() > 0.9
    assert (right - shuffled).mean() > 1.0


def test_lm_and_vlm_start_from_the_same_weights(world, tmp_path):
    tok = load_tokenizer(world["tokenizer"])
    lm = build_initial_model(lm_config(world, tmp_path / "a"), tok, DIM)
    vlm = build_initial_model(lm_config(world, tmp_path / "b", kind="vlm", text=[],
                                        captions=[world["captions"]]), tok, DIM)
    assert all(torch.equal(p, q) for p, q in zip(lm.state_dict().values(),
                                                   vlm.state_dict().values()))


def test_ddp_two_processes_match_single_process_accumulation(world, tmp_path):
    cfg = lm_config(world, tmp_path / "single", batch_size=4, grad_accum=2, epochs=1)
    train(cfg)
    out = tmp_path / "ddp"
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-port", str(29500 + os.getpid() % 1000), "-m", "babymerge.cli", "train",
            "--kind", "lm", "--text", str(world["text"]), "--features", str(world["features"]),
            "--tokenizer", str(world["tokenizer"]), "--out", str(out), "--preset", "tiny",
            "--seq-len", "32", "--batch-size", "4", "--grad-accum", "1", "--epochs", "1",
            "--lr", "3e-3", "--warmup-steps", "3", "--log-every", "2", "--save-every", "0",
            "--cache-dir", str(cfg.cache_dir), "--no-progress", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    ref, got = weights(cfg.out), weights(out)
    for k in ref:  # the all-reduce sums in another order than accumulation: float tolerance
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5)
    a = [r for r in records(cfg.out) if "loss" in r]
    b = [r for r in records(out) if "loss" in r]
    assert [r["words"] for r in a] == [r["words"] for r in b]
    assert json.loads((out / "train_config.json").read_text())["world_size"] == 2


def test_bad_inputs_are_clear_errors(world, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["train", "--kind", "lm", "--text", str(world["text"]),
                                  "--tokenizer", str(world["tokenizer"]), "--out",
                                  str(tmp_path / "x")])
    assert result.exit_code == 2 and "--features is required" in result.output
    result = runner.invoke(main, ["train", "--kind", "vlm", "--features", str(world["features"]),
                                  "--tokenizer", str(world["tokenizer"]), "--out",
                                  str(tmp_path / "x")])
    assert result.exit_code == 2 and "--kind vlm needs --captions" in result.output
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty.txt: no text"):
        train(lm_config(world, tmp_path / "e", text=[empty]))
    # errors found while the run starts reach the command line as a message, not a traceback
    not_h5 = tmp_path / "not.h5"
    not_h5.write_text("text\n")
    cases = [(["--text", str(empty)], f"{tmp_path}/empty.txt: no text"),
             (["--tokenizer", str(tmp_path)], f"{tmp_path}: no tokenizer.json"),
             (["--features", str(not_h5)], f"{tmp_path}/not.h5: not a readable HDF5 file")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda: no CUDA device is available"))
    for flags, message in cases:
        base = {"--text": str(world["text"]), "--features": str(world["features"]),
                "--tokenizer": str(world["tokenizer"])}
        base.update(zip(flags[::2], flags[1::2]))
        result = runner.invoke(main, ["train", "--kind", "lm", "--preset", "tiny", "--seq-len",
                                      "32", "--no-progress", "--out", str(tmp_path / "cli"),
                                      "--cache-dir", str(world["root"] / "cache"),
                                      *[x for kv in base.items() for x in kv]])
        assert isinstance(result.exception, SystemExit), result.exception
        assert result.exit_code == 1 and f"Error: {message}" in result.output, result.output
    # a model made for 16-d features cannot train on 8-d ones
    init = tmp_path / "init"
    train(lm_config(world, init, epochs=1))
    started = train(lm_config(world, tmp_path / "z", tokenizer=None, init_from=init, max_steps=1))
    assert (started / "resume" / "tokenizer.json").is_file()  # the tokenizer came from --init-from
    other = write_feature_file(tmp_path / "f8.h5", ["a"], np.zeros((1, 8)), np.zeros(8))
    with pytest.raises(FeatureFileError, match="dimension mismatch.*16-d.*8-d"):
        train(lm_config(world, tmp_path / "y", features=other, init_from=init))


def test_bf16_autocast_path_runs_on_cpu(world, tmp_path):
    # the CUDA default precision, exercised on CPU so the autocast path is covered without a GPU
    out = train(lm_config(world, tmp_path / "bf16", precision="bf16", epochs=1))
    losses = [r["loss"] for r in records(out) if "loss" in r]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_checkpoints_carry_the_black_feature_eval_falls_back_to(world, tmp_path):
    from babymerge.evaluate import EvalConfig, evaluate, load_tasks
    from babymerge.model import load_black_feature

    # a black feature nobody could guess (the world's is zeros)
    black = np.linspace(-1, 1, DIM)
    features = write_feature_file(tmp_path / "f.h5", ["a"], np.ones((1, DIM)), black)
    out = train(lm_config(world, tmp_path / "lm", features=features, epochs=1,
                          checkpoint_unit=500))
    want = FeatureTable(features, dtype=torch.float32).black
    dirs = [out, out / "resume", *(out / "checkpoints").iterdir()]
    assert len(dirs) > 2
    for d in dirs:
        assert torch.equal(load_black_feature(d), want), d
    assert load_black_feature(tmp_path) is None
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"sentence_good": f"the {a} sees the red cat.",
                                         "sentence_bad": f"the {a} the sees red cat.",
                                         "UID": "order"}) + "\n" for a in ("dog", "bird")))
    task = load_tasks([f"minimal_pairs:{pairs}"], load_tokenizer(out), None, checkpoint=out)[0]
    assert torch.equal(task.features.float(), want[None])
    # without --features, eval of a text-only task runs on the checkpoint's own /black
    with_file = evaluate(EvalConfig(model=out, task=[f"minimal_pairs:{pairs}"], features=features))
    without = evaluate(EvalConfig(model=out, task=[f"minimal_pairs:{pairs}"]))
    assert without["scores"] == with_file["scores"]


# ---------------------------------------------------------------------------------------------
# Resuming and starting runs


def standardize_config(world, out, **kw) -> TrainConfig:
    """One epoch, features standardised (the resume tests' default)."""
    return lm_config(world, out, **{"epochs": 1, "feature_norm": "standardize", **kw})


def test_standardize_run_resumes_to_identical_weights(world, tmp_path):
    # from_pretrained made the frozen feature statistics trainable again, so the resumed
    # optimizer had two more parameters than the saved state: load_state_dict raised
    full = train(standardize_config(world, tmp_path / "full"))
    out = tmp_path / "stopped"
    train(standardize_config(world, out, max_steps=3))
    train(standardize_config(world, out))
    ref, got = load_file(str(full / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_init_from_keeps_feature_statistics_out_of_the_optimizer(world, tmp_path):
    # a trainable parameter that never gets a gradient also stops DDP at its first step
    init = train(standardize_config(world, tmp_path / "init", max_steps=1, save_every=1))
    tok = load_tokenizer(world["tokenizer"])
    fresh = build_initial_model(standardize_config(world, tmp_path / "a"), tok, DIM)
    started = build_initial_model(standardize_config(world, tmp_path / "b",
                                                     init_from=init / "resume"), tok, DIM)
    for model in (fresh, started):
        assert not model.model.feature_std.requires_grad
        assert not model.model.feature_mean.requires_grad
    sizes = [[len(g["params"]) for g in make_optimizer(m, standardize_config(world, tmp_path / "c"),
                                                       torch.device("cpu")).param_groups]
             for m in (fresh, started)]
    assert sizes[0] == sizes[1]


def test_resume_after_a_torn_metrics_line(world, tmp_path):
    # a node that dies mid-write leaves a partial last line (or NUL bytes after a power loss),
    # possibly cut inside a multi-byte character (not UTF-8 then); resuming read every line as
    # JSON and stopped with a JSONDecodeError
    out = tmp_path / "torn"
    train(standardize_config(world, out, feature_norm="none", max_steps=4))
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 6, "epoch": 0, "lo\x00\x00 \xe2\x82')
    train(standardize_config(world, out, feature_norm="none"))
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == sorted(set(steps)) and steps[-1] > 4


def test_resume_refuses_data_that_changed(world, tmp_path):
    # the saved step indexes the epoch plan of the data it was saved with; an appended corpus
    # made another plan and the run went on silently at the same step of other batches
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(world["text"].read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / "changed"
    train(standardize_config(world, out, text=[corpus], feature_norm="none", max_steps=2))
    with open(corpus, "a", encoding="utf-8") as f:
        f.write("the red cat sees the blue dog.\n" * 40)
    with pytest.raises(TrainError, match=r"training data changed.*text_sequences: \d+ -> \d+"):
        train(standardize_config(world, out, text=[corpus], feature_norm="none"))


def test_resume_refuses_captions_that_changed(world, tmp_path):
    # as many captions as before, one of them longer: only the caption token count tells
    lines = world["captions"].read_text(encoding="utf-8").splitlines()
    captions = tmp_path / "captions.jsonl"
    captions.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "changed"
    vlm = dict(kind="vlm", text=[], captions=[captions], feature_norm="none")
    train(standardize_config(world, out, max_steps=2, **vlm))
    first = json.loads(lines[0])
    first["caption"] += " the red cat sees the blue dog."
    captions.write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n", encoding="utf-8")
    with pytest.raises(TrainError, match=r"data changed since the run was saved "
                                         r"\(caption_tokens: \d+ -> \d+\)"):
        train(standardize_config(world, out, **vlm))


def test_init_from_refuses_another_tokenizer_of_the_same_size(world, tmp_path):
    # a retrained tokenizer keeps --vocab-size, so only the sizes were compared: the model went
    # on with every embedding row meaning another token
    init = train(standardize_config(world, tmp_path / "init", feature_norm="none", max_steps=1,
                                    save_every=1)) / "resume"
    other = tmp_path / "other_tok"
    shutil.copytree(world["tokenizer"], other)
    spec = json.loads((other / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[-2:]  # two learned tokens trade ids
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(TrainError, match="another tokenizer"):
        train(standardize_config(world, tmp_path / "z", feature_norm="none", init_from=init,
                                 tokenizer=other, max_steps=1))
    train(standardize_config(world, tmp_path / "same", feature_norm="none", init_from=init,
                             max_steps=1))


def test_resume_after_a_kill_between_the_checkpoint_swaps_renames(world, tmp_path):
    # save_checkpoint moves the old directory aside, then renames the new one into place; a kill
    # between the two left no resume/ at all and the next run started from step 0
    full = train(standardize_config(world, tmp_path / "full"))
    out = tmp_path / "stopped"
    train(standardize_config(world, out, max_steps=3))
    resume = out / "resume"
    resume.rename(out / ".resume.old")
    with pytest.warns(UserWarning, match="stopped while saving"):
        train(standardize_config(world, out))
    ref, got = load_file(str(full / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    # resumed at step 3, not restarted: every logged step once
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[:2] == [2, 3]


# ---------------------------------------------------------------------------------------------
# Features: out of core, standardised


def test_training_out_of_core_equals_in_memory_and_default_is_in_memory(
        world, tmp_path, one_thread):
    base = dict(kind="vlm", text=[world["text"]], captions=[world["captions"]],
                features=world["features"], tokenizer=world["tokenizer"], preset="tiny",
                seq_len=32, batch_size=16, epochs=1, lr=3e-3, warmup_steps=2, log_every=1,
                save_every=0, cache_dir=world["root"] / "cache", progress=False)
    default = TrainConfig(**base, out=tmp_path / "memory")
    assert default.feature_memory_gb < 0 and feature_memory_budget(default) > 2**20
    with pytest.warns(UserWarning, match="captions skipped"):
        train(default)
    with pytest.warns(UserWarning, match="captions skipped"):
        train(TrainConfig(**base, out=tmp_path / "disk", feature_memory_gb=0))

    def run(name):
        out = tmp_path / name
        lines = (out / "metrics.jsonl").read_text().splitlines()
        losses = [json.loads(line)["loss"] for line in lines if '"loss"' in line]
        config = json.loads((out / "train_config.json").read_text())
        return losses, load_file(str(out / "model.safetensors")), config["features_in_memory"]

    (loss_m, w_m, in_m), (loss_d, w_d, in_d) = run("memory"), run("disk")
    assert in_m is True and in_d is False
    assert len(loss_m) > 3 and loss_m == loss_d
    assert all(torch.equal(w_m[k], w_d[k]) for k in w_m)
    # the feature file's encoder is recorded, so the model can be run on pixels later
    assert load_model(tmp_path / "memory").config.encoder == "test/random"


def test_standardize_stores_the_feature_files_statistics(world, tmp_path, one_thread):
    from babymerge.featurefile import feature_statistics

    with h5py.File(world["features"], "r") as f:
        x = np.asarray(f[FEATURES][:], dtype=np.float64)
    mean, std = feature_statistics(world["features"], chunk_rows=3)  # several chunks
    assert np.allclose(mean.numpy(), x.mean(0), atol=1e-5)
    assert np.allclose(std.numpy(), x.std(0), atol=1e-5)
    cfg = TrainConfig(kind="lm", text=[world["text"]], features=world["features"],
                      tokenizer=world["tokenizer"], preset="tiny", seq_len=32, batch_size=16,
                      epochs=1, warmup_steps=1, save_every=0, progress=False,
                      cache_dir=world["root"] / "cache", out=tmp_path / "lm",
                      feature_norm="standardize")
    train(cfg)
    model = load_model(tmp_path / "lm")
    assert model.config.feature_norm == "standardize"
    assert torch.allclose(model.model.feature_mean, mean)
    assert torch.allclose(model.model.feature_std, std.clamp_min(1e-6))


def test_a_non_finite_loss_stops_before_the_step_and_keeps_the_saved_state(world, tmp_path,
                                                                           monkeypatch):
    """A NaN loss ran to the end and wrote an all-NaN checkpoint: now the step whose gradients
    are not finite stops the run with an error naming it, before the optimizer changes any
    weight, and the last saved resume state stays as it was."""
    from babymerge.model import BabyLlavaForConditionalGeneration
    from babymerge.train import TrainError

    real, calls = BabyLlavaForConditionalGeneration.forward, []

    def nan_on_the_fifth(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 5:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(BabyLlavaForConditionalGeneration, "forward", nan_on_the_fifth)
    out = tmp_path / "nan"
    with pytest.raises(TrainError, match=r"step 5: the loss or its gradients are NaN or infinite "
                                         r".*the last saved state is kept: .*resume \(step 4\)"):
        train(lm_config(world, out, save_every=2))
    state = json.loads((out / "resume" / "state.json").read_text())
    assert state["step"] == 4 and not state["finished"]
    assert all(torch.isfinite(t).all() for t in weights(out / "resume").values())
    assert not (out / "model.safetensors").exists()  # no final model from a broken run


def test_a_second_run_into_the_same_out_is_refused_naming_the_first(world, tmp_path):
    """Two runs into one --out interleaved their writes; the second now stops at once."""
    import os

    from babymerge.config import exclusive
    from babymerge.train import TrainError

    out = tmp_path / "busy"
    with exclusive(out / ".lock", "train"):  # as a running train holds it
        with pytest.raises(TrainError, match=rf"another train run \(PID {os.getpid()}\) is "
                                             rf"writing {out}"):
            train(lm_config(world, out))
    train(lm_config(world, out, max_steps=1))  # free again
