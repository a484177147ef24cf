"""babymerge.featurefile: the feature table read out of core (rows gathered from the HDF5 file)
gives the same rows, in the same order, as the table held in memory."""

import shutil

import h5py
import numpy as np
import pytest
import torch

from babymerge.featurefile import FEATURES, FeatureTable
from fixtures import world  # noqa: F401  (fixture)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("chunks", [None, (64, 16)], ids=["contiguous", "chunked"])
def test_out_of_core_gather_equals_in_memory(world, dtype, chunks, tmp_path):
    path = tmp_path / "f.h5"
    shutil.copy(world["features"], path)
    if chunks:  # DESIGN.md allows chunks of >= 64 rows; they take the row-by-row read path
        with h5py.File(path, "r+") as f:
            data = f[FEATURES][:]
            del f[FEATURES]
            f.create_dataset(FEATURES, data=data, chunks=chunks)
    memory = FeatureTable(path, dtype=dtype)
    need = len(memory) * memory.dim * memory.black.element_size()
    assert memory.in_memory and FeatureTable(path, max_memory_bytes=need).in_memory
    disk = FeatureTable(path, dtype=dtype, max_memory_bytes=need - 1)
    assert disk._rows.chunks == chunks
    assert not disk.in_memory and disk.features is None and disk.dim == memory.dim
    rows = np.array([77, 3, 3, 120, 0, 77, 64])  # unsorted, repeated: order must be restored
    got = disk.gather(rows)
    assert got.dtype == dtype and torch.equal(got, memory.gather(rows))
    assert torch.equal(got, memory.features[torch.from_numpy(rows)])
    ids = [world["ids"][i] for i in (5, 1, 5)]
    assert torch.equal(disk.lookup(ids), memory.lookup(ids))
    assert disk.gather(np.array([], dtype=np.int64)).shape == (0, memory.dim)
    disk.close()


def test_non_finite_rows_black_and_duplicate_ids_are_refused(tmp_path):
    """A NaN row silently changed scores and trained a NaN model: the table names the ids, in
    memory at load and out of core when the rows are read; a NaN /black, or an id stored twice
    (a caption's image would be whichever row came last), is refused at load."""
    from babymerge.featurefile import FeatureFileError
    from fixtures import write_feature_file

    ids = [f"img{i}" for i in range(6)]
    feats = np.random.default_rng(0).standard_normal((6, 8))
    feats[2, 5], feats[4, 0] = np.nan, np.inf
    path = write_feature_file(tmp_path / "bad.h5", ids, feats, np.zeros(8))
    with pytest.raises(FeatureFileError, match=r"bad.h5: 2 feature row\(s\) hold NaN or infinite "
                                               r"values \(ids 'img2', 'img4'\)"):
        FeatureTable(path)
    lazy = FeatureTable(path, max_memory_bytes=0)  # out of core: checked as rows are read
    assert torch.isfinite(lazy.lookup(["img0", "img5"])).all()
    with pytest.raises(FeatureFileError, match="'img4'"):
        lazy.lookup(["img0", "img4"])
    lazy.close()
    black = np.zeros(8)
    black[3] = np.nan
    with pytest.raises(FeatureFileError, match="/black holds NaN"):
        FeatureTable(write_feature_file(tmp_path / "black.h5", ids[:2], feats[:2], black))
    with pytest.raises(FeatureFileError, match=r"1 image id\(s\) stored twice in /ids \('img0'\)"):
        FeatureTable(write_feature_file(tmp_path / "dupe.h5", ["img0", "img1", "img0"],
                                        feats[[0, 1, 3]], np.zeros(8)))


def test_damaged_bytes_are_named_with_what_repairs_them(tmp_path):
    """HDF5 reports damage as OSError, KeyError or RuntimeError naming no file; the table says
    which file, that it is damaged, and that a copy or a new extraction (not a rerun) repairs it,
    whether the damaged rows are read at load or, out of core, when a batch needs them."""
    from babymerge.featurefile import FeatureFileError, feature_statistics
    from fixtures import damage_first_chunk, write_feature_file

    ids = [f"img{i}" for i in range(200)]
    feats = np.random.default_rng(0).standard_normal((200, 8))
    path = damage_first_chunk(write_feature_file(tmp_path / "d.h5", ids, feats, np.zeros(8)))
    damaged = r"d.h5: damaged, HDF5 cannot read it \(.*\); .* no rerun repairs it: copy it again"
    with pytest.raises(FeatureFileError, match=damaged):
        FeatureTable(path)
    with pytest.raises(FeatureFileError, match=damaged):
        feature_statistics(path)
    lazy = FeatureTable(path, max_memory_bytes=0)
    good = lazy.lookup(["img70", "img199"])
    assert torch.equal(good, torch.from_numpy(feats[[70, 199]]).half())
    with pytest.raises(FeatureFileError, match=damaged):
        lazy.lookup(["img70", "img3"])
    lazy.close()
