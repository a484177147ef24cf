"""babymerge.features (stage 1, extract-features and join-features): the encoder's pooling and
preprocessing against transformers, the feature file's layout, resume after a kill (ranks, parts,
join), refusing to mix encoders, re-runs and retries of failed images, sources already stored in
the file, and the extraction with the GPU JPEG path."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

import babymerge.features as features
from babymerge.cli import main as cli
from babymerge.featurefile import (BLACK, FAILED, FEATURES, IDS, LAYER, POOLING, FeatureFileError,
                                   STR_DTYPE, FeatureTable)
from babymerge.features import (ExtractConfig, JoinConfig, extract_features, join_features,
                                load_encoder, save_random_dinov2)
from babymerge.images import GpuJpegDecoder, SourceError, gpu_jpeg_decoder_available
from fixtures import (encoder_dir, extract, pil_decode, smooth_image,  # noqa: F401 (a fixture)
                      write_images, write_shard)


# ---------------------------------------------------------------------------------------------
# The encoder: pooling and preprocessing as transformers' processor and model


def test_pooling_and_preprocessing_match_processor_then_model(tmp_path):
    """Our batched path (torch uint8 resize, normalise on device, blocks up to layer -2) against
    the reference `processor(images) -> model(output_hidden_states) -> hidden_states[-2] -> mean
    over patches`, at DINOv2's real geometry (shortest edge 256, crop 224).

    Tolerance: torch's antialiased bicubic rounds to within one grey level of PIL's (1/255/std =
    0.0175 after normalisation); through the random encoder that is <= 1e-3 of the feature scale,
    well inside fp16 storage error relative to real DINOv2 features.
    """
    directory = save_random_dinov2(tmp_path / "enc")
    rng = np.random.default_rng(0)
    images = [smooth_image(rng, h, w) for h, w in [(480, 640), (300, 200), (256, 256), (224, 500)]]
    processor = AutoImageProcessor.from_pretrained(directory)
    model = AutoModel.from_pretrained(directory).eval()
    with torch.no_grad():
        pixel_values = processor(images, return_tensors="pt")["pixel_values"]
        hidden = model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[LAYER]
    reference = hidden[:, 1:].mean(dim=1)  # CLS dropped, mean over patches

    encoder = load_encoder(directory)
    ours = encoder.encode(images)
    assert ours.dtype == torch.float32 and ours.shape == reference.shape == (4, 64)
    scale = reference.abs().mean().item()
    assert (ours - reference).abs().max().item() <= 2e-3 * max(scale, 1.0)
    normalised = encoder.normalize(torch.stack([encoder.preprocess.pixels(im) for im in images]))
    assert (normalised - pixel_values).abs().max().item() <= 1 / 255 / 0.224 + 1e-4


def test_register_tokens_are_dropped_too(tmp_path):
    """dinov2-with-registers: CLS and the 4 register tokens are not patches."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=56,
        num_register_tokens=4)).eval()
    model.save_pretrained(tmp_path / "reg")
    processor = AutoImageProcessor.from_pretrained(save_random_dinov2(tmp_path / "plain",
                                                                      image_size=56))
    processor.save_pretrained(tmp_path / "reg")
    images = [smooth_image(np.random.default_rng(5), 64, 80)]
    with torch.no_grad():
        hidden = model(pixel_values=processor(images, return_tensors="pt")["pixel_values"],
                       output_hidden_states=True).hidden_states[LAYER]
    encoder = load_encoder(tmp_path / "reg")
    assert encoder.num_prefix_tokens == 5
    torch.testing.assert_close(encoder.encode(images), hidden[:, 5:].mean(1), atol=2e-3, rtol=2e-3)


def photo_jpegs(folder, sizes, seed=0):
    """Photo-like RGB JPEGs (smooth content plus sensor-like noise, quality 90)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (width, height) in enumerate(sizes):
        coarse = (rng.random((height // 8, width // 8, 3)) * 255).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
        noisy = smooth + rng.normal(0, 6, smooth.shape)
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folder / f"photo{i}.jpg",
                                                                       quality=90)
    return folder


def test_default_extraction_matches_the_reference_on_large_jpegs(tmp_path):
    """The stored feature of each JPEG, at the defaults, against the paper's recipe computed
    independently: ``processor(image)`` -> encoder -> ``hidden_states[-2][0, 1:].mean(0)``. The
    JPEGs are 2-4x the resize target (shortest edge 256), where decoder drafting would change
    the result (1.0-1.6% of the feature's largest magnitude on these images, measured) and exact
    decoding stays within 0.03% plus fp16 storage rounding (~0.05%)."""
    directory = save_random_dinov2(tmp_path / "enc")
    images = photo_jpegs(tmp_path / "jpegs", [(600, 600), (800, 600), (1024, 768), (520, 700)])
    extract_features(ExtractConfig(source=str(images), out=tmp_path / "f.h5",
                                   encoder=str(directory), num_workers=0, progress=False))
    table = FeatureTable(tmp_path / "f.h5", dtype=torch.float32)
    processor = AutoImageProcessor.from_pretrained(directory)
    model = AutoModel.from_pretrained(directory).eval()
    for path in sorted(images.iterdir()):
        with torch.no_grad(), Image.open(path) as image:
            pixel_values = processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]
            hidden = model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        reference = hidden[-2][0, 1:].mean(0)
        ours = table.lookup([path.stem])[0]
        error = ((ours - reference).abs().max() / reference.abs().max()).item()
        assert error <= 3e-3, f"{path.name}: {error:.2%} of the feature's largest magnitude"


# ---------------------------------------------------------------------------------------------
# The feature file


def test_folder_extraction_file_layout(tmp_path, encoder_dir):
    rng = np.random.default_rng(1)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for i in range(5):
        smooth_image(rng, 40 + 9 * i, 70).save(tmp_path / "imgs" / ("sub" if i % 2 else "")
                                                / f"im{i}.png")
    out = tmp_path / "f.h5"
    summary = extract(tmp_path / "imgs", out, encoder_dir)
    assert summary["rows"] == 5 and summary["failed"] == 0
    with h5py.File(out, "r") as f:
        assert f[FEATURES].shape == (5, 64) and f[FEATURES].dtype == np.float16
        assert f[FEATURES].chunks is None  # contiguous: fast random batch reads
        assert sorted(x.decode() for x in f[IDS][:]) == ["im0", "im2", "im4", "sub/im1", "sub/im3"]
        assert f[BLACK].shape == (64,) and len(f[FAILED]["ids"]) == 0
        a = dict(f.attrs)
        assert a["layer"] == LAYER and a["pooling"] == POOLING and a["image_size"] == 56
        assert a["dtype"] == "float16" and a["count"] == 5 and bool(a["complete"])
        assert a["encoder"] == str(encoder_dir) and a["babymerge_version"]
        assert json.loads(a["config"])["batch_size"] == 4
    table = FeatureTable(out)
    encoder = load_encoder(encoder_dir)
    expected = encoder.encode([Image.open(tmp_path / "imgs" / "sub" / "im3.png")])[0]
    torch.testing.assert_close(table.lookup(["sub/im3"])[0].float(), expected, atol=2e-3, rtol=2e-3)
    black = encoder.encode([Image.new("RGB", (640, 420))])[0]
    torch.testing.assert_close(table.black.float(), black, atol=2e-3, rtol=2e-3)


def test_local_encoder_recorded_by_absolute_path(tmp_path, encoder_dir, monkeypatch):
    # train copies the attr into the model config: a VLM must find its encoder from any folder
    (tmp_path / "imgs").mkdir()
    smooth_image(np.random.default_rng(2), 40, 50).save(tmp_path / "imgs" / "a.png")
    monkeypatch.chdir(encoder_dir.parent)
    extract(tmp_path / "imgs", tmp_path / "f.h5", encoder_dir.name)
    with h5py.File(tmp_path / "f.h5", "r") as f:
        assert f.attrs["encoder"] == str(encoder_dir.resolve())
    monkeypatch.chdir(tmp_path)  # the same encoder named from elsewhere is the same encoder
    assert extract(tmp_path / "imgs", tmp_path / "f.h5", encoder_dir)["skipped"] == 1


def test_no_progress_shows_no_bar(tmp_path, encoder_dir, capsys):
    """--no-progress (and the demo's) silences the extraction bar and transformers' loading bar;
    by default ours shows."""
    write_images(tmp_path / "images", ["a.png", "b.png"])
    extract(tmp_path / "images", tmp_path / "quiet.h5", encoder_dir, progress=False)
    err = capsys.readouterr().err
    assert "img/s" not in err and "%|" not in err, err
    extract(tmp_path / "images", tmp_path / "bar.h5", encoder_dir)
    assert "img/s" in capsys.readouterr().err


def test_extraction_runs_where_flock_is_not_supported(tmp_path, encoder_dir, monkeypatch):
    """Cluster file systems whose mounts have no file locks (Lustre noflock, NFS without
    lockd): flock fails there with ENOSYS/ENOLCK, which must not stop extraction."""
    write_images(tmp_path / "imgs", ["a.png", "b.png"])

    def no_locks(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr("babymerge.config.fcntl.flock", no_locks)
    with pytest.warns(UserWarning, match="no file locks"):
        summary = extract(tmp_path / "imgs", tmp_path / "f.h5", encoder_dir)
    assert summary["rows"] == 2 and not (tmp_path / "f.h5.partial").exists()


# ---------------------------------------------------------------------------------------------
# Robustness: ranks + SIGKILL + resume + join, refusing to mix encoders, the CLI


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


# ---------------------------------------------------------------------------------------------
# Re-runs: images that could not be read are tried again, failures recorded anew


def test_missing_file_is_retried_corrupt_file_is_not(tmp_path, encoder_dir):
    """An image that could not be read (missing file: wrong --image-root, download not yet
    finished) is tried again by the next run; one that failed to decode waits for
    --retry-failed."""
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


def test_rerun_with_still_missing_images_does_not_rewrite(tmp_path, encoder_dir):
    """A re-run whose only work is trying again images that still cannot be read leaves the
    feature file as it is (at real scale it is gigabytes; rewriting it on every run of a job
    array for a few missing files costs minutes and adds nothing)."""
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


def test_rerun_whose_failure_changed_records_the_new_reason(tmp_path, encoder_dir):
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


# ---------------------------------------------------------------------------------------------
# Sources already in the file: extending a feature file with a second SOURCE whose ids are
# already stored (from the first source) says so; a resume or re-run of a source already in
# the file does not


def test_second_source_with_stored_ids_warns_and_resume_does_not(tmp_path, encoder_dir):
    write_images(tmp_path / "a", ["1.png", "2.png"], seed=0)
    write_images(tmp_path / "b", ["2.png", "3.png"], seed=1)  # its "2" is another image
    out = tmp_path / "f.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        extract(tmp_path / "a", out, encoder_dir)
    with pytest.warns(UserWarning, match=r"1 image id\(s\) of SOURCE .*b are already in .*: 2;"):
        summary = extract(tmp_path / "b", out, encoder_dir)
    assert summary["rows"] == 3 and summary["skipped"] == 1
    with h5py.File(out, "r") as f:
        sources = json.loads(f.attrs["config"])["sources"]
    assert sources == sorted(str((tmp_path / d).resolve()) for d in "ab")
    with warnings.catch_warnings():  # both sources are known now: re-runs are resumes
        warnings.simplefilter("error")
        assert extract(tmp_path / "b", out, encoder_dir)["skipped"] == 2
        assert extract(tmp_path / "a", out, encoder_dir)["skipped"] == 2


def test_file_written_before_sources_were_recorded(tmp_path, encoder_dir):
    """A file whose config has only its one ``source``: re-running that source resumes quietly,
    another source with the same ids warns."""
    write_images(tmp_path / "a", ["1.png"], seed=0)
    write_images(tmp_path / "b", ["1.png"], seed=1)
    out = tmp_path / "f.h5"
    extract(tmp_path / "a", out, encoder_dir)
    with h5py.File(out, "r+") as f:
        config = json.loads(f.attrs["config"])
        del config["sources"]
        f.attrs["config"] = json.dumps(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert extract(tmp_path / "a", out, encoder_dir)["skipped"] == 1
    with pytest.warns(UserWarning, match=r"1 image id\(s\) of SOURCE .*b are already in"):
        extract(tmp_path / "b", out, encoder_dir)


def test_joined_file_records_every_shards_source(tmp_path, encoder_dir):
    from babymerge.features import JoinConfig, join_features

    write_images(tmp_path / "a", ["1.png"], seed=0)
    write_images(tmp_path / "b", ["2.png"], seed=1)
    extract(tmp_path / "a", tmp_path / "a.h5", encoder_dir)
    extract(tmp_path / "b", tmp_path / "b.h5", encoder_dir)
    join_features(JoinConfig(shards=[tmp_path / "a.h5", tmp_path / "b.h5"], out=tmp_path / "j.h5"))
    with warnings.catch_warnings():  # b's images are in the joined file: re-running b resumes
        warnings.simplefilter("error")
        assert extract(tmp_path / "b", tmp_path / "j.h5", encoder_dir)["skipped"] == 1


def test_virtual_join_counts_the_failed_it_writes(tmp_path, encoder_dir):
    """An id failed in one shard but with a feature in another is not failed: the summary and
    the file agree (the virtual join's summary counted it)."""
    from babymerge.features import JoinConfig, join_features

    write_images(tmp_path / "a", ["1.png"], seed=0)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "1.png").write_bytes(b"broken")
    extract(tmp_path / "a", tmp_path / "a.h5", encoder_dir)
    with pytest.raises(SourceError, match="all 1 image"):  # the file is written all the same
        extract(tmp_path / "b", tmp_path / "b.h5", encoder_dir)
    for virtual in (False, True):
        out = tmp_path / f"j{virtual}.h5"
        summary = join_features(JoinConfig(shards=[tmp_path / "a.h5", tmp_path / "b.h5"],
                                           out=out, virtual=virtual))
        with h5py.File(out, "r") as f:
            assert summary["failed"] == len(f["failed"]["ids"]) == 0


def test_longer_shard_range_is_the_same_source(tmp_path, encoder_dir):
    """Extending a feature file with a longer range (or a glob) of the same .tar shards, as the
    README's `extract-features shards/{00000..00331}.tar` does once more of a download has
    arrived, is a resume of the same source, not a second source whose ids clash."""
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "00000.tar", 0, 2, seed=0)
    write_shard(shards / "00001.tar", 100, 2, seed=1)
    out = tmp_path / "f.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        extract(f"{shards}/{{00000..00000}}.tar", out, encoder_dir)
        # the download went on: the range is extended, the stored shard is resumed quietly
        summary = extract(f"{shards}/{{00000..00001}}.tar", out, encoder_dir)
        assert summary["rows"] == 4 and summary["skipped"] == 2
        assert extract(f"{shards}/*.tar", out, encoder_dir)["skipped"] == 4
        assert extract(str(shards), out, encoder_dir)["skipped"] == 4
    # shards of another download with the same keys still clash
    other = tmp_path / "other"
    other.mkdir()
    write_shard(other / "00000.tar", 0, 1, seed=5)
    with pytest.warns(UserWarning, match=r"1 image id\(s\) of SOURCE .*other.* are already in"):
        extract(f"{other}/{{00000..00000}}.tar", out, encoder_dir)


# ---------------------------------------------------------------------------------------------
# Extraction with the GPU JPEG path (on CPU the decoder's ``decode`` is fixtures.pil_decode,
# a PIL stand-in with torchvision's signature; the decoder itself is test_images.py's)


def test_feature_file_does_not_depend_on_where_jpegs_decode(tmp_path, encoder_dir, monkeypatch):
    """The whole extraction with deferral on (decode stand-in on CPU) equals the worker run
    without drafting: same ids in the same order, same features, same /failed. Deferral turns
    drafting off for the whole file, even under --jpeg-draft, so the large progressive JPEG left
    to the workers is not drafted either (drafting would change its feature)."""
    rng = np.random.default_rng(4)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(7):
        smooth_image(rng, 60 + 4 * i, 80).save(folder / f"a{i}.jpg")
    smooth_image(rng, 50, 70).save(folder / "p.jpg", progressive=True)
    smooth_image(rng, 300, 400).save(folder / "big.jpg", progressive=True)  # drafted if asked
    smooth_image(rng, 50, 70).save(folder / "c.png")
    (folder / "z.jpg").write_bytes(b"")
    kw = dict(source=str(folder), encoder=str(encoder_dir), num_workers=0, batch_size=4)
    extract_features(ExtractConfig(out=tmp_path / "workers.h5", **kw))
    extract_features(ExtractConfig(out=tmp_path / "drafted.h5", jpeg_draft=True, **kw))
    monkeypatch.setattr(features, "resolve_decode", lambda decode, device, workers: "gpu")
    monkeypatch.setattr(features, "GpuJpegDecoder",
                        lambda preprocess, device: GpuJpegDecoder(preprocess, device, pil_decode))
    extract_features(ExtractConfig(out=tmp_path / "gpu.h5", jpeg_draft=True, **kw))
    with (h5py.File(tmp_path / "workers.h5") as a, h5py.File(tmp_path / "gpu.h5") as b,
          h5py.File(tmp_path / "drafted.h5") as d):
        assert list(a[IDS][:]) == list(b[IDS][:]) and len(a[IDS]) == 10
        np.testing.assert_array_equal(a[FEATURES][:], b[FEATURES][:])
        assert list(a[FAILED]["ids"][:]) == list(b[FAILED]["ids"][:]) == [b"z"]
        # the file says which decoder made it
        assert json.loads(a.attrs["config"])["decode_resolved"] == "workers"
        assert json.loads(b.attrs["config"])["decode_resolved"] == "gpu"
        big = list(a[IDS][:]).index(b"big")
        assert not np.array_equal(a[FEATURES][big], d[FEATURES][big])


def test_auto_decode_follows_device_and_workers(monkeypatch):
    monkeypatch.setattr(features, "gpu_jpeg_decoder_available", lambda: True)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert features.resolve_decode("auto", cuda, 3) == "gpu"
    assert features.resolve_decode("auto", cuda, features.GPU_DECODE_BELOW_WORKERS) == "workers"
    assert features.resolve_decode("auto", cpu, 0) == "workers"
    assert features.resolve_decode("workers", cuda, 0) == "workers"
    assert features.resolve_decode("gpu", cuda, 15) == "gpu"


def test_decode_gpu_without_cuda_is_a_clear_error(tmp_path, encoder_dir):
    if torch.cuda.is_available() and gpu_jpeg_decoder_available():
        pytest.skip("this machine can decode on the GPU")
    smooth_image(np.random.default_rng(6), 60, 80).save(tmp_path / "a.jpg")
    with pytest.raises(features.InputError, match="--decode gpu needs"):
        extract_features(ExtractConfig(source=str(tmp_path), out=tmp_path / "f.h5",
                                       encoder=str(encoder_dir), decode="gpu", device="cpu"))


def test_a_non_finite_feature_is_never_stored(tmp_path, encoder_dir, monkeypatch):
    """An image whose feature comes out NaN (or overflows float16) goes to /failed with the
    reason, and its row is not written; the other images are."""
    write_images(tmp_path / "images", ["a.png", "b.png", "c.png"])
    real = features.ImageEncoder.encode_pixels

    def nan_for_the_second(self, pixels):
        out = real(self, pixels)
        if len(out) == 3:  # the images' batch (the black image is encoded alone, first)
            out[1, 0] = float("nan")
        return out

    monkeypatch.setattr(features.ImageEncoder, "encode_pixels", nan_for_the_second)
    summary = extract(tmp_path / "images", tmp_path / "f.h5", encoder_dir, progress=False)
    assert (summary["new"], summary["new_failed"]) == (2, 1)
    table = FeatureTable(tmp_path / "f.h5")
    assert sorted(table.ids) == ["a", "c"] and torch.isfinite(table.features.float()).all()
    assert "not finite" in table.failed["b"]


@pytest.mark.parametrize("virtual", [False, True])
def test_join_refuses_non_finite_rows(tmp_path, virtual):
    from fixtures import write_feature_file

    feats = np.ones((3, 4))
    feats[1, 2] = np.inf
    shards = [write_feature_file(tmp_path / "s0.h5", ["a", "b", "c"], feats, np.zeros(4)),
              write_feature_file(tmp_path / "s1.h5", ["d"], np.ones((1, 4)), np.zeros(4))]
    with pytest.raises(FeatureFileError, match=r"s0.h5: 1 feature row\(s\) from row 1 on hold NaN"):
        join_features(JoinConfig(shards=[str(s) for s in shards], out=tmp_path / "j.h5",
                                 virtual=virtual))
    assert not (tmp_path / "j.h5").exists()


@pytest.mark.parametrize("name", ["/data/models/dinov2-large", "./enc", "models/dinov2/large"])
def test_a_missing_local_encoder_folder_is_named(name):
    with pytest.raises(features.EncoderError, match=f"--encoder {name}: no such folder"):
        load_encoder(name)


def test_a_source_whose_every_image_fails_is_an_error(tmp_path, encoder_dir):
    """Exit 0 with an empty feature file passed for a good run (Google's raw CC3M TSV read as
    id<TAB>path: every row failed); the file and its /failed reasons are still written."""
    (tmp_path / "imgs").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "imgs" / name).write_bytes(b"not an image")
    with pytest.raises(SourceError, match=r"all 2 image\(s\) failed \(e.g. 'a': .*/failed"):
        extract(tmp_path / "imgs", tmp_path / "f.h5", encoder_dir)
    assert set(FeatureTable(tmp_path / "f.h5").failed) == {"a", "b"}


def test_writers_of_feature_files_never_replace_a_users_file(tmp_path, encoder_dir):
    """extract-features and join-features refuse an --out that is not a feature file, and leave
    it as it was (join replaced it whole)."""
    write_images(tmp_path / "imgs", ["a.png"])
    extract(tmp_path / "imgs", tmp_path / "f.h5", encoder_dir)
    for name in ("notes.h5", "notes2.h5"):
        (tmp_path / name).write_text("my notes")
    with pytest.raises(FeatureFileError, match="notes.h5: not a readable HDF5 file"):
        extract(tmp_path / "imgs", tmp_path / "notes.h5", encoder_dir)
    with pytest.raises(FeatureFileError, match="--out .*notes2.h5: exists and is not a feature "
                                               "file; nothing replaced"):
        join_features(JoinConfig(shards=[tmp_path / "f.h5"], out=tmp_path / "notes2.h5"))
    assert all((tmp_path / n).read_text() == "my notes" for n in ("notes.h5", "notes2.h5"))
    join_features(JoinConfig(shards=[tmp_path / "f.h5"], out=tmp_path / "j.h5"))
    join_features(JoinConfig(shards=[tmp_path / "f.h5"], out=tmp_path / "j.h5"))  # its own: again


def test_join_names_a_shard_it_cannot_use(tmp_path, encoder_dir):
    """A shard that is not HDF5, one cut short, one of another width, or one whose bytes were
    damaged after it was written: one error naming it, copied or joined virtually, and no OUT."""
    write_images(tmp_path / "imgs", ["a.png"])
    extract(tmp_path / "imgs", tmp_path / "good.h5", encoder_dir)
    (tmp_path / "text.h5").write_text("not hdf5")
    data = (tmp_path / "good.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[:len(data) // 3])
    from fixtures import damage_first_chunk, write_feature_file

    write_feature_file(tmp_path / "wide.h5", ["b"], np.ones((1, 8)), np.zeros(8))
    shutil.copy(tmp_path / "good.h5", tmp_path / "bad.h5")  # made like good.h5, 70 rows
    with h5py.File(tmp_path / "bad.h5", "r+") as f:
        rows = np.repeat(f[FEATURES][:], 70, axis=0)
        del f[FEATURES], f[IDS]
        f[FEATURES] = rows
        f.create_dataset(IDS, data=[f"x{i}" for i in range(70)], dtype=STR_DTYPE)
        f.attrs["count"] = 70
    damage_first_chunk(tmp_path / "bad.h5")
    for shard, says in (("text.h5", "not a readable HDF5 file"),
                        ("cut.h5", "not a readable HDF5 file|cut short|truncated"),
                        ("wide.h5", "wide.h5"),
                        ("bad.h5", "bad.h5: damaged, HDF5 cannot read it")):
        for virtual in (False, True):
            with pytest.raises(FeatureFileError, match=says):
                join_features(JoinConfig(shards=[tmp_path / "good.h5", tmp_path / shard],
                                         out=tmp_path / f"j_{shard}", virtual=virtual))
            assert not (tmp_path / f"j_{shard}").exists()
