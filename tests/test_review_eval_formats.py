"""The BabyLM evaluation pipeline's own multimodal jsonl records, as its read_files.py decodes
them: Winoground (image_idx + image_key into facebook/winoground, no image_id) and VQA
(idx_in_hf_dataset, the COCO image_id, question_id, seven distractors)."""

import pytest
import torch
from evalmerge_fixtures import make_tokenizer, write_features, write_jsonl

from babymerge.evaluate import load_tasks
from babymerge.featurefile import FeatureTable


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
