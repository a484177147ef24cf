"""Stage 1 robustness: ranks + SIGKILL + resume + join, refusing to mix encoders, the CLI."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from babymerge.cli import main as cli
from babymerge.featurefile import FEATURES, IDS, FeatureFileError, FeatureTable
from babymerge.features import ExtractConfig, JoinConfig, join_features, save_random_dinov2
from test_features import encoder_dir, extract, write_images  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    write_images(folder, [f"{i:03d}.png" for i in range(48)], size=(40, 52))
    return folder


def read(path):
    with h5py.File(path, "r") as f:
        return [x.decode() for x in f[IDS][:]], np.asarray(f[FEATURES][:])


def cli_args(source, out, encoder_dir, *extra):
    return ["extract-features", str(source), "--out", str(out), "--encoder", str(encoder_dir),
            "--batch-size", "2", "--flush-every", "4", "--num-workers", "0", *extra]


# Subprocesses run the stage through its config like the CLI does, but import only stage 1:
# `python -m babymerge.cli` imports every stage (~10 s per process on a loaded 2-core machine).
RUNNER = """import json, sys
from babymerge.config import build_config
from babymerge.features import ExtractConfig, extract_features
extract_features(build_config(ExtractConfig, json.loads(sys.argv[1])))
"""


def runner_command(tmp_path, source, out, encoder_dir):
    script = tmp_path / "run_extract.py"
    script.write_text(RUNNER)
    return [str(script), json.dumps({"source": str(source), "out": str(out),
                                     "encoder": str(encoder_dir), "batch_size": 2,
                                     "flush_every": 4, "num_workers": 0})]


def test_ranks_killed_resumed_and_joined_equal_one_run(tmp_path, images, encoder_dir):
    """Two processes with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE;
    the launcher adds nothing the stage reads and would cost a third torch start-up). Rank 0 is
    SIGKILLed mid-run and resumed; the joined file must equal one uninterrupted run. One test for
    both properties because each subprocess costs ~10 s of imports on a loaded 2-core machine."""
    out = tmp_path / "multi.h5"
    shard0, shard1 = (tmp_path / f"multi.shard-0000{r}-of-00002.h5" for r in range(2))
    ranks = [subprocess.Popen([sys.executable, *runner_command(tmp_path, images, out, encoder_dir)],
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2",
                                   "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for r in range(2)]
    parts = tmp_path / (shard0.name + ".partial")

    def kill_rank0_after_three_parts():
        deadline = time.time() + 120
        while len(list(parts.glob("part-*.h5"))) < 3 and ranks[0].poll() is None \
                and time.time() < deadline:
            time.sleep(0.002)
        ranks[0].send_signal(signal.SIGKILL)

    watcher = threading.Thread(target=kill_rank0_after_three_parts)
    watcher.start()  # the reference run below overlaps the subprocesses' start-up
    single = tmp_path / "single.h5"
    extract(images, single, encoder_dir, batch_size=2, flush_every=4)
    watcher.join()
    assert ranks[0].wait() == -signal.SIGKILL, "rank 0 finished before it could be killed"
    assert ranks[1].wait(timeout=120) == 0, ranks[1].stderr.read().decode()[-2000:]

    with pytest.raises(FeatureFileError, match="did not finish"):
        FeatureTable(shard0)  # the stub says so until a clean finish
    with pytest.raises(FeatureFileError, match="did not finish"):
        join_features(JoinConfig(shards=[shard0, shard1], out=out))
    assert 3 <= len(list(parts.glob("part-*.h5"))) < 6
    summary = extract(images, out, encoder_dir, batch_size=2, flush_every=4, shard="0/2")
    assert summary["skipped"] >= 12 and summary["rows"] == 24 and not parts.exists()
    assert len(read(shard1)[0]) == 24

    result = CliRunner().invoke(cli, ["join-features", str(shard0), str(shard1), "--out", str(out)])
    assert result.exit_code == 0, result.output
    ids, feats = read(out)
    ref_ids, ref_feats = read(single)
    assert ids == ref_ids  # no duplicated, no missing id, same order
    # Parts end on whole batches, so the resumed rank forms the same batches as the single run
    # (and each shard starts on a batch boundary): identical features.
    np.testing.assert_array_equal(feats, ref_feats)

    # A virtual join reads the same, and survives moving the folder (paths stored relative).
    join_features(JoinConfig(shards=[shard0, shard1], out=tmp_path / "virtual.h5", virtual=True))
    moved = tmp_path.parent / (tmp_path.name + "_moved")
    shutil.move(tmp_path, moved)
    virtual = FeatureTable(moved / "virtual.h5", dtype=torch.float32)
    assert virtual.ids == ref_ids
    np.testing.assert_array_equal(virtual.features.numpy(), feats.astype(np.float32))

    with pytest.raises(FeatureFileError, match="is in both"):
        join_features(JoinConfig(shards=[moved / shard1.name, moved / shard1.name],
                                 out=moved / "dup.h5"))


def test_kill_between_merge_and_cleanup_leaves_no_duplicates(tmp_path, images, encoder_dir,
                                                             monkeypatch):
    out = tmp_path / "f.h5"
    import babymerge.features as features

    monkeypatch.setattr(features.shutil, "rmtree", lambda path: None)  # "killed" right here
    extract(images, out, encoder_dir, batch_size=8, flush_every=16)
    assert (tmp_path / "f.h5.partial").is_dir()
    # a part and a merge killed mid-write
    (tmp_path / "f.h5.partial" / "part-000099.h5.tmp").write_bytes(b"half a part")
    (tmp_path / "f.h5.tmp").write_bytes(b"half a merge")
    monkeypatch.undo()
    summary = extract(images, out, encoder_dir, batch_size=8, flush_every=16)
    assert summary["new"] == 0 and summary["rows"] == 48
    ids, _ = read(out)
    assert len(ids) == len(set(ids)) == 48
    assert not (tmp_path / "f.h5.partial").exists()


def test_appending_refuses_other_encoder_layer_or_dtype(tmp_path, encoder_dir):
    write_images(tmp_path / "imgs", ["a.png", "b.png"])
    out = tmp_path / "f.h5"
    extract(tmp_path / "imgs", out, encoder_dir)
    write_images(tmp_path / "imgs", ["c.png"], seed=1)
    assert extract(tmp_path / "imgs", out, encoder_dir)["new"] == 1  # same encoder: appends

    other = save_random_dinov2(tmp_path / "other", image_size=56, seed=1)
    with pytest.raises(FeatureFileError, match="encoder="):
        extract(tmp_path / "imgs", out, other)
    with pytest.raises(FeatureFileError, match="dtype='float16'"):
        extract(tmp_path / "imgs", out, encoder_dir, dtype="float32")
    # Same encoder name, other crop or other weights (the latter caught by /black).
    swap = tmp_path / "swap"
    shutil.copytree(encoder_dir, swap)
    extract(tmp_path / "imgs", tmp_path / "g.h5", swap)
    save_random_dinov2(swap, image_size=70)
    with pytest.raises(FeatureFileError, match="image_size=56"):
        extract(tmp_path / "imgs", tmp_path / "g.h5", swap)
    save_random_dinov2(swap, image_size=56, seed=7)
    with pytest.raises(FeatureFileError, match="/black differs"):
        extract(tmp_path / "imgs", tmp_path / "g.h5", swap)
    with h5py.File(out, "r") as f:
        f_layer = dict(f.attrs)
    assert f_layer["count"] == 3 and bool(f_layer["complete"])


def test_cli_and_shard_flag(tmp_path, encoder_dir):
    write_images(tmp_path / "imgs", [f"{i}.png" for i in range(5)])
    runner = CliRunner()
    result = runner.invoke(cli, cli_args(tmp_path / "imgs", tmp_path / "f.h5", encoder_dir,
                                         "--shard", "1/2"))
    assert result.exit_code == 0, result.output
    assert read(tmp_path / "f.shard-00001-of-00002.h5")[0] == ["2", "3", "4"]
    result = runner.invoke(cli, cli_args(tmp_path / "imgs", tmp_path / "f.h5", encoder_dir,
                                         "--shard", "2/2"))
    assert result.exit_code != 0 and "--shard 2/2" in result.output
    with pytest.raises(ValueError, match="--batch-size must be >= 1"):
        ExtractConfig(source="x", batch_size=0)
    with pytest.raises(ValueError, match="--precision must be one of"):
        ExtractConfig(source="x", precision="fp8")
    with pytest.raises(FeatureFileError, match="did not finish"):
        join_features(JoinConfig(shards=[_stub(tmp_path)], out=tmp_path / "j.h5"))


def _stub(tmp_path):
    path = tmp_path / "stub.h5"
    with h5py.File(path, "w") as f:
        f.attrs["complete"] = False
    return path
