"""Stage 3a: score a checkpoint on the BabyLM evaluation pipeline's zero-shot tasks, with the
pipeline's numbers.

``babymerge eval MODEL_DIR --task KIND:PATH ... --features FILE.h5 --out scores.json``

Task files are read as the pipeline reads them (:mod:`babymerge.tasks`: minimal pairs, EWoK, entity
tracking, COMPS, wug, Winoground, VQA). Every candidate is ``[BOS, <image>] + tokens(sentence)``,
the image token carrying the image's cached feature (the feature file's ``/black`` for text-only
tasks, the paper's text-only input). Scored as the pipeline scores (its
``sentence_zero_shot/{dataset,compute_results,run}.py`` at bf55c11):

- a candidate's score is the sum of the log-probabilities of its completion's tokens, those whose
  character span ends past where the completion starts (no length normalisation);
- an item is correct when the gold candidate (the first) has the highest score, the first maximum
  winning, so a tie counts as correct; identical candidates are scored once, so they tie exactly;
- a task's accuracy is the unweighted mean over its groups (UIDs) of the accuracy within each;
  entity tracking's is the mean over its splits (regular, ambiref, move_contents) of the mean
  over their UIDs; wug's score is Spearman's rho between the model's probability of the first
  sentence (softmax over the item's sentences) and the human ratio.

Accuracies are fractions in [0, 1] here and in every babymerge file (the pipeline prints percent);
rho is in [-1, 1]. ``--predictions DIR`` writes ``DIR/<task>/predictions.json`` in the pipeline's
layout (``{UID: {"predictions": [{"id": "<UID>_<n>", "pred": ...}]}}``), so the two can be diffed
item by item.

Image ids are looked up in the feature file, so no image is encoded here (:func:`babymerge.tasks.
image_id` says how a line names its image). The scoring loop (:func:`score_candidates`) is what
:mod:`babymerge.merge` runs on its live model at every alpha: tasks are read and tokenised once
(:func:`load_tasks`), then scored many times.
"""

from __future__ import annotations

import functools
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import click
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoConfig

from babymerge.config import arg, atomic_write_text, config_to_dict, opt
from babymerge.distributed import resolve_device
from babymerge.featurefile import FeatureFileError, FeatureTable
from babymerge.model import (NonFiniteError, encoder_name, image_prefix_ids, load_black_feature,
                             load_model)
from babymerge.tasks import (CORRELATION_KINDS, ENTITY_TRACKING_SPLITS, KIND_ALIASES,
                             MULTIMODAL_KINDS, TASK_KINDS, Item, TaskError, TaskSpec,
                             parse_task_spec, read_items)
from babymerge.tokenizer import TokenizerError, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Scored positions go through the LM head this many at a time: bounds the transient logits to
# chunk x vocab floats (1024 x 30k x 4 B = 123 MB) however long or wide the batch is.
LOGIT_CHUNK = 1024


@dataclass
class EvalConfig:
    """``babymerge eval``: one checkpoint, several tasks, one JSON of scores."""

    model: Path = arg(help="checkpoint directory (BabyLLaVA, tokenizer inside)")
    task: list[str] = opt([], "task as KIND:PATH or NAME=KIND:PATH, KIND in "
                          + "|".join(TASK_KINDS + tuple(KIND_ALIASES)) + " (repeatable)",
                          short="-t")
    features: Path | None = opt(None, "feature file (extract-features) with the tasks' image ids "
                                "and the black feature used for text-only inputs")
    out: Path | None = opt(None, "write the scores here as JSON")
    predictions: Path | None = opt(None, "also write DIR/<task>/predictions.json per task, in the "
                                   "BabyLM pipeline's layout (to diff item by item)")
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


@dataclass
class PreparedTask:
    """A task tokenised and flattened into candidates, ready to be scored any number of times.

    Candidates of one item are contiguous, gold first: item ``i`` owns candidates
    ``item_start[i]:item_start[i+1]``. Candidate ``c`` is ``input_ids[c]``; its tokens from
    ``score_from[c]`` on are scored; its image token carries ``features[feature_rows[c]]``.
    Candidates with the same ids and image are one sequence: ``same_as[c]`` is the first such
    candidate, the one scored.
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
    same_as: torch.Tensor | None = None  # (candidates,) long; None: every candidate its own
    ratios: list[float] | None = None  # per item, correlation kinds
    predictions: list[str] | None = None  # per candidate: what predictions.json calls it

    def __post_init__(self) -> None:
        if self.same_as is None:
            first: dict[tuple, int] = {}
            self.same_as = torch.tensor(
                [first.setdefault((tuple(ids), int(row)), c) for c, (ids, row) in
                 enumerate(zip(self.input_ids, self.feature_rows.tolist(), strict=True))],
                dtype=torch.long)

    @property
    def num_items(self) -> int:
        return len(self.groups)

    @functools.cached_property
    def packed(self) -> list[PackedItem]:
        """The items packed for scoring (:func:`pack_items`), built once per task."""
        return pack_items(self)

    @property
    def metric(self) -> str:
        return "spearman" if self.kind in CORRELATION_KINDS else "accuracy"

    @property
    def chance(self) -> float:
        """Expected score of a random guess: mean of 1/candidates over items; 0 for a
        correlation."""
        if self.metric == "spearman":
            return 0.0
        return float((1.0 / self.item_start.diff().double()).mean())


def pack_task(spec: TaskSpec, prefix: list[int], sequences: list[list[list[int]]],
              first_scored: list[list[int]], groups: list[str], image_index: list[int],
              features: torch.Tensor, **extra) -> PreparedTask:
    """Flatten token ids per item (one list per candidate) into a :class:`PreparedTask`;
    ``first_scored[i][j]`` is the index of the first scored token of item i's candidate j, and
    ``image_index[i]`` is item i's row in ``features``."""
    input_ids, score_from, rows, starts = [], [], [], [0]
    for seqs, firsts, img in zip(sequences, first_scored, image_index, strict=True):
        for seq, first in zip(seqs, firsts, strict=True):
            input_ids.append(prefix + seq)
            score_from.append(len(prefix) + first)
            rows.append(img)
        starts.append(len(input_ids))
    return PreparedTask(spec.name, spec.kind, str(spec.path), input_ids, score_from,
                        torch.tensor(rows, dtype=torch.long), features,
                        torch.tensor(starts, dtype=torch.long), groups, **extra)


def _tokenize_candidates(items: list[Item], tokenizer, prefix_len: int,
                         max_positions: int | None) -> tuple[list, list]:
    """Per item and candidate: the sentence's token ids and the index of its first scored token,
    the first whose character span ends past the completion's start (the pipeline's rule)."""
    sentences = [sentence for it in items for sentence, _ in it.candidates]
    if max_positions is not None:
        # a token spans at most the longest vocabulary entry's characters: a longer text cannot
        # fit, and is refused before it is tokenised (a 10 MB line took minutes and gigabytes)
        widest = max(len(token) for token in tokenizer.get_vocab())
        limit = (max_positions - prefix_len) * widest
        for it in items:
            for sentence, _ in it.candidates:
                if len(sentence) > limit:
                    raise TaskError(f"{it.where}: a candidate of {len(sentence)} characters "
                                    f"cannot fit the model's {max_positions} positions")
    enc = tokenizer(sentences, add_special_tokens=False, return_offsets_mapping=True)
    sequences, firsts, k = [], [], 0
    for it in items:
        seqs, item_firsts = [], []
        for sentence, completion in it.candidates:
            ids, offsets = enc["input_ids"][k], enc["offset_mapping"][k]
            k += 1
            start = len(sentence) - len(completion)
            first = next((j for j, (_, end) in enumerate(offsets) if end > start), None)
            if first is None:
                raise TaskError(f"{it.where}: candidate {completion!r} has no tokens to score")
            if max_positions is not None and prefix_len + len(ids) > max_positions:
                raise TaskError(f"{it.where}: {prefix_len + len(ids)} tokens exceed the model's "
                                f"{max_positions} positions")
            seqs.append(ids)
            item_firsts.append(first)
        sequences.append(seqs)
        firsts.append(item_firsts)
    return sequences, firsts


def prepare_task(spec: TaskSpec, tokenizer, table: FeatureTable | None,
                 max_positions: int | None = None) -> PreparedTask:
    """Read, validate and tokenise one task; look up its images' features (or the black one)."""
    items = read_items(spec)
    if table is None:
        need = "the black feature for text-only inputs" if spec.kind not in MULTIMODAL_KINDS \
            else "the features of its images"
        raise TaskError(f"task {spec.name} needs {need}: pass --features FILE.h5")
    if spec.kind not in MULTIMODAL_KINDS:
        features, image_index = table.black[None], [0] * len(items)
    else:
        try:
            rows = table.rows([it.image_id for it in items])
        except FeatureFileError as e:
            raise TaskError(f"task {spec.name} ({spec.path}): {e}") from e
        unique, inverse = torch.unique(rows, return_inverse=True)
        features, image_index = table.gather(unique), inverse.tolist()
    prefix = image_prefix_ids(tokenizer)
    sequences, firsts = _tokenize_candidates(items, tokenizer, len(prefix), max_positions)
    return pack_task(spec, prefix, sequences, firsts, [it.group for it in items], image_index,
                     features, ratios=([it.ratio for it in items]
                                       if spec.kind in CORRELATION_KINDS else None),
                     predictions=[p for it in items for p in it.predictions])


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
                                 load_features=any(p.kind in MULTIMODAL_KINDS for p in parsed),
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
    return [prepare_task(p, tokenizer, table if table is not None or p.kind in MULTIMODAL_KINDS
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


@dataclass
class PackedItem:
    """One item's candidates as one sequence: their longest common prefix once, then each
    candidate's remaining tokens, a branch that attends to the prefix and to itself only
    (:func:`score_candidates`). ``scored`` lists, per scored token, the position whose output
    predicts it, the token, and its candidate."""

    ids: list[int]
    positions: list[int]
    branch: list[int]  # 0: the shared prefix; k: the k-th candidate's own tokens
    scored: list[tuple[int, int, int]]


def pack_items(task: PreparedTask) -> list[PackedItem]:
    """:class:`PackedItem` s of ``task`` (one per item), identical candidates packed once. On real
    BLiMP (67,000 pairs, a tokenizer trained on them) packing runs 24% fewer token positions."""
    packed = []
    same_as = task.same_as.tolist()
    for i in range(task.num_items):
        first, end = int(task.item_start[i]), int(task.item_start[i + 1])
        own = [c for c in range(first, end) if same_as[c] == c]
        seqs = [task.input_ids[c] for c in own]
        if not seqs:  # an item without candidates (ImageTextModel.score with no texts)
            packed.append(PackedItem([], [], [], []))
            continue
        shared = 0
        while all(shared < len(s) and s[shared] == seqs[0][shared] for s in seqs):
            shared += 1
        ids, positions, branch = list(seqs[0][:shared]), list(range(shared)), [0] * shared
        scored = []
        for k, (c, seq) in enumerate(zip(own, seqs), 1):
            offset = len(ids) - shared  # packed index of the candidate's token t >= shared
            ids += seq[shared:]
            positions += range(shared, len(seq))
            branch += [k] * (len(seq) - shared)

            def at(t: int) -> int:
                return t if t < shared else t + offset

            scored += [(at(t - 1), seq[t], c) for t in range(task.score_from[c], len(seq))]
        packed.append(PackedItem(ids, positions, branch, scored))
    return packed


def _tree_mask(branch: torch.Tensor) -> torch.Tensor:
    """(batch, 1, L, L) boolean attention mask of packed rows: causal, and a candidate's token sees
    the shared prefix and its own branch. Padding (branch -1) sees only itself: a row with nothing
    to attend to would make the softmax NaN."""
    length = branch.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=branch.device).tril()
    key, query = branch[:, None, :], branch[:, :, None]
    same = (key == 0) | (key == query)
    own = torch.eye(length, dtype=torch.bool, device=branch.device)[None] & (query < 0)
    return ((causal & same & (query >= 0)) | own)[:, None]


@torch.no_grad()
def score_candidates(model, task: PreparedTask, batch_size: int = 64,
                     progress: bool = True) -> torch.Tensor:
    """Sum of log-probabilities of each candidate's scored tokens, shape (candidates,), float64.

    Each item runs as ONE packed sequence (:func:`pack_items`): the candidates' common prefix
    (``[BOS, <image>]``, a VQA question, an EWoK context, the first words of a minimal pair) is
    computed once, each candidate's rest attends to it through a tree-shaped mask with position
    ids that restart after it, which gives each candidate the same outputs as running it alone.
    Batches of ``batch_size`` packed items are length-sorted (longest first, so an out-of-memory
    shows at once) and right-padded. Only the hidden states of scored positions go through the
    LM head, in chunks, so the full (batch, length, vocab) logits never exist.
    """
    device = next(model.parameters()).device
    packed = task.packed
    order = sorted(range(len(packed)), key=lambda i: -len(packed[i].ids))
    scores = torch.zeros(len(task.input_ids), dtype=torch.float64)
    # in their stored dtype: the model casts them to its projector's dtype, after standardising
    # them in float32 (feature_norm="standardize"); rounded to bfloat16 first, the large shared
    # offset of the features would lose what the standardisation is there to keep
    features = task.features.to(device)
    item_rows = task.feature_rows[task.item_start[:-1].clamp(max=len(task.feature_rows) - 1)] \
        if len(task.feature_rows) else torch.zeros(0, dtype=torch.long)
    with tqdm(total=len(order), unit="item", desc=f"eval {task.name}", disable=not progress,
              leave=False) as bar:
        for start in range(0, len(order), batch_size):
            idx = [i for i in order[start:start + batch_size] if packed[i].scored]
            if not idx:
                bar.update(len(order[start:start + batch_size]))
                continue
            width = len(packed[idx[0]].ids)
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            pos = torch.zeros(len(idx), width, dtype=torch.long)
            branch = torch.full((len(idx), width), -1, dtype=torch.long)
            rows, where, targets, cands = [], [], [], []
            for r, i in enumerate(idx):
                item = packed[i]
                n = len(item.ids)
                ids[r, :n], pos[r, :n] = torch.tensor(item.ids), torch.tensor(item.positions)
                branch[r, :n] = torch.tensor(item.branch)
                for at, target, c in item.scored:
                    rows.append(r)
                    where.append(at)
                    targets.append(target)
                    cands.append(c)
            mask = _tree_mask(branch.to(device))
            hidden = model.model(input_ids=ids.to(device), attention_mask=mask,
                                 position_ids=pos.to(device), use_cache=False,
                                 pixel_values=features[item_rows[idx].to(device)]
                                 ).last_hidden_state
            h = hidden[torch.tensor(rows, device=device), torch.tensor(where, device=device)]
            targets = torch.tensor(targets, device=device)
            logp = torch.cat([-F.cross_entropy(model.lm_head(h[j:j + LOGIT_CHUNK]).float(),
                                               targets[j:j + LOGIT_CHUNK], reduction="none")
                              for j in range(0, len(h), LOGIT_CHUNK)])
            logp = logp.double().cpu()
            if not torch.isfinite(logp).all():  # finite weights and features, yet an overflow
                raise NonFiniteError(f"task {task.name}: the model's log-probabilities are NaN "
                                     f"or infinite (weights in {next(model.parameters()).dtype}; "
                                     "float32 avoids an overflow)")
            scores.index_add_(0, torch.tensor(cands), logp)
            bar.update(len(order[start:start + batch_size]))
    return scores[task.same_as]


def chosen_candidates(task: PreparedTask, scores: torch.Tensor) -> torch.Tensor:
    """Per item, the index (within the item) of its highest-scoring candidate, the first maximum
    on a tie (``torch.max``'s index, as the pipeline takes it)."""
    per_item = torch.split(scores, task.item_start.diff().tolist())
    return torch.tensor([int(torch.nonzero(s == s.max())[0]) for s in per_item],
                        dtype=torch.long)


def average_ranks(values) -> np.ndarray:
    """Ranks (1-based) along the last axis, ties given the mean of the ranks they span (as
    ``scipy.stats.rankdata``); any leading axes are independent rows (bootstrap replicates)."""
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(v, axis=-1, kind="stable")
    ordered = np.take_along_axis(v, order, axis=-1)
    n = v.shape[-1]
    position = np.broadcast_to(np.arange(n), v.shape)
    starts = np.ones(v.shape, dtype=bool)
    starts[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    ends = np.ones(v.shape, dtype=bool)
    ends[..., :-1] = starts[..., 1:]
    # each sorted position's tie block runs from the last start at or before it to the first
    # end at or after it
    first = np.maximum.accumulate(np.where(starts, position, 0), axis=-1)
    last = np.flip(np.minimum.accumulate(np.flip(np.where(ends, position, n), -1), axis=-1), -1)
    ranks = np.empty(v.shape)
    np.put_along_axis(ranks, order, (first + last) / 2 + 1, axis=-1)
    return ranks


def spearman(x, y):
    """Spearman's rho along the last axis: Pearson's correlation of the average ranks (as
    ``scipy.stats.spearmanr``, which the pipeline calls). NaN where either side is constant. A
    float for 1-D input, an array of one rho per row otherwise."""
    a, b = average_ranks(x), average_ranks(y)
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    denominator = np.sqrt(np.square(a).sum(-1) * np.square(b).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(denominator > 0, (a * b).sum(-1) / denominator, np.nan)
    return float(rho) if rho.ndim == 0 else rho


def first_probabilities(task: PreparedTask, scores: torch.Tensor) -> list[float]:
    """Per item, the softmax over its candidates' scores, at the first candidate (wug). In
    float32, as the pipeline computes it: where one sentence is far likelier, float32 rounds the
    probability to 1, and items so rounded tie in the ranks, as they do there."""
    return [float(torch.softmax(s.float(), 0)[0])
            for s in torch.split(scores, task.item_start.diff().tolist())]


def item_outcomes(task: PreparedTask, scores: torch.Tensor) -> list[float]:
    """Per item, what the task's score is made of: 1.0 when the gold candidate is chosen, else
    0.0; for a correlation, the probability of the first sentence. Any subset's score follows
    from these (:func:`score_items`): a split or a bootstrap needs no second forward pass."""
    if task.metric == "spearman":
        return first_probabilities(task, scores)
    return (chosen_candidates(task, scores) == 0).double().tolist()


def score_items(task: PreparedTask, outcomes: list[float],
                items: list[int] | None = None) -> dict:
    """``{"score", "metric", "groups"}`` of the items ``items`` (indices; None: all) from their
    :func:`item_outcomes`: the task's score as the pipeline computes it (module docstring), and
    per group (UID) the accuracy, or for a correlation the rho over the items."""
    items = range(task.num_items) if items is None else items
    if task.metric == "spearman":
        rho = spearman([outcomes[i] for i in items], [task.ratios[i] for i in items])
        return {"score": rho, "metric": "spearman", "groups": {task.groups[0]: rho}}
    per_group: dict[str, list[float]] = {}
    for i in items:
        per_group.setdefault(task.groups[i], []).append(outcomes[i])
    groups = {g: sum(v) / len(v) for g, v in per_group.items()}
    return {"score": aggregate_groups(task.kind, groups), "metric": "accuracy", "groups": groups}


def aggregate_groups(kind: str, groups: dict):
    """A task's accuracy from its groups' (UIDs') accuracies: their unweighted mean; entity
    tracking's, the mean over its splits of the mean over their UIDs. The values may be arrays
    (one per bootstrap replicate): only sums and divisions."""
    if kind == "entity_tracking":
        splits = [[a for g, a in groups.items() if g.startswith(split)]
                  for split in ENTITY_TRACKING_SPLITS]
        means = [sum(v) / len(v) for v in splits if v]
        if means:
            return sum(means) / len(means)
    return sum(groups.values()) / len(groups)


def task_score(task: PreparedTask, scores: torch.Tensor) -> dict:
    """:func:`score_items` of every item, from the candidates' ``scores``."""
    return score_items(task, item_outcomes(task, scores))


def pipeline_predictions(task: PreparedTask, scores: torch.Tensor) -> dict:
    """The pipeline's ``predictions.json`` of this task: per UID, in item order, ``{"id":
    "<UID>_<n>", "pred": <the chosen candidate>}`` (the completion; COMPS: the sentence), wug
    items also with ``"prob"``, the first sentence's probability."""
    chosen = chosen_candidates(task, scores).tolist()
    probs = first_probabilities(task, scores) if task.metric == "spearman" else None
    out: dict[str, dict] = {}
    for i, (group, j) in enumerate(zip(task.groups, chosen)):
        preds = out.setdefault(group, {"predictions": []})["predictions"]
        entry = {"id": f"{group}_{len(preds)}",
                 "pred": task.predictions[int(task.item_start[i]) + j]}
        if probs is not None:
            entry["prob"] = probs[i]
        preds.append(entry)
    return out


def evaluate_tasks(model, tasks: list[PreparedTask], batch_size: int = 64,
                   progress: bool = True, with_scores: bool = False) -> dict[str, dict]:
    """Score the live ``model`` on every prepared task: ``{name: {"score", "metric",
    "groups", "items"}}`` (:func:`score_items`, :func:`item_outcomes`), with each candidate's
    ``"scores"`` if asked."""
    was_training = model.training
    model.eval()
    try:
        out = {}
        for t in tasks:
            scores = score_candidates(model, t, batch_size, progress)
            outcomes = item_outcomes(t, scores)
            out[t.name] = {**score_items(t, outcomes), "items": outcomes,
                           **({"scores": scores} if with_scores else {})}
        return out
    finally:
        model.train(was_training)


def task_summary(tasks: list[PreparedTask]) -> dict[str, dict]:
    """The ``tasks`` block of results files: kind, metric, chance, items, path."""
    return {t.name: {"kind": t.kind, "metric": t.metric, "chance": t.chance,
                     "items": t.num_items, "path": t.path} for t in tasks}


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
    for flag, path, folder in (("--out", cfg.out, False), ("--predictions", cfg.predictions, True)):
        if path is not None and path.exists() and path.is_dir() != folder:
            raise TaskError(f"{flag} {path}: exists and is a {'file' if folder else 'folder'}; "
                            f"{flag} takes a {'folder' if folder else 'file'} path")
    tokenizer = checkpoint_tokenizer(cfg.model, "MODEL")
    # data errors surface before the model is loaded
    tasks = load_tasks(cfg.task, tokenizer, cfg.features, checkpoint_max_positions(cfg.model),
                       checkpoint=cfg.model)
    check_feature_encoder(cfg.model, cfg.features)
    model = load_model(cfg.model, resolve_device(cfg.device), DTYPES[cfg.dtype])
    check_feature_dim(model, tasks)
    t0 = time.perf_counter()
    results = evaluate_tasks(model, tasks, cfg.batch_size, cfg.progress,
                             with_scores=cfg.predictions is not None)
    seconds = time.perf_counter() - t0
    report = {"model": str(cfg.model), "tasks": task_summary(tasks),
              "scores": {name: r["score"] for name, r in results.items()},
              "groups": {name: r["groups"] for name, r in results.items()},
              "seconds": seconds,
              # batch size, dtype, device, feature file: what two runs on one model differ in
              "config": config_to_dict(cfg)}
    for name, score in report["scores"].items():
        summary = report["tasks"][name]
        shown = (f"{score:.4f} ({100 * score:.2f}%)" if summary["metric"] == "accuracy"
                 else f"rho {score:.4f}")
        click.echo(f"{name}: {shown} (chance {summary['chance']:.3f}, {summary['items']} items)")
    if cfg.predictions is not None:
        for task in tasks:
            atomic_write_text(cfg.predictions / task.name / "predictions.json", json.dumps(
                pipeline_predictions(task, results[task.name]["scores"])) + "\n")
    if cfg.out is not None:
        atomic_write_text(cfg.out, json.dumps(report, indent=2) + "\n")
    return report
