"""babymerge.world (the built-in world): deterministic, in the BabyLM formats the eval stage reads,
with the facts in its captions and evaluation items true of the images, and without priors a
model could score with: minimal pairs carry no number prior, VQA answers are balanced within each
question type."""

import json
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from babymerge.world import (COLOURS, NUMBER_WORDS, PHENOMENA, PREPOSITIONS, VERBS, Grammar,
                             WorldConfig, generate_world, layout, render, sample_scene)

SMALL = dict(train_images=30, eval_images=20, text_words=3000, pairs_per_phenomenon=15,
             image_size=64)


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    return generate_world(WorldConfig(**SMALL), tmp_path_factory.mktemp("world"))


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_same_seed_same_world_other_seed_differs(small_world, tmp_path):
    again = generate_world(WorldConfig(**SMALL), tmp_path / "a")
    for name in ("captions", "corpus", "winoground", "vqa"):
        assert getattr(again, name).read_bytes() == getattr(small_world, name).read_bytes(), name
    for uid in PHENOMENA:
        assert ((again.minimal_pairs / f"{uid}.jsonl").read_bytes()
                == (small_world.minimal_pairs / f"{uid}.jsonl").read_bytes())
    a = np.asarray(Image.open(again.images / "eval" / "000003.png"))
    b = np.asarray(Image.open(small_world.images / "eval" / "000003.png"))
    assert (a == b).all()
    other = generate_world(WorldConfig(**{**SMALL, "seed": 1}), tmp_path / "b")
    assert other.corpus.read_bytes() != small_world.corpus.read_bytes()


def test_layout_and_formats(small_world):
    ids = {p.relative_to(small_world.images).with_suffix("").as_posix()
           for p in small_world.images.rglob("*.png")}
    assert len(ids) == SMALL["train_images"] + SMALL["eval_images"]
    with Image.open(small_world.images / "train" / "000000.png") as im:
        assert im.size == (64, 64) and im.mode == "RGB"

    caps = _jsonl(small_world.captions)
    assert len(caps) == SMALL["train_images"] * 3
    assert ({c["image_id"] for c in caps} <= ids
            and all(c["image_id"].startswith("train/") for c in caps))

    lines = small_world.corpus.read_text().splitlines()
    assert sum(len(s.split()) for s in lines) >= SMALL["text_words"]

    files = sorted(small_world.minimal_pairs.glob("*.jsonl"))
    assert len(files) >= 5 and {f.stem for f in files} == set(PHENOMENA)
    corpus = set(lines)
    for f in files:
        rows = _jsonl(f)
        assert len(rows) == SMALL["pairs_per_phenomenon"]
        for r in rows:
            assert r["UID"] == f.stem and {"field", "linguistics_term"} <= set(r)
            assert r["sentence_good"] != r["sentence_bad"]
            # a minimal pair: one word differs (or two adjacent words trade places)
            g, b = r["sentence_good"].split(), r["sentence_bad"].split()
            assert len(g) == len(b) and sum(x != y for x, y in zip(g, b)) in (1, 2)
            assert r["sentence_good"] not in corpus  # held out

    wino = _jsonl(small_world.winoground)
    vqa = _jsonl(small_world.vqa)
    for rows in (wino, vqa):
        assert len(rows) == SMALL["eval_images"]
        assert all(r["image_id"].startswith("eval/") and r["image_id"] in ids for r in rows)
    assert all(r["caption_0"] != r["caption_1"] for r in wino)
    # a swap reuses the caption's words (up to number agreement): only the image tells them apart
    def lemmas(caption):
        return Counter("be" if w in ("is", "are") else w.rstrip("s")
                       for w in caption.rstrip(".").split())

    for r in wino:
        if r["secondary_tag"] == "swap":
            assert lemmas(r["caption_0"]) == lemmas(r["caption_1"]), r
    for r in vqa:
        assert r["target_ans"] not in r["distractors"] and len(r["distractors"]) >= 2


def test_ewok_items_follow_the_pipelines_format_and_the_scene(small_world):
    """EWoK's format (Context1/2, Target1/2, Domain, ...), each item twice with contexts and
    targets swapped as EWoK's downloader writes it; Context2 changes one fact of Context1 and
    each target restates its own context's fact."""
    from babymerge.tasks import read_items, parse_task_spec

    rows = _jsonl(small_world.ewok)
    assert len(rows) == 2 * min(SMALL["eval_images"], 100)
    for a, b in zip(rows[0::2], rows[1::2]):
        assert {"Context1", "Context2", "Target1", "Target2", "Domain", "ContextType",
                "ContextDiff", "TargetDiff"} <= set(a)
        assert (b["Context1"], b["Target1"]) == (a["Context2"], a["Target2"])
        assert a["Context1"] != a["Context2"] and a["Target1"] != a["Target2"]
        fact = a["Target1"].rstrip(".").split()[-1 if a["Domain"] == "colour" else -2]
        # a count of one is "a ..." in the context
        assert fact in f" {a['Context1']}".replace(" a ", " one ").split()
        assert a["Domain"] in ("colour", "count")
    items = read_items(parse_task_spec(f"ewok:{small_world.ewok}"))
    assert {it.group for it in items} == {r["Domain"] for r in rows}


VERB_FORMS = {frozenset(("is", "are")), frozenset(("does", "do"))} | {
    frozenset(pair) for pair in VERBS}


@pytest.mark.parametrize("uid", sorted(PHENOMENA))
def test_minimal_pairs_differ_in_the_labelled_word(uid):
    g = Grammar(random.Random(0))
    for _ in range(200):
        good, bad = (s.rstrip(".?").split() for s in g.minimal_pair(uid))
        diff = [frozenset((x, y)) for x, y in zip(good, bad) if x != y]
        if uid == "negation_word_order":
            assert good.index("not") == bad.index("not") + 1
        elif uid == "determiner_noun_agreement":
            assert diff in ([frozenset(("this", "these"))], [frozenset(("that", "those"))])
        elif uid == "numeral_noun_agreement":
            assert len(diff) == 1 and {len(w) for w in diff[0]} == {min(map(len, diff[0])),
                                                                    min(map(len, diff[0])) + 1}
        else:
            assert len(diff) == 1 and diff[0] in VERB_FORMS, (good, bad)
        if uid == "agreement_across_attractor":
            assert any(p.split()[0] in good for p in PREPOSITIONS)
        if uid == "agreement_across_relative_clause":
            assert "that" in good


def test_captions_and_items_state_the_scene(small_world):
    """Facts are right: the colour a VQA item names is the colour of pixels in its image."""
    for r in _jsonl(small_world.vqa):
        if r["question_type"] != "colour":
            continue
        img = np.asarray(Image.open(small_world.images / f"{r['image_id']}.png")).astype(int)
        target = np.array(COLOURS[r["target_ans"]])
        close = (np.abs(img - target).max(-1) <= 25).sum()
        assert close >= 10, (r, close)


def test_scene_layout_respects_relation():
    rng = random.Random(3)
    for _ in range(200):
        scene = sample_scene(rng)
        layout(scene, 96, rng)
        total = sum(g.count for g in scene.groups)
        assert 1 <= total <= 3 and len(scene.objects) == total
        for _, _, cx, cy, r, _ in scene.objects:
            assert 0 <= cx - r and cx + r <= 96 and 0 <= cy - r and cy + r <= 96
        if len(scene.groups) == 2:
            a = [o for o in scene.objects if o[0] == scene.groups[0].shape]
            b = [o for o in scene.objects if o[0] == scene.groups[1].shape]
            ax, ay = np.mean([o[2] for o in a]), np.mean([o[3] for o in a])
            bx, by = np.mean([o[2] for o in b]), np.mean([o[3] for o in b])
            assert {"above": ay < by, "below": ay > by, "left": ax < bx,
                    "right": ax > bx}[scene.where]
        assert render(scene, 96, rng).size == (96, 96)


def test_bad_sizes_name_the_flag():
    with pytest.raises(ValueError, match="--train-images"):
        WorldConfig(train_images=0)


# ---------------------------------------------------------------------------------------------
# No priors to exploit: minimal pairs without a number prior, balanced VQA answers


SINGULAR = {"is", "does", "this", "that"} | {third for _, third in VERBS}


@pytest.mark.parametrize("uid", sorted(set(PHENOMENA) - {"negation_word_order"}))
def test_good_sentence_is_singular_in_about_half_the_pairs(uid):
    """No number prior: numeral_noun_agreement drew its numeral uniformly from one/two/three, so
    the good sentence held the plural noun in 2/3 of the pairs; a unigram model of the corpus
    (no syntax at all: it just prefers the more frequent plural noun forms) scored 0.67 on that
    UID."""
    g = Grammar(random.Random(0))
    singular = 0
    n = 1500
    for _ in range(n):
        good, bad = (s.rstrip(".?").split() for s in g.minimal_pair(uid))
        (x, y), = [(a, b) for a, b in zip(good, bad) if a != b]
        # nouns: the singular is the form without the -s
        singular += x in SINGULAR if uid != "numeral_noun_agreement" else len(x) < len(y)
    assert 0.45 <= singular / n <= 0.55, (uid, singular / n)


TINY_TEXT = dict(train_images=1, text_words=1, pairs_per_phenomenon=1, image_size=32)


def test_vqa_answers_are_balanced_within_each_question_type(tmp_path):
    """No answer prior: two-group scenes mostly hold one object per group, so "how many ... are
    there?" was answered "one" in ~58% of the held-out items (chance 1/3). The VLM learns that
    prior from the training captions' count questions, so part of its VQA advantage over the LM
    came without the image (a bigram model of the captions, blind, scored 0.58 on count
    items)."""
    world = generate_world(WorldConfig(eval_images=600, **TINY_TEXT), tmp_path / "w")
    rows = [json.loads(line) for line in world.vqa.read_text().splitlines()]
    by_type: dict[str, Counter] = {}
    for r in rows:
        # shape answers come in both numbers; the prior that matters is over shapes
        answer = r["target_ans"].rstrip("s") if r["question_type"] == "shape" else r["target_ans"]
        by_type.setdefault(r["question_type"], Counter())[answer] += 1
    assert set(by_type) == {"colour", "shape", "count"}
    assert set(by_type["count"]) == set(NUMBER_WORDS.values())
    for kind, counts in by_type.items():
        share = max(counts.values()) / sum(counts.values())
        # a constant answer should score about chance: 1 / (number of answers)
        assert share <= 1.4 / len(counts), (kind, counts)
    # still enough count items to measure counting
    assert sum(by_type["count"].values()) >= 0.1 * len(rows)


def test_balancing_draws_nothing_from_the_items_stream(tmp_path, monkeypatch):
    """The count balancing takes no rng draw of its own: the Winoground items, drawn from the
    same stream, are those of a world whose VQA questions are not balanced."""
    from babymerge import world as world_module

    cfg = WorldConfig(eval_images=200, **TINY_TEXT)
    balanced = generate_world(cfg, tmp_path / "balanced")
    real = world_module._vqa
    # a fresh count each time: every count answer is among the least used, as before balancing
    monkeypatch.setattr(world_module, "_vqa",
                        lambda scene, rng, asked: real(scene, rng, Counter()))
    unbalanced = generate_world(cfg, tmp_path / "unbalanced")
    assert balanced.winoground.read_text() == unbalanced.winoground.read_text()
    assert balanced.vqa.read_text() != unbalanced.vqa.read_text()  # the balancing did act
