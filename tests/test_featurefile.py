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
