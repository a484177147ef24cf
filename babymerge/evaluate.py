"""Stage 3a: score a checkpoint on the BabyLM evaluation pipeline's zero-shot tasks.

``babymerge eval MODEL_DIR --task KIND:PATH ... --features FILE.h5 --out scores.json``

Three task kinds, read in the pipeline's own jsonl formats (``../shared/DESIGN.md``):

- ``minimal_pairs`` (BLiMP, BLiMP supplement): ``sentence_good`` vs ``sentence_bad``;
- ``winoground`` (image-text matching): ``caption_0`` (gold) vs ``caption_1`` with the image;
- ``vqa``: ``question + " " + answer`` for ``target_ans`` (gold) and each of ``distractors``, only
  the answer tokens scored.

Every candidate is ``[BOS, <image>] + tokens`` with the image token carrying the image's cached
feature (the feature file's ``/black`` for minimal pairs, the paper's text-only input). A
candidate's score is the sum of its scored tokens' log-probabilities (no length normalisation); an
item is won when the gold candidate's score is strictly higher than every other one's, as the
pipeline scores.
Accuracy is the mean over items within each group (the record's ``UID``; for minimal pairs without
one, the file stem; otherwise the task) and the task's score is the macro-average over groups.

Image ids are looked up in the feature file, so no image is encoded here. A record's id is its
``image_id`` (ours; the pipeline's VQA files carry the COCO ``image_id`` of the question's image).
The pipeline's Winoground files carry none: their ``image_idx`` is the row of
``facebook/winoground`` (its test split, in id order) and ``image_key`` its column (``image_0``
or ``image_1``), so the id is ``ex_<image_idx>_img_<k>``, that image's stem in Winoground's own
``images.zip`` (``extract-features`` on the unzipped folder stores exactly these ids). Either
field alone names no single image and is an error.

The scoring loop (:func:`score_candidates`) is what :mod:`babymerge.merge` runs on its live model
at every alpha: tasks are read and tokenised once (:func:`load_tasks`), then scored many times.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import click
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoConfig

from babymerge.config import InputError, arg, atomic_write_text, config_to_dict, opt
from babymerge.distributed import resolve_device
from babymerge.featurefile import FeatureFileError, FeatureTable
from babymerge.model import encoder_name, image_prefix_ids, load_black_feature, load_model
from babymerge.textfiles import numbered_lines
from babymerge.tokenizer import TokenizerError, load_tokenizer

TASK_KINDS = ("minimal_pairs", "winoground", "vqa")
GRAMMAR_KINDS = ("minimal_pairs",)
MULTIMODAL_KINDS = ("winoground", "vqa")
# Winoground's image_key values (facebook/winoground's image columns) -> k of ex_<idx>_img_<k>
WINOGROUND_IMAGE_KEY = re.compile(r"image_(\d+)")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Scored positions go through the LM head this many at a time: bounds the transient logits to
# chunk x vocab floats (1024 x 30k x 4 B = 123 MB) however long or wide the batch is.
LOGIT_CHUNK = 1024


@dataclass
class EvalConfig:
    """``babymerge eval``: one checkpoint, several tasks, one JSON of scores."""

    model: Path = arg(help="checkpoint directory (BabyLLaVA, tokenizer inside)")
    task: list[str] = opt([], "task as KIND:PATH or NAME=KIND:PATH, KIND in "
                          + "|".join(TASK_KINDS) + " (repeatable)", short="-t")
    features: Path | None = opt(None, "feature file (extract-features) with the tasks' image ids "
                                "and the black feature used for text-only inputs")
    out: Path | None = opt(None, "write the scores here as JSON")
    batch_size: int = opt(64, "sequences per forward pass")
    device: str = opt("auto", "cpu, cuda, cuda:N, or auto (cuda when available)")
    dtype: str = opt("float32", "model dtype for scoring", choices=tuple(DTYPES))
    progress: bool = opt(True, "show the progress bars")

    def __post_init__(self) -> None:
        if not self.task:
            raise ValueError("--task: give at least one task (KIND:PATH)")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        for spec in self.task:
            parse_task_spec(spec)  # syntax only: a bad spec fails before anything is loaded


class TaskError(InputError):
    """Bad evaluation data or task spec; the message names the task, file and line."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str
    path: Path


def parse_task_spec(text: str) -> TaskSpec:
    """``KIND:PATH`` or ``NAME=KIND:PATH``; NAME defaults to the file or folder stem."""
    name = None
    head, colon, path = text.partition(":")
    if "=" in head:
        name, _, head = head.partition("=")
    kind = head.strip()
    if not colon or not path or kind not in TASK_KINDS or (name is not None and not name.strip()):
        raise TaskError(f"--task {text!r}: expected KIND:PATH or NAME=KIND:PATH with KIND one of "
                        f"{', '.join(TASK_KINDS)}")
    path_ = Path(path)
    return TaskSpec(name=(name.strip() if name else path_.stem), kind=kind, path=path_)


@dataclass
class Item:
    """One multiple-choice item as read: candidate 0 is gold."""

    where: str  # "file:line", for errors
    group: str
    context: str  # scored-not text before each candidate ("" or the VQA question)
    candidates: list[str]
    image_id: str | None


def _task_files(spec: TaskSpec) -> list[Path]:
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


def _image_id(record: dict, where: str) -> str:
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
    raise TaskError(f"{where}: no image id: give 'image_id', or 'image_idx' with 'image_key' "
                    "(the pipeline's Winoground files)")


def read_items(spec: TaskSpec) -> list[Item]:
    """Every item of a task, validated; malformed lines are errors naming file and line."""
    items: list[Item] = []
    for path in _task_files(spec):
        for lineno, rec in _read_jsonl(path):
            where = f"{path}:{lineno}"
            uid = rec.get("UID")
            if spec.kind == "minimal_pairs":
                group = str(uid) if uid is not None else path.stem
                items.append(Item(where, group, "", [_text(rec, "sentence_good", where),
                                                     _text(rec, "sentence_bad", where)], None))
            elif spec.kind == "winoground":
                items.append(Item(where, str(uid) if uid is not None else spec.name, "",
                                  [_text(rec, "caption_0", where), _text(rec, "caption_1", where)],
                                  _image_id(rec, where)))
            else:  # vqa
                distractors = rec.get("distractors")
                if (not isinstance(distractors, list) or not distractors
                        or not all(isinstance(d, str) and d.strip() for d in distractors)):
                    raise TaskError(f"{where}: field 'distractors' must be a non-empty list of "
                                    f"non-empty strings, got {distractors!r}")
                items.append(Item(where, str(uid) if uid is not None else spec.name,
                                  _text(rec, "question", where),
                                  [_text(rec, "target_ans", where), *distractors],
                                  _image_id(rec, where)))
    if not items:
        raise TaskError(f"task {spec.name} ({spec.kind}:{spec.path}): no items")
    return items


@dataclass
class PreparedTask:
    """A task tokenised and flattened into candidates, ready to be scored any number of times.

    Candidates of one item are contiguous, gold first: item ``i`` owns candidates
    ``item_start[i]:item_start[i+1]``. Candidate ``c`` is ``input_ids[c]``; its tokens from
    ``score_from[c]`` on are scored; its image token carries ``features[feature_rows[c]]``.
    """

    name: str
    kind: str
    path: str
    input_ids: list[list[int]]
    score_from: list[int]
    feature_rows: torch.Tensor  # (candidates,) long
    features: torch.Tensor  # (unique images, D)
    item_start: torch.Tensor  # (items + 1,) long
    groups: list[str]  # per item

    @property
    def num_items(self) -> int:
        return len(self.groups)

    @property
    def chance(self) -> float:
        """Expected accuracy of a random guess (mean of 1/candidates over items)."""
        return float((1.0 / self.item_start.diff().double()).mean())


def pack_task(spec: TaskSpec, prefix: list[int], contexts: list[list[int]],
              continuations: list[list[list[int]]], groups: list[str], image_index: list[int],
              features: torch.Tensor) -> PreparedTask:
    """Flatten token ids per item (context, candidate continuations) into a :class:`PreparedTask`;
    ``image_index[i]`` is item i's row in ``features``."""
    input_ids, score_from, rows, starts = [], [], [], [0]
    for ctx, conts, img in zip(contexts, continuations, image_index, strict=True):
        for cont in conts:
            input_ids.append(prefix + ctx + cont)
            score_from.append(len(prefix) + len(ctx))
            rows.append(img)
        starts.append(len(input_ids))
    return PreparedTask(spec.name, spec.kind, str(spec.path), input_ids, score_from,
                        torch.tensor(rows, dtype=torch.long), features,
                        torch.tensor(starts, dtype=torch.long), groups)


def prepare_task(spec: TaskSpec, tokenizer, table: FeatureTable | None,
                 max_positions: int | None = None) -> PreparedTask:
    """Read, validate and tokenise one task; look up its images' features (or the black one)."""
    items = read_items(spec)
    if table is None:
        need = "the black feature for text-only inputs" if spec.kind in GRAMMAR_KINDS else \
            "the features of its images"
        raise TaskError(f"task {spec.name} needs {need}: pass --features FILE.h5")
    if spec.kind in GRAMMAR_KINDS:
        features, image_index = table.black[None], [0] * len(items)
    else:
        try:
            rows = table.rows([it.image_id for it in items])
        except FeatureFileError as e:
            raise TaskError(f"task {spec.name} ({spec.path}): {e}") from e
        unique, inverse = torch.unique(rows, return_inverse=True)
        features, image_index = table.gather(unique), inverse.tolist()

    def encode(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    # As the pipeline does: the context is tokenised alone, the continuation is the whole text's
    # tokens past the context's length (so the answer tokenises as it would inside the sentence).
    with_context = [i for i, it in enumerate(items) if it.context]
    contexts: list[list[int]] = [[] for _ in items]
    for i, ids in zip(with_context, encode([items[i].context for i in with_context]),
                      strict=True):
        contexts[i] = ids
    whole = encode([(it.context + " " + c) if it.context else c
                    for it in items for c in it.candidates])
    prefix = image_prefix_ids(tokenizer)
    continuations, k = [], 0
    for it, ctx in zip(items, contexts, strict=True):
        conts = []
        for cand in it.candidates:
            ids = whole[k][len(ctx):] if it.context else whole[k]
            k += 1
            if not ids:
                raise TaskError(f"{it.where}: candidate {cand!r} has no tokens to score")
            if max_positions is not None and len(prefix) + len(ctx) + len(ids) > max_positions:
                raise TaskError(f"{it.where}: {len(prefix) + len(ctx) + len(ids)} tokens exceed "
                                f"the model's {max_positions} positions")
            conts.append(ids)
        continuations.append(conts)
    return pack_task(spec, prefix, contexts, continuations, [it.group for it in items],
                     image_index, features)


def load_tasks(specs: list[str], tokenizer, features: str | Path | FeatureTable | None,
               max_positions: int | None = None, checkpoint: str | Path | None = None
               ) -> list[PreparedTask]:
    """Parse ``KIND:PATH`` specs and prepare every task (names must be unique). Without
    ``features``, text-only tasks use the ``/black`` feature saved in ``checkpoint`` by
    ``babymerge train`` (:func:`babymerge.model.load_black_feature`)."""
    parsed = [parse_task_spec(s) for s in specs]
    # text-only tasks need just /black: skip reading the rows (the file may be a 600k-image one);
    # image tasks read only their own images' rows from the file (max_memory_bytes=0: out of
    # core), not the whole of a file that may also hold the training images (millions of rows)
    table = features
    if isinstance(features, (str, Path)):
        try:
            table = FeatureTable(features,
                                 load_features=any(p.kind not in GRAMMAR_KINDS for p in parsed),
                                 max_memory_bytes=0)
        except FeatureFileError as e:
            raise TaskError(f"--features: {e}") from e
        try:
            return _prepare_all(parsed, tokenizer, table, max_positions, checkpoint)
        finally:
            table.close()
    return _prepare_all(parsed, tokenizer, table, max_positions, checkpoint)


def _prepare_all(parsed: list[TaskSpec], tokenizer, table: FeatureTable | None,
                 max_positions: int | None, checkpoint: str | Path | None
                 ) -> list[PreparedTask]:
    names = [p.name for p in parsed]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TaskError(f"--task: duplicate task name(s) {', '.join(dupes)}; name them with "
                        "NAME=KIND:PATH")
    black = load_black_feature(checkpoint) if table is None and checkpoint is not None else None
    # prepare_task reads only ``.black`` of a text-only task's table; image tasks still need
    # --features (and say so)
    black_only = SimpleNamespace(black=black) if black is not None else None
    return [prepare_task(p, tokenizer, table if table is not None or p.kind not in GRAMMAR_KINDS
                         else black_only, max_positions) for p in parsed]


def check_feature_dim(model, tasks: list[PreparedTask]) -> None:
    """The projector reads features of one width; a file from another encoder is an error."""
    want = model.config.vision_config.hidden_size
    for task in tasks:
        if task.features.shape[-1] != want:
            raise TaskError(f"task {task.name}: features have dimension {task.features.shape[-1]} "
                            f"but the model's projector expects {want} (another encoder?)")


def check_feature_encoder(checkpoint: Path, features: Path | None) -> str | None:
    """A warning (returned, and issued) when ``features`` was made by another encoder than the
    one ``checkpoint`` was trained on: two encoders of one width (dinov2-large and
    dinov2-with-registers-large) pass the width check and score nonsense. Names are compared by
    their last path part, so a hub id, a local copy of it and its hub cache snapshot agree."""
    if features is None:
        return None
    made_with = str(FeatureTable(features, require_complete=False, load_features=False)
                    .attrs.get("encoder") or "")
    trained_on = str(getattr(AutoConfig.from_pretrained(str(checkpoint)), "encoder", "") or "")

    def stem(name: str) -> str:
        return encoder_name(name).split("/")[-1].lower()

    if not made_with or not trained_on or stem(made_with) == stem(trained_on):
        return None
    message = (f"{features} holds features of encoder {made_with!r} but {checkpoint} was trained "
               f"on features of {trained_on!r}; if these are not the same weights, its scores "
               "mean nothing: extract the task images with the model's encoder")
    warnings.warn(message, stacklevel=2)
    return message


@torch.no_grad()
def score_candidates(model, task: PreparedTask, batch_size: int = 64,
                     progress: bool = True) -> torch.Tensor:
    """Sum of log-probabilities of each candidate's scored tokens, shape (candidates,), float64.

    Batches are length-sorted (longest first, so an out-of-memory shows at once) and right-padded
    (Llama positions ignore the attention mask, so left padding would shift them). Only the hidden
    states of scored positions go through the LM head, in chunks, so the full (batch, length,
    vocab) logits never exist.
    """
    device = next(model.parameters()).device
    lengths = torch.tensor([len(s) for s in task.input_ids])
    order = torch.argsort(lengths, descending=True, stable=True).tolist()
    scores = torch.zeros(len(order), dtype=torch.float64)
    # in their stored dtype: the model casts them to its projector's dtype, after standardising
    # them in float32 (feature_norm="standardize"); rounded to bfloat16 first, the large shared
    # offset of the features would lose what the standardisation is there to keep
    features = task.features.to(device)
    # the bar advances per candidate (batches cut across items) but reads in items and items/s,
    # the unit the task sizes and the pipeline's throughput are quoted in
    with tqdm(total=len(order), unit="item", unit_scale=task.num_items / max(1, len(order)),
              desc=f"eval {task.name}", disable=not progress, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = int(lengths[idx[0]])
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            keep = torch.zeros(len(idx), width, dtype=torch.long)
            # positions whose next-token prediction is a scored token
            sel = torch.zeros(len(idx), width, dtype=torch.bool)
            for r, c in enumerate(idx):
                seq = task.input_ids[c]
                ids[r, :len(seq)] = torch.tensor(seq)
                keep[r, :len(seq)] = 1
                sel[r, task.score_from[c] - 1:len(seq) - 1] = True
            ids, keep, sel = ids.to(device), keep.to(device), sel.to(device)
            hidden = model.model(input_ids=ids, attention_mask=keep, use_cache=False,
                                 pixel_values=features[task.feature_rows[idx].to(device)]
                                 ).last_hidden_state
            targets = torch.roll(ids, -1, dims=1)[sel]
            rows = torch.arange(len(idx), device=device)[:, None].expand_as(sel)[sel]
            h = hidden[sel]
            logp = torch.cat([-F.cross_entropy(model.lm_head(h[i:i + LOGIT_CHUNK]).float(),
                                               targets[i:i + LOGIT_CHUNK], reduction="none")
                              for i in range(0, len(h), LOGIT_CHUNK)])
            total = torch.zeros(len(idx), dtype=torch.float64, device=device)
            scores[idx] = total.index_add_(0, rows, logp.double()).cpu()
            bar.update(len(idx))
    return scores


def accuracy(task: PreparedTask, scores: torch.Tensor) -> dict:
    """Strict wins of the gold candidate, per group and macro-averaged over groups."""
    n = task.num_items
    item_of = torch.repeat_interleave(torch.arange(n), task.item_start.diff())
    is_gold = torch.zeros(len(scores), dtype=torch.bool)
    is_gold[task.item_start[:-1]] = True
    best_other = torch.full((n,), float("-inf"), dtype=scores.dtype).scatter_reduce(
        0, item_of[~is_gold], scores[~is_gold], reduce="amax")
    wins = (scores[is_gold] > best_other).double()
    per_group: dict[str, list[float]] = {}
    for g, w in zip(task.groups, wins.tolist()):
        per_group.setdefault(g, []).append(w)
    groups = {g: sum(v) / len(v) for g, v in per_group.items()}
    return {"accuracy": sum(groups.values()) / len(groups), "groups": groups}


def evaluate_tasks(model, tasks: list[PreparedTask], batch_size: int = 64,
                   progress: bool = True) -> dict[str, dict]:
    """Score the live ``model`` on every prepared task: ``{name: {"accuracy", "groups"}}``."""
    was_training = model.training
    model.eval()
    try:
        return {t.name: accuracy(t, score_candidates(model, t, batch_size, progress))
                for t in tasks}
    finally:
        model.train(was_training)


def task_summary(tasks: list[PreparedTask]) -> dict[str, dict]:
    """The ``tasks`` block of results files: kind, chance, items, path."""
    return {t.name: {"kind": t.kind, "chance": t.chance, "items": t.num_items, "path": t.path}
            for t in tasks}


def checkpoint_tokenizer(directory: str | Path, flag: str):
    """The tokenizer saved in a checkpoint; a missing or foreign one is an error naming ``flag``."""
    try:
        return load_tokenizer(directory)
    except TokenizerError as e:
        raise TaskError(f"{flag}: {e}") from e


def checkpoint_max_positions(directory: str | Path) -> int:
    """The decoder's position limit, from the checkpoint's config (no weights read)."""
    return AutoConfig.from_pretrained(str(directory)).text_config.max_position_embeddings


def evaluate(cfg: EvalConfig) -> dict:
    """Evaluate ``cfg.model`` on ``cfg.task``; returns (and writes to ``cfg.out``) the scores."""
    if not (cfg.model / "config.json").is_file():
        raise TaskError(f"{cfg.model}: not a checkpoint directory (no config.json)")
    tokenizer = checkpoint_tokenizer(cfg.model, "MODEL")
    # data errors surface before the model is loaded
    tasks = load_tasks(cfg.task, tokenizer, cfg.features, checkpoint_max_positions(cfg.model),
                       checkpoint=cfg.model)
    check_feature_encoder(cfg.model, cfg.features)
    model = load_model(cfg.model, resolve_device(cfg.device), DTYPES[cfg.dtype])
    check_feature_dim(model, tasks)
    t0 = time.perf_counter()
    scores = evaluate_tasks(model, tasks, cfg.batch_size, cfg.progress)
    seconds = time.perf_counter() - t0
    report = {"model": str(cfg.model), "tasks": task_summary(tasks),
              "scores": {name: s["accuracy"] for name, s in scores.items()},
              "groups": {name: s["groups"] for name, s in scores.items()},
              "seconds": seconds,
              # batch size, dtype, device, feature file: what two runs on one model differ in
              "config": config_to_dict(cfg)}
    for name, acc in report["scores"].items():
        click.echo(f"{name}: {acc:.4f} (chance {report['tasks'][name]['chance']:.3f}, "
                   f"{report['tasks'][name]['items']} items)")
    if cfg.out is not None:
        atomic_write_text(cfg.out, json.dumps(report, indent=2) + "\n")
    return report
