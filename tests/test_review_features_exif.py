"""Stage 1: a photo stored sideways with an EXIF orientation is encoded upright, as ``datasets``
(the BabyLM evaluation pipeline's image loader) and transformers' ``load_image`` decode it."""

import io

import numpy as np
import torch
from PIL import Image, ImageOps

from babymerge.featurefile import FeatureTable
from babymerge.features import load_encoder
from babymerge.images import Preprocess
from test_features import encoder_dir, extract, smooth_image  # noqa: F401 (a fixture)

ORIENTATION = 0x0112


def sideways_jpeg(orientation):
    """A 48x80 (h x w) JPEG whose EXIF says: display rotated (6 = 90 degrees clockwise)."""
    image = smooth_image(np.random.default_rng(3), 48, 80)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def test_exif_rotated_photo_is_encoded_upright_like_datasets(tmp_path, encoder_dir):  # noqa: F811
    import datasets

    data = sideways_jpeg(6)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "photo.jpg").write_bytes(data)
    # What the evaluation pipeline sees: the datasets Image feature decodes it upright (80x48).
    upright = datasets.Image().decode_example({"bytes": data, "path": None})
    assert upright.size == (48, 80)
    assert upright.size == ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size

    extract(tmp_path / "imgs", tmp_path / "f.h5", encoder_dir)
    got = FeatureTable(tmp_path / "f.h5", dtype=torch.float32).lookup(["photo"])[0]
    encoder = load_encoder(encoder_dir)
    expected = encoder.encode([upright])[0]
    sideways = Image.fromarray(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    stored = encoder.encode([sideways])[0]  # the pixels as stored, no EXIF left on them
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)
    assert (got - stored).abs().max() > 10 * (got - expected).abs().max()
    # A PIL image opened plainly (its EXIF still on it) is encoded as extraction encodes the file
    torch.testing.assert_close(encoder.encode([Image.open(io.BytesIO(data))])[0], got,
                               atol=2e-3, rtol=2e-3)


def test_rotated_jpeg_is_not_deferred_to_nvjpeg():
    """nvJPEG ignores EXIF: a rotated JPEG stays with the workers' PIL decode."""
    preprocess = Preprocess(64, 56, 56, defer_jpeg=True)
    assert preprocess.gpu_decodable(sideways_jpeg(1)) == (80, 48)
    assert preprocess.gpu_decodable(sideways_jpeg(6)) is None
    assert preprocess(sideways_jpeg(6)).shape == (3, 56, 56)
