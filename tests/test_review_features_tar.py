"""Stage 1 on img2dataset-style web-dataset shards cut short (a download or writer killed)."""

import io
import json
import tarfile

import h5py
import numpy as np
import pytest
from PIL import Image

from babymerge.featurefile import FAILED, IDS
from babymerge.images import list_images
from test_features import encoder_dir, extract  # noqa: F401 (a fixture)


def write_shard(path, first_key, n, seed):
    """img2dataset's layout: KEY.jpg, KEY.txt, KEY.json per sample, 9-digit keys."""
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w") as tar:
        for k in range(first_key, first_key + n):
            buf = io.BytesIO()
            Image.fromarray((rng.random((40, 52, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
            key = f"{k:09d}"
            for ext, data in (("jpg", buf.getvalue()), ("txt", b"a caption"),
                              ("json", json.dumps({"key": key, "status": "success"}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        return [(m.name, m.offset, m.offset_data, m.size) for m in tar]


@pytest.mark.parametrize("where", ["header_boundary", "inside_image"])
def test_shard_cut_short_keeps_the_rest_records_and_warns(tmp_path, encoder_dir, where):  # noqa: F811
    write_shard(tmp_path / "s-000.tar", 0, 3, seed=0)
    members = write_shard(tmp_path / "s-001.tar", 10000, 3, seed=1)
    data = (tmp_path / "s-001.tar").read_bytes()
    # Cut at the header of the second sample's json (a block boundary: tarfile's iteration just
    # stopped there, silently), or inside the second sample's JPEG (iteration raised ReadError).
    name, offset, offset_data, size = members[5] if where == "header_boundary" else members[3]
    cut = offset if where == "header_boundary" else offset_data + size // 2
    (tmp_path / "s-001.tar").write_bytes(data[:cut])

    with pytest.warns(UserWarning, match=r"s-001\.tar: tar shard cut short"):
        summary = extract(tmp_path / "s-{000..001}.tar", tmp_path / "f.h5", encoder_dir)
    with h5py.File(tmp_path / "f.h5", "r") as f:
        ids = [x.decode() for x in f[IDS][:]]
        failed = dict(zip([x.decode() for x in f[FAILED]["ids"][:]],
                          [x.decode() for x in f[FAILED]["reasons"][:]]))
    assert ids[:3] == ["000000000", "000000001", "000000002"]  # the whole shard is all there
    if where == "header_boundary":
        assert ids[3:] == ["000010000", "000010001"] and not failed
    else:  # the sample whose bytes were cut is recorded, not silently dropped
        assert ids[3:] == ["000010000"] and "cut short" in failed["000010001"]
    assert summary["rows"] + summary["failed"] == 5


def test_whole_shard_lists_without_warning(tmp_path, recwarn):
    write_shard(tmp_path / "s.tar", 7, 2, seed=2)
    assert [i.id for i in list_images(str(tmp_path / "s.tar"))] == ["000000007", "000000008"]
    assert not [w for w in recwarn if "tar" in str(w.message)]
