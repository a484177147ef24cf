"""babymerge.evaluate: scoring parity with plain transformers, the eval CLI, task files (every
bad input; files as they come off real disks; the BabyLM evaluation pipeline's own multimodal
records), and the check that the task feature file comes from the model's encoder."""

import json
import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForImageTextToText

from babymerge.cli import main
from babymerge.evaluate import (EvalConfig, TaskError, accuracy, check_feature_dim,
                                check_feature_encoder, evaluate, load_tasks, pack_task,
                                parse_task_spec, read_items, score_candidates)
from babymerge.featurefile import FeatureTable
from babymerge.merge import MergeConfig, merge
from babymerge.model import MODEL_PRESETS, build_model, load_model, save_checkpoint
from fixtures import (FEATURE_DIM, build_world, eval_world, make_tokenizer,  # noqa: F401
                      write_feature_file, write_features, write_jsonl)


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


def test_batched_scores_equal_plain_transformers(eval_world, monkeypatch):
    monkeypatch.setattr("babymerge.evaluate.LOGIT_CHUNK", 7)  # chunk edges inside every batch
    tasks = load_tasks(list(eval_world.specs.values()), eval_world.tokenizer, eval_world.features)
    ours = load_model(eval_world.vlm)
    plain = AutoModelForImageTextToText.from_pretrained(eval_world.vlm).eval()
    for task in tasks:
        path = Path(task.path)
        files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        records = [json.loads(line) for f in files
                   for line in Path(f).read_text().splitlines()][:8]  # the slow side
        ref = direct_scores(plain, eval_world.tokenizer, eval_world.features, task.kind, records)
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


def test_eval_cli_writes_scores(eval_world, tmp_path):
    out = tmp_path / "scores.json"
    args = ["eval", str(eval_world.vlm), "--features", str(eval_world.features), "--out", str(out),
            "--batch-size", "7"] + [a for s in eval_world.specs.values() for a in ("-t", s)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert set(report["scores"]) == {"blimp", "wg", "vqa"}
    assert report["tasks"]["vqa"] == {"kind": "vqa", "chance": 0.25, "items": 8,
                                      "path": eval_world.specs["vqa"].split(":", 1)[1]}
    assert all(0.0 <= s <= 1.0 for s in report["scores"].values())
    # the resolved config: what tells two runs on one model apart
    assert report["config"]["batch_size"] == 7 and report["config"]["dtype"] == "float32"
    assert report["config"]["features"] == str(eval_world.features)
    again = evaluate(EvalConfig(model=eval_world.vlm, task=list(eval_world.specs.values()),
                                features=eval_world.features, batch_size=64))
    assert again["scores"] == report["scores"]  # batch size does not change a score


def test_task_spec_names_and_image_id_fields(tmp_path):
    assert parse_task_spec("minimal_pairs:eval/blimp/").name == "blimp"
    spec = parse_task_spec("wino=winoground:eval/wg.jsonl")
    assert (spec.name, spec.kind, str(spec.path)) == ("wino", "winoground", "eval/wg.jsonl")
    path = write_jsonl(tmp_path / "w.jsonl", [
        {"caption_0": "a cat", "caption_1": "a dog", "image_key": "image_1", "image_idx": 3},
        {"caption_0": "a cat", "caption_1": "a dog", "image_id": 7, "image_key": "image_0"}])
    items = read_items(parse_task_spec(f"winoground:{path}"))
    assert [it.image_id for it in items] == ["ex_3_img_1", "7"]


def _error(eval_world, tmp_path, records, kind="vqa", features="default", raw=None):
    path = tmp_path / "task.jsonl"
    if raw is not None:
        path.write_text(raw)
    else:
        write_jsonl(path, records)
    feats = eval_world.features if features == "default" else features
    with pytest.raises(TaskError) as e:
        load_tasks([f"{kind}:{path}"], eval_world.tokenizer, feats)
    return str(e.value)


VQA = {"question": "what color is the ball ?", "target_ans": "red", "distractors": ["blue"],
       "image_id": "img0"}


def test_malformed_lines_name_file_and_line(eval_world, tmp_path):
    msg = _error(eval_world, tmp_path, None, raw=json.dumps(VQA) + "\n\n{not json\n")
    assert "task.jsonl:3" in msg and "not valid JSON" in msg
    msg = _error(eval_world, tmp_path, None, raw=json.dumps(VQA) + "\n[1, 2]\n")
    assert "task.jsonl:2" in msg and "JSON object" in msg
    msg = _error(eval_world, tmp_path, [VQA, {**VQA, "target_ans": ""}])
    assert "task.jsonl:2" in msg and "'target_ans'" in msg
    msg = _error(eval_world, tmp_path, [{**VQA, "distractors": "blue"}])
    assert "task.jsonl:1" in msg and "'distractors'" in msg
    msg = _error(eval_world, tmp_path, [{k: v for k, v in VQA.items() if k != "image_id"}])
    assert "task.jsonl:1" in msg and "no image id" in msg
    for lone in ({"image_idx": 3}, {"image_key": "image_0"}):  # half of Winoground's pair
        msg = _error(eval_world, tmp_path, [{**{k: v for k, v in VQA.items() if k != "image_id"},
                                        **lone}])
        assert "task.jsonl:1" in msg and "'image_idx' with 'image_key'" in msg
    msg = _error(eval_world, tmp_path,
                 [{**VQA, "image_id": None, "image_idx": 3, "image_key": "k"}])
    assert "task.jsonl:1" in msg and "image_key 'k'" in msg
    msg = _error(eval_world, tmp_path, [{"sentence_good": "the cat sees"}], kind="minimal_pairs")
    assert "task.jsonl:1" in msg and "'sentence_bad'" in msg


def test_unknown_image_ids_listed(eval_world, tmp_path):
    msg = _error(eval_world, tmp_path,
                 [VQA, {**VQA, "image_id": "nope1"}, {**VQA, "image_id": "nope2"}])
    assert "2 image id(s)" in msg and "nope1" in msg and "nope2" in msg and "task.jsonl" in msg


def test_empty_tasks_and_bad_specs(eval_world, tmp_path):
    assert "no items" in _error(eval_world, tmp_path, None, raw="\n\n")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TaskError, match="no .jsonl files"):
        load_tasks([f"minimal_pairs:{tmp_path / 'empty'}"], eval_world.tokenizer,
                   eval_world.features)
    with pytest.raises(TaskError, match="does not exist"):
        load_tasks([f"vqa:{tmp_path / 'missing.jsonl'}"], eval_world.tokenizer, eval_world.features)
    for bad in ["blimp.jsonl", "grammar:x.jsonl", "=vqa:x.jsonl", "vqa:"]:
        with pytest.raises(TaskError, match="KIND:PATH"):
            parse_task_spec(bad)
    with pytest.raises(TaskError, match="duplicate task name"):
        load_tasks([eval_world.specs["wg"], eval_world.specs["wg"]], eval_world.tokenizer,
                   eval_world.features)
    with pytest.raises(TaskError, match="--features"):
        load_tasks([eval_world.specs["blimp"]], eval_world.tokenizer, None)
    with pytest.raises(TaskError, match="--features: feature file not found"):
        load_tasks([eval_world.specs["blimp"]], eval_world.tokenizer, tmp_path / "none.h5")
    bare = shutil.copytree(eval_world.vlm, tmp_path / "bare")
    (bare / "tokenizer.json").unlink()
    with pytest.raises(TaskError, match="MODEL: .* no tokenizer.json"):
        evaluate(EvalConfig(model=bare, task=[eval_world.specs["blimp"]],
                            features=eval_world.features))
    with pytest.raises(ValueError, match="--task"):
        EvalConfig(model=eval_world.vlm, task=[])
    res = CliRunner().invoke(main, ["eval", str(eval_world.vlm), "-t", "nokind:x.jsonl"])
    assert res.exit_code == 2 and "KIND:PATH" in res.output


def test_too_long_and_wrong_feature_dim(eval_world, tmp_path):
    with pytest.raises(TaskError, match="exceed the model's 5 positions"):
        load_tasks([eval_world.specs["blimp"]], eval_world.tokenizer, eval_world.features,
                   max_positions=5)
    other = write_features(tmp_path / "f32.h5", [f"img{i}" for i in range(8)], dim=FEATURE_DIM * 2)
    tasks = load_tasks([eval_world.specs["wg"]], eval_world.tokenizer, other)
    with pytest.raises(TaskError, match="dimension 32 but the model's projector expects 16"):
        check_feature_dim(load_model(eval_world.vlm), tasks)


def test_progress_bar_counts_items(eval_world, capsys):
    """The bar advances per scored sequence but reads in items (8 VQA items, 32 candidates)."""
    task = load_tasks([eval_world.specs["vqa"]], eval_world.tokenizer, eval_world.features)[0]
    score_candidates(load_model(eval_world.vlm), task, batch_size=16, progress=True)
    err = capsys.readouterr().err
    assert "/8.0" in err and "item/s" in err
    # no candidates at all (ImageTextModel.score with no texts): an empty result, not a crash
    empty = pack_task(parse_task_spec("vqa:none.jsonl"), [1, 4], [[]], [[]], ["none"], [0],
                      task.features)
    assert score_candidates(load_model(eval_world.vlm), empty, progress=True).numel() == 0


def test_no_progress_is_silent(eval_world, tmp_path, capfd):
    """--no-progress leaves nothing on stderr: neither our bars nor transformers' own."""
    result = CliRunner().invoke(main, ["eval", str(eval_world.vlm), *sum((["--task", s] for s in
                                       eval_world.specs.values()), []), "--features",
                                       str(eval_world.features), "--no-progress", "--device",
                                       "cpu"])
    assert result.exit_code == 0, result.output
    err = capfd.readouterr().err + result.stderr  # tqdm writes to the runner's stderr
    assert "it/s" not in err and "%|" not in err, err


# ---------------------------------------------------------------------------------------------
# Task files as they come off real disks: macOS ._NAME.jsonl twins in a copied folder, a file
# that is not UTF-8, a byte-order mark

PAIR = {"sentence_good": "the cat sees a dog .", "sentence_bad": "the cat see a dog .",
        "UID": "agreement", "field": "morphology", "linguistics_term": "agreement"}


def test_hidden_twins_skipped_and_bad_bytes_named(tmp_path):
    folder = tmp_path / "blimp_filtered"
    write_jsonl(folder / "agreement.jsonl", [PAIR, PAIR])
    # AppleDouble metadata: binary, never a task file
    (folder / "._agreement.jsonl").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00\xff\xfe")
    items = read_items(parse_task_spec(f"minimal_pairs:{folder}"))
    assert len(items) == 2 and {it.group for it in items} == {"agreement"}
    (folder / "latin1.jsonl").write_bytes(
        b'{"sentence_good": "caf\xe9 .", "sentence_bad": "caf\xe9 caf\xe9 ."}\n')
    with pytest.raises(TaskError, match=r"latin1.jsonl:1: not UTF-8"):
        read_items(parse_task_spec(f"minimal_pairs:{folder}"))


def test_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "bom.jsonl"
    write_jsonl(path, [PAIR])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    tok = make_tokenizer(tmp_path / "tok")
    task = load_tasks([f"minimal_pairs:{path}"], tok, write_features(tmp_path / "f.h5", ["x"]))[0]
    assert task.num_items == 1


# ---------------------------------------------------------------------------------------------
# The BabyLM evaluation pipeline's own multimodal jsonl records, as its read_files.py decodes
# them: Winoground (image_idx + image_key into facebook/winoground, no image_id) and VQA
# (idx_in_hf_dataset, the COCO image_id, question_id, seven distractors)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def test_pipeline_winoground_items_get_their_own_image(tok, tmp_path):
    """One line per (example, image) with image_idx/image_key: each line's feature is the image
    ex_<idx>_img_<k> (Winoground's own file stem), not one feature per image_key value."""
    lines = []
    for idx in range(2):
        for k in range(2):
            caps = ["a red cat", "a cat red"] if k == 0 else ["a cat red", "a red cat"]
            lines.append({"caption_0": caps[0], "caption_1": caps[1], "tag": "Object",
                          "secondary_tag": "", "collapsed_tag": "Object", "image_idx": idx,
                          "image_key": f"image_{k}"})
    path = write_jsonl(tmp_path / "winoground_filtered" / "winoground.jsonl", lines)
    ids = ["ex_0_img_0", "ex_0_img_1", "ex_1_img_0", "ex_1_img_1", "262148"]
    features = write_features(tmp_path / "eval.h5", ids)
    task = load_tasks([f"winoground:{path}"], tok, features)[0]
    table = FeatureTable(features)
    per_item = task.features[task.feature_rows[task.item_start[:-1]]]
    assert torch.equal(per_item, table.lookup(ids[:4]))
    assert len(torch.unique(per_item, dim=0)) == 4


def test_pipeline_vqa_items_use_the_coco_image_id(tok, tmp_path):
    rec = {"idx_in_hf_dataset": 5, "target_ans": "red", "question": "what color is the ball ?",
           "distractors": ["blue", "green", "yellow", "cat", "dog", "2", "no"],
           "image_id": 262148, "question_id": 262148000}
    path = write_jsonl(tmp_path / "vqa_filtered" / "vqa.jsonl", [rec])
    ids = ["ex_0_img_0", "262148"]
    features = write_features(tmp_path / "eval.h5", ids)
    task = load_tasks([f"vqa:{path}"], tok, features)[0]
    assert task.chance == pytest.approx(1 / 8) and task.num_items == 1
    assert torch.equal(task.features[task.feature_rows],
                       FeatureTable(features).lookup(["262148"] * 8))


def test_image_tasks_read_only_their_rows_of_a_large_feature_file(tok, tmp_path):
    """--features may be one file with every training image too (millions of rows): an image
    task reads its own images' rows, not the whole /features into memory."""
    import tracemalloc

    ids = [f"img{i}" for i in range(2000)]
    features = write_features(tmp_path / "all.h5", ids, dim=4096)  # 16 MB of fp16 rows
    recs = [{"caption_0": "a red cat", "caption_1": "a cat red", "image_id": f"img{i}"}
            for i in (7, 1500)]
    path = write_jsonl(tmp_path / "wg.jsonl", recs)
    tracemalloc.start()
    try:
        task = load_tasks([f"winoground:{path}"], tok, features)[0]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"{peak / 2**20:.1f} MiB held to prepare 2 images"
    assert torch.equal(task.features, FeatureTable(features).lookup(["img7", "img1500"]))


# ---------------------------------------------------------------------------------------------
# The feature encoder check: eval and merge warn when the task feature file comes from another
# encoder than the model's (encoders of one width pass the width check; their features mean
# nothing to the projector)


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


SNAPSHOT = ("/scratch/hf/hub/models--facebook--dinov2-large/snapshots/"
            "47b73eefe95e8d44ec3623f8890bd894b6ea2d6c")


def test_hub_cache_snapshot_is_the_hub_model(checkpoint, tmp_path):
    """An encoder given as its hub cache snapshot folder (what offline clusters point --encoder
    at: .../models--facebook--dinov2-large/snapshots/<commit>) is the hub model it caches; its
    last path part is a commit hash, which warned against the hub id."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_feature_encoder(checkpoint, feature_file(tmp_path / "f.h5", SNAPSHOT)) is None
        assert check_feature_encoder(checkpoint,
                                     feature_file(tmp_path / "g.h5", SNAPSHOT + "/")) is None
    other = SNAPSHOT.replace("dinov2-large", "dinov2-with-registers-large")
    with pytest.warns(UserWarning, match="dinov2-with-registers-large"):
        check_feature_encoder(checkpoint, feature_file(tmp_path / "h.h5", other))
