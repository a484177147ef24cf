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
