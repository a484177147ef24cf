"""Stage 1's GPU JPEG path: which files are deferred to nvJPEG, the decoder's batching and
fallbacks, and a feature file that does not depend on where JPEGs were decoded.

On CPU the decoder's ``decode`` is a PIL stand-in with torchvision's signature (torchvision cannot
be installed beside the CPU torch here); ``-m gpu`` runs the real nvJPEG against the workers.
"""

import io
import json
from dataclasses import replace

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import babymerge.features as features
from babymerge.featurefile import FAILED, FEATURES, IDS
from babymerge.features import ExtractConfig, extract_features, load_encoder, save_random_dinov2
from babymerge.images import (BadImage, GpuJpegDecoder, ImageDataset, ImageItem, JpegBytes,
                              Preprocess, collate, gpu_jpeg_decoder_available)
from test_features import smooth_image


def jpeg_bytes(image, **save_kw):
    buf = io.BytesIO()
    image.save(buf, "JPEG", **save_kw)
    return buf.getvalue()


def pil_decode(blobs, device):
    """torchvision.io.decode_jpeg's contract (list of uint8 byte tensors -> list of uint8 CHW RGB
    images; RuntimeError when a file cannot be decoded), done with PIL."""
    out = []
    for blob in blobs:
        try:
            image = Image.open(io.BytesIO(blob.numpy().tobytes()))
            image.load()
        except OSError as e:
            raise RuntimeError(f"decode failed: {e}") from e
        array = np.array(image.convert("RGB"), dtype=np.uint8)
        out.append(torch.from_numpy(array).permute(2, 0, 1).to(device))
    return out


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return save_random_dinov2(tmp_path_factory.mktemp("enc") / "dinov2", image_size=56)


def test_only_plain_whole_jpegs_are_deferred(encoder_dir):
    preprocess = load_encoder(encoder_dir).preprocess
    rng = np.random.default_rng(0)
    photo = smooth_image(rng, 60, 80)
    baseline = jpeg_bytes(photo)
    assert preprocess.gpu_decodable(baseline) == (80, 60)
    assert preprocess.gpu_decodable(jpeg_bytes(photo.convert("L"))) == (80, 60)
    assert preprocess.gpu_decodable(jpeg_bytes(photo, progressive=True)) is None
    assert preprocess.gpu_decodable(jpeg_bytes(photo.convert("CMYK"))) is None
    assert preprocess.gpu_decodable(baseline[:-100]) is None  # truncated: PIL's check decides
    with pytest.raises(BadImage, match="truncated"):
        preprocess.gpu_decodable(baseline[:200])  # cut inside the header
    png = io.BytesIO()
    photo.save(png, "PNG")
    assert preprocess.gpu_decodable(png.getvalue()) is None
    with pytest.raises(BadImage, match="empty"):
        preprocess.gpu_decodable(b"")
    with pytest.raises(BadImage, match="not an image"):
        preprocess.gpu_decodable(b"\xff\xd8\xff hello")


def test_decoder_matches_workers_and_falls_back(encoder_dir):
    """Batches split by pixel budget, a refused batch retried one by one, a refused image decoded
    by PIL: crops equal the worker path's exactly (the stand-in decodes as PIL does)."""
    preprocess = load_encoder(encoder_dir, jpeg_draft=False).preprocess
    rng = np.random.default_rng(1)
    blobs = [jpeg_bytes(smooth_image(rng, h, w)) for h, w in [(60, 80), (120, 90), (64, 64)]]
    refused = blobs[1]
    calls = []

    def decode(data, device):
        calls.append(len(data))
        if any(d.numpy().tobytes() == refused for d in data):
            raise RuntimeError("nvjpeg refused it")
        return pil_decode(data, device)

    jpegs = [JpegBytes(b, *preprocess.gpu_decodable(b)) for b in blobs]
    decoder = GpuJpegDecoder(preprocess, torch.device("cpu"), decode=decode,
                             max_batch_pixels=80 * 60 + 120 * 90)
    crops = decoder(jpegs)
    # chunks [0, 1] and [2]; chunk [0, 1] refused, then 0 and 1 alone (1 refused -> PIL)
    assert calls == [2, 1, 1, 1]
    for crop, blob in zip(crops, blobs):
        assert torch.equal(crop, preprocess(blob))


def test_decoder_resizes_each_size_once_and_keeps_order(encoder_dir, monkeypatch):
    """A chunk of mixed sizes: one resize_crop call per size, on the stacked images, and each
    crop equals resizing that image alone, bit for bit, at its place in the input order."""
    preprocess = load_encoder(encoder_dir, jpeg_draft=False).preprocess
    rng = np.random.default_rng(7)
    sizes = [(60, 80), (64, 64), (60, 80), (120, 90), (64, 64), (60, 80)]
    blobs = [jpeg_bytes(smooth_image(rng, h, w)) for h, w in sizes]
    alone = [preprocess.resize_crop(image) for image in pil_decode(
        [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs], "cpu")]
    batches = []
    resize_crop = Preprocess.resize_crop

    def spy(self, x):
        batches.append(tuple(x.shape))
        return resize_crop(self, x)

    monkeypatch.setattr(Preprocess, "resize_crop", spy)
    jpegs = [JpegBytes(b, *preprocess.gpu_decodable(b)) for b in blobs]
    crops = GpuJpegDecoder(preprocess, torch.device("cpu"), decode=pil_decode)(jpegs)
    assert batches == [(3, 3, 60, 80), (2, 3, 64, 64), (1, 3, 120, 90)]
    assert len(crops) == len(blobs)
    for crop, expected in zip(crops, alone, strict=True):
        assert crop.shape == expected.shape and torch.equal(crop, expected)


def test_decoder_gives_the_reason_of_an_unusable_image(encoder_dir):
    preprocess = load_encoder(encoder_dir).preprocess
    good = jpeg_bytes(smooth_image(np.random.default_rng(2), 60, 80))
    # a header that claims a size the data does not hold: the decoder refuses, PIL names it
    broken = good[:200] + b"\x00" * 50 + b"\xff\xd9"
    jpegs = [JpegBytes(b, 80, 60)
             for b in (good, broken)]
    out = GpuJpegDecoder(preprocess, torch.device("cpu"), decode=pil_decode)(jpegs)
    assert isinstance(out[0], torch.Tensor) and out[0].dtype == torch.uint8
    assert isinstance(out[1], str) and "truncated or corrupt" in out[1]


def test_decoded_image_of_another_size_than_the_header_goes_to_pil(encoder_dir):
    """An image the decoder returns at a size other than the header's is not resized into a
    crop (it would be one of the right shape, of the wrong picture): PIL decodes it again."""
    preprocess = load_encoder(encoder_dir, jpeg_draft=False).preprocess
    blob = jpeg_bytes(smooth_image(np.random.default_rng(8), 60, 80))

    def transposed(data, device):
        return [image.transpose(1, 2) for image in pil_decode(data, device)]

    crops = GpuJpegDecoder(preprocess, torch.device("cpu"), decode=transposed)(
        [JpegBytes(blob, 80, 60)])
    assert torch.equal(crops[0], preprocess(blob))


def test_cpu_fallback_records_any_decoder_exception(encoder_dir):
    """As in the workers, an unexpected exception of the PIL fallback is one /failed reason."""
    preprocess = load_encoder(encoder_dir).preprocess

    def refuse(data, device):
        raise RuntimeError("nvjpeg refused it")

    decoder = GpuJpegDecoder(preprocess, torch.device("cpu"), decode=refuse)
    decoder.preprocess = lambda data: 1 / 0  # only the fallback calls it like this
    good = jpeg_bytes(smooth_image(np.random.default_rng(7), 60, 80))
    assert decoder([JpegBytes(good, 80, 60)]) == ["decode error (ZeroDivisionError: division by "
                                                  "zero)"]


def test_collate_keeps_deferred_jpegs_apart(tmp_path, encoder_dir):
    preprocess = replace(load_encoder(encoder_dir).preprocess, defer_jpeg=True)
    rng = np.random.default_rng(3)
    data = [jpeg_bytes(smooth_image(rng, 60, 80)),
            jpeg_bytes(smooth_image(rng, 60, 80), progressive=True), b""]
    items = []
    for i, blob in enumerate(data):
        (tmp_path / f"{i}.jpg").write_bytes(blob)
        items.append(ImageItem(id=str(i), path=str(tmp_path / f"{i}.jpg")))
    dataset = ImageDataset(items, preprocess)
    batch = collate([dataset[i] for i in range(3)])
    assert batch.jpegs == [0] and batch.good == [1] and batch.bad == [2]
    assert batch.pixels.shape[0] == 1 and batch.jpeg_bytes[0].width == 80


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


def test_nvjpeg_probe_needs_a_decode_that_works(monkeypatch):
    """torchvision that imports but cannot decode (built without nvJPEG) counts as absent."""
    import sys
    import types

    from babymerge import images

    def probe(decode_jpeg):
        fake = types.ModuleType("torchvision.io")
        fake.ImageReadMode = types.SimpleNamespace(RGB="RGB")
        fake.decode_jpeg = decode_jpeg
        monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
        monkeypatch.setitem(sys.modules, "torchvision.io", fake)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        images.gpu_jpeg_decoder_available.cache_clear()
        try:
            return images.gpu_jpeg_decoder_available()
        finally:
            images.gpu_jpeg_decoder_available.cache_clear()

    def broken(data, mode, device):
        raise RuntimeError("torchvision was not compiled with nvjpeg support")

    assert probe(broken) is False
    assert probe(lambda data, mode, device: pil_decode(data, "cpu")) is True


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


@pytest.mark.gpu
@pytest.mark.parametrize("subsampling, mean_levels, min_cosine", [(0, 1.0, 0.999),
                                                                  (2, 2.5, 0.998)],
                         ids=["444", "420"])
def test_nvjpeg_against_workers_on_cuda(tmp_path, subsampling, mean_levels, min_cosine):
    """Real nvJPEG vs PIL at DINOv2's geometry on photo-like images. With full-resolution chroma
    (4:4:4) only the IDCT's rounding differs: crops agree to a mean under one grey level. With
    4:2:0 chroma (most photos) nvJPEG repeats chroma samples where libjpeg interpolates: about a
    grey level on average, more at colour edges (an emulation with libjpeg-turbo's
    non-interpolating upsampling gave a mean of 0.8 to 1.3 and a feature cosine >= 0.9988)."""
    if not (torch.cuda.is_available() and gpu_jpeg_decoder_available()):
        pytest.skip("needs CUDA and torchvision")
    encoder = load_encoder(save_random_dinov2(tmp_path / "enc"), "cuda", jpeg_draft=False)
    rng = np.random.default_rng(5)
    blobs = [jpeg_bytes(smooth_image(rng, h, w), quality=90, subsampling=subsampling)
             for h, w in [(480, 640), (375, 500), (640, 427), (256, 256), (1000, 1500),
                          (480, 640), (256, 256)]]
    jpegs = [JpegBytes(b, *encoder.preprocess.gpu_decodable(b)) for b in blobs]
    decoder = GpuJpegDecoder(encoder.preprocess, torch.device("cuda"))
    gpu = torch.stack(decoder(jpegs))
    for crop, jpeg in zip(gpu, jpegs):  # resized with its size group = resized alone, exactly
        alone = encoder.preprocess.resize_crop(decoder.decode([jpeg.tensor()], device="cuda")[0])
        assert torch.equal(crop, alone)
    cpu = torch.stack([encoder.preprocess(b) for b in blobs]).cuda()
    diff = (gpu.float() - cpu.float()).abs()
    assert diff.mean().item() < mean_levels, diff.mean().item()
    a, b = encoder.encode_pixels(gpu), encoder.encode_pixels(cpu)
    assert torch.nn.functional.cosine_similarity(a, b).min().item() > min_cosine
