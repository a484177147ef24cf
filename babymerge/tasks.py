"""The BabyLM evaluation pipeline's zero-shot task files, read as the pipeline reads them.

The rules come from its source (``babylm/evaluation-pipeline-2025`` at bf55c11,
``evaluation_pipeline/sentence_zero_shot/read_files.py``; summarised in ``../shared/PAPER.md``);
the code is ours. Every item is a list of candidates, the gold one first; a candidate is a
``sentence`` and its ``completion``, a suffix of the sentence whose tokens are the scored ones (the
pipeline scores the tokens whose character span ends past ``len(sentence) - len(completion)``).
Each item belongs to a group, the pipeline's UID, over which accuracies are averaged.

- ``minimal_pairs`` (pipeline names ``blimp``, ``blimp_supplement``): ``[sentence_good]`` vs
  ``[sentence_bad]`` (brackets: the scored completion); group: ``UID`` when the line has a
  ``field`` (BLiMP), else the file stem (the supplement);
- ``ewok``: ``Context1 [Target1]`` vs ``Context1 [Target2]``; group ``Domain``;
- ``entity_tracking``: ``input_prefix[option]`` for each of ``options``; group
  ``<file stem>_<numops>_ops``;
- ``comps``: ``prefix_acceptable [property_phrase]`` vs ``prefix_unacceptable
  [property_phrase]``; group from the file stem (base, wugs, wugs_dist_before,
  wugs_dist_in_between);
- ``wug_adj``, ``wug_past``: the tab-separated ``[sentences]`` and a human ``ratio``; group: the
  kind;
- ``winoground``: ``[caption_0]`` vs ``[caption_1]`` with the image; group ``winoground``;
- ``vqa``: ``question [target_ans]`` vs ``question [distractor]`` for each distractor; group
  ``vqa``.

Image ids (looked up in a feature file made by ``extract-features``): a line's ``image_id``;
else Winoground's ``image_idx`` + ``image_key`` (a row and column of ``facebook/winoground``),
the id ``ex_<image_idx>_img_<k>`` (that image's stem in Winoground's ``images.zip``); else VQA's
``idx_in_hf_dataset`` (a row of ``HuggingFaceM4/VQAv2``, validation), the id
``vqav2_<idx_in_hf_dataset>``, what ``extract-features`` stores for that split saved with
``save_to_disk`` and ``--id-column 'vqav2_{row}'``.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from babymerge.config import InputError
from babymerge.textfiles import numbered_lines

TASK_KINDS = ("minimal_pairs", "ewok", "entity_tracking", "comps", "wug_adj", "wug_past",
              "winoground", "vqa")
# the pipeline's own task names for a kind
KIND_ALIASES = {"blimp": "minimal_pairs", "blimp_supplement": "minimal_pairs"}
MULTIMODAL_KINDS = ("winoground", "vqa")
# scored by the Spearman correlation of the model's probability of the first sentence (softmax over
# the item's sentences) with the human ratio, over all items, as the pipeline does
CORRELATION_KINDS = ("wug_adj", "wug_past")
# entity tracking's score: the mean over these splits of the mean over their UIDs
ENTITY_TRACKING_SPLITS = ("regular", "ambiref", "move_contents")
COMPS_SUBSETS = {"comps_base": "base", "comps_wugs": "wugs",
                 "comps_wugs_dist-before": "wugs_dist_before"}  # any other: wugs_dist_in_between
# Winoground's image_key values (facebook/winoground's image columns) -> k of ex_<idx>_img_<k>
WINOGROUND_IMAGE_KEY = re.compile(r"image_(\d+)")
VQA_ROW_ID = "vqav2_{}"


class TaskError(InputError):
    """Bad evaluation data or task spec; the message names the task, file and line."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str
    path: Path


@dataclass
class Item:
    """One multiple-choice item as read: candidate 0 is gold."""

    where: str  # "file:line", for errors
    group: str  # the pipeline's UID
    candidates: list[tuple[str, str]]  # (sentence, completion: the scored suffix)
    image_id: str | None = None
    ratio: float | None = None  # wug: the human ratio the first sentence's probability tracks
    # what the pipeline's predictions.json names the chosen candidate by
    predictions: list[str] = field(default_factory=list)


def parse_task_spec(text: str) -> TaskSpec:
    """``KIND:PATH`` or ``NAME=KIND:PATH``; NAME defaults to the file or folder stem. KIND is one of
    :data:`TASK_KINDS` or a pipeline task name of :data:`KIND_ALIASES`."""
    name = None
    head, colon, path = text.partition(":")
    if "=" in head:
        name, _, head = head.partition("=")
    kind = KIND_ALIASES.get(head.strip(), head.strip())
    if not colon or not path or kind not in TASK_KINDS or (name is not None and not name.strip()):
        raise TaskError(f"--task {text!r}: expected KIND:PATH or NAME=KIND:PATH with KIND one of "
                        f"{', '.join(TASK_KINDS + tuple(KIND_ALIASES))}")
    path_ = Path(path)
    return TaskSpec(name=(name.strip() if name else path_.stem), kind=kind, path=path_)


def task_files(spec: TaskSpec) -> list[Path]:
    if spec.path.is_dir():
        # hidden files are never task files: macOS leaves binary ._NAME.jsonl twins in copies
        files = sorted(p for p in spec.path.glob("*.jsonl") if not p.name.startswith("."))
        if not files:
            raise TaskError(f"task {spec.name}: no .jsonl files in folder {spec.path}")
        return files
    if not spec.path.is_file():
        raise TaskError(f"task {spec.name}: {spec.path} does not exist")
    return [spec.path]


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    for lineno, line in numbered_lines(path, TaskError):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
        if not isinstance(record, dict):
            raise TaskError(f"{path}:{lineno}: expected a JSON object, got "
                            f"{type(record).__name__}")
        yield lineno, record


def _text(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise TaskError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    return value


def _texts(record: dict, key: str, where: str) -> list[str]:
    values = record.get(key)
    if (not isinstance(values, list) or not values
            or not all(isinstance(v, str) and v.strip() for v in values)):
        raise TaskError(f"{where}: field {key!r} must be a non-empty list of non-empty strings, "
                        f"got {values!r}")
    return values


def image_id(record: dict, where: str) -> str:
    """The feature-file id of a record's image (module docstring). Neither Winoground field alone
    is an id: image_key as the id would give every item image_0's or image_1's one feature."""
    if record.get("image_id") is not None:
        return str(record["image_id"])
    idx, key = record.get("image_idx"), record.get("image_key")
    if idx is not None and key is not None:
        match = WINOGROUND_IMAGE_KEY.fullmatch(str(key))
        if match is None:
            raise TaskError(f"{where}: image_key {key!r} is not a Winoground image column "
                            "(image_0 or image_1)")
        return f"ex_{idx}_img_{match.group(1)}"
    if record.get("idx_in_hf_dataset") is not None:
        return VQA_ROW_ID.format(record["idx_in_hf_dataset"])
    raise TaskError(f"{where}: no image id: give 'image_id', 'image_idx' with 'image_key' (the "
                    "pipeline's Winoground files) or 'idx_in_hf_dataset' (its VQA files)")


def _same_sentence(sentences: list[str]) -> list[tuple[str, str]]:
    return [(s, s) for s in sentences]


def _minimal_pair(rec: dict, path: Path, where: str) -> Item:
    good, bad = _text(rec, "sentence_good", where), _text(rec, "sentence_bad", where)
    # the pipeline takes the UID from lines with a `field` (BLiMP); the supplement's from the file
    group = str(rec.get("UID")) if "field" in rec and rec.get("UID") is not None else path.stem
    return Item(where, group, _same_sentence([good, bad]), predictions=[good, bad])


def _ewok(rec: dict, path: Path, where: str) -> Item:
    context = _text(rec, "Context1", where)
    targets = [_text(rec, "Target1", where), _text(rec, "Target2", where)]
    # both candidates continue Context1 (Context2 only serves masked models); only the target
    # is scored
    return Item(where, str(_text(rec, "Domain", where)),
                [(f"{context} {t}", f" {t}") for t in targets],
                predictions=[f" {t}" for t in targets])


def _entity_tracking(rec: dict, path: Path, where: str) -> Item:
    prefix, options = _text(rec, "input_prefix", where), _texts(rec, "options", where)
    if "numops" not in rec:
        raise TaskError(f"{where}: field 'numops' is missing")
    return Item(where, f"{path.stem}_{rec['numops']}_ops", [(prefix + o, o) for o in options],
                predictions=list(options))


def _comps(rec: dict, path: Path, where: str) -> Item:
    phrase = _text(rec, "property_phrase", where)
    sentences = [f"{_text(rec, key, where)} {phrase}"
                 for key in ("prefix_acceptable", "prefix_unacceptable")]
    return Item(where, COMPS_SUBSETS.get(path.stem, "wugs_dist_in_between"),
                [(s, phrase) for s in sentences], predictions=sentences)


def _wug(kind: str):
    def decode(rec: dict, path: Path, where: str) -> Item:
        sentences = _text(rec, "sentences", where).split("\t")
        try:
            ratio = float(rec["ratio"])
        except (KeyError, TypeError, ValueError):
            raise TaskError(f"{where}: field 'ratio' must be a number, got "
                            f"{rec.get('ratio')!r}") from None
        if len(sentences) < 2 or not all(s.strip() for s in sentences):
            raise TaskError(f"{where}: field 'sentences' must hold two or more tab-separated "
                            "sentences")
        return Item(where, kind, _same_sentence(sentences), ratio=ratio, predictions=sentences)
    return decode


def _winoground(rec: dict, path: Path, where: str) -> Item:
    captions = [_text(rec, "caption_0", where), _text(rec, "caption_1", where)]
    return Item(where, "winoground", _same_sentence(captions), image_id(rec, where),
                predictions=captions)


def _vqa(rec: dict, path: Path, where: str) -> Item:
    question = _text(rec, "question", where)
    answers = [_text(rec, "target_ans", where), *_texts(rec, "distractors", where)]
    return Item(where, "vqa", [(f"{question} {a}", f" {a}") for a in answers],
                image_id(rec, where), predictions=[f" {a}" for a in answers])


DECODERS = {"minimal_pairs": _minimal_pair, "ewok": _ewok, "entity_tracking": _entity_tracking,
            "comps": _comps, "wug_adj": _wug("wug_adj"), "wug_past": _wug("wug_past"),
            "winoground": _winoground, "vqa": _vqa}


def read_items(spec: TaskSpec) -> list[Item]:
    """Every item of a task, validated; malformed lines are errors naming file and line."""
    decode = DECODERS[spec.kind]
    items = [decode(rec, path, f"{path}:{lineno}")
             for path in task_files(spec) for lineno, rec in _read_jsonl(path)]
    if not items:
        raise TaskError(f"task {spec.name} ({spec.kind}:{spec.path}): no items")
    same = [it.where for it in items if len({c for c, _ in it.candidates}) == 1]
    if same:
        # real BLiMP holds 7 such pairs (passive_1, principle_A_case_2); the pipeline counts a
        # tie as correct, and so does babymerge, but the item measures nothing
        warnings.warn(f"task {spec.name}: {len(same)} item(s) whose candidates are all the same "
                      f"sentence (scored as ties, counted correct as the pipeline counts them): "
                      f"{', '.join(same[:5])}{' ...' if len(same) > 5 else ''}", stacklevel=2)
    return items
