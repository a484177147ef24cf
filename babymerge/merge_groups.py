"""Beyond one alpha: an alpha per parameter group, searched, and the Pareto front of the groups'
scores (``merge --groups``).

Which parts of the network carry the grammar that the VLM lost? The paper merges every tensor
with one alpha. Here the tensors are cut into groups, each with its own alpha:

- ``kind``: what each tensor does: ``embeddings`` (token embeddings), ``attention`` (q, k, v, o
  of every layer), ``mlp`` (gate, up, down), ``norms`` (every RMSNorm), ``head`` (the LM head),
  ``projector`` (the image projector). Attention against MLP is the usual first question about
  where syntax lives; embeddings and the head hold the vocabulary the captions skewed; the
  projector (with the feature statistics it standardises by) matters only to images;
- ``depth``: ``embeddings``, the ``lower``, ``middle`` and ``upper`` thirds of the layers (all of a
  layer's tensors), ``head`` (final norm and LM head), ``projector``: probing studies place
  syntax in the middle layers;
- or ``NAME=REGEX,REGEX;NAME=...``: every merged tensor must match exactly one group.

The search is coordinate ascent on the rule's objective (the selection items with
``--select-on half``), cheap and transparent: from the best uniform alpha, each round tries
every group alone at every ``--group-grid`` value (the others held), then takes the single best
move; it stops when no move improves, or after ``--group-rounds``. The first round, every group
moved alone from the uniform point, measures how much each group moves the grammar score. Each
tried point is scored and logged like a uniform one, so a rerun resumes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from babymerge import kernels
from babymerge.merge_inputs import VLM_ONLY, MergeError, format_alpha

GROUP_PRESETS = ("kind", "depth")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class ParameterGroups:
    """Group name -> indices into the merged tensor names, in the spec's order."""

    spec: str
    members: dict[str, list[int]]

    @property
    def names(self) -> list[str]:
        return list(self.members)


def _kind(name: str) -> str:
    if name.startswith(VLM_ONLY):  # the projector and the feature statistics it standardises by
        return "projector"
    if "embed_tokens" in name:
        return "embeddings"
    if name.startswith("lm_head"):
        return "head"
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    if "norm" in name:
        return "norms"
    raise MergeError(f"--groups kind: tensor {name!r} is of no known kind; give the groups as "
                     "NAME=REGEX;...")


def _depth(name: str, layers: int) -> str:
    if name.startswith(VLM_ONLY):
        return "projector"
    if "embed_tokens" in name:
        return "embeddings"
    layer = _LAYER.search(name)
    if layer is None:
        return "head"  # the final norm and the LM head: what turns the last layer into words
    third = min(2, int(layer.group(1)) * 3 // layers)
    return ("lower", "middle", "upper")[third]


def parse_groups(spec: str, names: list[str]) -> ParameterGroups:
    """``spec`` (a preset or ``NAME=REGEX,...;...``) applied to the merged tensor ``names``;
    groups without tensors are left out (an LM without projector)."""
    if spec in GROUP_PRESETS:
        layers = 1 + max((int(m.group(1)) for n in names if (m := _LAYER.search(n))), default=0)
        by = [(_kind(n) if spec == "kind" else _depth(n, layers)) for n in names]
        order = (("embeddings", "attention", "mlp", "norms", "head", "projector") if spec == "kind"
                 else ("embeddings", "lower", "middle", "upper", "head", "projector"))
        members = {g: [i for i, b in enumerate(by) if b == g] for g in order}
        return ParameterGroups(spec, {g: m for g, m in members.items() if m})
    patterns: dict[str, list[re.Pattern]] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        group, eq, regexes = part.partition("=")
        if not eq or not group.strip() or not regexes.strip():
            raise MergeError(f"--groups {spec!r}: expected {' or '.join(GROUP_PRESETS)}, or "
                             "NAME=REGEX,REGEX;NAME=...")
        try:
            patterns[group.strip()] = [re.compile(r.strip()) for r in regexes.split(",")
                                       if r.strip()]
        except re.error as e:
            raise MergeError(f"--groups: {regexes.strip()!r} is not a regular expression "
                             f"({e})") from None
    members = {g: [] for g in patterns}
    for i, name in enumerate(names):
        hits = [g for g, ps in patterns.items() if any(p.search(name) for p in ps)]
        if len(hits) != 1:
            raise MergeError(f"--groups: tensor {name!r} matches {len(hits)} groups "
                             f"({', '.join(hits) or 'none'}); each must match exactly one")
        members[hits[0]].append(i)
    empty = [g for g, m in members.items() if not m]
    if empty:
        raise MergeError(f"--groups: group(s) {', '.join(empty)} match no merged tensor")
    return ParameterGroups(spec, members)


def merge_groups_(live: list[torch.Tensor], lm: list[torch.Tensor], vlm: list[torch.Tensor],
                  groups: ParameterGroups, alphas: dict[str, float]) -> None:
    """``alpha_g * LM + (1 - alpha_g) * VLM`` into the live tensors of each group ``g``, in place,
    through the same kernel as the uniform merge."""
    for g, idx in groups.members.items():
        kernels.interpolate_([live[i] for i in idx], [lm[i] for i in idx],
                             [vlm[i] for i in idx], alphas[g])


def point_key(alphas: dict[str, float]) -> str:
    """How a group point is named in logs and tables: ``embeddings=0.5,attention=0.3,...``."""
    return ",".join(f"{g}={format_alpha(a)}" for g, a in alphas.items())


def coordinate_search(groups: list[str], start: float, grid: list[float], rounds: int,
                      score) -> list[dict]:
    """Coordinate ascent from every group at ``start``: each round scores every group alone at
    every other grid value, then moves to the best point if it improves the objective
    (``score(alphas)`` returns a record with ``"group_alphas"`` and the ``"objective"`` the rule
    compares). Returns each point tried once, in order, with the ``"round"`` that first tried it
    (0: the start), ``"probe"`` (the group the first round moved alone from the uniform point)
    and ``"best"`` on the point the search ends at."""
    from babymerge.merge_report import TIE_TOLERANCE

    current = {g: start for g in groups}
    best = score(current)
    tried = {point_key(current): {**best, "round": 0}}
    for round_number in range(1, rounds + 1):
        moves = []
        for g in groups:
            for value in grid:
                if value == current[g]:
                    continue
                rec = score({**current, g: value})
                key = point_key(rec["group_alphas"])
                if key not in tried:
                    tried[key] = {**rec, "round": round_number,
                                  **({"probe": g} if round_number == 1 else {})}
                moves.append(rec)
        top = max(moves, key=lambda r: r["objective"], default=None)
        if top is None or top["objective"] <= best["objective"] + TIE_TOLERANCE:
            break
        best, current = top, dict(top["group_alphas"])
    best_key = point_key(best["group_alphas"])
    return [{**r, "best": key == best_key} for key, r in tried.items()]


def pareto_front(points: list[dict], axes: list[str]) -> list[int]:
    """Indices of the points no other point beats on every axis (at least as good on all, better
    on one), in order of the first axis."""
    front = []
    for i, p in enumerate(points):
        dominated = any(all(q[a] >= p[a] for a in axes) and any(q[a] > p[a] for a in axes)
                        for j, q in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][axes[0]])


def sensitivity(records: list[dict], start: dict, axis: str) -> dict[str, float]:
    """Per group, how far moving it alone from the uniform point moved ``axis`` (max - min of
    the first round's probes and the start), largest first."""
    spread = {}
    for r in records:
        if "probe" in r:
            values = spread.setdefault(r["probe"], [start[axis]])
            values.append(r[axis])
    ranges = {g: max(v) - min(v) for g, v in spread.items()}
    return dict(sorted(ranges.items(), key=lambda kv: -kv[1]))
