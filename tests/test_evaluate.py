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
from babymerge.evaluate import (EvalConfig, check_feature_dim, check_feature_encoder, evaluate,
                                load_tasks, pack_task, score_candidates, task_score)
from babymerge.tasks import TaskError, parse_task_spec
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
        # the first maximum wins: a tie counts for the gold candidate
        wins = [float(got[s] >= got[s + 1:e].max()) for s, e in
                zip(task.item_start[:-1].tolist(), task.item_start[1:].tolist(), strict=True)]
        acc = task_score(task, got)
        if task.kind == "minimal_pairs":  # macro over UIDs: the file stem, or the UID field
            assert set(acc["groups"]) == {"agreement", "order"}
            assert acc["score"] == pytest.approx(np.mean(list(acc["groups"].values())))
        else:
            assert acc["score"] == pytest.approx(np.mean(wins))
    assert [t.chance for t in tasks] == [0.5, 0.5, 0.25]


def test_eval_cli_writes_scores(eval_world, tmp_path):
    out = tmp_path / "scores.json"
    args = ["eval", str(eval_world.vlm), "--features", str(eval_world.features), "--out", str(out),
            "--batch-size", "7"] + [a for s in eval_world.specs.values() for a in ("-t", s)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert set(report["scores"]) == {"blimp", "wg", "vqa"}
    assert report["tasks"]["vqa"] == {"kind": "vqa", "metric": "accuracy", "chance": 0.25,
                                      "items": 8,
                                      "path": eval_world.specs["vqa"].split(":", 1)[1]}
    assert all(0.0 <= s <= 1.0 for s in report["scores"].values())
    # the resolved config: what tells two runs on one model apart
    assert report["config"]["batch_size"] == 7 and report["config"]["dtype"] == "float32"
    assert report["config"]["features"] == str(eval_world.features)
    again = evaluate(EvalConfig(model=eval_world.vlm, task=list(eval_world.specs.values()),
                                features=eval_world.features, batch_size=64))
    assert again["scores"] == report["scores"]  # batch size does not change a score


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
    # the characters alone show it cannot fit; or it fits the characters' bound but not in tokens
    for positions, says in ((5, "cannot fit the model's 5 positions"),
                            (9, "exceed the model's 9 positions")):
        with pytest.raises(TaskError, match=says):
            load_tasks([eval_world.specs["blimp"]], eval_world.tokenizer, eval_world.features,
                       max_positions=positions)
    other = write_features(tmp_path / "f32.h5", [f"img{i}" for i in range(8)], dim=FEATURE_DIM * 2)
    tasks = load_tasks([eval_world.specs["wg"]], eval_world.tokenizer, other)
    with pytest.raises(TaskError, match="dimension 32 but the model's projector expects 16"):
        check_feature_dim(load_model(eval_world.vlm), tasks)


def test_progress_bar_counts_items(eval_world, capsys):
    """The bar counts items (8 VQA items, 32 candidates), the unit the pipeline's throughput and
    the task sizes are quoted in."""
    task = load_tasks([eval_world.specs["vqa"]], eval_world.tokenizer, eval_world.features)[0]
    score_candidates(load_model(eval_world.vlm), task, batch_size=16, progress=True)
    err = capsys.readouterr().err
    assert "/8 " in err and "item/s" in err
    # no candidates at all (ImageTextModel.score with no texts): an empty result, not a crash
    empty = pack_task(parse_task_spec("vqa:none.jsonl"), [1, 4], [[]], [[]], ["none"], [0],
                      task.features)  # one item without candidates
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


# ---------------------------------------------------------------------------------------------
# Conformance with the BabyLM pipeline's scoring rules (sentence_zero_shot/{dataset,
# compute_results,run}.py at bf55c11), each computed here independently of babymerge's scorer:
# one sequence at a time, full logits, the scored tokens picked by character offsets.


def _pipeline_rule_score(model, tok, sentence, completion, feature):
    """The pipeline's causal score: tokens whose span ends past the completion's start."""
    enc = tok(sentence, add_special_tokens=False, return_offsets_mapping=True)
    prefix = [tok.bos_token_id, tok.convert_tokens_to_ids("<image>")]
    seq = torch.tensor([prefix + enc["input_ids"]])
    start = len(sentence) - len(completion)
    with torch.no_grad():
        logp = model(input_ids=seq, pixel_values=feature[None]).logits.log_softmax(-1)[0]
    return sum(logp[len(prefix) + j - 1, t].item()
               for j, (t, (_, end)) in enumerate(zip(enc["input_ids"], enc["offset_mapping"]))
               if end > start)


@pytest.fixture(scope="module")
def scorer(eval_world):
    black = FeatureTable(eval_world.features).black.float()
    return load_model(eval_world.vlm), eval_world.tokenizer, black


def _task(eval_world, tmp_path, kind, records, name="task"):
    path = write_jsonl(tmp_path / f"{name}.jsonl", records)
    return load_tasks([f"{kind}:{path}"], eval_world.tokenizer, eval_world.features)[0]


def test_ties_count_for_the_gold_candidate(eval_world, scorer, tmp_path):
    """The pipeline takes torch.max's index, the first maximum: identical sentences tie, exactly,
    and the item counts as correct."""
    model, _, _ = scorer
    same = {"sentence_good": "the red cat sees a dog .", "sentence_bad": "the red cat sees a dog ."}
    with pytest.warns(UserWarning, match="all the same sentence"):
        task = _task(eval_world, tmp_path, "minimal_pairs", [same] * 3)
    scores = score_candidates(model, task, batch_size=1, progress=False)
    assert torch.equal(scores[0::2], scores[1::2])
    assert task_score(task, scores)["score"] == 1.0


def test_ewok_scores_only_the_target(eval_world, scorer, tmp_path):
    model, tok, black = scorer
    rec = {"Context1": "the red cat sees a dog .", "Context2": "the blue cat sees a dog .",
           "Target1": "the cat is red .", "Target2": "the cat is blue .", "Domain": "colour",
           "ContextType": "x", "ContextDiff": "x", "TargetDiff": "x"}
    task = _task(eval_world, tmp_path, "ewok", [rec])
    got = score_candidates(model, task, progress=False)
    want = [_pipeline_rule_score(model, tok, f"{rec['Context1']} {t}", f" {t}", black)
            for t in (rec["Target1"], rec["Target2"])]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-4)
    whole = _pipeline_rule_score(model, tok, f"{rec['Context1']} {rec['Target1']}",
                                 f"{rec['Context1']} {rec['Target1']}", black)
    assert abs(whole - want[0]) > 1.0  # the context's tokens are not in the score


def test_a_token_across_the_completion_boundary_is_scored(eval_world, scorer, tmp_path):
    """Entity tracking joins prefix and option without a space: a token that starts in the
    prefix and ends in the option is scored (its span ends past the option's start)."""
    model, tok, black = scorer
    rec = {"input_prefix": "the red ca", "options": ["t sees a dog .", "r sees a dog ."],
           "numops": 0}
    task = _task(eval_world, tmp_path, "entity_tracking", [rec], "regular")
    got = score_candidates(model, task, progress=False)
    want = [_pipeline_rule_score(model, tok, rec["input_prefix"] + o, o, black)
            for o in rec["options"]]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-4)
    enc = tok("the red cat", add_special_tokens=False, return_offsets_mapping=True)
    spans = enc["offset_mapping"]
    assert any(s < len("the red ca") < e for s, e in spans)  # the case this test is about


def test_entity_tracking_averages_its_splits(eval_world):
    """The mean over regular, ambiref and move_contents of the mean over each one's UIDs, not
    the mean over UIDs."""
    from babymerge.evaluate import pack_task
    from babymerge.tasks import TaskSpec

    groups = ["regular_1_ops", "regular_2_ops", "regular_2_ops", "ambiref_1_ops"]
    task = pack_task(TaskSpec("et", "entity_tracking", "x"), [1, 4], [[[5], [6]]] * 4,
                     [[0, 0]] * 4, groups, [0] * 4, torch.zeros(1, FEATURE_DIM))
    # correct, correct, wrong, correct
    scores = torch.tensor([0.0, -1.0, 0.0, -1.0, -1.0, 0.0, 0.0, -1.0], dtype=torch.float64)
    result = task_score(task, scores)
    assert result["groups"] == {"regular_1_ops": 1.0, "regular_2_ops": 0.5, "ambiref_1_ops": 1.0}
    assert result["score"] == pytest.approx((0.75 + 1.0) / 2)  # not (1 + 0.5 + 1) / 3


def test_wug_is_spearman_of_the_first_sentences_probability(eval_world, scorer, tmp_path):
    model, tok, black = scorer
    sentences = ["the red cat sees a dog .", "the red cat see a dog .", "a blue ball .",
                 "the blue ball .", "the dog likes a cat .", "the dog like a cat ."]
    records = [{"sentences": f"{sentences[i]}\t{sentences[i + 1]}", "ratio": r}
               for i, r in zip(range(0, 6, 2), (0.9, 0.2, 0.6))]
    records += [{"sentences": f"{sentences[1]}\t{sentences[0]}", "ratio": 0.1}]
    task = _task(eval_world, tmp_path, "wug_adj", records)
    result = task_score(task, score_candidates(model, task, progress=False))
    probs = []
    for rec in records:
        a, b = rec["sentences"].split("\t")
        sa, sb = (_pipeline_rule_score(model, tok, s, s, black) for s in (a, b))
        probs.append(1 / (1 + np.exp(sb - sa)))  # softmax over the two, at the first
    ratios = [r["ratio"] for r in records]
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731  (no ties in this data)
    want = np.corrcoef(rank(probs), rank(ratios))[0, 1]
    assert result["metric"] == "spearman" and result["score"] == pytest.approx(want)
    assert task.chance == 0.0


def test_spearman_gives_ties_their_mean_rank():
    """As scipy.stats.spearmanr (the pipeline's): ties share the mean of their ranks."""
    from babymerge.evaluate import spearman

    x, y = [1.0, 2.0, 2.0, 3.0, 5.0], [0.3, 0.1, 0.4, 0.9, 0.5]
    ranks_x = np.array([1, 2.5, 2.5, 4, 5])
    ranks_y = np.array([2, 1, 3, 5, 4])
    assert spearman(x, y) == pytest.approx(np.corrcoef(ranks_x, ranks_y)[0, 1])
    try:
        from scipy.stats import spearmanr
    except ImportError:
        return
    assert spearman(x, y) == pytest.approx(spearmanr(x, y)[0])


def test_average_ranks_of_many_rows_are_each_rows_own():
    """Bootstrap replicates are ranked as rows at once: each row as counted by definition (the
    number below plus half the ties, plus one half), NaN rho for a constant row."""
    from babymerge.evaluate import average_ranks, spearman

    rows = np.random.default_rng(0).integers(0, 6, size=(50, 40)).astype(float)  # many ties
    below = (rows[:, None, :] < rows[:, :, None]).sum(-1)
    equal = (rows[:, None, :] == rows[:, :, None]).sum(-1)
    np.testing.assert_array_equal(average_ranks(rows), below + (equal + 1) / 2)
    other = np.random.default_rng(1).random((50, 40))
    rhos = spearman(rows, other)
    assert rhos.shape == (50,)
    np.testing.assert_allclose(rhos, [spearman(r, o) for r, o in zip(rows, other)])
    assert np.isnan(spearman([1.0, 1.0, 1.0], [0.1, 0.2, 0.3]))


def test_predictions_follow_the_pipelines_layout(eval_world, tmp_path):
    """--predictions DIR: DIR/<task>/predictions.json, per UID the chosen candidate of each item
    in order, ids <UID>_<n>: the completion (the VQA answer with its space)."""
    out = tmp_path / "preds"
    res = CliRunner().invoke(main, ["eval", str(eval_world.vlm), "-t", eval_world.specs["blimp"],
                                    "-t", eval_world.specs["vqa"], "--features",
                                    str(eval_world.features), "--predictions", str(out),
                                    "--no-progress"])
    assert res.exit_code == 0, res.output
    blimp = json.loads((out / "blimp" / "predictions.json").read_text())
    assert set(blimp) == {"agreement", "order"}
    records = [json.loads(line) for line in
               (Path(eval_world.specs["blimp"].split(":", 1)[1]) / "agreement.jsonl")
               .read_text().splitlines()]
    preds = blimp["agreement"]["predictions"]
    assert [p["id"] for p in preds] == [f"agreement_{n}" for n in range(len(records))]
    assert all(p["pred"] in (r["sentence_good"], r["sentence_bad"])
               for p, r in zip(preds, records))
    vqa = json.loads((out / "vqa" / "predictions.json").read_text())["vqa"]["predictions"]
    assert len(vqa) == 8 and all(p["pred"].startswith(" ") for p in vqa)


def test_images_named_the_pipelines_way_work_end_to_end(tmp_path):
    """The pipeline's VQA lines name their image by row of VQAv2 (idx_in_hf_dataset) and its
    Winoground lines by row and column of facebook/winoground (image_idx, image_key). Both
    saved with datasets' save_to_disk and extracted with an id template, they score: each line
    gets its own image's feature."""
    import datasets
    from PIL import Image

    from babymerge.features import ExtractConfig, extract_features, save_random_dinov2

    rng = np.random.default_rng(0)

    def picture():
        return Image.fromarray((rng.random((40, 50, 3)) * 255).astype(np.uint8))

    vqa_rows = datasets.Dataset.from_dict({"image": [picture() for _ in range(3)],
                                           "question_id": [10, 11, 12]},
                                          features=datasets.Features({
                                              "image": datasets.Image(),
                                              "question_id": datasets.Value("int64")}))
    vqa_rows.save_to_disk(str(tmp_path / "vqav2_validation"))
    wg_rows = datasets.Dataset.from_dict({"image_0": [picture() for _ in range(2)],
                                          "image_1": [picture() for _ in range(2)]},
                                         features=datasets.Features({
                                             "image_0": datasets.Image(),
                                             "image_1": datasets.Image()}))
    wg_rows.save_to_disk(str(tmp_path / "winoground_test"))
    encoder = save_random_dinov2(tmp_path / "enc", hidden_size=FEATURE_DIM, image_size=28)
    out = tmp_path / "eval.h5"
    for source, id_column, path_column in (
            ("vqav2_validation", "vqav2_{row}", "image"),
            ("winoground_test", "ex_{row}_img_0", "image_0"),
            ("winoground_test", "ex_{row}_img_1", "image_1")):
        extract_features(ExtractConfig(source=str(tmp_path / source), out=out,
                                       encoder=str(encoder), id_column=id_column,
                                       path_column=path_column, num_workers=0, progress=False))
    table = FeatureTable(out)
    assert sorted(table.ids) == sorted(["vqav2_0", "vqav2_1", "vqav2_2", "ex_0_img_0",
                                        "ex_1_img_0", "ex_0_img_1", "ex_1_img_1"])
    vqa = write_jsonl(tmp_path / "vqa.jsonl", [
        {"question": "what color is the ball ?", "target_ans": "red", "distractors": ["blue"],
         "idx_in_hf_dataset": i} for i in (2, 0)])
    wg = write_jsonl(tmp_path / "wg.jsonl", [
        {"caption_0": "a red cat", "caption_1": "a cat red", "tag": "t", "secondary_tag": "",
         "collapsed_tag": "c", "image_idx": i, "image_key": f"image_{k}"}
        for i in (0, 1) for k in (1, 0)])
    tok = make_tokenizer(tmp_path / "tok")
    tasks = load_tasks([f"vqa:{vqa}", f"winoground:{wg}"], tok, out)
    for task, ids in zip(tasks, (["vqav2_2", "vqav2_0"],
                                 ["ex_0_img_1", "ex_0_img_0", "ex_1_img_1", "ex_1_img_0"])):
        per_item = task.features[task.feature_rows[task.item_start[:-1]]]
        assert torch.equal(per_item, table.lookup(ids)), task.name


def test_non_finite_log_probabilities_are_an_error(eval_world, monkeypatch):
    """Finite weights and features can still overflow (a float16 model): an error, not a score
    computed from NaN."""
    from babymerge.model import NonFiniteError

    model = load_model(eval_world.vlm)
    task = load_tasks([eval_world.specs["blimp"]], eval_world.tokenizer, eval_world.features)[0]
    with torch.no_grad():
        model.lm_head.weight[5] = float("inf")
    with pytest.raises(NonFiniteError, match="task blimp: the model's log-probabilities are NaN"):
        score_candidates(model, task, progress=False)


def test_a_line_longer_than_any_model_input_is_refused_before_tokenising(eval_world, tmp_path,
                                                                           monkeypatch):
    """The bound is the longest vocabulary entry's length x the positions: a text past it cannot
    fit, so it is refused without tokenising it (a 10 MB line took minutes and gigabytes)."""
    calls = []
    real = type(eval_world.tokenizer).__call__

    def counting(self, texts, *args, **kwargs):
        calls.append(len(texts))
        return real(self, texts, *args, **kwargs)

    monkeypatch.setattr(type(eval_world.tokenizer), "__call__", counting)
    huge = {"sentence_good": "the cat sees a dog . " * 20_000, "sentence_bad": "the cat ."}
    path = write_jsonl(tmp_path / "long.jsonl", [huge])
    with pytest.raises(TaskError, match=r"long.jsonl:1: a candidate of 420000 characters cannot "
                                        r"fit the model's 256 positions"):
        load_tasks([f"minimal_pairs:{path}"], eval_world.tokenizer, eval_world.features,
                   max_positions=256)
    assert not calls
