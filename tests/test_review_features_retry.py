"""Stage 1: an image that could not be read (missing file: wrong --image-root, download not yet
finished) is tried again by the next run; one that failed to decode waits for --retry-failed."""

import json

import torch

from babymerge.featurefile import FeatureTable
from test_features import encoder_dir, extract, write_images  # noqa: F401 (a fixture)


def test_missing_file_is_retried_corrupt_file_is_not(tmp_path, encoder_dir):  # noqa: F811
    write_images(tmp_path / "imgs", ["a.png"])
    (tmp_path / "imgs" / "bad.png").write_bytes(b"not an image")
    lines = [{"image_id": i, "path": f"imgs/{i}.png"} for i in ("a", "late", "bad")]
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "f.h5"
    first = extract(tmp_path / "list.jsonl", out, encoder_dir)
    assert first["rows"] == 1 and first["failed"] == 2
    assert FeatureTable(out).failed["late"].startswith("unreadable")

    write_images(tmp_path / "imgs", ["late.png"], seed=4)  # the download finished
    second = extract(tmp_path / "list.jsonl", out, encoder_dir)
    table = FeatureTable(out, dtype=torch.float32)
    assert second["new"] == 1 and second["skipped"] == 2
    assert "late" in table and set(table.failed) == {"bad"}
    assert extract(tmp_path / "list.jsonl", out, encoder_dir, retry_failed=True)["new_failed"] == 1
