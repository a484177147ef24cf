"""Choosing without peeking, and how sure a difference is: the selection split and paired
bootstrap intervals of a merge sweep.

The paper picks its alpha on the items it then reports. ``merge --select-on half`` splits every
task's items in two, per UID and seeded: the alpha is chosen on the selection half and every
reported number is the other half's, so the chosen point's score is not the maximum of eleven
noisy measurements of the same items.

Every point and endpoint is logged with its per-item outcomes (:func:`babymerge.evaluate.
item_outcomes`), so both halves, and any interval, follow from one scoring pass.

Intervals: for each point against each unmerged endpoint, the difference of every task score,
group mean and objective, with a 95% percentile interval from a paired bootstrap over items
(the same resampled items score both models), stratified by UID: the pipeline's accuracy is a
mean over UIDs, so each UID keeps its size in every replicate. McNemar's test would give one
p-value per UID and none for a macro mean over UIDs or a Spearman rho; the bootstrap gives an
interval for each number the report shows. A UID's replicate depends only on how many of its
items each model alone gets right, so it is drawn from a multinomial over the four outcome
pairs: exact resampling, at a cost independent of the number of items.
"""

from __future__ import annotations

import base64
import zlib
from dataclasses import dataclass

import numpy as np

from babymerge.evaluate import PreparedTask, aggregate_groups, score_items, spearman
from babymerge.merge_report import objective

SELECT_ON = ("all", "half")
CONFIDENCE = 0.95


# --- per-item outcomes in metrics.jsonl ---------------------------------------------------------

def encode_outcomes(task: PreparedTask, outcomes: list[float]) -> str | list[float]:
    """Accuracy outcomes as base64 bits (67k BLiMP pairs: 11 kB a point); probabilities as is."""
    if task.metric == "spearman":
        return [float(v) for v in outcomes]
    return base64.b64encode(np.packbits(np.asarray(outcomes) > 0.5).tobytes()).decode("ascii")


def decode_outcomes(task: PreparedTask, encoded: str | list[float]) -> np.ndarray:
    if task.metric == "spearman":
        return np.asarray(encoded, dtype=np.float64)
    bits = np.unpackbits(np.frombuffer(base64.b64decode(encoded), dtype=np.uint8))
    return bits[:task.num_items].astype(np.float64)


def has_outcomes(rec: dict, tasks: list[PreparedTask]) -> bool:
    """Whether a logged record carries every task's per-item outcomes, of the right count (a
    record of an older babymerge has none: its point is scored again)."""
    items = rec.get("items")
    if not isinstance(items, dict):
        return False
    try:
        return all(len(decode_outcomes(t, items[t.name])) == t.num_items for t in tasks)
    except (KeyError, TypeError, ValueError):
        return False


# --- the split ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Split:
    """Item indices per task: ``select`` chooses the alpha, ``report`` is what results show."""

    select: dict[str, list[int]]
    report: dict[str, list[int]]


def split_items(tasks: list[PreparedTask], select_on: str, seed: int) -> Split:
    """``all``: both halves are every item (the paper's choice on the reported items). ``half``:
    within each (task, UID), a seeded shuffle gives half the items (rounded down) to selection,
    the rest to the report; a task's split depends only on the seed, its name and its items."""
    every = {t.name: list(range(t.num_items)) for t in tasks}
    if select_on == "all":
        return Split(every, every)
    select: dict[str, list[int]] = {}
    report: dict[str, list[int]] = {}
    for t in tasks:
        by_group: dict[str, list[int]] = {}
        for i, g in enumerate(t.groups):
            by_group.setdefault(g, []).append(i)
        chosen: list[int] = []
        for g, items in by_group.items():
            rng = np.random.default_rng([seed, zlib.crc32(t.name.encode()), zlib.crc32(g.encode())])
            chosen += [items[k] for k in rng.permutation(len(items))[:len(items) // 2]]
        picked = set(chosen)
        select[t.name] = sorted(picked)
        report[t.name] = [i for i in every[t.name] if i not in picked]
    return Split(select, report)


def rescore(rec: dict, tasks: list[PreparedTask], items: dict[str, list[int]],
            summary: dict, groups: dict) -> dict:
    """``rec``'s scores, group means, objective and UID accuracies on ``items`` only."""
    results = {t.name: score_items(t, decode_outcomes(t, rec["items"][t.name]).tolist(),
                                   items[t.name]) for t in tasks}
    scores = {n: r["score"] for n, r in results.items()}
    return {"scores": scores, **objective(scores, summary, groups),
            "groups": {n: r["groups"] for n, r in results.items() if len(r["groups"]) > 1}}


# --- paired bootstrap ---------------------------------------------------------------------------

def _task_differences(task: PreparedTask, ours: np.ndarray, theirs: np.ndarray,
                      items: list[int], replicates: int, rng: np.random.Generator
                      ) -> tuple[float, np.ndarray]:
    """(observed score(ours) - score(theirs) on ``items``, one difference per replicate)."""
    items = np.asarray(items, dtype=np.int64)
    if task.metric == "spearman":
        ratios = np.asarray(task.ratios, dtype=np.float64)
        observed = spearman(ours[items], ratios[items]) - spearman(theirs[items], ratios[items])
        draw = items[rng.integers(0, len(items), size=(replicates, len(items)))]
        return observed, spearman(ours[draw], ratios[draw]) - spearman(theirs[draw], ratios[draw])
    names = list(dict.fromkeys(task.groups[i] for i in items))
    code = {g: k for k, g in enumerate(names)}
    group_of = np.fromiter((code[task.groups[i]] for i in items), np.int64, len(items))
    a, b = ours[items] > 0.5, theirs[items] > 0.5
    size = np.bincount(group_of, minlength=len(names))
    only_ours = np.bincount(group_of, weights=a & ~b, minlength=len(names))
    only_theirs = np.bincount(group_of, weights=~a & b, minlength=len(names))
    observed_groups, replicate_groups = {}, {}
    for k, g in enumerate(names):
        n, up, down = int(size[k]), only_ours[k] / size[k], only_theirs[k] / size[k]
        observed_groups[g] = up - down
        counts = rng.multinomial(n, [up, down, max(0.0, 1 - up - down)], size=replicates)
        replicate_groups[g] = (counts[:, 0] - counts[:, 1]) / n
    return (aggregate_groups(task.kind, observed_groups),
            aggregate_groups(task.kind, replicate_groups))


def paired_interval(rec: dict, other: dict, tasks: list[PreparedTask],
                    items: dict[str, list[int]], summary: dict, groups: dict,
                    replicates: int, seed: int) -> dict[str, dict[str, float]]:
    """``rec`` minus ``other`` on ``items``: for every task, group mean and the objective, the
    observed difference and its 95% paired-bootstrap interval, ``{"diff", "low", "high"}``. The
    seed fixes the replicates, so the interval of a point is the same however the sweep ran."""
    rng = np.random.default_rng(seed)
    observed, drawn = {}, {}
    for t in tasks:
        observed[t.name], drawn[t.name] = _task_differences(
            t, decode_outcomes(t, rec["items"][t.name]),
            decode_outcomes(t, other["items"][t.name]), items[t.name], replicates, rng)
    # group means and the objective are means of task scores, so their differences are the same
    # means of the task differences, replicate by replicate
    means_observed = objective(observed, summary, groups)
    means_drawn = objective(drawn, summary, groups)
    tail = 100 * (1 - CONFIDENCE) / 2
    out = {}
    for name, diff in {**observed, **means_observed}.items():
        values = drawn[name] if name in drawn else means_drawn[name]
        low, high = (np.nanpercentile(values, [tail, 100 - tail])
                     if np.isfinite(values).any() else (np.nan, np.nan))
        out[name] = {"diff": float(diff), "low": float(low), "high": float(high)}
    return out
