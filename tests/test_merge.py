"""babymerge.merge (the stage): endpoints equal evaluating the models, kept checkpoints against a
merge of the files on disk, the results files, MergeConfig's errors, a checkpoint sweep with
VLM-only tensors, the CLI, the black feature from the VLM checkpoint, and the sweep writing into
the live model through the kernels' dispatch point. Alpha grids, the --vlm list and checkpoint
compatibility are test_merge_inputs.py's; the methods test_merge_methods.py's; the rule, results.md
and plots test_merge_report.py's; resuming test_merge_resume.py's."""

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoTokenizer

from babymerge.cli import main
from babymerge.evaluate import EvalConfig, evaluate
from babymerge.merge import MergeConfig, MergeError, checkpoint_names, choose, merge
from babymerge.model import load_black_feature, save_black_feature
from fixtures import eval_world, make_checkpoint  # noqa: F401  (eval_world: fixture)


@pytest.fixture(scope="module")
def sweep(eval_world):
    """The paper's merge on all three task kinds: grid 0, 0.3, 1, alpha 0.3 kept."""
    cfg = MergeConfig(lm=eval_world.lm, vlm=[eval_world.vlm],
                      task=list(eval_world.specs.values()), features=eval_world.features,
                      out=eval_world.root / "merge", alpha_grid="0,0.3,1", keep="0.3,chosen")
    return cfg, merge(cfg)


def test_endpoints_equal_evaluating_the_models(eval_world, sweep):
    _, results = sweep
    by_alpha = {r["alpha"]: r for r in results["records"]}
    scores = {}
    for which in ("vlm", "lm"):
        scores[which] = evaluate(EvalConfig(model=getattr(eval_world, which),
                                            task=list(eval_world.specs.values()),
                                            features=eval_world.features))
    assert scores["vlm"]["scores"] != scores["lm"]["scores"]  # else the test could not tell
    assert by_alpha[0.0]["scores"] == scores["vlm"]["scores"]
    assert by_alpha[1.0]["scores"] == scores["lm"]["scores"]
    assert by_alpha[0.0]["groups"]["blimp"] == scores["vlm"]["groups"]["blimp"]
    assert results["endpoints"]["vlm"] == {"vlm": scores["vlm"]["scores"],
                                           "lm": scores["lm"]["scores"]}


def test_kept_checkpoint_is_the_merge_of_the_files_on_disk(eval_world, sweep):
    cfg, results = sweep
    kept = cfg.out / "alpha_0.3"
    assert str(kept) in results["kept"]
    lm = load_file(eval_world.lm / "model.safetensors")
    vlm = load_file(eval_world.vlm / "model.safetensors")
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
    assert AutoTokenizer.from_pretrained(kept).get_vocab() == eval_world.tokenizer.get_vocab()
    assert json.loads((kept / "merge.json").read_text())["alpha"] == 0.3


def test_results_files_follow_the_contract(sweep):
    cfg, results = sweep
    on_disk = json.loads((cfg.out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert set(on_disk["tasks"]) == {"blimp", "wg", "vqa"}
    assert on_disk["tasks"]["blimp"] == {"kind": "minimal_pairs", "metric": "accuracy",
                                         "chance": 0.5, "items": 24,
                                         "path": cfg.task[0].split(":", 1)[1]}
    assert [r["alpha"] for r in on_disk["records"]] == [0.0, 0.3, 1.0]
    assert all(0 <= s <= 1 for r in on_disk["records"] for s in r["scores"].values())
    best = choose(on_disk["records"], ["vlm"])
    assert on_disk["chosen_alpha"] == best["alpha"] and "maximises" in on_disk["rule"]
    for r in on_disk["records"]:  # the rule's objective: mean of grammar and multimodal means
        assert r["objective"] == pytest.approx(
            (r["scores"]["blimp"] + (r["scores"]["wg"] + r["scores"]["vqa"]) / 2) / 2)
    # --keep 0.3,chosen: exactly those alphas' folders (one, if the chosen alpha is 0.3)
    kept = {str(cfg.out / f"alpha_{a}") for a in {0.3, best["alpha"]}}
    assert set(on_disk["kept"]) == kept and all(Path(k).is_dir() for k in kept)
    assert {p.name for p in cfg.out.glob("alpha_*") if p.is_dir()} == {Path(k).name for k in kept}
    md = (cfg.out / "results.md").read_text()
    assert "| vlm | alpha | blimp | wg | vqa |" in md and "(chosen)" in md
    assert (cfg.out / "alpha_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (cfg.out / "checkpoint_curve.png").exists()  # one --vlm: no curve over training
    assert len((cfg.out / "metrics.jsonl").read_text().splitlines()) == 3
    saved = json.loads((cfg.out / "merge_config.json").read_text())
    assert saved["config"]["alpha_grid"] == "0,0.3,1"


def test_config_errors_name_the_flag(eval_world):
    ok = dict(lm=eval_world.lm, vlm=[eval_world.vlm], task=[eval_world.specs["blimp"]],
              features=eval_world.features)
    for change, why in [({"lm": None}, "--lm"), ({"vlm": []}, "--vlm"), ({"task": []}, "--task"),
                        ({"method": "ties"}, "--base"), ({"density": 0.0}, "--density"),
                        ({"alpha_grid": "0:2:1"}, "--allow-extrapolation"),
                        ({"method": "ties", "base": eval_world.base, "allow_extrapolation": True},
                         "ties is not defined outside"),
                        ({"keep": "0.3,best"}, "--keep")]:
        with pytest.raises(ValueError, match=why):
            MergeConfig(**{**ok, **change})
    assert checkpoint_names([eval_world.root / "a" / "vlm",
                             eval_world.root / "b" / "vlm"]) == ["a_vlm", "b_vlm"]
    with pytest.raises(MergeError, match="given twice"):
        checkpoint_names([eval_world.vlm, eval_world.root / "." / "vlm"])
    res = CliRunner().invoke(main, ["merge", "--lm", str(eval_world.lm), "--vlm",
                                    str(eval_world.vlm), "-t", eval_world.specs["blimp"],
                                    "--alpha-grid", "0:1"])
    assert res.exit_code == 2 and "START:STOP:STEP" in res.output


def test_vlm_only_tensors_kept_and_checkpoint_sweep(eval_world, tmp_path):
    """An LM without the projector merges into two VLMs (a checkpoint sweep) with DARE; the
    projector stays each VLM's, the winner over both VLMs is kept."""
    lm = shutil.copytree(eval_world.lm, tmp_path / "lm_noproj")
    tensors = load_file(lm / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if "multi_modal_projector" not in k},
              lm / "model.safetensors", metadata={"format": "pt"})
    vlm2 = make_checkpoint(tmp_path / "vlm2", eval_world.tokenizer, seed=5)
    cfg = MergeConfig(lm=lm, vlm=[eval_world.vlm, vlm2], task=[eval_world.specs["blimp"]],
                      features=eval_world.features, out=tmp_path / "sweep", alpha_grid="0.5",
                      keep="0.5", method="dare", base=eval_world.base, density=0.5)
    results = merge(cfg)
    assert [(r["vlm"], r["alpha"]) for r in results["records"]] == [("vlm", 0.5), ("vlm2", 0.5)]
    assert set(results["endpoints"]) == {"vlm", "vlm2"}
    assert results["chosen_vlm"] in ("vlm", "vlm2")
    # the paper's curves over training: score against the --vlm checkpoints
    assert (cfg.out / "checkpoint_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name, vlm_dir in (("vlm", eval_world.vlm), ("vlm2", vlm2)):
        kept = load_file(cfg.out / name / "alpha_0.5" / "model.safetensors")
        original = load_file(vlm_dir / "model.safetensors")
        proj = [k for k in original if "multi_modal_projector" in k]
        assert proj and all(torch.equal(kept[k], original[k]) for k in proj)
        merged = [k for k in original if k not in proj]
        assert not any(torch.equal(kept[k], original[k]) for k in merged if "norm" not in k)


def test_merge_cli_runs(eval_world, tmp_path):
    out = tmp_path / "cli"
    res = CliRunner().invoke(main, ["merge", "--lm", str(eval_world.lm), "--vlm",
                                    str(eval_world.vlm),
                                    "-t", f"grammar={eval_world.specs['blimp']}", "--features",
                                    str(eval_world.features), "--alpha-grid", "1", "--keep", "none",
                                    "--method", "slerp", "--out", str(out)])
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert results["chosen_alpha"] == 1.0 and results["kept"] == []
    assert results["records"][0]["scores"] == results["endpoints"]["vlm"]["lm"]  # slerp at 1 = LM


def test_black_feature_from_the_vlm_checkpoint(eval_world, sweep, tmp_path):
    """A VLM carrying black_feature.safetensors (as train writes it) merges without --features,
    scoring text-only tasks exactly as with the feature file's /black, and its kept checkpoints
    carry the same file."""
    with h5py.File(eval_world.features) as f:
        black = torch.from_numpy(np.asarray(f["black"][:], dtype=np.float32))
    vlm = shutil.copytree(eval_world.vlm, tmp_path / "vlm")
    save_black_feature(vlm, black)
    cfg = MergeConfig(lm=eval_world.lm, vlm=[vlm], task=[eval_world.specs["blimp"]],
                      out=tmp_path / "out", alpha_grid="0.3", keep="0.3")
    results = merge(cfg)
    with_file = next(r for r in sweep[1]["records"] if r["alpha"] == 0.3)
    assert results["records"][0]["scores"]["blimp"] == with_file["scores"]["blimp"]
    assert torch.equal(load_black_feature(cfg.out / "alpha_0.3"), black)


def test_sweep_overwrites_the_live_parameters_through_the_dispatch_point(eval_world, tmp_path,
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
    merge(MergeConfig(lm=eval_world.lm, vlm=[eval_world.vlm], task=[eval_world.specs["blimp"]],
                      features=eval_world.features, out=tmp_path / "out", alpha_grid="0,0.5,1",
                      keep="none"))
    assert len(models) == 1 and [c[2] for c in calls] == [0.0, 0.5, 1.0]
    live = {p.data_ptr() for p in models[0].parameters()}
    assert all(set(dst) <= live for dst, _, _ in calls)  # written into the model itself
    assert len(calls[0][0]) == len(list(models[0].parameters()))
    assert all(c[1] == calls[0][1] for c in calls)  # the same resident endpoints every time
    assert not set(calls[0][1]) & live  # endpoints are copies, not the live tensors


def test_no_progress_is_silent(eval_world, tmp_path, capfd):
    """--no-progress leaves no bar on stderr, kept checkpoints' writes included."""
    result = CliRunner().invoke(main, ["merge", "--lm", str(eval_world.lm), "--vlm",
                                       str(eval_world.vlm),
                                       *sum((["--task", s] for s in eval_world.specs.values()),
                                            []),
                                       "--features", str(eval_world.features), "--alpha-grid",
                                       "0,1",
                                       "--keep", "0,1", "--out", str(tmp_path / "m"),
                                       "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "alpha_1.0").is_dir()
    err = capfd.readouterr().err + result.stderr  # tqdm writes to the runner's stderr
    assert "it/s" not in err and "%|" not in err, err


def test_objective_groups_are_a_config_field_and_take_a_correlation_task(eval_world, tmp_path):
    """--objective regroups the tasks: here grammar (minimal pairs) and a wug task (Spearman's
    rho), which results.json, results.md and the plot carry; a member that is neither a kind nor
    a task, or groups that hold none of the tasks, are errors naming the flag."""
    wug = tmp_path / "wug_adj.jsonl"
    wug.write_text("".join(json.dumps({"sentences": f"the {c} cat sees a dog .\tthe {c} cat "
                                                    "see a dog .", "ratio": r}) + "\n"
                           for c, r in (("red", 0.9), ("blue", 0.1), ("green", 0.5))))
    base = dict(lm=eval_world.lm, vlm=[eval_world.vlm], features=eval_world.features,
                task=[eval_world.specs["blimp"], f"wug_adj:{wug}"], alpha_grid="0,1",
                keep="none", progress=False)
    results = merge(MergeConfig(**base, out=tmp_path / "m",
                                objective="grammar=minimal_pairs;morphology=wug_adj"))
    assert results["objective_groups"] == {"grammar": ["minimal_pairs"], "morphology": ["wug_adj"]}
    assert results["tasks"]["wug_adj"]["metric"] == "spearman"
    for r in results["records"]:
        assert -1 <= r["scores"]["wug_adj"] <= 1
        assert r["morphology"] == r["scores"]["wug_adj"]
        assert r["objective"] == pytest.approx((r["grammar"] + r["morphology"]) / 2)
    md = (tmp_path / "m" / "results.md").read_text()
    assert "| wug_adj | wug_adj | spearman | 3 | 0.000 |" in md and "morphology" in md
    assert (tmp_path / "m" / "alpha_curve.png").is_file()
    with pytest.raises(MergeError, match="'nope' is neither a task kind"):
        merge(MergeConfig(**base, out=tmp_path / "e1", objective="grammar=minimal_pairs,nope"))
    with pytest.raises(MergeError, match="none of the tasks is in a group"):
        merge(MergeConfig(**base, out=tmp_path / "e2", objective="multimodal=vqa"))
    with pytest.raises(ValueError, match="--objective"):
        MergeConfig(**base, out=tmp_path / "e3", objective="grammar")


def test_a_kept_folder_of_the_users_is_refused_before_any_scoring(eval_world, tmp_path, capsys):
    from babymerge.model import OutputError

    out = tmp_path / "m"
    (out / "alpha_0.5").mkdir(parents=True)
    (out / "alpha_0.5" / "analysis.ipynb").write_text("{}")
    with pytest.raises(OutputError, match=r"--keep .*alpha_0.5: holds files babymerge did not "
                                          r"write \(analysis.ipynb\)"):
        merge(MergeConfig(lm=eval_world.lm, vlm=[eval_world.vlm], task=[eval_world.specs["blimp"]],
                          features=eval_world.features, out=out, alpha_grid="0,0.5,1",
                          keep="0.5"))
    assert "alpha=" not in capsys.readouterr().out  # nothing was scored
    assert (out / "alpha_0.5" / "analysis.ipynb").read_text() == "{}"


def test_a_nan_in_the_lm_is_refused_naming_the_tensor(eval_world, tmp_path):
    """0 x NaN is NaN: every alpha scored 0.0, alpha = 0 included, and a chosen alpha was
    reported; now the merge stops on loading the LM."""
    from babymerge.model import NonFiniteError

    lm = shutil.copytree(eval_world.lm, tmp_path / "lm")
    tensors = load_file(lm / "model.safetensors")
    tensors["lm_head.weight"][0, 0] = float("nan")
    save_file(tensors, lm / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NonFiniteError, match=r"lm: 1 tensor\(s\) hold NaN or infinite values: "
                                             r"lm_head.weight"):
        merge(MergeConfig(lm=lm, vlm=[eval_world.vlm], task=[eval_world.specs["blimp"]],
                          features=eval_world.features, out=tmp_path / "m", alpha_grid="0,1",
                          keep="none", progress=False))


def test_a_second_merge_into_the_same_out_is_refused(eval_world, tmp_path):
    import os

    from babymerge.config import exclusive

    out = tmp_path / "busy"
    with exclusive(out / ".lock", "merge"):
        with pytest.raises(MergeError, match=rf"another merge run \(PID {os.getpid()}\)"):
            merge(MergeConfig(lm=eval_world.lm, vlm=[eval_world.vlm],
                              task=[eval_world.specs["blimp"]], features=eval_world.features,
                              out=out, alpha_grid="0,1", keep="none", progress=False))
    assert not (out / "metrics.jsonl").exists()


def test_two_torchrun_ranks_share_the_sweep_and_give_one_process_results(eval_world, tmp_path):
    """`torchrun --nproc-per-node 2 babymerge merge`: three VLMs x three alphas, nine points cut
    5/4 (one VLM's grid split between the ranks), each point scored once, one metrics.jsonl, and
    results.json and the kept checkpoints (0.5 of each VLM, and the winner, kept by rank 0 after
    the others finished) as one process gives them."""
    import os
    import subprocess
    import sys

    world = eval_world
    third = make_checkpoint(tmp_path / "vlm3", world.tokenizer, seed=3)
    args = ["merge", "--lm", str(world.lm), "--vlm", str(world.vlm), "--vlm", str(world.base),
            "--vlm", str(third), "--features", str(world.features), "--alpha-grid", "0,0.5,1",
            "--keep", "0.5,chosen", "--bootstrap", "100", "--no-progress", "--device", "cpu"]
    args += [a for spec in world.specs.values() for a in ("-t", spec)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    repo = Path(__file__).resolve().parents[1]
    one = subprocess.run([sys.executable, "-m", "babymerge.cli", *args, "--out",
                          str(tmp_path / "one")], env=env, cwd=repo, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(29500 + os.getpid() % 1000 + 7), "-m",
                          "babymerge.cli", *args, "--out", str(tmp_path / "two")],
                         env=env, cwd=repo, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]

    def comparable(out: Path) -> dict:
        results = json.loads((out / "results.json").read_text())
        results["records"] = [{k: v for k, v in r.items() if not k.endswith("_s")}
                              for r in results["records"]]
        results["kept"] = [str(Path(k).relative_to(out)) for k in results["kept"]]
        return results

    assert comparable(tmp_path / "two") == comparable(tmp_path / "one")
    logged = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").open()]
    assert sorted((r["vlm"], r["alpha"]) for r in logged) == sorted(
        (v, a) for v in ("vlm", "base", "vlm3") for a in (0.0, 0.5, 1.0))
    kept = comparable(tmp_path / "one")["kept"]
    assert len(kept) >= 3
    for k in kept:
        ours = load_file(str(tmp_path / "two" / k / "model.safetensors"))
        theirs = load_file(str(tmp_path / "one" / k / "model.safetensors"))
        assert all(torch.equal(ours[n], theirs[n]) for n in theirs)
