"""babymerge eval: scoring parity with plain transformers, the CLI, and every bad input."""

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from evalmerge_fixtures import FEATURE_DIM, build_world, write_features, write_jsonl
from transformers import AutoModelForImageTextToText

from babymerge.cli import main
from babymerge.evaluate import (EvalConfig, TaskError, accuracy, check_feature_dim, evaluate,
                                load_tasks, pack_task, parse_task_spec, read_items,
                                score_candidates)
from babymerge.model import load_model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("evalworld"))


def direct_scores(model, tok, features_path, kind, records):
    """Per-sentence log-prob sums the plain way: one sequence at a time, full logits,
    log_softmax."""
    with h5py.File(features_path) as f:
        ids = [s.decode() for s in f["ids"][:]]
        feats = torch.from_numpy(np.asarray(f["features"][:], dtype=np.float32))
        black = torch.from_numpy(np.asarray(f["black"][:], dtype=np.float32))
    prefix = [tok.bos_token_id, tok.convert_tokens_to_ids("<image>")]
    out = []
    for rec in records:
        if kind == "minimal_pairs":
            cands, ctx, feat = [rec["sentence_good"], rec["sentence_bad"]], "", black
        elif kind == "winoground":
            cands, ctx, feat = [rec["caption_0"], rec["caption_1"]], "", None
        else:
            cands, ctx, feat = [rec["target_ans"], *rec["distractors"]], rec["question"], None
        if feat is None:
            feat = feats[ids.index(rec["image_id"])]
        ctx_ids = tok(ctx, add_special_tokens=False)["input_ids"] if ctx else []
        for cand in cands:
            whole = tok(f"{ctx} {cand}" if ctx else cand, add_special_tokens=False)["input_ids"]
            seq = torch.tensor([prefix + ctx_ids + whole[len(ctx_ids):]])
            with torch.no_grad():
                logp = model(input_ids=seq, pixel_values=feat[None]).logits.log_softmax(-1)[0]
            first = len(prefix) + len(ctx_ids)
            out.append(sum(logp[t - 1, seq[0, t]].item() for t in range(first, seq.shape[1])))
    return torch.tensor(out, dtype=torch.float64)


def test_batched_scores_equal_plain_transformers(world, monkeypatch):
    monkeypatch.setattr("babymerge.evaluate.LOGIT_CHUNK", 7)  # chunk edges inside every batch
    tasks = load_tasks(list(world.specs.values()), world.tokenizer, world.features)
    ours = load_model(world.vlm)
    plain = AutoModelForImageTextToText.from_pretrained(world.vlm).eval()
    for task in tasks:
        path = Path(task.path)
        files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        records = [json.loads(line) for f in files for line in open(f)][:8]  # the slow side
        ref = direct_scores(plain, world.tokenizer, world.features, task.kind, records)
        # batch 5: several padded, length-mixed batches
        got = score_candidates(ours, task, batch_size=5, progress=False)
        assert torch.allclose(got[:len(ref)], ref, atol=1e-4), task.name
        wins = [float(got[s] > got[s + 1:e].max()) for s, e in
                zip(task.item_start[:-1].tolist(), task.item_start[1:].tolist(), strict=True)]
        acc = accuracy(task, got)
        if task.kind == "minimal_pairs":  # macro over UIDs: the file stem, or the UID field
            assert set(acc["groups"]) == {"agreement", "order"}
            assert acc["accuracy"] == pytest.approx(np.mean(list(acc["groups"].values())))
        else:
            assert acc["accuracy"] == pytest.approx(np.mean(wins))
    assert [t.chance for t in tasks] == [0.5, 0.5, 0.25]


def test_eval_cli_writes_scores(world, tmp_path):
    out = tmp_path / "scores.json"
    args = ["eval", str(world.vlm), "--features", str(world.features), "--out", str(out),
            "--batch-size", "7"] + [a for s in world.specs.values() for a in ("-t", s)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert set(report["scores"]) == {"blimp", "wg", "vqa"}
    assert report["tasks"]["vqa"] == {"kind": "vqa", "chance": 0.25, "items": 8,
                                      "path": world.specs["vqa"].split(":", 1)[1]}
    assert all(0.0 <= s <= 1.0 for s in report["scores"].values())
    # the resolved config: what tells two runs on one model apart
    assert report["config"]["batch_size"] == 7 and report["config"]["dtype"] == "float32"
    assert report["config"]["features"] == str(world.features)
    again = evaluate(EvalConfig(model=world.vlm, task=list(world.specs.values()),
                                features=world.features, batch_size=64))
    assert again["scores"] == report["scores"]  # batch size does not change a score


def test_task_spec_names_and_image_id_fields(world, tmp_path):
    assert parse_task_spec("minimal_pairs:eval/blimp/").name == "blimp"
    spec = parse_task_spec("wino=winoground:eval/wg.jsonl")
    assert (spec.name, spec.kind, str(spec.path)) == ("wino", "winoground", "eval/wg.jsonl")
    path = write_jsonl(tmp_path / "w.jsonl", [
        {"caption_0": "a cat", "caption_1": "a dog", "image_key": "image_1", "image_idx": 3},
        {"caption_0": "a cat", "caption_1": "a dog", "image_id": 7, "image_key": "image_0"}])
    items = read_items(parse_task_spec(f"winoground:{path}"))
    assert [it.image_id for it in items] == ["ex_3_img_1", "7"]


def _error(world, tmp_path, records, kind="vqa", features="default", raw=None):
    path = tmp_path / "task.jsonl"
    if raw is not None:
        path.write_text(raw)
    else:
        write_jsonl(path, records)
    feats = world.features if features == "default" else features
    with pytest.raises(TaskError) as e:
        load_tasks([f"{kind}:{path}"], world.tokenizer, feats)
    return str(e.value)


VQA = {"question": "what color is the ball ?", "target_ans": "red", "distractors": ["blue"],
       "image_id": "img0"}


def test_malformed_lines_name_file_and_line(world, tmp_path):
    msg = _error(world, tmp_path, None, raw=json.dumps(VQA) + "\n\n{not json\n")
    assert "task.jsonl:3" in msg and "not valid JSON" in msg
    msg = _error(world, tmp_path, None, raw=json.dumps(VQA) + "\n[1, 2]\n")
    assert "task.jsonl:2" in msg and "JSON object" in msg
    msg = _error(world, tmp_path, [VQA, {**VQA, "target_ans": ""}])
    assert "task.jsonl:2" in msg and "'target_ans'" in msg
    msg = _error(world, tmp_path, [{**VQA, "distractors": "blue"}])
    assert "task.jsonl:1" in msg and "'distractors'" in msg
    msg = _error(world, tmp_path, [{k: v for k, v in VQA.items() if k != "image_id"}])
    assert "task.jsonl:1" in msg and "no image id" in msg
    for lone in ({"image_idx": 3}, {"image_key": "image_0"}):  # half of Winoground's pair
        msg = _error(world, tmp_path, [{**{k: v for k, v in VQA.items() if k != "image_id"},
                                        **lone}])
        assert "task.jsonl:1" in msg and "'image_idx' with 'image_key'" in msg
    msg = _error(world, tmp_path, [{**VQA, "image_id": None, "image_idx": 3, "image_key": "k"}])
    assert "task.jsonl:1" in msg and "image_key 'k'" in msg
    msg = _error(world, tmp_path, [{"sentence_good": "the cat sees"}], kind="minimal_pairs")
    assert "task.jsonl:1" in msg and "'sentence_bad'" in msg


def test_unknown_image_ids_listed(world, tmp_path):
    msg = _error(world, tmp_path, [VQA, {**VQA, "image_id": "nope1"}, {**VQA, "image_id": "nope2"}])
    assert "2 image id(s)" in msg and "nope1" in msg and "nope2" in msg and "task.jsonl" in msg


def test_empty_tasks_and_bad_specs(world, tmp_path):
    assert "no items" in _error(world, tmp_path, None, raw="\n\n")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TaskError, match="no .jsonl files"):
        load_tasks([f"minimal_pairs:{tmp_path / 'empty'}"], world.tokenizer, world.features)
    with pytest.raises(TaskError, match="does not exist"):
        load_tasks([f"vqa:{tmp_path / 'missing.jsonl'}"], world.tokenizer, world.features)
    for bad in ["blimp.jsonl", "grammar:x.jsonl", "=vqa:x.jsonl", "vqa:"]:
        with pytest.raises(TaskError, match="KIND:PATH"):
            parse_task_spec(bad)
    with pytest.raises(TaskError, match="duplicate task name"):
        load_tasks([world.specs["wg"], world.specs["wg"]], world.tokenizer, world.features)
    with pytest.raises(TaskError, match="--features"):
        load_tasks([world.specs["blimp"]], world.tokenizer, None)
    with pytest.raises(TaskError, match="--features: feature file not found"):
        load_tasks([world.specs["blimp"]], world.tokenizer, tmp_path / "none.h5")
    bare = shutil.copytree(world.vlm, tmp_path / "bare")
    (bare / "tokenizer.json").unlink()
    with pytest.raises(TaskError, match="MODEL: .* no tokenizer.json"):
        evaluate(EvalConfig(model=bare, task=[world.specs["blimp"]], features=world.features))
    with pytest.raises(ValueError, match="--task"):
        EvalConfig(model=world.vlm, task=[])
    res = CliRunner().invoke(main, ["eval", str(world.vlm), "-t", "nokind:x.jsonl"])
    assert res.exit_code == 2 and "KIND:PATH" in res.output


def test_too_long_and_wrong_feature_dim(world, tmp_path):
    with pytest.raises(TaskError, match="exceed the model's 5 positions"):
        load_tasks([world.specs["blimp"]], world.tokenizer, world.features, max_positions=5)
    other = write_features(tmp_path / "f32.h5", [f"img{i}" for i in range(8)], dim=FEATURE_DIM * 2)
    tasks = load_tasks([world.specs["wg"]], world.tokenizer, other)
    with pytest.raises(TaskError, match="dimension 32 but the model's projector expects 16"):
        check_feature_dim(load_model(world.vlm), tasks)


def test_progress_bar_counts_items(world, capsys):
    """The bar advances per scored sequence but reads in items (8 VQA items, 32 candidates)."""
    task = load_tasks([world.specs["vqa"]], world.tokenizer, world.features)[0]
    score_candidates(load_model(world.vlm), task, batch_size=16, progress=True)
    err = capsys.readouterr().err
    assert "/8.0" in err and "item/s" in err
    # no candidates at all (ImageTextModel.score with no texts): an empty result, not a crash
    empty = pack_task(parse_task_spec("vqa:none.jsonl"), [1, 4], [[]], [[]], ["none"], [0],
                      task.features)
    assert score_candidates(load_model(world.vlm), empty, progress=True).numel() == 0


def test_no_progress_is_silent(world, tmp_path, capfd):
    """--no-progress leaves nothing on stderr: neither our bars nor transformers' own."""
    result = CliRunner().invoke(main, ["eval", str(world.vlm), *sum((["--task", s] for s in
                                       world.specs.values()), []), "--features",
                                       str(world.features), "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    err = capfd.readouterr().err + result.stderr  # tqdm writes to the runner's stderr
    assert "it/s" not in err and "%|" not in err, err
