"""A saved VLM plus its encoder answers for raw images, exactly as for cached features."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from babymerge.evaluate import load_tasks, score_candidates
from babymerge.features import (EncoderError, ExtractConfig, extract_features,
                                save_random_dinov2)
from babymerge.model import IMAGE_TOKEN, MODEL_PRESETS, build_model, save_checkpoint
from babymerge.pixels import load_vlm_with_encoder
from babymerge.tokenizer import load_tokenizer
from fixtures import world  # noqa: F401  (fixture)

TEXTS = ["a red cat is here.", "the dog sees the blue fish."]


@pytest.fixture(scope="module")
def saved(world, tmp_path_factory):  # noqa: F811
    """A tiny VLM whose config names a random 64-d DINOv2, saved with its tokenizer."""
    root = tmp_path_factory.mktemp("pixels")
    encoder = save_random_dinov2(root / "enc", image_size=56)
    tok = load_tokenizer(world["tokenizer"])
    preset = type(MODEL_PRESETS["tiny"])(**{**MODEL_PRESETS["tiny"].__dict__, "feature_dim": 64})
    model = build_model(preset, seed=0, vocab_size=len(tok),
                        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, encoder=str(encoder))
    save_checkpoint(model, root / "vlm", tok)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a", (90, 70)), ("b", (64, 64))):
        pixels = (rng.random((*size, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"{name}.png")
    return {"root": root, "encoder": encoder, "vlm": root / "vlm", "images": images}


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
