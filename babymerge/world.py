"""The built-in world: a generated, seeded stand-in for the paper's data, so that the whole
experiment runs offline on a CPU.

One small vocabulary (shapes, colours, sizes, numbers, children and animals, a few verbs) is used
three ways, mirroring the BabyLM multimodal track:

- **scenes**: images with one or two groups of objects (1 to 3 objects in all; each group has a
  shape, colour, size and count, and the groups sit in a relation to each other), drawn with PIL
  with jittered background, positions, sizes, hues and rotations, and captioned from a small
  grammar that states the scene's facts (the paper's image-caption pairs);
- **text**: a richer grammar over the same words (agreement across attractors and relative
  clauses, determiners, questions, negation) whose facts are random (the paper's text-only corpus);
- **evaluation sets** in the BabyLM pipeline's formats (``../shared/DESIGN.md``): BLiMP-style
  minimal pairs (one jsonl per UID in a folder), Winoground-style caption pairs and VQA-style
  questions with distractors, both about held-out images.

Everything is a pure function of :class:`WorldConfig` (seeded); nothing is shipped or downloaded.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from babymerge.config import atomic_write_text, opt, save_config

# ---------------------------------------------------------------------------------------------
# Lexicon. Plurals are regular on purpose: agreement is carried by the ``-s`` suffix and by
# is/are, does/do, this/these, so a minimal pair differs in one word.
SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 205, 30), "purple": (140, 50, 180)}
SIZES = ("small", "big")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
AGENTS = ("girl", "boy", "dog", "cat", "bird")
AGENT_ADJECTIVES = ("happy", "sad", "hungry", "tired")
# transitive verbs: (base/plural form, third person singular)
VERBS = (("see", "sees"), ("like", "likes"), ("want", "wants"), ("draw", "draws"),
         ("find", "finds"), ("hold", "holds"))
PREPOSITIONS = ("above", "below", "near", "behind", "next to")
# the relation of group A to group B in a scene, and the words a caption uses for it
RELATIONS = {"above": "above", "below": "below", "left": "to the left of",
             "right": "to the right of"}
PLACES = {"top": "at the top", "bottom": "at the bottom", "left": "on the left",
          "right": "on the right"}
SG, PL = "sg", "pl"
# Drawing: object radius as a fraction of the image side, and jitter amplitudes (0-255 units).
RADIUS = {"small": 0.085, "big": 0.14}
# The background is most of the image: its tint is the largest source of variance in a pooled
# feature, so it jitters little; a random encoder's feature then varies mostly with the objects.
BACKGROUND_JITTER = 6
BACKGROUND = (225, 225, 220)
HUE_JITTER = 20

# Minimal-pair phenomena (BLiMP-style UIDs) -> (field, linguistics_term)
PHENOMENA = {
    "determiner_noun_agreement": ("morphology", "determiner_noun_agreement"),
    "subject_verb_agreement": ("morphology", "subject_verb_agreement"),
    "agreement_across_attractor": ("syntax", "subject_verb_agreement"),
    "agreement_across_relative_clause": ("syntax", "subject_verb_agreement"),
    "agreement_in_question": ("syntax", "subject_verb_agreement"),
    "negation_word_order": ("syntax", "negation"),
    "numeral_noun_agreement": ("morphology", "determiner_noun_agreement"),
}


@dataclass
class WorldConfig:
    """Sizes of the built-in world. Defaults are the demo's default scale (a few minutes on CPU)."""

    seed: int = opt(0, "Seed of every random choice (images, sentences, evaluation items)")
    train_images: int = opt(2000, "Scenes with captions, used to train the VLM")
    eval_images: int = opt(300, "Held-out scenes for the Winoground- and VQA-style sets")
    captions_per_image: int = opt(3, "Captions per training scene (different templates)")
    caption_style: str = opt("mixed", "'mixed': descriptions as real captions mostly are, "
                             "noun phrases and relations with no verb ('two red circles above "
                             "a blue square.'), and question-answer talk about the picture "
                             "('what colour are the circles? red.'), the format the VQA-style "
                             "items ask in; 'fragments': the descriptions only; 'sentences': "
                             "full statements ('two red circles are above a blue square.') and "
                             "the questions", choices=("mixed", "fragments", "sentences"))
    text_words: int = opt(200_000, "Words of the text-only corpus (approximate, whole sentences)")
    pairs_per_phenomenon: int = opt(200, "Minimal pairs per UID")
    image_size: int = opt(112, "Side of the square scene images in pixels")

    def __post_init__(self) -> None:
        for name in ("train_images", "eval_images", "captions_per_image", "text_words",
                     "pairs_per_phenomenon"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, "
                                 f"got {getattr(self, name)}")
        if self.image_size < 32:
            raise ValueError(f"--image-size must be >= 32 pixels, got {self.image_size}")
        if self.caption_style not in ("mixed", "fragments", "sentences"):
            raise ValueError(f"--caption-style must be mixed, fragments or sentences, got "
                             f"{self.caption_style!r}")


@dataclass(frozen=True)
class WorldPaths:
    """Where :func:`generate_world` put each part of the world."""

    root: Path
    images: Path         # folder: train/NNNNNN.png and eval/NNNNNN.png; image id = relative path
    captions: Path       # jsonl {"image_id", "caption"}, training scenes only
    corpus: Path         # plain text, one sentence per line (text-only corpus)
    minimal_pairs: Path  # folder of <UID>.jsonl
    winoground: Path     # jsonl
    vqa: Path            # jsonl
    ewok: Path           # jsonl, EWoK's format: text-only world knowledge about scenes
    manifest: Path       # world.json: config, counts, vocabulary

    def task_specs(self) -> list[str]:
        """Every evaluation set as a ``NAME=KIND:PATH`` task spec (DESIGN.md)."""
        return [f"blimp_world=minimal_pairs:{self.minimal_pairs}",
                f"winoground_world=winoground:{self.winoground}",
                f"vqa_world=vqa:{self.vqa}", f"ewok_world=ewok:{self.ewok}"]


# ---------------------------------------------------------------------------------------------
# Scenes


@dataclass
class Group:
    """Identical objects drawn together: ``count`` ``size`` ``colour`` ``shape``s."""

    shape: str
    colour: str
    size: str
    count: int

    @property
    def number(self) -> str:
        return SG if self.count == 1 else PL


@dataclass
class Scene:
    groups: list[Group]
    # two groups: where group 0 is relative to group 1 (RELATIONS key); one group: PLACES key
    where: str
    objects: list[tuple[str, str, float, float, float, float]] = field(default_factory=list)
    # (shape, colour, cx, cy, radius, rotation) in pixels, filled by layout


def sample_scene(rng: random.Random) -> Scene:
    """1 or 2 groups, 1 to 3 objects in all; two groups differ in shape AND colour so that
    "the circle" and "the red object" each name one group (questions stay unambiguous)."""
    if rng.random() < 0.4:
        g = Group(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES),
                  rng.randint(1, 3))
        return Scene([g], rng.choice(list(PLACES)))
    shape_a, shape_b = rng.sample(SHAPES, 2)
    colour_a, colour_b = rng.sample(list(COLOURS), 2)
    count_a, count_b = rng.choice([(1, 1), (1, 1), (2, 1), (1, 2)])
    groups = [Group(shape_a, colour_a, rng.choice(SIZES), count_a),
              Group(shape_b, colour_b, rng.choice(SIZES), count_b)]
    return Scene(groups, rng.choice(list(RELATIONS)))


def _regions(scene: Scene, side: int) -> list[tuple[float, float, float, float]]:
    """Box (x0, y0, x1, y1) for each group: the half of the image its relation or place says.
    A 6% margin keeps objects clear of the border (encoders' centre crops trim it)."""
    m, s, h = 0.06 * side, side * 0.94, side / 2
    halves = {"top": (m, m, s, h), "bottom": (m, h, s, s), "left": (m, m, h, s),
              "right": (h, m, s, s)}
    if len(scene.groups) == 1:
        return [halves[scene.where]]
    a_b = {"above": ("top", "bottom"), "below": ("bottom", "top"), "left": ("left", "right"),
           "right": ("right", "left")}[scene.where]
    return [halves[a_b[0]], halves[a_b[1]]]


def layout(scene: Scene, side: int, rng: random.Random) -> None:
    """Place every object in its group's region without overlaps (rejection sampling; the
    radius shrinks if a crowded region refuses, so layout always succeeds)."""
    scene.objects = []
    placed: list[tuple[float, float, float]] = []
    for group, (x0, y0, x1, y1) in zip(scene.groups, _regions(scene, side)):
        base = RADIUS[group.size] * side
        for _ in range(group.count):
            r = base * rng.uniform(0.85, 1.15)
            for attempt in range(200):
                if attempt and attempt % 50 == 0:
                    r *= 0.85
                rr = min(r, (x1 - x0) / 2 - 1, (y1 - y0) / 2 - 1)
                cx, cy = rng.uniform(x0 + rr, x1 - rr), rng.uniform(y0 + rr, y1 - rr)
                if all(math.hypot(cx - px, cy - py) > rr + pr + 2 for px, py, pr in placed):
                    break
            placed.append((cx, cy, rr))
            scene.objects.append((group.shape, group.colour, cx, cy, rr, rng.uniform(-0.3, 0.3)))


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners = [(math.pi / 4 + k * math.pi / 2) for k in range(4)]
        return [(cx + r * math.cos(a + rot), cy + r * math.sin(a + rot)) for a in corners]
    if shape == "triangle":
        corners = [(-math.pi / 2 + k * 2 * math.pi / 3) for k in range(3)]
        return [(cx + r * math.cos(a + rot), cy + r * math.sin(a + rot)) for a in corners]
    if shape == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5 + rot
            rk = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rk * math.cos(a), cy + rk * math.sin(a)))
        return pts
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, side: int, rng: random.Random) -> Image.Image:
    """Draw a laid-out scene: light jittered background, a few faint background specks,
    hue-jittered objects with a dark outline."""
    bg = _jitter(BACKGROUND, rng, BACKGROUND_JITTER)
    img = Image.new("RGB", (side, side), bg)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(0, 6)):  # clutter that carries no meaning
        x, y = rng.uniform(0, side), rng.uniform(0, side)
        d = side * 0.01
        draw.ellipse((x - d, y - d, x + d, y + d), fill=_jitter(bg, rng, 40))
    for shape, colour, cx, cy, r, rot in scene.objects:
        fill = _jitter(COLOURS[colour], rng, HUE_JITTER)
        outline = tuple(int(c * 0.5) for c in fill)
        if shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=outline)
        else:
            draw.polygon(_polygon(shape, cx, cy, r, rot), fill=fill, outline=outline)
    return img


# ---------------------------------------------------------------------------------------------
# Language shared by captions and the text corpus


def plural(noun: str) -> str:
    return noun + "s"


def noun_form(noun: str, number: str) -> str:
    return noun if number == SG else plural(noun)


def be(number: str) -> str:
    return "is" if number == SG else "are"


def do(number: str) -> str:
    return "does" if number == SG else "do"


def other(number: str) -> str:
    return PL if number == SG else SG


def group_np(g: Group, *, definite: bool = False, with_size: bool = True,
             with_colour: bool = True) -> str:
    """"two small red circles", "a blue square", "the big star"."""
    if definite:
        det = "the"
    else:
        det = "a" if g.count == 1 else NUMBER_WORDS[g.count]
    words = [det] + ([g.size] if with_size else []) + ([g.colour] if with_colour else [])
    return " ".join(words + [noun_form(g.shape, g.number)])


def sentence(words: str) -> str:
    """Final punctuation attached BERT-style tokenizers split it off anyway."""
    return words.strip() + "."


def question(words: str) -> str:
    return words.strip() + "?"


# --- captions: the scene's facts in a small grammar


def _cap_relation(scene: Scene, rng: random.Random) -> str:
    a, b = scene.groups
    return sentence(f"{group_np(a)} {be(a.number)} {RELATIONS[scene.where]} {group_np(b)}")


def _cap_place(scene: Scene, rng: random.Random) -> str:
    g = scene.groups[0]
    return sentence(f"{group_np(g)} {be(g.number)} {PLACES[scene.where]}")


def _cap_there(scene: Scene, rng: random.Random) -> str:
    nps = " and ".join(group_np(g) for g in scene.groups)
    return sentence(f"there {be(scene.groups[0].number)} {nps}")


def _cap_colour_q(scene: Scene, rng: random.Random) -> str:
    g = rng.choice(scene.groups)
    return f"{colour_question(g)} {g.colour}."


def _cap_shape_q(scene: Scene, rng: random.Random) -> str:
    g = rng.choice(scene.groups)
    return f"{shape_question(g)} {noun_form(g.shape, g.number)}."


def _cap_count_q(scene: Scene, rng: random.Random) -> str:
    g = rng.choice(scene.groups)
    return f"{count_question(g)} {NUMBER_WORDS[g.count]}."


def colour_question(g: Group) -> str:
    return question(f"what colour {be(g.number)} the {noun_form(g.shape, g.number)}")


def shape_question(g: Group) -> str:
    return question(f"what shape {be(g.number)} the {g.colour} "
                    f"{'thing' if g.number == SG else 'things'}")


def count_question(g: Group) -> str:
    return question(f"how many {plural(g.shape)} are there")


CAPTION_TEMPLATES = (_cap_there, _cap_colour_q, _cap_shape_q, _cap_count_q)


# --- fragment captions: the same facts with no verb, as web and dataset captions mostly are
# ("two red circles above a blue square"): nothing in them teaches agreement


def _frag_relation(scene: Scene, rng: random.Random) -> str:
    a, b = scene.groups
    return sentence(f"{group_np(a)} {RELATIONS[scene.where]} {group_np(b)}")


def _frag_place(scene: Scene, rng: random.Random) -> str:
    return sentence(f"{group_np(scene.groups[0])} {PLACES[scene.where]}")


def _frag_picture(scene: Scene, rng: random.Random) -> str:
    return sentence("a picture of " + " and ".join(group_np(g) for g in scene.groups))


def _frag_colour(scene: Scene, rng: random.Random) -> str:
    g = rng.choice(scene.groups)
    return sentence(f"{g.colour} {noun_form(g.shape, g.number)}")


def _frag_count(scene: Scene, rng: random.Random) -> str:
    g = rng.choice(scene.groups)
    return sentence(f"{NUMBER_WORDS[g.count]} {noun_form(g.shape, g.number)}")


FRAGMENT_TEMPLATES = (_frag_picture, _frag_colour, _frag_count)


def captions(scene: Scene, rng: random.Random, k: int, style: str = "sentences") -> list[str]:
    """``k`` captions of one scene, each from a different template where possible. Sentences: a
    statement of where things are, an existence statement, and questions answered from the
    scene (the caption counterparts of the VQA-style evaluation, as a parent's talk about a
    picture book). Fragments: the same facts with no verb. Mixed: fragments for the
    descriptions, and the questions."""
    if style == "fragments":
        first = _frag_relation if len(scene.groups) == 2 else _frag_place
        rest = FRAGMENT_TEMPLATES
    elif style == "mixed":
        first = _frag_relation if len(scene.groups) == 2 else _frag_place
        rest = (_frag_picture, _cap_colour_q, _cap_shape_q, _cap_count_q)
    else:
        first = _cap_relation if len(scene.groups) == 2 else _cap_place
        rest = CAPTION_TEMPLATES
    templates = [first] + rng.sample(rest, len(rest))
    return [templates[i % len(templates)](scene, rng) for i in range(k)]


# --- the text-only grammar: the same words, richer syntax, random facts


class Grammar:
    """Sentences of the text corpus, each generator also able to return its minimal-pair twin.

    Each ``s_*`` method returns ``(good, bad)``: ``bad`` violates the phenomenon the method is
    named after in exactly one word. The corpus uses ``good`` only.
    """

    def __init__(self, rng: random.Random):
        self.rng = rng

    # noun phrases ----------------------------------------------------------------------------
    def number(self) -> str:
        return self.rng.choice((SG, PL))

    def det(self, number: str, *, demonstrative: bool = False) -> str:
        r = self.rng
        if demonstrative:
            return r.choice(("this", "that")) if number == SG else r.choice(("these", "those"))
        if number == SG:
            return r.choice(("the", "the", "a", "this", "that", "one"))
        return r.choice(("the", "the", "these", "those", "two", "three", "some"))

    def shape_np(self, number: str, det: str | None = None) -> str:
        r = self.rng
        words = [self.det(number) if det is None else det]
        if r.random() < 0.4:
            words.append(r.choice(SIZES))
        if r.random() < 0.6:
            words.append(r.choice(list(COLOURS)))
        return " ".join(w for w in words + [noun_form(r.choice(SHAPES), number)] if w)

    def agent_np(self, number: str, det: str | None = None) -> str:
        r = self.rng
        words = [("the" if r.random() < 0.7 else self.det(number)) if det is None else det]
        if r.random() < 0.3:
            words.append(r.choice(AGENT_ADJECTIVES))
        return " ".join(w for w in words + [noun_form(r.choice(AGENTS), number)] if w)

    def any_np(self, number: str) -> str:
        return self.shape_np(number) if self.rng.random() < 0.6 else self.agent_np(number)

    # predicates: (text for a singular subject, text for a plural subject) ---------------------
    def predicate(self, subject_is_agent: bool) -> tuple[str, str]:
        r = self.rng
        if subject_is_agent and r.random() < 0.7:
            base, third = r.choice(VERBS)
            obj = self.any_np(self.number())
            return f"{third} {obj}", f"{base} {obj}"
        adj = (r.choice(AGENT_ADJECTIVES) if subject_is_agent
               else r.choice(list(COLOURS) + list(SIZES)))
        return f"is {adj}", f"are {adj}"

    def subject(self, number: str) -> tuple[str, bool]:
        if self.rng.random() < 0.5:
            return self.shape_np(number), False
        return self.agent_np(number), True

    # sentence types -----------------------------------------------------------------------------
    def s_subject_verb_agreement(self) -> tuple[str, str]:
        n = self.number()
        subj, agent = self.subject(n)
        pred = self.predicate(agent)
        i = 0 if n == SG else 1
        return sentence(f"{subj} {pred[i]}"), sentence(f"{subj} {pred[1 - i]}")

    def s_agreement_across_attractor(self) -> tuple[str, str]:
        # the attractor has the OTHER number, so "agree with the nearest noun" fails
        n = self.number()
        subj, agent = self.subject(n)
        attractor = self.any_np(other(n))
        pred = self.predicate(agent)
        i = 0 if n == SG else 1
        head = f"{subj} {self.rng.choice(PREPOSITIONS)} {attractor}"
        return sentence(f"{head} {pred[i]}"), sentence(f"{head} {pred[1 - i]}")

    def s_agreement_across_relative_clause(self) -> tuple[str, str]:
        r = self.rng
        n = self.number()
        inner = other(n)
        if r.random() < 0.5:
            # object relative: "the circle that the girls like is red"
            subj, agent = self.subject(n)
            base, third = r.choice(VERBS)
            rc = f"that {self.agent_np(inner)} {third if inner == SG else base}"
        else:
            # subject relative whose object has the other number: "the girl that sees the
            # stars is happy"
            subj, agent = self.agent_np(n), True
            base, third = r.choice(VERBS)
            rc = f"that {third if n == SG else base} {self.shape_np(inner)}"
        pred = self.predicate(agent)
        i = 0 if n == SG else 1
        head = f"{subj} {rc}"
        return sentence(f"{head} {pred[i]}"), sentence(f"{head} {pred[1 - i]}")

    def s_agreement_in_question(self) -> tuple[str, str]:
        r = self.rng
        n = self.number()
        if r.random() < 0.5:
            subj = self.shape_np(n, det="the")
            adj = r.choice(list(COLOURS) + list(SIZES))
            return (question(f"{be(n)} {subj} {adj}"), question(f"{be(other(n))} {subj} {adj}"))
        subj = self.agent_np(n, det="the")
        base, _ = r.choice(VERBS)
        rest = f"{subj} {base} {self.any_np(self.number())}"
        return question(f"{do(n)} {rest}"), question(f"{do(other(n))} {rest}")

    def s_negation_word_order(self) -> tuple[str, str]:
        r = self.rng
        n = self.number()
        if r.random() < 0.5:
            subj = self.shape_np(n)
            adj = r.choice(list(COLOURS) + list(SIZES))
            return (sentence(f"{subj} {be(n)} not {adj}"), sentence(f"{subj} not {be(n)} {adj}"))
        subj = self.agent_np(n)
        base, _ = r.choice(VERBS)
        obj = self.any_np(self.number())
        return (sentence(f"{subj} {do(n)} not {base} {obj}"),
                sentence(f"{subj} not {do(n)} {base} {obj}"))

    def s_determiner_noun_agreement(self) -> tuple[str, str]:
        r = self.rng
        n = self.number()
        d_good = self.det(n, demonstrative=True)
        d_bad = {"this": "these", "that": "those", "these": "this", "those": "that"}[d_good]
        is_agent = r.random() < 0.5
        rest = (self.agent_np(n, det="") if is_agent else self.shape_np(n, det="")).strip()
        np_good, np_bad = f"{d_good} {rest}", f"{d_bad} {rest}"
        if r.random() < 0.5:  # as subject
            p = self.predicate(is_agent)[0 if n == SG else 1]
            return sentence(f"{np_good} {p}"), sentence(f"{np_bad} {p}")
        return self._as_object(np_good, np_bad)

    def s_numeral_noun_agreement(self) -> tuple[str, str]:
        r = self.rng
        # the number first, so that half the good sentences are singular: a count drawn from
        # 1..3 made 2/3 of them plural, which a model preferring plural nouns got right blind
        n = self.number()
        count = 1 if n == SG else r.randint(2, 3)
        shape = r.choice(SHAPES)
        adj = r.choice(list(COLOURS)) + " " if r.random() < 0.5 else ""
        good = f"{NUMBER_WORDS[count]} {adj}{noun_form(shape, n)}"
        bad = f"{NUMBER_WORDS[count]} {adj}{noun_form(shape, other(n))}"
        if r.random() < 0.5:
            return sentence(f"there {be(n)} {good}"), sentence(f"there {be(n)} {bad}")
        return self._as_object(good, bad)

    def _as_object(self, good: str, bad: str) -> tuple[str, str]:
        """"<agent> <verb> good." / "... bad.": the pair differs only inside the object."""
        n = self.number()
        base, third = self.rng.choice(VERBS)
        lead = f"{self.agent_np(n)} {third if n == SG else base}"
        return sentence(f"{lead} {good}"), sentence(f"{lead} {bad}")

    # corpus-only sentence types (no minimal-pair twin needed) ----------------------------------
    def s_relation(self) -> str:
        a, b = self.number(), self.number()
        rel = self.rng.choice(list(RELATIONS.values()))
        return sentence(f"{self.shape_np(a)} {be(a)} {rel} {self.shape_np(b)}")

    def s_wh_question(self) -> str:
        """A question about a random scene with its answer: the text-only counterpart of the
        caption questions, so that the LM knows the format but not the answer."""
        r = self.rng
        g = Group(r.choice(SHAPES), r.choice(list(COLOURS)), r.choice(SIZES), r.randint(1, 3))
        kind = r.randrange(3)
        if kind == 0:
            return f"{colour_question(g)} {g.colour}."
        if kind == 1:
            return f"{shape_question(g)} {noun_form(g.shape, g.number)}."
        return f"{count_question(g)} {NUMBER_WORDS[g.count]}."

    def corpus_sentence(self) -> str:
        r = self.rng.random()
        if r < 0.10:
            return self.s_relation()
        if r < 0.18:
            return self.s_wh_question()
        kinds = (self.s_subject_verb_agreement, self.s_subject_verb_agreement,
                 self.s_agreement_across_attractor, self.s_agreement_across_attractor,
                 self.s_agreement_across_relative_clause, self.s_agreement_across_relative_clause,
                 self.s_agreement_in_question, self.s_negation_word_order,
                 self.s_determiner_noun_agreement, self.s_numeral_noun_agreement)
        return self.rng.choice(kinds)()[0]

    def minimal_pair(self, uid: str) -> tuple[str, str]:
        return getattr(self, f"s_{uid}")()


# ---------------------------------------------------------------------------------------------
# Evaluation items about held-out scenes


def _swap(scene: Scene, rng: random.Random) -> tuple[str, str, str, str]:
    """(gold caption, wrong caption, tag, secondary tag). Two groups: the wrong caption swaps the
    groups' colours, shapes or counts (Winoground's word-order swaps); one group: it replaces the
    colour, shape or count with another value (same words otherwise, so a text-only model has no
    reason to prefer either)."""
    tag = rng.choice(("colour", "shape", "count"))
    if len(scene.groups) == 2:
        a, b = scene.groups
        if tag == "count" and a.count == b.count:
            tag = rng.choice(("colour", "shape"))
        a2, b2 = (Group(a.shape, a.colour, a.size, a.count),
                  Group(b.shape, b.colour, b.size, b.count))
        if tag == "colour":
            a2.colour, b2.colour = b.colour, a.colour
        elif tag == "shape":
            a2.shape, b2.shape = b.shape, a.shape
        else:
            a2.count, b2.count = b.count, a.count
        rel = RELATIONS[scene.where]
        gold = sentence(f"{group_np(a)} {be(a.number)} {rel} {group_np(b)}")
        wrong = sentence(f"{group_np(a2)} {be(a2.number)} {rel} {group_np(b2)}")
        return gold, wrong, tag, "swap"
    g = scene.groups[0]
    g2 = Group(g.shape, g.colour, g.size, g.count)
    if tag == "colour":
        g2.colour = rng.choice([c for c in COLOURS if c != g.colour])
    elif tag == "shape":
        g2.shape = rng.choice([s for s in SHAPES if s != g.shape])
    else:
        g2.count = rng.choice([c for c in NUMBER_WORDS if c != g.count])
    place = PLACES[scene.where]
    return (sentence(f"{group_np(g)} {be(g.number)} {place}"),
            sentence(f"{group_np(g2)} {be(g2.number)} {place}"), tag, "replace")


# EWoK-format items are made for this many held-out scenes (two lines each)
EWOK_SCENES = 100


def _ewok(scene: Scene, rng: random.Random) -> list[dict]:
    """Two EWoK lines (its downloader writes each item twice, contexts and targets swapped) from
    one scene's facts, in words only: Context1 states the scene, Context2 the same scene with one
    group's colour or count changed; Target1 follows from Context1, Target2 from Context2. The
    pipeline scores Target1 against Target2 after Context1, the target's tokens only."""
    g = rng.choice(scene.groups)
    domain = rng.choice(("colour", "count"))
    g2 = Group(g.shape, g.colour, g.size, g.count)
    if domain == "colour":
        g2.colour = rng.choice([c for c in COLOURS if c != g.colour])

        def target(h: Group) -> str:
            return sentence(f"the {noun_form(h.shape, h.number)} {be(h.number)} {h.colour}")
    else:
        g2.count = rng.choice([c for c in NUMBER_WORDS if c != g.count])

        def target(h: Group) -> str:
            return sentence(f"there {be(h.number)} {NUMBER_WORDS[h.count]} "
                            f"{noun_form(h.shape, h.number)}")

    def context(h: Group) -> str:
        return sentence(f"{group_np(h)} {be(h.number)} {PLACES[scene.where]}"
                        if scene.where in PLACES else f"there {be(h.number)} {group_np(h)}")

    c1, c2, t1, t2 = context(g), context(g2), target(g), target(g2)
    common = {"Domain": domain, "ContextType": "scene", "ContextDiff": domain,
              "TargetDiff": domain}
    return [{"Context1": c1, "Context2": c2, "Target1": t1, "Target2": t2, **common},
            {"Context1": c2, "Context2": c1, "Target1": t2, "Target2": t1, **common}]


def _vqa(scene: Scene, rng: random.Random, asked: Counter) -> dict:
    """One question about the scene; distractors are the other values of the same kind, in the
    same grammatical number as the answer.

    ``asked`` counts the count answers given so far. Scenes mostly hold one object per group
    (P("one") ~ 0.58), a prior the VLM learns from the captions' count questions; so a count
    question is asked only where its answer is among the least used so far (else the scene gets
    a colour or shape question), which keeps a constant answer at chance. Colours and shapes are
    uniform already. The rng draws are the same either way, so the Winoground items drawn from
    the same stream do not change."""
    g = rng.choice(scene.groups)
    kind = rng.choice(("colour", "shape", "count"))
    if kind == "count":
        least = min(asked[c] for c in NUMBER_WORDS)
        fits = [h for h in [g] + scene.groups if asked[h.count] == least]
        if fits:
            g = fits[0]  # the drawn group when its answer fits
        else:
            kind = ("colour", "shape")[sum(asked.values()) % 2]
    if kind == "count":
        asked[g.count] += 1
    if kind == "colour":
        return {"question": colour_question(g), "target_ans": g.colour, "question_type": kind,
                "distractors": [c for c in COLOURS if c != g.colour]}
    if kind == "shape":
        return {"question": shape_question(g), "target_ans": noun_form(g.shape, g.number),
                "question_type": kind,
                "distractors": [noun_form(s, g.number) for s in SHAPES if s != g.shape]}
    return {"question": count_question(g), "target_ans": NUMBER_WORDS[g.count],
            "question_type": kind,
            "distractors": [w for c, w in NUMBER_WORDS.items() if c != g.count]}


# ---------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _draw_split(split: str, n: int, cfg: WorldConfig, root: Path, seed: int, progress: bool
                ) -> list[tuple[str, Scene]]:
    rng = random.Random(seed)
    out_dir = root / split
    out_dir.mkdir(parents=True, exist_ok=True)
    scenes = []
    for i in tqdm(range(n), desc=f"world: {split} images", unit="img", leave=False,
                  disable=not progress):
        scene = sample_scene(rng)
        layout(scene, cfg.image_size, rng)
        image_id = f"{split}/{i:06d}"
        path = out_dir / f"{i:06d}.png"
        # images are not written atomically one by one: the manifest, written last, marks a
        # complete world, and generate_world rewrites everything on a re-run
        render(scene, cfg.image_size, rng).save(path, optimize=False, compress_level=1)
        scenes.append((image_id, scene))
    return scenes


def generate_world(cfg: WorldConfig, out: str | Path, progress: bool = True) -> WorldPaths:
    """Write the whole world under ``out`` and return where each part is.

    The same config gives byte-identical text and evaluation files and identical images.
    """
    root = Path(out)
    paths = WorldPaths(root=root, images=root / "images", captions=root / "captions.jsonl",
                       corpus=root / "text" / "corpus.txt",
                       minimal_pairs=root / "eval" / "minimal_pairs",
                       winoground=root / "eval" / "winoground.jsonl",
                       vqa=root / "eval" / "vqa.jsonl", ewok=root / "eval" / "ewok.jsonl",
                       manifest=root / "world.json")
    # independent streams, so changing one size does not reshuffle the other parts
    seeds = {k: hash_seed(cfg.seed, k)
             for k in ("train", "eval", "captions", "corpus", "pairs", "items", "ewok")}

    train = _draw_split("train", cfg.train_images, cfg, paths.images, seeds["train"],
                        progress)
    rng = random.Random(seeds["captions"])
    caption_rows = [{"image_id": image_id, "caption": c}
                    for image_id, scene in train
                    for c in captions(scene, rng, cfg.captions_per_image, cfg.caption_style)]
    _write_jsonl(paths.captions, caption_rows)

    grammar = Grammar(random.Random(seeds["corpus"]))
    lines, words = [], 0
    while words < cfg.text_words:
        s = grammar.corpus_sentence()
        lines.append(s)
        words += len(s.split())
    paths.corpus.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(paths.corpus, "\n".join(lines) + "\n")

    # minimal pairs: held-out sentences (a good sentence seen in the corpus is redrawn)
    seen = set(lines)
    grammar = Grammar(random.Random(seeds["pairs"]))
    paths.minimal_pairs.mkdir(parents=True, exist_ok=True)
    for uid, (field_name, term) in PHENOMENA.items():
        rows, tries = [], 0
        while len(rows) < cfg.pairs_per_phenomenon:
            good, bad = grammar.minimal_pair(uid)
            tries += 1
            if (good in seen and tries < 50 * cfg.pairs_per_phenomenon) or good == bad:
                continue
            seen.add(good)
            rows.append({"sentence_good": good, "sentence_bad": bad, "field": field_name,
                         "linguistics_term": term, "UID": uid, "pairID": str(len(rows))})
        _write_jsonl(paths.minimal_pairs / f"{uid}.jsonl", rows)

    held_out = _draw_split("eval", cfg.eval_images, cfg, paths.images, seeds["eval"],
                           progress)
    rng = random.Random(seeds["items"])
    wino, vqa, asked = [], [], Counter()
    for image_id, scene in held_out:
        gold, wrong, tag, secondary = _swap(scene, rng)
        wino.append({"caption_0": gold, "caption_1": wrong, "image_id": image_id, "tag": tag,
                     "secondary_tag": secondary, "collapsed_tag": tag})
        vqa.append({"image_id": image_id, **_vqa(scene, rng, asked)})
    _write_jsonl(paths.winoground, wino)
    _write_jsonl(paths.vqa, vqa)
    rng = random.Random(seeds["ewok"])  # its own stream: the other sets stay as they were
    ewok = [row for _, scene in held_out[:EWOK_SCENES] for row in _ewok(scene, rng)]
    _write_jsonl(paths.ewok, ewok)

    manifest = {"counts": {"train_images": len(train), "eval_images": len(held_out),
                           "captions": len(caption_rows), "corpus_sentences": len(lines),
                           "corpus_words": words,
                           "caption_words": sum(len(r["caption"].split()) for r in caption_rows),
                           "minimal_pairs": cfg.pairs_per_phenomenon * len(PHENOMENA),
                           "winoground": len(wino), "vqa": len(vqa), "ewok": len(ewok)},
                "phenomena": list(PHENOMENA),
                "vocabulary": {"shapes": list(SHAPES), "colours": list(COLOURS),
                               "sizes": list(SIZES), "agents": list(AGENTS),
                               "verbs": [v for pair in VERBS for v in pair]},
                "paths": {k: str(v) for k, v in paths.__dict__.items()}}
    save_config(cfg, paths.manifest, world=manifest)
    return paths


def hash_seed(seed: int, name: str) -> int:
    """A stable per-part seed (Python's ``hash`` of a str is salted per process)."""
    return int.from_bytes(name.encode(), "little") % (2**31) * 1_000_003 + seed
