"""babymerge.demo: `babymerge demo` end to end at tiny scale, the pieces of its report (the
finding sentence and the intervals it reads), a rerun into a finished folder, and a rerun into a
folder of another demo: refused up front, nothing overwritten."""

import contextlib
import dataclasses
import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from babymerge.cli import main
from babymerge.config import InputError, save_config
from babymerge.demo import (SCALES, DemoConfig, _check_demo_folder, _check_same_demo, demo,
                            finding)
from babymerge.evaluate import evaluate_tasks, load_tasks
from babymerge.featurefile import FeatureTable
from babymerge.model import load_model
from babymerge.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The tiny demo with --no-progress, and what it wrote to stderr."""
    out = tmp_path_factory.mktemp("demo")
    with contextlib.redirect_stderr(io.StringIO()) as err:
        rep = demo(DemoConfig(out=out, scale="tiny", progress=False))
    return rep, out, err.getvalue()


@pytest.fixture(scope="module")
def report(demo_run):
    return demo_run[:2]


def test_no_progress_draws_no_bar(demo_run):
    # the world's, extraction's, training's and evaluation's bars, and transformers' own
    assert "it/s" not in demo_run[2] and "/s]" not in demo_run[2], demo_run[2][-2000:]


def test_demo_end_to_end_shows_what_the_paper_needs(report):
    rep, out = report
    results = json.loads((out / "merge" / "results.json").read_text())
    assert [r["alpha"] for r in results["records"]] == [round(0.1 * i, 1) for i in range(11)]
    tasks = results["tasks"]
    kinds = {t["kind"] for t in tasks.values()}
    assert kinds == {"minimal_pairs", "winoground", "vqa", "ewok"}  # EWoK: the pipeline's format
    ewok = json.loads(Path(tasks[next(n for n, t in tasks.items() if t["kind"] == "ewok")]["path"])
                      .read_text().splitlines()[0])
    assert {"Context1", "Context2", "Target1", "Target2", "Domain"} <= set(ewok)
    by_alpha = {r["alpha"]: r["scores"] for r in results["records"]}
    vlm, lm = by_alpha[0.0], by_alpha[1.0]
    name = {t["kind"]: n for n, t in tasks.items()}
    # the LM learned grammar from text: clearly above the 50% of a coin
    assert lm[name["minimal_pairs"]] >= 0.6, lm
    assert set(vlm) == set(lm) == set(tasks)

    # the report: every stage timed, the random encoder labelled, the plot and one verdict
    assert set(rep["stages"]) == {"world", "encoder", "extract-features", "tokenizer",
                                  "train lm", "train vlm", "merge"}
    assert all(s["seconds"] >= 0 for s in rep["stages"].values())
    assert "randomly initialised" in rep["encoder"]
    assert Path(rep["plot"]).is_file()
    text = (out / "report.txt").read_text()
    assert rep["finding"] in text and "paper's finding" in rep["finding"]
    assert "0 VLM" in text and "1 LM" in text and "alpha_curve.png" in text


@pytest.mark.parametrize("kind", ["winoground", "vqa"])
def test_demo_vlm_beats_chance_and_lm_with_the_image(report, kind):
    results = json.loads((report[1] / "merge" / "results.json").read_text())
    name = next(n for n, t in results["tasks"].items() if t["kind"] == kind)
    by_alpha = {r["alpha"]: r["scores"][name] for r in results["records"]}
    assert by_alpha[0.0] > results["tasks"][name]["chance"] + 0.05
    assert by_alpha[0.0] > by_alpha[1.0]
    # ... and through the image, not a caption prior: with every image's feature replaced by
    # another image's, the same VLM scores lower.
    out = report[1]
    task = results["tasks"][name]
    spec = f"{name}={kind}:{task['path']}"
    vlm = load_model(out / "vlm")
    table = FeatureTable(out / "features.h5")
    right = evaluate_tasks(vlm, load_tasks([spec], load_tokenizer(out / "vlm"), table),
                           progress=False)[name]["score"]
    table.features = table.features[torch.randperm(len(table), generator=torch.Generator()
                                                   .manual_seed(0))]
    shuffled = evaluate_tasks(vlm, load_tasks([spec], load_tokenizer(out / "vlm"), table),
                              progress=False)[name]["score"]
    logged = next(json.loads(line) for line in (out / "merge" / "metrics.jsonl").open()
                  if json.loads(line)["alpha"] == 0.0)  # every item; results show the report half
    assert right == pytest.approx(logged["scores"][name])
    assert right > shuffled + 0.05


def _results(grammar, multimodal, noise=0.02, alphas=(0.0, 0.5, 1.0), selection=None):
    """results.json of a sweep (VLM, merges, LM) whose intervals are each difference +- noise;
    ``selection``: {alpha: (grammar, multimodal)} of the selection half (default: the same)."""
    recs = [{"alpha": a, "grammar": g, "multimodal": m, "scores": {"g": g, "w": m}}
            for a, g, m in zip(alphas, grammar, multimodal)]
    for r in recs:
        g, m = (selection or {}).get(r["alpha"], (r["grammar"], r["multimodal"]))
        r["selection"] = {"grammar": g, "multimodal": m}
    for r in recs:
        r["intervals"] = {f"vs_{w}": {k: {"diff": r[k] - e[k], "low": r[k] - e[k] - noise,
                                          "high": r[k] - e[k] + noise}
                                      for k in ("grammar", "multimodal")}
                          for w, e in (("vlm", recs[0]), ("lm", recs[-1]))}
    return {"records": recs}


def test_finding_sentence_follows_the_intervals():
    holds, text = finding(_results((0.60, 0.70, 0.75), (0.70, 0.69, 0.55)))
    assert holds and "holds on this run" in text and "alpha = 0.5" in text, text
    assert "recovers 67% of the gap" in text and "keeping 93% of the multimodal lead" in text
    holds, text = finding(_results((0.80, 0.78, 0.75), (0.70, 0.69, 0.55)))
    assert not holds and "not weaker on grammar" in text
    # the merge improves grammar but gives up the multimodal lead
    holds, text = finding(_results((0.60, 0.70, 0.75), (0.70, 0.55, 0.55)))
    assert not holds and "only in part" in text


def test_finding_is_not_claimed_on_a_gap_within_the_noise():
    # the small scale's numbers (2026-11-27): 0.9914 vs 0.9964 on 1,400 pairs, 7 pairs; it was
    # reported as the paper's finding
    holds, text = finding(_results((0.9914, 0.9943, 0.9964), (0.6083, 0.6117, 0.3867),
                                   noise=0.006, alphas=(0.0, 0.1, 1.0)))
    assert not holds and "cannot be seen" in text and "includes 0" in text
    # a clear gap, but a merge 0.003 above the VLM does not "recover" it
    holds, text = finding(_results((0.90, 0.903, 0.95), (0.61, 0.61, 0.39), noise=0.01))
    assert not holds and "only in part" in text
    holds, text = finding(_results((0.90, 0.93, 0.95), (0.61, 0.61, 0.39), noise=0.01))
    assert holds and "recovers 60% of the gap" in text


def test_finding_judges_the_merge_the_selection_half_picked():
    """The merge is chosen on the selection items and judged on the report items: alpha 0.6
    looks best on the report half, but the selection half picked 0.3, which is the one named."""
    results = _results((0.60, 0.66, 0.72, 0.75), (0.70, 0.68, 0.66, 0.55),
                       alphas=(0.0, 0.3, 0.6, 1.0),
                       selection={0.3: (0.71, 0.68), 0.6: (0.65, 0.66)})
    holds, text = finding(results)
    assert holds and "alpha = 0.3" in text, text


def test_cli_and_bad_scale():
    res = CliRunner().invoke(main, ["demo", "--help"])
    assert res.exit_code == 0 and "--scale" in res.output and "tiny" in res.output
    res = CliRunner().invoke(main, ["demo", "--scale", "huge"])
    assert res.exit_code != 0 and "huge" in res.output
    with pytest.raises(ValueError, match="--scale"):
        DemoConfig(scale="huge")


def test_demo_rerun_into_a_finished_folder_reuses_every_stage(report):
    """A second `babymerge demo` into the same --out completes with the same results: training,
    extraction and the merge are reused (no rate: they did no work now), not divided by ~0 s."""
    first, out = report
    assert first["stages"]["train lm"]["tokens_per_s"] > 0
    assert not any(s.get("reused") for s in first["stages"].values())
    results = (out / "merge" / "results.json").read_text()
    again = demo(DemoConfig(out=out, scale="tiny", progress=False))
    for name in ("extract-features", "train lm", "train vlm", "merge"):
        assert again["stages"][name]["reused"], name
    assert again["stages"]["train vlm"]["tokens_per_s"] is None
    assert again["stages"]["train vlm"]["tokens"] == first["stages"]["train vlm"]["tokens"]
    assert again["stages"]["merge"]["items_per_s"] is None
    assert again["stages"]["extract-features"]["images"] == first["stages"]["extract-features"][
        "images"]
    assert (out / "merge" / "results.json").read_text() == results
    assert again["finding"] == first["finding"]
    assert "reused" in (out / "report.txt").read_text()


def test_bench_pipeline_refuses_a_used_out(report, capsys):
    """The demo reuses what a run left in --out: a benchmark there would time nothing."""
    _, out = report
    spec = importlib.util.spec_from_file_location("bench_pipeline",
                                                  ROOT / "scripts" / "bench_pipeline.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--quick", "--out", str(out)])
    assert exit_info.value.code == 2
    assert f"--out {out} is not an empty folder" in capsys.readouterr().err


def test_demo_refuses_a_folder_of_another_scale_or_seed(tmp_path):
    # what a finished or interrupted `babymerge demo --scale tiny --out tmp_path` leaves first
    save_config(DemoConfig(out=tmp_path, scale="tiny"), tmp_path / "demo_config.json",
                scale_settings=dataclasses.asdict(SCALES["tiny"]))
    with pytest.raises(InputError, match="--scale tiny -> small"):
        demo(DemoConfig(out=tmp_path, scale="small", progress=False))
    with pytest.raises(InputError, match="--seed 0 -> 3"):
        demo(DemoConfig(out=tmp_path, scale="tiny", seed=3, progress=False))
    # refused before the world (and the tokenizer) were regenerated for the new settings
    assert not (tmp_path / "world").exists()
    # the same settings resume; another device or progress bar is the same run
    _check_same_demo(tmp_path / "demo_config.json",
                     DemoConfig(out=tmp_path, scale="tiny", device="cpu", progress=False),
                     SCALES["tiny"])
    # a custom scale under a preset's name (scripts/bench_pipeline.py --quick) is another run
    quick = dataclasses.replace(SCALES["tiny"], lm_epochs=1)
    with pytest.raises(InputError, match="other settings"):
        _check_same_demo(tmp_path / "demo_config.json", DemoConfig(out=tmp_path, scale="tiny"),
                         quick)


def test_demo_never_writes_over_a_folder_or_file_it_did_not_start(tmp_path):
    """--out with files of the user's (a world/ of their own would be written over) or an
    existing file: one error, nothing written; an empty folder is used."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "world").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"holds files no demo wrote \(notes.txt, world\)"):
        demo(DemoConfig(out=tmp_path / "mine", scale="tiny", progress=False))
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt", "world"]
    assert not any((tmp_path / "mine" / "world").iterdir())
    (tmp_path / "file").write_text("mine")
    with pytest.raises(InputError, match="a file, not a folder"):
        demo(DemoConfig(out=tmp_path / "file", scale="tiny", progress=False))
    assert (tmp_path / "file").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    _check_demo_folder(tmp_path / "empty")


def test_the_vlm_reads_the_text_its_captions_leave_of_the_lms_budget(tmp_path):
    """As in the paper (50M text + 50M caption words), half of the VLM's words may be captions:
    it reads a prefix of the LM's text whose words and the captions' add up to the LM's."""
    from types import SimpleNamespace

    from babymerge.demo import _vlm_text

    world = SimpleNamespace(corpus=tmp_path / "text" / "corpus.txt",
                            captions=tmp_path / "captions.jsonl")
    world.corpus.parent.mkdir()
    lines = [f"sentence number {i} has six words." for i in range(100)]  # 600 words
    world.corpus.write_text("\n".join(lines) + "\n")
    world.captions.write_text("".join(json.dumps({"image_id": str(i), "caption": "red circles."})
                                      + "\n" for i in range(120)))  # 240 words
    text = _vlm_text(SCALES["small"], world)
    kept = text.read_text().splitlines()
    assert kept == lines[:60] and text != world.corpus  # 360 + 240 = 600 words
    assert _vlm_text(dataclasses.replace(SCALES["small"], vlm_text="all"), world) == world.corpus
    world.captions.write_text("".join(json.dumps({"image_id": str(i), "caption": "a b c d e f"})
                                      + "\n" for i in range(100)))  # as many words as the text
    with pytest.raises(ValueError, match="exceed the text's"):
        _vlm_text(SCALES["small"], world)


def test_demo_training_saves_its_resume_state_during_the_run(tmp_path):
    """An interrupted demo resumes training from the last save, not from step 0: the demo's
    train configs save the resume state periodically (the tiny VLM alone runs ~640 steps)."""
    from types import SimpleNamespace

    from babymerge.demo import _train_config

    world = SimpleNamespace(corpus=tmp_path / "corpus.txt", captions=tmp_path / "captions.jsonl")
    world.corpus.write_text("the dog sees a cat.\n" * 20)
    world.captions.write_text('{"image_id": "a", "caption": "two red circles."}\n')
    (tmp_path / "features.h5").write_text("x\n")
    for kind in ("lm", "vlm"):
        cfg = _train_config(DemoConfig(out=tmp_path, scale="tiny"), SCALES["tiny"], kind,
                            tmp_path, world, tmp_path / "features.h5", tmp_path / "tok")
        assert 0 < cfg.save_every <= 200, (kind, cfg.save_every)
