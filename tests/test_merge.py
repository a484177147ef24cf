"""babymerge merge: endpoints, kept checkpoints against a merge from disk, methods, grid parsing,
checkpoint sweep, and every bad input."""

import dataclasses
import json
import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from evalmerge_fixtures import FEATURE_DIM, build_world, make_checkpoint
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoTokenizer

from babymerge.cli import main
from babymerge.evaluate import EvalConfig, evaluate
from babymerge.merge import (MergeConfig, MergeError, checkpoint_names, choose, merge, parse_alpha_grid,
                             parse_keep)
from babymerge.merge_methods import MERGE_METHODS
from babymerge.model import (MODEL_PRESETS, build_model, load_black_feature,
                             save_black_feature, save_checkpoint)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("mergeworld"))


@pytest.fixture(scope="module")
def sweep(world):
    """The paper's merge on all three task kinds: grid 0, 0.3, 1, alpha 0.3 kept."""
    cfg = MergeConfig(lm=world.lm, vlm=[world.vlm], task=list(world.specs.values()),
                      features=world.features, out=world.root / "merge", alpha_grid="0,0.3,1",
                      keep="0.3,chosen")
    return cfg, merge(cfg)


def test_endpoints_equal_evaluating_the_models(world, sweep):
    _, results = sweep
    by_alpha = {r["alpha"]: r for r in results["records"]}
    scores = {}
    for which in ("vlm", "lm"):
        scores[which] = evaluate(EvalConfig(model=getattr(world, which),
                                            task=list(world.specs.values()),
                                            features=world.features))
    assert scores["vlm"]["scores"] != scores["lm"]["scores"]  # else the test could not tell
    assert by_alpha[0.0]["scores"] == scores["vlm"]["scores"]
    assert by_alpha[1.0]["scores"] == scores["lm"]["scores"]
    assert by_alpha[0.0]["groups"]["blimp"] == scores["vlm"]["groups"]["blimp"]
    assert results["endpoints"]["vlm"] == {"vlm": scores["vlm"]["scores"],
                                           "lm": scores["lm"]["scores"]}


def test_kept_checkpoint_is_the_merge_of_the_files_on_disk(world, sweep):
    cfg, results = sweep
    kept = cfg.out / "alpha_0.3"
    assert str(kept) in results["kept"]
    lm, vlm = load_file(world.lm / "model.safetensors"), load_file(world.vlm / "model.safetensors")
    # 0.3 is written right after its in-place merge; 'chosen' (when not 0.3) after the whole sweep,
    # merged again from the resident endpoints, which must have come through unchanged
    for path in results["kept"]:
        alpha = json.loads((Path(path) / "merge.json").read_text())["alpha"]
        merged = load_file(Path(path) / "model.safetensors")
        assert merged.keys() == vlm.keys()
        for name, v in vlm.items():
            torch.testing.assert_close(merged[name], alpha * lm[name] + (1 - alpha) * v,
                                       rtol=1e-6, atol=1e-6, msg=f"{path} {name}")
    model = AutoModelForImageTextToText.from_pretrained(kept)  # a standard HF directory
    assert model.config.model_type == "babyllava"
    assert AutoTokenizer.from_pretrained(kept).get_vocab() == world.tokenizer.get_vocab()
    assert json.loads((kept / "merge.json").read_text())["alpha"] == 0.3


def test_results_files_follow_the_contract(sweep):
    cfg, results = sweep
    on_disk = json.loads((cfg.out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert set(on_disk["tasks"]) == {"blimp", "wg", "vqa"}
    assert on_disk["tasks"]["blimp"] == {"kind": "minimal_pairs", "chance": 0.5, "items": 24,
                                         "path": cfg.task[0].split(":", 1)[1]}
    assert [r["alpha"] for r in on_disk["records"]] == [0.0, 0.3, 1.0]
    assert all(0 <= s <= 1 for r in on_disk["records"] for s in r["scores"].values())
    best = choose(on_disk["records"], ["vlm"])
    assert on_disk["chosen_alpha"] == best["alpha"] and "maximises" in on_disk["rule"]
    for r in on_disk["records"]:  # the rule's objective: mean of grammar and multimodal means
        assert r["objective"] == pytest.approx(
            (r["scores"]["blimp"] + (r["scores"]["wg"] + r["scores"]["vqa"]) / 2) / 2)
    if best["alpha"] != 0.3:
        assert (cfg.out / f"alpha_{best['alpha']}").is_dir()  # 'chosen' in --keep
    md = (cfg.out / "results.md").read_text()
    assert "| vlm | alpha | blimp | wg | vqa |" in md and "(chosen)" in md
    assert (cfg.out / "alpha_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (cfg.out / "checkpoint_curve.png").exists()  # one --vlm: no curve over training
    assert len((cfg.out / "metrics.jsonl").read_text().splitlines()) == 3
    saved = json.loads((cfg.out / "merge_config.json").read_text())
    assert saved["config"]["alpha_grid"] == "0,0.3,1"


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


def test_config_errors_name_the_flag(world):
    ok = dict(lm=world.lm, vlm=[world.vlm], task=[world.specs["blimp"]], features=world.features)
    for change, why in [({"lm": None}, "--lm"), ({"vlm": []}, "--vlm"), ({"task": []}, "--task"),
                        ({"method": "ties"}, "--base"), ({"density": 0.0}, "--density"),
                        ({"alpha_grid": "0:2:1"}, "--allow-extrapolation"),
                        ({"method": "ties", "base": world.base, "allow_extrapolation": True},
                         "ties is not defined outside"),
                        ({"keep": "0.3,best"}, "--keep")]:
        with pytest.raises(ValueError, match=why):
            MergeConfig(**{**ok, **change})
    assert checkpoint_names([world.root / "a" / "vlm", world.root / "b" / "vlm"]) == ["a_vlm", "b_vlm"]
    with pytest.raises(MergeError, match="given twice"):
        checkpoint_names([world.vlm, world.root / "." / "vlm"])
    res = CliRunner().invoke(main, ["merge", "--lm", str(world.lm), "--vlm", str(world.vlm),
                                    "-t", world.specs["blimp"], "--alpha-grid", "0:1"])
    assert res.exit_code == 2 and "START:STOP:STEP" in res.output


def test_mismatched_checkpoints_fail_before_any_work(world, tmp_path):
    preset = dataclasses.replace(MODEL_PRESETS["tiny"], feature_dim=FEATURE_DIM, hidden_size=32)
    tok = world.tokenizer
    narrow = build_model(preset, seed=0, vocab_size=len(tok), image_token_id=4, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    save_checkpoint(narrow, tmp_path / "narrow", tok)
    extra = shutil.copytree(world.lm, tmp_path / "extra")
    tensors = load_file(extra / "model.safetensors")
    save_file({**tensors, "model.adapter.weight": torch.zeros(2)}, extra / "model.safetensors",
              metadata={"format": "pt"})
    retok = shutil.copytree(world.lm, tmp_path / "retok")
    spec = json.loads((retok / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["▁red"], vocab["▁blue"] = vocab["▁blue"], vocab["▁red"]  # same size, other rows
    (retok / "tokenizer.json").write_text(json.dumps(spec))
    both = [shutil.copytree(d, tmp_path / f"both_{d.name}") for d in (world.lm, world.vlm)]
    for d in both:  # in both files, so names and shapes match, but no parameter of the model
        save_file({**load_file(d / "model.safetensors"), "model.adapter.weight": torch.zeros(2)},
                  d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MergeError, match="1 tensor.*not parameters of the loaded model: model.ad"):
        merge(MergeConfig(lm=both[0], vlm=[both[1]], task=[world.specs["blimp"]],
                          features=world.features, out=tmp_path / "out_both"))
    v = len(tok)
    for lm, why in [(tmp_path / "narrow", rf"shape mismatch\(es\).*embed_tokens.weight \({v}, 32\) "
                                          rf"vs \({v}, 64\)"),
                    (extra, r"1 tensor\(s\) of --lm .* not in --vlm .*: model.adapter.weight"),
                    (tmp_path / "nothing", "no model.safetensors"),
                    (retok, "different tokenizer vocabularies")]:
        out = tmp_path / "out"
        with pytest.raises(MergeError, match=why):
            merge(MergeConfig(lm=lm, vlm=[world.vlm], task=[world.specs["blimp"]],
                              features=world.features, out=out))
        assert not out.exists()


def test_vlm_only_tensors_kept_and_checkpoint_sweep(world, tmp_path):
    """An LM without the projector merges into two VLMs (a checkpoint sweep) with DARE; the
    projector stays each VLM's, the winner over both VLMs is kept."""
    lm = shutil.copytree(world.lm, tmp_path / "lm_noproj")
    tensors = load_file(lm / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if "multi_modal_projector" not in k},
              lm / "model.safetensors", metadata={"format": "pt"})
    vlm2 = make_checkpoint(tmp_path / "vlm2", world.tokenizer, seed=5)
    cfg = MergeConfig(lm=lm, vlm=[world.vlm, vlm2], task=[world.specs["blimp"]],
                      features=world.features, out=tmp_path / "sweep", alpha_grid="0.5",
                      keep="0.5", method="dare", base=world.base, density=0.5)
    results = merge(cfg)
    assert [(r["vlm"], r["alpha"]) for r in results["records"]] == [("vlm", 0.5), ("vlm2", 0.5)]
    assert set(results["endpoints"]) == {"vlm", "vlm2"}
    assert results["chosen_vlm"] in ("vlm", "vlm2")
    # the paper's curves over training: score against the --vlm checkpoints
    assert (cfg.out / "checkpoint_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name, vlm_dir in (("vlm", world.vlm), ("vlm2", vlm2)):
        kept = load_file(cfg.out / name / "alpha_0.5" / "model.safetensors")
        original = load_file(vlm_dir / "model.safetensors")
        proj = [k for k in original if "multi_modal_projector" in k]
        assert proj and all(torch.equal(kept[k], original[k]) for k in proj)
        merged = [k for k in original if k not in proj]
        assert not any(torch.equal(kept[k], original[k]) for k in merged if "norm" not in k)


def tensors(seed, *shapes):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen) for s in shapes]


SHAPES = [(7, 5), (11,), (3, 4, 2)]


def test_methods_against_their_definitions():
    lm, vlm, base = tensors(0, *SHAPES), tensors(1, *SHAPES), tensors(2, *SHAPES)

    def run(name, alpha, **kw):
        method = MERGE_METHODS[name]([t.clone() for t in lm], [t.clone() for t in vlm],
                                     [t.clone() for t in base], **kw)
        dst = [torch.empty_like(t) for t in lm]
        method.merge_into_(dst, alpha)
        return dst

    for alpha in (0.0, 0.3, 1.0):
        linear = run("linear", alpha)
        for d, a, b in zip(linear, lm, vlm):
            torch.testing.assert_close(d, alpha * a + (1 - alpha) * b)
        # task arithmetic at scale 1, and DARE keeping everything, are the linear merge
        for name in ("task-arithmetic", "dare"):
            for d, ref in zip(run(name, alpha, density=1.0), linear):
                torch.testing.assert_close(d, ref, rtol=1e-5, atol=1e-5)
    for d, a, b, c in zip(run("task-arithmetic", 0.3, scale=2.0), lm, vlm, base):
        torch.testing.assert_close(d, c + 2.0 * (0.3 * (a - c) + 0.7 * (b - c)))
    # slerp: exact endpoints; equal-norm orthogonal vectors keep their norm half way
    for alpha, ref in ((0.0, vlm), (1.0, lm)):
        assert all(torch.equal(d, r) for d, r in zip(run("slerp", alpha), ref))
    x, y = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 3.0])
    half = MERGE_METHODS["slerp"]([x], [y], None)
    out = [torch.empty(2)]
    half.merge_into_(out, 0.5)
    torch.testing.assert_close(out[0], torch.tensor([3 / math.sqrt(2), 3 / math.sqrt(2)]))
    # DARE: about density of each task vector kept, rescaled by 1/density, same masks every call
    dare = MERGE_METHODS["dare"]([t.clone() for t in lm], [t.clone() for t in vlm],
                                 [t.clone() for t in base], density=0.5, seed=3)
    kept = torch.cat([t.flatten() != 0 for t in dare.tau_lm]).float().mean().item()
    assert 0.3 < kept < 0.7
    first, second = run("dare", 0.4, density=0.5, seed=3), run("dare", 0.4, density=0.5, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(dare.tau_lm[0] != 0, dare.tau_vlm[0] != 0)  # independent masks
    nz = dare.tau_lm[0] != 0
    torch.testing.assert_close(dare.tau_lm[0][nz], ((lm[0] - base[0]) / 0.5)[nz])


def test_dare_masks_come_from_a_cpu_generator_whatever_the_device_or_dtype():
    """DARE's masks are uniform draws of a CPU generator seeded per (seed, tensor, model), moved
    to the tensors' device: a sweep resumed on another device (CUDA's generator is another
    stream) or in another dtype keeps its masks."""
    lm, vlm, base = tensors(0, *SHAPES), tensors(1, *SHAPES), tensors(2, *SHAPES)
    seed, density = 3, 0.5
    dare = MERGE_METHODS["dare"]([t.clone() for t in lm], [t.clone() for t in vlm],
                                 [t.clone() for t in base], density=density, seed=seed)
    for i, shape in enumerate(SHAPES):
        for stream, tau in ((2 * i, dare.tau_lm[i]), (2 * i + 1, dare.tau_vlm[i])):
            gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + stream)
            assert torch.equal(tau != 0, torch.rand(shape, generator=gen) < density)
    # the first tensor's mask, fixed: a change of recipe (or of torch's CPU stream) shows here
    assert "".join("1" if k else "0" for k in (dare.tau_lm[0] != 0).flatten().tolist()) == \
        "10110011001001111010101100000100000"
    half = MERGE_METHODS["dare"]([t.bfloat16() for t in lm], [t.bfloat16() for t in vlm],
                                 [t.bfloat16() for t in base], density=density, seed=seed)
    assert all(torch.equal(a != 0, b != 0) for a, b in zip(half.tau_lm, dare.tau_lm))
    assert all(torch.equal(a != 0, b != 0) for a, b in zip(half.tau_vlm, dare.tau_vlm))
    assert MERGE_METHODS["dare"].uses_seed and not MERGE_METHODS["ties"].uses_seed


def test_ties_trims_elects_and_averages():
    base = [torch.zeros(6)]
    lm = [torch.tensor([4.0, -1.0, 2.0, 0.1, -3.0, 0.0])]
    vlm = [torch.tensor([2.0, 3.0, -1.0, 0.2, -1.0, 5.0])]
    ties = MERGE_METHODS["ties"](lm, [vlm[0].clone()], base, density=0.5)
    # top 3 magnitudes each: lm keeps 4, 2, -3; vlm keeps 2, 3, 5
    assert ties.tau_lm[0].tolist() == [4.0, 0.0, 2.0, 0.0, -3.0, 0.0]
    assert ties.tau_vlm[0].tolist() == [2.0, 3.0, 0.0, 0.0, 0.0, 5.0]
    out = [torch.empty(6)]
    ties.merge_into_(out, 0.5)
    # agreeing entries: weighted mean; one survivor: its value; nothing kept: 0
    assert out[0].tolist() == [3.0, 3.0, 2.0, 0.0, -3.0, 5.0]
    ties.merge_into_(out, 0.0)
    assert out[0].tolist() == [2.0, 3.0, 0.0, 0.0, 0.0, 5.0]


def test_merge_cli_runs(world, tmp_path):
    out = tmp_path / "cli"
    res = CliRunner().invoke(main, ["merge", "--lm", str(world.lm), "--vlm", str(world.vlm),
                                    "-t", f"grammar={world.specs['blimp']}", "--features",
                                    str(world.features), "--alpha-grid", "1", "--keep", "none",
                                    "--method", "slerp", "--out", str(out)])
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert results["chosen_alpha"] == 1.0 and results["kept"] == []
    assert results["records"][0]["scores"] == results["endpoints"]["vlm"]["lm"]  # slerp at 1 = LM


def test_black_feature_from_the_vlm_checkpoint(world, sweep, tmp_path):
    """A VLM carrying black_feature.safetensors (as train writes it) merges without --features,
    scoring text-only tasks exactly as with the feature file's /black, and its kept checkpoints
    carry the same file."""
    with h5py.File(world.features) as f:
        black = torch.from_numpy(np.asarray(f["black"][:], dtype=np.float32))
    vlm = shutil.copytree(world.vlm, tmp_path / "vlm")
    save_black_feature(vlm, black)
    cfg = MergeConfig(lm=world.lm, vlm=[vlm], task=[world.specs["blimp"]], out=tmp_path / "out",
                      alpha_grid="0.3", keep="0.3")
    results = merge(cfg)
    with_file = next(r for r in sweep[1]["records"] if r["alpha"] == 0.3)
    assert results["records"][0]["scores"]["blimp"] == with_file["scores"]["blimp"]
    assert torch.equal(load_black_feature(cfg.out / "alpha_0.3"), black)


def test_sweep_overwrites_the_live_parameters_through_the_dispatch_point(world, tmp_path,
                                                                          monkeypatch):
    """Every alpha goes through kernels.interpolate_ into the loaded model's own parameter
    storages (no new model, no state dict), reading the two resident endpoints."""
    from babymerge import kernels

    import babymerge.merge as merge_module

    models, calls = [], []
    real_load, real_interpolate = merge_module.load_model, kernels.interpolate_

    def load(*args, **kw):
        models.append(real_load(*args, **kw))
        return models[-1]

    def interpolate(dst, a, b, alpha):
        calls.append(([t.data_ptr() for t in dst], [t.data_ptr() for t in a + b], alpha))
        real_interpolate(dst, a, b, alpha)

    monkeypatch.setattr(merge_module, "load_model", load)
    monkeypatch.setattr(kernels, "interpolate_", interpolate)
    merge(MergeConfig(lm=world.lm, vlm=[world.vlm], task=[world.specs["blimp"]],
                      features=world.features, out=tmp_path / "out", alpha_grid="0,0.5,1",
                      keep="none"))
    assert len(models) == 1 and [c[2] for c in calls] == [0.0, 0.5, 1.0]
    live = {p.data_ptr() for p in models[0].parameters()}
    assert all(set(dst) <= live for dst, _, _ in calls)  # written into the model itself
    assert len(calls[0][0]) == len(list(models[0].parameters()))
    assert all(c[1] == calls[0][1] for c in calls)  # the same resident endpoints every time
    assert not set(calls[0][1]) & live  # endpoints are copies, not the live tensors


def test_no_progress_is_silent(world, tmp_path, capfd):
    """--no-progress leaves no bar on stderr, kept checkpoints' writes included."""
    result = CliRunner().invoke(main, ["merge", "--lm", str(world.lm), "--vlm", str(world.vlm),
                                       *sum((["--task", s] for s in world.specs.values()), []),
                                       "--features", str(world.features), "--alpha-grid", "0,1",
                                       "--keep", "0,1", "--out", str(tmp_path / "m"),
                                       "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "alpha_1.0").is_dir()
    err = capfd.readouterr().err + result.stderr  # tqdm writes to the runner's stderr
    assert "it/s" not in err and "%|" not in err, err
