"""Shared test fixtures and helpers (not a test module): the generated worlds the stages run on and
the image helpers of the extraction tests. Nothing is downloaded.

- The text world (:func:`make_world`, pytest fixture ``world``) for the tokenizer, data, train,
  export, pixels and packaging tests: a text corpus, image-dependent captions and a feature file
  written directly in the DESIGN.md layout (no extractor needed). Image ``i`` shows a (colour,
  animal) pair; its feature is the sum of the two prototypes plus noise, so a caption can only be
  predicted from the feature.
- The evaluation world (:func:`build_world`, pytest fixture ``eval_world``) for the evaluate and
  merge tests: the project's tokenizer, BabyLLaVA checkpoints (tiny preset, 16-d features), a
  feature file and the three task kinds in the BabyLM pipeline's jsonl formats.
- Images for stage 1 (features and images tests): smooth random pictures, a tiny random DINOv2
  (pytest fixture ``encoder_dir``), web-dataset shards, a PIL stand-in for nvJPEG.

pytest fixtures are found by name in the module that uses them, so a test module imports them
(``from fixtures import world  # noqa: F401``). Each importing module gets its own instance, also
of the session-scoped ``world``: no test module sees files another module's tests wrote.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from babymerge.featurefile import BLACK, FAILED, FEATURES, IDS, STR_DTYPE
from babymerge.features import ExtractConfig, extract_features, save_random_dinov2
from babymerge.model import (IMAGE_TOKEN, MODEL_PRESETS, build_model, save_checkpoint,
                             set_feature_statistics)
from babymerge.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer

# ---------------------------------------------------------------------------------------------
# The text world (tokenizer, data, train, export, pixels, packaging)

TEXT_COLORS = ["red", "blue", "green", "yellow"]
TEXT_ANIMALS = ["cat", "dog", "bird", "fish"]
TEXT_VERBS = ["sees", "likes", "finds", "chases", "hears"]
DIM = 16  # the text world's feature width


def write_feature_file(path: Path, ids: list[str], features: np.ndarray, black: np.ndarray,
                       failed: dict[str, str] | None = None, complete: bool = True) -> Path:
    failed = failed or {}
    with h5py.File(path, "w") as f:
        f.create_dataset(FEATURES, data=features.astype(np.float16))
        f.create_dataset(IDS, data=np.array(ids, dtype=object), dtype=STR_DTYPE)
        f.create_dataset(BLACK, data=black.astype(np.float16))
        g = f.create_group(FAILED)
        g.create_dataset("ids", data=np.array(list(failed), dtype=object), dtype=STR_DTYPE)
        g.create_dataset("reasons", data=np.array(list(failed.values()), dtype=object),
                         dtype=STR_DTYPE)
        f.attrs.update({"encoder": "test/random", "layer": -2, "pooling": "mean_patch",
                        "image_size": 224, "dtype": "float16", "count": len(ids),
                        "complete": complete, "babymerge_version": "test", "config": "{}"})
    return path


def damage_first_chunk(path: Path) -> Path:
    """Store /features in gzip chunks of 64 rows and overwrite the first chunk's bytes: damage
    HDF5 meets only when it reads rows 0-63 (a bad disk sector, a copy gone wrong)."""
    with h5py.File(path, "r+") as f:
        data = f[FEATURES][:]
        del f[FEATURES]
        f.create_dataset(FEATURES, data=data, chunks=(64, data.shape[1]), compression="gzip")
        chunk = f[FEATURES].id.get_chunk_info(0)
    with open(path, "r+b") as f:
        f.seek(chunk.byte_offset)
        f.write(b"\xff" * chunk.size)
    return path


def image_class(i: int) -> tuple[str, str]:
    return TEXT_COLORS[i % 4], TEXT_ANIMALS[(i // 4) % 4]


def caption_of(i: int) -> str:
    color, animal = image_class(i)
    return f"a {color} {animal} is here."


def make_world(root: Path, n_images: int = 128, n_lines: int = 400, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    proto_c, proto_a = rng.normal(size=(4, DIM)), rng.normal(size=(4, DIM))
    ids = [f"img{i:03d}" for i in range(n_images)]
    feats = np.stack([proto_c[i % 4] + proto_a[(i // 4) % 4] + 0.1 * rng.normal(size=DIM)
                      for i in range(n_images)])
    features = write_feature_file(root / "features.h5", ids, feats, np.zeros(DIM),
                                  failed={"broken01": "cannot identify image file"})
    lines = []
    for _ in range(n_lines):
        a, b = rng.choice(TEXT_ANIMALS, 2)
        lines.append(f"the {a} {rng.choice(TEXT_VERBS)} the {rng.choice(TEXT_COLORS)} {b}.")
    text = root / "corpus.txt"
    text.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    captions = root / "captions.jsonl"
    recs = [{"image_id": image_id, "caption": caption_of(i)} for i, image_id in enumerate(ids)]
    recs += [{"image_id": "missing07", "caption": "a red cat is here."},
             {"image_id": "broken01", "caption": "a blue dog is here."}]
    captions.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    tok_dir = root / "tokenizer"
    train_tokenizer(TokenizerConfig(corpus=[text, captions_as_text(root, recs)], out=tok_dir,
                                    vocab_size=400, min_frequency=1, progress=False))
    return {"root": root, "features": features, "text": text, "captions": captions,
            "tokenizer": tok_dir, "ids": ids, "feats": feats}


def captions_as_text(root: Path, recs: list[dict]) -> Path:
    path = root / "captions.txt"
    path.write_text("".join(r["caption"] + "\n" for r in recs), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> dict:
    return make_world(tmp_path_factory.mktemp("world"))


# ---------------------------------------------------------------------------------------------
# The evaluation world (evaluate, merge, merge_inputs, merge_resume, model)

FEATURE_DIM = 16  # the evaluation world's feature width
EVAL_NOUNS = ["cat", "dog", "ball", "bird", "tree", "car"]
EVAL_COLORS = ["red", "blue", "green", "yellow"]
EVAL_VERBS = ["sees", "likes", "chases"]


def make_tokenizer(directory: Path):
    """The project's tokenizer (helper T's stage) trained on the world's sentences."""
    corpus = [f"the {c} {n} {v} a {n2} ." for c in EVAL_COLORS for n in EVAL_NOUNS
              for v in EVAL_VERBS for n2 in EVAL_NOUNS[:2]] + ["what color is the ball ?", "see"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "corpus.txt").write_text("\n".join(corpus) + "\n", encoding="utf-8")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its stats line
        train_tokenizer(TokenizerConfig(corpus=[directory / "corpus.txt"], out=directory / "tok",
                                        vocab_size=330, min_frequency=1, progress=False))
    return load_tokenizer(directory / "tok")


def make_model(tokenizer, seed: int):
    preset = dataclasses.replace(MODEL_PRESETS["tiny"], feature_dim=FEATURE_DIM)
    return build_model(preset, seed=seed, vocab_size=len(tokenizer),
                       image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id).eval()


def make_checkpoint(directory: Path, tokenizer, seed: int) -> Path:
    return save_checkpoint(make_model(tokenizer, seed), directory, tokenizer)


def write_features(path: Path, ids: list[str], dim: int = FEATURE_DIM, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        f.create_dataset(FEATURES, data=rng.standard_normal((len(ids), dim)).astype(np.float16))
        f.create_dataset(IDS, data=np.array(ids, dtype=object), dtype=STR_DTYPE)
        f.create_dataset(BLACK, data=rng.standard_normal(dim).astype(np.float16))
        f.attrs.update(count=len(ids), complete=True, layer=-2, pooling="mean_patch")
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_tasks(root: Path) -> dict[str, str]:
    """The three task kinds; returns {name: spec}. Image ids img0..img7."""
    agreement = [{"sentence_good": f"the {n} {v} a {m} .",
                  "sentence_bad": f"the {n} {v[:-1]} a {m} ."}
                 for n in EVAL_NOUNS for v in EVAL_VERBS[:2] for m in EVAL_NOUNS[:1]]
    order = [{"sentence_good": f"the {c} {n} .", "sentence_bad": f"{c} the {n} .", "UID": "order",
              "field": "syntax"} for c in EVAL_COLORS for n in EVAL_NOUNS[:3]]
    write_jsonl(root / "blimp" / "agreement.jsonl", agreement)
    write_jsonl(root / "blimp" / "order.jsonl", order)
    wino = [{"caption_0": f"a {EVAL_COLORS[i % 4]} {EVAL_NOUNS[i % 6]}",
             "caption_1": f"a {EVAL_COLORS[(i + 1) % 4]} {EVAL_NOUNS[i % 6]}",
             "image_id": f"img{i}"}
            for i in range(8)]
    write_jsonl(root / "wg.jsonl", wino)
    vqa = [{"question": "what color is the ball ?", "target_ans": EVAL_COLORS[i % 4],
            "distractors": [c for c in EVAL_COLORS if c != EVAL_COLORS[i % 4]],
            "image_id": f"img{i}"}
           for i in range(8)]
    write_jsonl(root / "vqa.jsonl", vqa)
    return {"blimp": f"minimal_pairs:{root / 'blimp'}", "wg": f"winoground:{root / 'wg.jsonl'}",
            "vqa": f"vqa:{root / 'vqa.jsonl'}"}


@dataclasses.dataclass
class World:
    root: Path
    tokenizer: object
    features: Path
    specs: dict[str, str]
    vlm: Path
    lm: Path
    base: Path


def build_world(root: Path) -> World:
    tok = make_tokenizer(root / "tokenizer")
    features = write_features(root / "features.h5", [f"img{i}" for i in range(8)])
    specs = write_tasks(root / "tasks")
    return World(root, tok, features, specs, vlm=make_checkpoint(root / "vlm", tok, seed=1),
                 lm=make_checkpoint(root / "lm", tok, seed=2),
                 base=make_checkpoint(root / "base", tok, seed=0))


@pytest.fixture(scope="module")
def eval_world(tmp_path_factory) -> World:
    return build_world(tmp_path_factory.mktemp("evalworld"))


# ---------------------------------------------------------------------------------------------
# Images for stage 1 (features, images)


def smooth_image(rng, height, width, mode="RGB"):
    """A photo-like (smooth) random image; white noise would exaggerate resampling differences."""
    pixels = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    return Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(2)).convert(mode)


def write_images(folder, names, seed=0, size=(48, 64)):
    rng = np.random.default_rng(seed)
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        smooth_image(rng, *size).save(path)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A tiny random DINOv2 with a 56-pixel crop (shortest edge 64): fast on CPU."""
    return save_random_dinov2(tmp_path_factory.mktemp("enc") / "dinov2", image_size=56)


def extract(source, out, encoder_dir, **kw):
    cfg = ExtractConfig(source=str(source), out=out, encoder=str(encoder_dir),
                        num_workers=kw.pop("num_workers", 0), batch_size=kw.pop("batch_size", 4),
                        **kw)
    return extract_features(cfg)


def write_shard(path, first_key, n, seed):
    """img2dataset's layout: KEY.jpg, KEY.txt, KEY.json per sample, 9-digit keys."""
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w") as tar:
        for k in range(first_key, first_key + n):
            buf = io.BytesIO()
            Image.fromarray((rng.random((40, 52, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
            key = f"{k:09d}"
            for ext, data in (("jpg", buf.getvalue()), ("txt", b"a caption"),
                              ("json", json.dumps({"key": key, "status": "success"}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        return [(m.name, m.offset, m.offset_data, m.size) for m in tar]


def pil_decode(blobs, device):
    """torchvision.io.decode_jpeg's contract (list of uint8 byte tensors -> list of uint8 CHW RGB
    images; RuntimeError when a file cannot be decoded), done with PIL: the GPU JPEG decoder's
    stand-in on CPU (torchvision cannot be installed beside the CPU torch here)."""
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


def vlm_of_random_encoder(root: Path, tokenizer_dir: Path, feature_norm: str = "none") -> dict:
    """A tiny VLM reading the pooled features of a random 64-d DINOv2 (56-pixel crop) that its
    config names, saved with its tokenizer, and two images: what the pixels and submission
    tests run on raw images. With ``feature_norm="standardize"``, random feature statistics."""
    encoder = save_random_dinov2(root / "enc", image_size=56)
    tok = load_tokenizer(tokenizer_dir)
    preset = dataclasses.replace(MODEL_PRESETS["tiny"], feature_dim=64)
    model = build_model(preset, seed=0, vocab_size=len(tok),
                        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, encoder=str(encoder),
                        feature_norm=feature_norm)
    g = torch.Generator().manual_seed(0)
    if feature_norm == "standardize":
        set_feature_statistics(model, torch.randn(64, generator=g),
                               torch.rand(64, generator=g) + 0.5)
    save_checkpoint(model, root / "vlm", tok)
    images = root / "images"
    images.mkdir()
    for name, size in (("a", (90, 70)), ("b", (64, 64))):
        pixels = (torch.rand(*size, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(images / f"{name}.png")
    return {"root": root, "encoder": encoder, "vlm": root / "vlm", "images": images,
            "tokenizer": tok}
