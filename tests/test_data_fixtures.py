"""A tiny generated world for the tokenizer/data/train tests: a text corpus, image-dependent
captions, and a feature file written directly in the DESIGN.md layout (no extractor needed).

Image ``i`` shows a (colour, animal) pair; its feature is the sum of the two prototypes plus
noise, so a caption can only be predicted from the feature. Imported by the test modules.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from babymerge.featurefile import BLACK, FAILED, FEATURES, IDS, STR_DTYPE
from babymerge.tokenizer import TokenizerConfig, train_tokenizer

COLORS = ["red", "blue", "green", "yellow"]
ANIMALS = ["cat", "dog", "bird", "fish"]
VERBS = ["sees", "likes", "finds", "chases", "hears"]
DIM = 16


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


def image_class(i: int) -> tuple[str, str]:
    return COLORS[i % 4], ANIMALS[(i // 4) % 4]


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
        a, b = rng.choice(ANIMALS, 2)
        lines.append(f"the {a} {rng.choice(VERBS)} the {rng.choice(COLORS)} {b}.")
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
