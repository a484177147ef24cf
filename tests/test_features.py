"""Stage 1: encoder pooling and preprocessing parity, file layout, sources, bad files."""

import json

import h5py
import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from transformers import AutoImageProcessor, AutoModel

from babymerge.featurefile import BLACK, FAILED, FEATURES, IDS, LAYER, POOLING, FeatureTable
from babymerge.features import (ExtractConfig, extract_features, load_encoder, pool_patch_tokens,
                                save_random_dinov2)


def smooth_image(rng, height, width, mode="RGB"):
    """A photo-like (smooth) random image; white noise would exaggerate resampling differences."""
    pixels = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    return Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(2)).convert(mode)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A tiny random DINOv2 with a 56-pixel crop (shortest edge 64): fast on CPU."""
    return save_random_dinov2(tmp_path_factory.mktemp("enc") / "dinov2", image_size=56)


def extract(source, out, encoder_dir, **kw):
    cfg = ExtractConfig(source=str(source), out=out, encoder=str(encoder_dir),
                        num_workers=kw.pop("num_workers", 0), batch_size=kw.pop("batch_size", 4),
                        **kw)
    return extract_features(cfg)


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
    x = torch.stack([encoder.preprocess.pixels(im) for im in images]).float()
    normalised = (x / 255 - encoder._mean) / encoder._std
    assert (normalised - pixel_values).abs().max().item() <= 1 / 255 / 0.224 + 1e-4


def test_pool_patch_tokens_drops_cls_and_registers():
    hidden = torch.arange(2 * 7 * 3, dtype=torch.float32).view(2, 7, 3)
    torch.testing.assert_close(pool_patch_tokens(hidden, 5), hidden[:, 5:].mean(1))


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
