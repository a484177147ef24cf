"""Task files as they come off real disks: macOS ._NAME.jsonl twins in a copied folder, a file
that is not UTF-8, a byte-order mark."""

import pytest
from evalmerge_fixtures import make_tokenizer, write_features, write_jsonl

from babymerge.evaluate import TaskError, load_tasks, parse_task_spec, read_items

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
