"""Out-of-core feature reading: same rows, batches and training as the in-memory table."""

import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from babymerge.featurefile import FEATURES, FeatureTable
from babymerge.model import load_model
from babymerge.train import TrainConfig, feature_memory_budget, train
from test_data_fixtures import world  # noqa: F401  (fixture)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("chunks", [None, (64, 16)], ids=["contiguous", "chunked"])
def test_out_of_core_gather_equals_in_memory(world, dtype, chunks, tmp_path):  # noqa: F811
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


@pytest.fixture
def one_thread():
    # Two threads on a shared 2-core machine make tiny steps slower, not faster.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_training_out_of_core_equals_in_memory_and_default_is_in_memory(
        world, tmp_path, one_thread):  # noqa: F811
    base = dict(kind="vlm", text=[world["text"]], captions=[world["captions"]],
                features=world["features"], tokenizer=world["tokenizer"], preset="tiny",
                seq_len=32, batch_size=16, epochs=1, lr=3e-3, warmup_steps=2, log_every=1,
                save_every=0, cache_dir=world["root"] / "cache", progress=False)
    default = TrainConfig(**base, out=tmp_path / "memory")
    assert default.feature_memory_gb < 0 and feature_memory_budget(default) > 2**20
    with pytest.warns(UserWarning, match="captions skipped"):
        train(default)
    with pytest.warns(UserWarning, match="captions skipped"):
        train(TrainConfig(**base, out=tmp_path / "disk", feature_memory_gb=0))

    def run(name):
        out = tmp_path / name
        lines = (out / "metrics.jsonl").read_text().splitlines()
        losses = [json.loads(line)["loss"] for line in lines if '"loss"' in line]
        config = json.loads((out / "train_config.json").read_text())
        return losses, load_file(str(out / "model.safetensors")), config["features_in_memory"]

    (loss_m, w_m, in_m), (loss_d, w_d, in_d) = run("memory"), run("disk")
    assert in_m is True and in_d is False
    assert len(loss_m) > 3 and loss_m == loss_d
    assert all(torch.equal(w_m[k], w_d[k]) for k in w_m)
    # the feature file's encoder is recorded, so the model can be run on pixels later
    assert load_model(tmp_path / "memory").config.encoder == "test/random"


def test_standardize_stores_the_feature_files_statistics(world, tmp_path, one_thread):  # noqa: F811
    from babymerge.featurefile import feature_statistics

    with h5py.File(world["features"], "r") as f:
        x = np.asarray(f[FEATURES][:], dtype=np.float64)
    mean, std = feature_statistics(world["features"], chunk_rows=3)  # several chunks
    assert np.allclose(mean.numpy(), x.mean(0), atol=1e-5)
    assert np.allclose(std.numpy(), x.std(0), atol=1e-5)
    cfg = TrainConfig(kind="lm", text=[world["text"]], features=world["features"],
                      tokenizer=world["tokenizer"], preset="tiny", seq_len=32, batch_size=16,
                      epochs=1, warmup_steps=1, save_every=0, progress=False,
                      cache_dir=world["root"] / "cache", out=tmp_path / "lm",
                      feature_norm="standardize")
    train(cfg)
    model = load_model(tmp_path / "lm")
    assert model.config.feature_norm == "standardize"
    assert torch.allclose(model.model.feature_mean, mean)
    assert torch.allclose(model.model.feature_std, std.clamp_min(1e-6))
