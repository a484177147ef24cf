"""babymerge.tasks: the BabyLM pipeline's zero-shot task files, decoded as its read_files.py decodes
them (bf55c11): each kind's candidates, the scored completion, the group (UID), image ids."""

import pytest

from babymerge.tasks import TaskError, image_id, parse_task_spec, read_items
from fixtures import write_jsonl

PAIR = {"sentence_good": "the cat sees a dog .", "sentence_bad": "the cat see a dog .",
        "UID": "agreement", "field": "morphology", "linguistics_term": "agreement"}


def _items(tmp_path, kind, records, name="task"):
    return read_items(parse_task_spec(f"{kind}:{write_jsonl(tmp_path / f'{name}.jsonl', records)}"))


def test_task_spec_names_and_image_id_fields(tmp_path):
    assert parse_task_spec("minimal_pairs:eval/blimp/").name == "blimp"
    spec = parse_task_spec("wino=winoground:eval/wg.jsonl")
    assert (spec.name, spec.kind, str(spec.path)) == ("wino", "winoground", "eval/wg.jsonl")
    path = write_jsonl(tmp_path / "w.jsonl", [
        {"caption_0": "a cat", "caption_1": "a dog", "image_key": "image_1", "image_idx": 3},
        {"caption_0": "a cat", "caption_1": "a dog", "image_id": 7, "image_key": "image_0"}])
    items = read_items(parse_task_spec(f"winoground:{path}"))
    assert [it.image_id for it in items] == ["ex_3_img_1", "7"]


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



def test_pipeline_task_names_are_kinds():
    assert parse_task_spec("blimp:x/").kind == parse_task_spec("blimp_supplement:y/").kind \
        == "minimal_pairs"
    for kind in ("ewok", "entity_tracking", "comps", "wug_adj", "wug_past"):
        assert parse_task_spec(f"{kind}:x.jsonl").kind == kind


def test_minimal_pairs_group_by_uid_only_with_a_field(tmp_path):
    """BLiMP lines (with ``field``) group by UID; the supplement's (no field) by file stem, even
    when they carry a UID, as the pipeline's decode_blimp does."""
    [blimp] = _items(tmp_path, "minimal_pairs", [PAIR], "blimp_file")
    no_field = {k: v for k, v in PAIR.items() if k != "field"}
    [supp] = _items(tmp_path, "minimal_pairs", [no_field], "hypernym")
    assert (blimp.group, supp.group) == ("agreement", "hypernym")
    assert blimp.candidates == [(PAIR["sentence_good"],) * 2, (PAIR["sentence_bad"],) * 2]


def test_ewok_scores_only_the_target_after_context1(tmp_path):
    rec = {"Context1": "The ball is red.", "Context2": "The ball is blue.",
           "Target1": "The ball is not blue.", "Target2": "The ball is not red.",
           "Domain": "material-properties", "ContextType": "concrete", "ContextDiff": "x",
           "TargetDiff": "y"}
    [item] = _items(tmp_path, "ewok", [rec])
    assert item.group == "material-properties"
    context = "The ball is red."
    assert item.candidates == [(f"{context} The ball is not blue.", " The ball is not blue."),
                               (f"{context} The ball is not red.", " The ball is not red.")]
    assert item.predictions == [" The ball is not blue.", " The ball is not red."]


def test_entity_tracking_groups_by_file_and_operations(tmp_path):
    rec = {"input_prefix": "Box 0 contains the apple. Box 0 contains", "numops": 2,
           "options": [" the apple.", " nothing.", " the pear."]}
    [item] = _items(tmp_path, "entity_tracking", [rec], "regular")
    assert item.group == "regular_2_ops"
    assert [c for _, c in item.candidates] == rec["options"]
    assert item.candidates[1][0] == rec["input_prefix"] + " nothing."


def test_comps_scores_the_property_and_predicts_the_sentence(tmp_path):
    rec = {"prefix_acceptable": "A robin", "prefix_unacceptable": "A dax",
           "property_phrase": "can fly."}
    subsets = {}
    for stem in ("comps_base", "comps_wugs", "comps_wugs_dist-before",
                 "comps_wugs_dist-in-between"):
        [item] = _items(tmp_path, "comps", [rec], stem)
        subsets[stem] = item.group
    assert list(subsets.values()) == ["base", "wugs", "wugs_dist_before", "wugs_dist_in_between"]
    assert item.candidates == [("A robin can fly.", "can fly."), ("A dax can fly.", "can fly.")]
    assert item.predictions == ["A robin can fly.", "A dax can fly."]


def test_wug_reads_tab_separated_sentences_and_the_ratio(tmp_path):
    [item] = _items(tmp_path, "wug_adj", [{"sentences": "It is blickish.\tIt is blickful.",
                                           "ratio": "0.75"}])
    assert item.group == "wug_adj" and item.ratio == 0.75
    assert item.candidates == [("It is blickish.",) * 2, ("It is blickful.",) * 2]
    with pytest.raises(TaskError, match="task.jsonl:1: field 'ratio'"):
        _items(tmp_path, "wug_past", [{"sentences": "a\tb", "ratio": None}])
    with pytest.raises(TaskError, match="two or more tab-separated"):
        _items(tmp_path, "wug_past", [{"sentences": "only one", "ratio": 1}])


def test_multimodal_groups_are_the_tasks_whatever_the_uid(tmp_path):
    """The pipeline groups Winoground and VQA as one UID each ("winoground", "vqa")."""
    [wg] = _items(tmp_path, "winoground", [{"caption_0": "a", "caption_1": "b",
                                            "image_id": "x", "UID": "tag"}])
    [vqa] = _items(tmp_path, "vqa", [{"question": "what ?", "target_ans": "red",
                                      "distractors": ["blue"], "image_id": "x", "UID": "q"}])
    assert (wg.group, vqa.group) == ("winoground", "vqa")
    assert vqa.candidates == [("what ? red", " red"), ("what ? blue", " blue")]


def test_vqa_row_index_is_an_image_id():
    """The pipeline's VQA lines name their image by row of VQAv2's validation split; the id is
    what extract-features stores with --id-column 'vqav2_{row}'."""
    assert image_id({"idx_in_hf_dataset": 12}, "f:1") == "vqav2_12"
    assert image_id({"idx_in_hf_dataset": 12, "image_id": 262148}, "f:1") == "262148"
    with pytest.raises(TaskError, match="'idx_in_hf_dataset'"):
        image_id({}, "f:1")


def test_identical_candidates_warn_naming_the_lines(tmp_path):
    same = {**PAIR, "sentence_bad": PAIR["sentence_good"]}
    with pytest.warns(UserWarning, match=r"1 item\(s\) whose candidates are all the same.*"
                                         r"task.jsonl:2"):
        _items(tmp_path, "minimal_pairs", [PAIR, same])
