"""The built-in world's VQA-style items have no answer prior to exploit.

Found in review: two-group scenes mostly hold one object per group, so "how many ... are there?"
was answered "one" in ~58% of the held-out items (chance 1/3). The VLM learns that prior from
the training captions' count questions, so part of its VQA advantage over the LM came without
the image (a bigram model of the captions, blind, scored 0.58 on count items).
"""

import json
from collections import Counter

from babymerge.world import NUMBER_WORDS, WorldConfig, generate_world

TINY_TEXT = dict(train_images=1, text_words=1, pairs_per_phenomenon=1, image_size=32)


def test_vqa_answers_are_balanced_within_each_question_type(tmp_path):
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
