"""Stage 1: a photo whose EXIF says how to turn it, but whose EXIF block Pillow cannot write
back without the orientation tag (its writer has raised TypeError, ZeroDivisionError and
IndexError on real camera files: python-pillow issues 4238, 7839, 8605), is still decoded and
turned; since EXIF orientation was applied it was recorded in /failed as a decode error (or as
'truncated or corrupt' for a ValueError), an image lost that decoded before."""

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from babymerge.images import Preprocess, upright
from test_review_features_exif import sideways_jpeg


@pytest.mark.parametrize("error", [TypeError, ZeroDivisionError, ValueError])
def test_unwritable_exif_still_turns_the_picture(monkeypatch, error):
    data = sideways_jpeg(6)
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))

    def broken(self, *args, **kwargs):
        raise error("malformed EXIF value")

    monkeypatch.setattr(Image.Exif, "tobytes", broken)
    got = upright(Image.open(io.BytesIO(data)))
    assert np.array_equal(np.asarray(got), want)
    assert upright(got) is got  # turned once: no orientation left on it
    assert Preprocess(64, 56, 56)(data).shape == (3, 56, 56)
