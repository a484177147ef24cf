"""Stage 1: a re-run whose only work is trying again images that still cannot be read leaves
the feature file as it is (at real scale it is gigabytes; rewriting it on every run of a job
array for a few missing files costs minutes and adds nothing); one whose failure changed is
recorded anew."""

import json
import os

from test_features import encoder_dir, extract, write_images  # noqa: F401 (a fixture)


def test_rerun_with_still_missing_images_does_not_rewrite(tmp_path, encoder_dir):  # noqa: F811
    write_images(tmp_path / "imgs", ["a.png", "b.png"])
    lines = [{"image_id": i, "path": f"imgs/{i}.png"} for i in ("a", "b", "gone")]
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "f.h5"
    extract(tmp_path / "list.jsonl", out, encoder_dir)
    before = os.stat(out).st_ino
    again = extract(tmp_path / "list.jsonl", out, encoder_dir)
    assert again["new"] == 0 and again["new_failed"] == 1 and again["failed"] == 1
    assert os.stat(out).st_ino == before  # not rewritten
    assert not out.with_name(out.name + ".partial").exists()


def test_rerun_whose_failure_changed_records_the_new_reason(tmp_path, encoder_dir):  # noqa: F811
    """Only the same failures, with the same reasons, leave the file alone: an image that now
    fails in another way is recorded with its new reason."""
    from babymerge.featurefile import FeatureTable

    write_images(tmp_path / "imgs", ["a.png"])
    lines = [{"image_id": i, "path": f"imgs/{i}.png"} for i in ("a", "gone")]
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "f.h5"
    extract(tmp_path / "list.jsonl", out, encoder_dir)
    assert "FileNotFoundError" in FeatureTable(out).failed["gone"]
    (tmp_path / "imgs" / "gone.png").mkdir()  # still unreadable, for another reason
    again = extract(tmp_path / "list.jsonl", out, encoder_dir)
    assert again["new_failed"] == 1 and again["failed"] == 1
    assert "IsADirectoryError" in FeatureTable(out).failed["gone"]
