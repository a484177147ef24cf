"""Stage 1: a .tar shard killed before its first header was complete (a 0-byte file, a few
bytes) is a shard cut short like any other: the run goes on over the others, warning with its
name; it stopped every run over hundreds of shards with 'not an uncompressed .tar shard'."""

import pytest

from babymerge.images import SourceError, list_images
from test_review_features_tar import write_shard


@pytest.mark.parametrize("size", [0, 100])
def test_shard_cut_before_its_first_header_is_skipped_with_a_warning(tmp_path, size):
    write_shard(tmp_path / "s-000.tar", 0, 2, seed=0)
    (tmp_path / "s-001.tar").write_bytes(b"\x00" * size)
    with pytest.warns(UserWarning, match=r"s-001.tar: tar shard cut short"):
        items = list_images(str(tmp_path / "s-{000..001}.tar"))
    assert [it.id for it in items] == ["000000000", "000000001"]


def test_a_file_that_is_no_tar_is_still_an_error(tmp_path):
    (tmp_path / "s-000.tar").write_bytes(b"\x1f\x8b" + b"gzip, not tar" * 100)
    with pytest.raises(SourceError, match="not an uncompressed .tar shard"):
        list_images(str(tmp_path / "s-000.tar"))
