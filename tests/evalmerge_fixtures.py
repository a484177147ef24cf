"""Tiny, generated evaluation world shared by test_evaluate*.py and test_merge*.py: the project's
tokenizer,
BabyLLaVA checkpoints (tiny preset, 16-d features), a feature file and the three task kinds in the
BabyLM pipeline's jsonl formats. Nothing is downloaded."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from pathlib import Path

import h5py
import numpy as np

from babymerge.featurefile import BLACK, FEATURES, IDS, STR_DTYPE
from babymerge.model import IMAGE_TOKEN, MODEL_PRESETS, build_model, save_checkpoint
from babymerge.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer

FEATURE_DIM = 16
NOUNS = ["cat", "dog", "ball", "bird", "tree", "car"]
COLORS = ["red", "blue", "green", "yellow"]
VERBS = ["sees", "likes", "chases"]


def make_tokenizer(directory: Path):
    """The project's tokenizer (helper T's stage) trained on the world's sentences."""
    corpus = [f"the {c} {n} {v} a {n2} ." for c in COLORS for n in NOUNS for v in VERBS
              for n2 in NOUNS[:2]] + ["what color is the ball ?", "see"]
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
                 for n in NOUNS for v in VERBS[:2] for m in NOUNS[:1]]
    order = [{"sentence_good": f"the {c} {n} .", "sentence_bad": f"{c} the {n} .", "UID": "order",
              "field": "syntax"} for c in COLORS for n in NOUNS[:3]]
    write_jsonl(root / "blimp" / "agreement.jsonl", agreement)
    write_jsonl(root / "blimp" / "order.jsonl", order)
    wino = [{"caption_0": f"a {COLORS[i % 4]} {NOUNS[i % 6]}",
             "caption_1": f"a {COLORS[(i + 1) % 4]} {NOUNS[i % 6]}", "image_id": f"img{i}"}
            for i in range(8)]
    write_jsonl(root / "wg.jsonl", wino)
    vqa = [{"question": "what color is the ball ?", "target_ans": COLORS[i % 4],
            "distractors": [c for c in COLORS if c != COLORS[i % 4]], "image_id": f"img{i}"}
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
