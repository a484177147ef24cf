"""A saved VLM plus its encoder answers for raw images, exactly as for cached features."""

import json

import pytest
import torch
from PIL import Image

from babymerge.evaluate import load_tasks, score_candidates
from babymerge.features import (EncoderError, ExtractConfig, extract_features,
                                save_random_dinov2)
from babymerge.pixels import load_vlm_with_encoder
from fixtures import vlm_of_random_encoder, world  # noqa: F401  (world: fixture)

TEXTS = ["a red cat is here.", "the dog sees the blue fish."]


@pytest.fixture(scope="module")
def saved(world, tmp_path_factory):  # noqa: F811
    """A tiny VLM whose config names a random 64-d DINOv2, saved with its tokenizer."""
    return vlm_of_random_encoder(tmp_path_factory.mktemp("pixels"), world["tokenizer"])


def test_scores_from_pixels_equal_scores_from_the_extracted_feature(saved):
    root = saved["root"]
    # float32 storage: the cached path then differs from the pixel path only in batch composition
    extract_features(ExtractConfig(source=str(saved["images"]), out=root / "f.h5",
                                   encoder=str(saved["encoder"]), num_workers=0, batch_size=4,
                                   dtype="float32"))
    tasks = root / "wg.jsonl"
    tasks.write_text("".join(json.dumps({"image_id": i, "caption_0": TEXTS[0],
                                         "caption_1": TEXTS[1]}) + "\n" for i in ("a", "b")))
    vlm = load_vlm_with_encoder(saved["vlm"], encoder=saved["encoder"])
    [task] = load_tasks([f"winoground:{tasks}"], vlm.tokenizer, root / "f.h5")
    cached = score_candidates(vlm.model, task, progress=False).view(2, 2)
    from_pixels = torch.tensor([vlm.score(Image.open(saved["images"] / f"{i}.png"), TEXTS)
                                for i in ("a", "b")], dtype=torch.float64)
    torch.testing.assert_close(from_pixels, cached, rtol=1e-5, atol=1e-4)
    assert (from_pixels[0] - from_pixels[1]).abs().min() > 1e-3  # the image does matter

    text = vlm.generate(Image.open(saved["images"] / "a.png"), prompt="the <image> cat",
                        max_new_tokens=4)
    assert isinstance(text, str)


def test_encoder_of_another_width_is_a_clear_error(saved):
    other = save_random_dinov2(saved["root"] / "enc32", hidden_size=32)
    with pytest.raises(EncoderError, match="32-d features but the model takes 64-d"):
        load_vlm_with_encoder(saved["vlm"], encoder=other)


def test_checkpoint_names_a_local_encoder_by_its_folder_name_only(saved):
    """No machine path in config.json: a local encoder folder is recorded by its name, and
    loading without the folder says to pass it."""
    config = json.loads((saved["vlm"] / "config.json").read_text())
    assert config["encoder"] == "enc" and str(saved["root"]) not in json.dumps(config)
    with pytest.raises(EncoderError, match=r"(?s)encoder 'enc'.*pass its folder: encoder=PATH"):
        load_vlm_with_encoder(saved["vlm"])


@pytest.mark.parametrize("recorded, name", [
    ("facebook/dinov2-large", "facebook/dinov2-large"),
    ("/home/u/.cache/huggingface/hub/models--facebook--dinov2-large/snapshots/0123abc",
     "facebook/dinov2-large"),
    ("/data/models/dinov2-with-registers-large/", "dinov2-with-registers-large"),
])
def test_encoder_name_is_portable(recorded, name):
    from babymerge.model import encoder_name

    assert encoder_name(recorded) == name
