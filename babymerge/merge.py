"""Stage 3b: interpolate the text-only LM into the VLM over an alpha grid, evaluating every point.

``babymerge merge --lm run/lm --vlm run/vlm --alpha-grid 0:1:0.1 --task ... --out run/merge``

``theta = alpha * theta_LM + (1 - alpha) * theta_VLM`` (alpha = 0 is the VLM, alpha = 1 the LM).
Names and shapes are checked from the safetensors headers before any tensor is read; tensors only in
the VLM (the projector, when the LM has none) are kept as they are.

The sweep runs in memory: the VLM is loaded as the live model, both endpoints stay resident on the
device, and for each alpha the live parameters are overwritten in place through
``kernels.interpolate_`` (fused Triton on CUDA, multi-tensor torch elsewhere) and then scored with
:mod:`babymerge.evaluate`. Nothing is written per alpha except for the alphas asked to be kept.

Memory on the device, bounded and independent of the grid's length: the live model, plus 2P
(linear, slerp) or 4P (task-vector methods) of resident tensors, P = the merged tensors' bytes
(see :mod:`babymerge.merge_methods`), plus one scoring batch's activations and at most
``evaluate.LOGIT_CHUNK`` x vocabulary logits. A checkpoint sweep holds one VLM at a time.

Beyond the paper: ``--method`` picks any method of :mod:`babymerge.merge_methods` (task
arithmetic, TIES and DARE take ``--base``, the shared initial checkpoint), and several ``--vlm``
checkpoints make a checkpoint sweep, each merged with the same LM, like the paper's curves over
training.

Resumable: every scored point (and unmerged endpoint score) is appended to ``metrics.jsonl`` as
it is made, and ``merge_config.json`` holds the sweep's identity (content hashes of the
checkpoints, of the prepared tasks, the method and dtype). Running the same command again after an
interruption reuses the points logged for the same (VLM, alpha) under the same identity and scores
only the rest, with the same results; the grid, ``--keep`` and the ``--vlm`` list may change
(extending the grid scores only the new points). A different identity is refused, naming what
differs; ``--restart`` discards the logged points instead, once: the same ``--restart`` command run
again after an interruption resumes the sweep it began (see
:func:`babymerge.merge_resume._restart`).

The chosen alpha follows the rule of :mod:`babymerge.merge_report`: the grid point maximising the
mean of the group scores, by default grammar (mean over minimal-pairs tasks) and multimodal (mean
over the image tasks); ``--objective`` regroups the tasks (EWoK or wug in a group of their own).

Choosing without peeking (:mod:`babymerge.merge_stats`): ``--select-on half`` chooses on half
of each task's items and reports the other half; every point carries paired-bootstrap intervals
of its differences from both unmerged endpoints. Both come from the per-item outcomes logged
with each point, so neither needs a second scoring pass, and either may change on a resume.

The stage in parts: this module is the sweep itself (the live model, one VLM at a time, and
:func:`merge`, the stage's story top-down); :mod:`babymerge.merge_inputs` checks what it is
given; :mod:`babymerge.merge_resume` keeps the run's identity, its log of scored points and its
kept checkpoints; :mod:`babymerge.merge_report` holds the rule, ``results.md`` and the plots;
:mod:`babymerge.merge_stats` the selection split and the intervals; :mod:`babymerge.merge_methods`
the merge methods.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import click
import torch

from babymerge.config import (atomic_write_bytes, atomic_write_text, exclusive, opt,
                              output_folder)
from babymerge.distributed import World, barrier, from_main, setup, teardown
from babymerge.evaluate import (DTYPES, PreparedTask, check_feature_dim, check_feature_encoder,
                                checkpoint_max_positions, checkpoint_tokenizer, evaluate_tasks,
                                load_tasks, task_summary)
from babymerge.tasks import parse_task_spec
from babymerge.merge_groups import (ParameterGroups, coordinate_search, merge_groups_,
                                    parse_groups, pareto_front, point_key, sensitivity)
from babymerge.merge_inputs import (MergeError, check_config_matches_weights, check_mergeable,
                                    check_same_computation,
                                    check_tokenizers, checkpoint_names, expand_checkpoint_patterns,
                                    order_by_training, parse_alpha_grid, parse_keep, read_shapes,
                                    read_tensors)
from babymerge.merge_methods import MERGE_METHODS, MergeMethod
from babymerge.merge_report import (DEFAULT_OBJECTIVE, choose, objective, parse_objective,
                                    plot_alpha_curve, plot_checkpoint_curve, plot_pareto,
                                    results_markdown, rule_text)
from babymerge.merge_stats import (CONFIDENCE, SELECT_ON, Split, encode_outcomes, has_outcomes,
                                   paired_interval, rescore, split_items)
from babymerge.merge_resume import (fingerprint_checkpoints, is_kept, kept_identity, kept_path,
                                    log_record, method_settings, open_run, read_metrics,
                                    reuse_line, save_run_config)
from babymerge.model import BLACK_FEATURE_FILE, check_replaceable, load_model, save_checkpoint


@dataclass
class MergeConfig:
    """``babymerge merge``: the alpha sweep between a text-only LM and one or more VLMs."""

    lm: Path | None = opt(None, "text-only LM checkpoint directory (alpha = 1)")
    vlm: list[Path] = opt([], "VLM checkpoint directory (alpha = 0); repeat it for a checkpoint "
                          "sweep, each merged with the same LM (swept in training order: "
                          "word-count checkpoints by their words, then the others as given)")
    alpha_grid: str = opt("0:1:0.1", "START:STOP:STEP (STOP included when on the grid) or a list "
                          "0,0.3,0.5,0.8")
    task: list[str] = opt([], "task as KIND:PATH or NAME=KIND:PATH (repeatable), as in eval",
                          short="-t")
    features: Path | None = opt(None, "feature file with the tasks' image ids and the black "
                                "feature (text-only tasks without it: the first --vlm's "
                                "black_feature.safetensors)")
    out: Path = opt(Path("run/merge"), "output folder: results.json/.md, alpha_curve.png, "
                    "checkpoint_curve.png (several --vlm), alpha_<a>/")
    keep: str = opt("chosen", "alphas whose merged checkpoints are written as alpha_<a>/: a list "
                    "(0.3,0.8), 'chosen' (may be in the list), or 'none'")
    method: str = opt("linear", "merge method", choices=tuple(MERGE_METHODS))
    base: Path | None = opt(None, "shared initial checkpoint (task-arithmetic, ties, dare)")
    density: float = opt(0.2, "ties/dare: fraction of each task vector's entries kept")
    scale: float = opt(1.0, "task-vector methods: factor on the merged task vector")
    seed: int = opt(0, "dare: seed of the drop masks")
    allow_extrapolation: bool = opt(False, "allow alphas outside [0, 1]")
    batch_size: int = opt(64, "sequences per forward pass when scoring")
    device: str = opt("auto", "cpu, cuda, cuda:N, or auto (cuda when available)")
    dtype: str = opt("float32", "dtype of the live model and the resident endpoints",
                     choices=tuple(DTYPES))
    objective: str = opt(DEFAULT_OBJECTIVE, "the rule's groups, NAME=MEMBER,...;NAME=...: each "
                         "group's score is the mean of its tasks' scores (members: task kinds or "
                         "task names), the chosen alpha maximises the mean of the groups")
    select_on: str = opt("all", "items the alpha is chosen on: 'all' (the paper: the reported "
                         "items), or 'half': per task and UID a seeded half chooses, and every "
                         "number in results is the other half's", choices=SELECT_ON)
    select_seed: int = opt(0, "seed of the --select-on half split and of the bootstrap")
    bootstrap: int = opt(1000, "paired bootstrap replicates for the 95% intervals of every "
                         "point against both unmerged endpoints (0: none)")
    groups: str = opt("none", "also search an alpha per parameter group, from the chosen uniform "
                      "alpha: 'kind' (embeddings, attention, mlp, norms, head, projector), "
                      "'depth' (embeddings, lower/middle/upper layers, head, projector), or "
                      "NAME=REGEX,...;NAME=... ('none': the paper's one alpha; one --vlm, "
                      "linear only)")
    group_grid: str = opt("0:1:0.25", "alphas each group tries (--groups)")
    group_rounds: int = opt(3, "--groups: rounds of coordinate ascent at most (each tries every "
                            "group at every --group-grid value, then takes the best move)")
    restart: bool = opt(False, "discard the points already logged in OUT/metrics.jsonl and sweep "
                        "afresh (by default a rerun reuses those made with the same checkpoints, "
                        "tasks, method and dtype); the same --restart command run again after an "
                        "interruption resumes the sweep it began")
    progress: bool = opt(True, "show the evaluation's progress bars")

    def __post_init__(self) -> None:
        if self.lm is None:
            raise ValueError("--lm: the text-only LM checkpoint is required")
        self.vlm = expand_checkpoint_patterns(self.vlm)
        if not self.vlm:
            raise ValueError("--vlm: give at least one VLM checkpoint")
        if not self.task:
            raise ValueError("--task: give at least one task to score every alpha on")
        if self.method not in MERGE_METHODS:
            raise ValueError(f"--method {self.method!r}: choose one of {', '.join(MERGE_METHODS)}")
        method = MERGE_METHODS[self.method]
        if method.needs_base and self.base is None:
            raise ValueError(f"--method {self.method} needs --base (the shared initial checkpoint)")
        if self.allow_extrapolation and not method.extrapolates:
            raise ValueError(f"--allow-extrapolation: --method {self.method} is not defined "
                             "outside [0, 1]")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"--density must be in (0, 1], got {self.density}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.select_on not in SELECT_ON:
            raise ValueError(f"--select-on {self.select_on!r}: choose one of "
                             f"{', '.join(SELECT_ON)}")
        if self.bootstrap < 0:
            raise ValueError(f"--bootstrap must be >= 0, got {self.bootstrap}")
        if self.groups != "none":
            if len(self.vlm) > 1 or self.method != "linear":
                raise ValueError("--groups: searches one --vlm's per-group alphas with "
                                 "--method linear")
            if self.group_rounds < 1:
                raise ValueError(f"--group-rounds must be >= 1, got {self.group_rounds}")
            parse_alpha_grid(self.group_grid, self.allow_extrapolation)
        parse_objective(self.objective)
        grid = parse_alpha_grid(self.alpha_grid, self.allow_extrapolation)
        off_grid = [a for a in parse_keep(self.keep, self.allow_extrapolation)[0] if a not in grid]
        if off_grid:
            raise ValueError(f"--keep {', '.join(map(str, off_grid))}: not on --alpha-grid "
                             f"{self.alpha_grid!r}; a kept merge is one that was scored: add it "
                             "to the grid")
        for spec in self.task:
            parse_task_spec(spec)


LOCK_FILE = ".lock"  # in OUT: one merge at a time writes there

# --- the sweep ----------------------------------------------------------------------------------

class _Sweep:
    """One VLM of the sweep: the live model loaded from it and a resident copy of its tensors."""

    def __init__(self, cfg: MergeConfig, index: int, vlm_name: str, names: list[str],
                 tasks: list[PreparedTask], tokenizer, device: torch.device, dtype: torch.dtype,
                 kept_identity: str):
        self.cfg, self.vlm_dir, self.vlm_name = cfg, cfg.vlm[index], vlm_name
        self.kept_identity = kept_identity
        self.tasks, self.tokenizer, self.device = tasks, tokenizer, device
        self.summary = task_summary(tasks)
        self.groups = parse_objective(cfg.objective)
        self.model = load_model(self.vlm_dir, device, dtype)
        check_feature_dim(self.model, tasks)
        params = dict(self.model.named_parameters())
        # a tensor in both files that the model does not use (a buffer, another architecture's
        # weight) has no live parameter to merge into
        unused = [n for n in names if n not in params]
        if unused:
            raise MergeError(f"--vlm {self.vlm_dir}: {len(unused)} tensor(s) in the checkpoints "
                             f"are not parameters of the loaded model: {', '.join(unused[:8])}")
        self.live = [params[n].data for n in names]  # overwritten in place at every alpha
        self.vlm_copy = [p.detach().clone() for p in self.live]

    def _score(self, alpha: float | None, merge_s: float) -> dict:
        t0 = time.perf_counter()
        result = evaluate_tasks(self.model, self.tasks, self.cfg.batch_size, self.cfg.progress)
        scores = {n: r["score"] for n, r in result.items()}
        return {"alpha": alpha, "vlm": self.vlm_name, "scores": scores,
                **objective(scores, self.summary, self.groups),
                "groups": {n: r["groups"] for n, r in result.items() if len(r["groups"]) > 1},
                "merge_s": merge_s, "eval_s": time.perf_counter() - t0,
                # what any split or interval is computed from, without scoring again
                "items": {t.name: encode_outcomes(t, result[t.name]["items"])
                          for t in self.tasks}}

    def merge_and_score(self, method: MergeMethod, alpha: float) -> dict:
        t0 = time.perf_counter()
        method.merge_into_(self.live, alpha)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # so merge_s times the merge, not its launch
        return self._score(alpha, time.perf_counter() - t0)

    def score_unmerged(self, tensors: list[torch.Tensor], which: str) -> dict:
        """Record of the live model with ``tensors`` copied in (the unmerged ``which`` endpoint)."""
        for d, s in zip(self.live, tensors, strict=True):
            d.copy_(s)
        return {**self._score(None, 0.0), "endpoint": which}

    def save(self, method: MergeMethod, alpha: float, current: float | None = None) -> str:
        """Write the merge at ``alpha`` as ``alpha_<a>/`` (merging first unless it is live)."""
        if current != alpha:
            method.merge_into_(self.live, alpha)
        provenance = {"lm": str(self.cfg.lm), "vlm": str(self.vlm_dir), "alpha": alpha,
                      "method": self.cfg.method,
                      "base": str(self.cfg.base) if self.cfg.base else None,
                      "identity": self.kept_identity}
        return self.write(kept_path(self.cfg, self.vlm_name, alpha), provenance, "--keep")

    def write(self, target: Path, provenance: dict, flag: str) -> str:
        """The live model as a checkpoint at ``target``, with ``merge.json`` saying what it is."""
        black = self.vlm_dir / BLACK_FEATURE_FILE

        def copy_black(tmp: Path) -> None:
            # the merged model takes text-only input as the VLM did: with the VLM's /black feature
            if black.is_file():
                shutil.copy2(black, tmp / BLACK_FEATURE_FILE)

        return str(save_checkpoint(self.model, target, self.tokenizer,
                                   extra_files={"merge.json": json.dumps(provenance, indent=2)},
                                   write_extra=copy_black, flag=flag))


@dataclass
class _Run:
    """What every VLM's sweep shares: its inputs, the endpoints' resident tensors, the resume
    state (the points and unmerged endpoint records logged so far, keyed by VLM name) and the
    selection split."""

    cfg: MergeConfig
    grid: list[float]
    keep: list[float]
    keep_chosen: bool
    method_cls: type[MergeMethod]
    names: list[str]
    tasks: list[PreparedTask]
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    vlm_names: list[str]
    identity: dict
    points: dict[tuple[str, float], dict]
    end_records: dict[tuple[str, str], dict]
    group_points: dict[str, dict]
    split: Split
    summary: dict
    groups: dict
    resident: dict[str, list[torch.Tensor] | None] = field(default_factory=dict)

    def endpoint(self, which: str) -> list[torch.Tensor] | None:
        """The LM's (or base's) tensors, read once, on the first VLM that needs loading."""
        if which not in self.resident:
            directory = self.cfg.lm if which == "lm" else self.cfg.base
            self.resident[which] = (
                read_tensors(directory, self.names, self.device, self.dtype)
                if which == "lm" or self.method_cls.needs_base else None)
        return self.resident[which]

    def log(self, rec: dict) -> dict:
        log_record(self.cfg.out / "metrics.jsonl", rec)
        if "endpoint" in rec:
            self.end_records[(rec["vlm"], rec["endpoint"])] = rec
        return rec

    def start(self, index: int, score_vlm: bool) -> tuple[_Sweep, MergeMethod]:
        """Load VLM ``index`` and build the method on it (scoring the unmerged VLM first)."""
        name = self.vlm_names[index]
        sweep = _Sweep(self.cfg, index, name, self.names, self.tasks, self.tokenizer,
                       self.device, self.dtype, kept_identity(self.identity, name))
        if score_vlm:  # before the method is built, which may turn vlm_copy into a task vector
            self.log(sweep.score_unmerged(sweep.vlm_copy, "vlm"))
        method = self.method_cls(self.endpoint("lm"), sweep.vlm_copy, self.endpoint("base"),
                                 density=self.cfg.density, scale=self.cfg.scale,
                                 seed=self.cfg.seed)
        return sweep, method

    def unsaved(self, name: str, alpha: float) -> bool:
        return not is_kept(self.cfg, self.identity, name, alpha)

    def to_keep(self, name: str) -> list[float]:
        """--keep's alphas for VLM ``name``, plus a single VLM's chosen one (needs its whole grid
        scored; a checkpoint sweep keeps only the winner over all VLMs, after the loop)."""
        if not (self.keep_chosen and len(self.vlm_names) == 1):
            return self.keep
        chosen = choose(self.on_selection([self.points[(name, a)] for a in self.grid]),
                        self.vlm_names)["alpha"]
        return self.keep + ([chosen] if chosen not in self.keep else [])

    def take_logged(self, logged: list[dict]) -> None:
        """Points and unmerged endpoint records from the log, the objective recomputed (it may
        change on a resume); a record without per-item outcomes (an older babymerge's) is left
        out, to be scored again."""
        for r in logged:
            if not has_outcomes(r, self.tasks):
                continue
            if "endpoint" in r:
                self.end_records[(r["vlm"], r["endpoint"])] = r
            elif "group_alphas" in r:
                self.group_points[point_key(r["group_alphas"])] = with_objective(
                    r, self.summary, self.groups)
            else:
                self.points[(r["vlm"], r["alpha"])] = with_objective(r, self.summary, self.groups)

    def on_selection(self, records: list[dict]) -> list[dict]:
        """``records`` with the objective of their selection items, what the rule compares."""
        if self.cfg.select_on == "all":
            return records
        return [{**r, "objective": rescore(r, self.tasks, self.split.select, self.summary,
                                           self.groups)["objective"]} for r in records]


def with_objective(rec: dict, summary: dict, groups: dict) -> dict:
    """A logged record with its group means and objective under ``groups`` (its other fields as
    they were, in :meth:`_Sweep._score`'s order)."""
    head = ("alpha", "vlm", "scores")
    tail = ("group_alphas", "groups", "merge_s", "eval_s", "items", "endpoint")
    return {**{k: rec[k] for k in head if k in rec}, **objective(rec["scores"], summary, groups),
            **{k: rec[k] for k in tail if k in rec}}


def _needed_ends(run: _Run) -> list[str]:
    """The unmerged endpoints scored apart from the grid: with linear merging the grid's 0 and 1
    ARE the endpoints; other methods score the two unmerged models, so the plot shows what the
    method gains or loses. Logged like the points, so a resumed run need not load a finished VLM
    just for them."""
    linear = run.cfg.method == "linear"
    return [w for w, a in (("vlm", 0.0), ("lm", 1.0)) if not (linear and a in run.grid)]


def _sweep_vlm(run: _Run, index: int, share: set | None = None
               ) -> tuple[list[dict], dict, list[str]] | None:
    """VLM ``index``'s grid (logged points reused, the rest merged, scored and logged), its
    unmerged endpoints' records and its kept checkpoints: (records, endpoints, kept paths). Its
    live model and copies are freed on return: one VLM's resident at a time.

    ``share``: a torchrun rank's part of the unlogged work (alphas, and "vlm"/"lm" for unmerged
    endpoints), scored and logged without assembling anything (None is returned): rank 0 then
    runs this again over the whole log, with nothing left to score."""
    cfg, grid, name = run.cfg, run.grid, run.vlm_names[index]
    needed_ends = _needed_ends(run)
    todo = [a for a in grid if (name, a) not in run.points and (share is None or a in share)]
    missing_ends = [w for w in needed_ends
                    if (name, w) not in run.end_records and (share is None or w in share)]
    sweep = method = None
    # a VLM whose points are all logged and whose kept checkpoints are all there is not even
    # read (to_keep needs the whole grid: evaluated only when todo is empty)
    if todo or missing_ends or (share is None
                                and any(run.unsaved(name, a) for a in run.to_keep(name))):
        sweep, method = run.start(index, score_vlm="vlm" in missing_ends)
    for alpha in todo:
        run.points[(name, alpha)] = run.log(sweep.merge_and_score(method, alpha))
        if alpha in run.keep and run.unsaved(name, alpha):
            sweep.save(method, alpha, current=alpha)  # live already: no merge to redo
    if "lm" in missing_ends:
        run.log(sweep.score_unmerged(run.endpoint("lm"), "lm"))
    if share is not None:
        return None
    ends = {w: run.end_records[(name, w)] for w in needed_ends}
    ends.update({w: run.points[(name, a)] for w, a in (("vlm", 0.0), ("lm", 1.0))
                 if w not in needed_ends})
    kept = []
    for alpha in run.to_keep(name):
        if run.unsaved(name, alpha):
            sweep.save(method, alpha)
        kept.append(str(kept_path(cfg, name, alpha)))
    return [run.points[(name, a)] for a in grid], {"vlm": ends["vlm"], "lm": ends["lm"]}, kept


def _shares(run: _Run, world: World) -> dict[int, set]:
    """This rank's part of the unlogged work, by VLM index: the (VLM, alpha or endpoint) items in
    sweep order, cut into ``world_size`` contiguous runs, so a rank loads as few VLMs as it can
    (a single VLM's grid is split between the ranks, each loading it once)."""
    items = [(i, a) for i, name in enumerate(run.vlm_names)
             for a in [*[a for a in run.grid if (name, a) not in run.points],
                       *[w for w in _needed_ends(run) if (name, w) not in run.end_records]]]
    size = -(-len(items) // world.world_size)
    shares: dict[int, set] = {}
    for i, a in items[world.rank * size:(world.rank + 1) * size]:
        shares.setdefault(i, set()).add(a)
    return shares


def merge(cfg: MergeConfig) -> dict | None:
    """Run the sweep(s); write results.json/.md, alpha_curve.png (and checkpoint_curve.png for a
    checkpoint sweep), metrics.jsonl and the kept checkpoints; return the results.json content.
    Under torchrun the ranks share the unlogged points; rank 0 returns the results, the others
    None."""
    world = setup(cfg.device)
    try:
        return _merge(cfg, world)
    finally:
        teardown(world)


def _merge(cfg: MergeConfig, world: World) -> dict | None:
    cfg = replace(cfg, vlm=order_by_training(cfg.vlm))
    grid = parse_alpha_grid(cfg.alpha_grid, cfg.allow_extrapolation)
    keep, keep_chosen = parse_keep(cfg.keep, cfg.allow_extrapolation)
    method_cls = MERGE_METHODS[cfg.method]
    device, dtype = world.device, DTYPES[cfg.dtype]

    # every check that reads only headers, configs and task files runs before any tensor is loaded
    names = _mergeable_names(cfg, method_cls)
    vlm_names = checkpoint_names(cfg.vlm)
    with ThreadPoolExecutor(1) as pool:  # the checkpoints are hashed while the tasks load
        hashing = pool.submit(fingerprint_checkpoints, cfg, vlm_names) if world.is_main else None
        tokenizer = checkpoint_tokenizer(cfg.vlm[0], "--vlm")
        check_tokenizers(cfg.lm, cfg.vlm, tokenizer)
        # without --features, text-only tasks use the /black feature the (first) VLM was
        # trained with
        tasks = load_tasks(cfg.task, tokenizer, cfg.features,
                           checkpoint_max_positions(cfg.vlm[0]), checkpoint=cfg.vlm[0])
        check_feature_encoder(cfg.vlm[0], cfg.features)
        summary, groups = task_summary(tasks), _objective_groups(cfg, tasks)
        for name in vlm_names:  # a kept folder that is the user's is refused before any scoring
            for alpha in keep:
                check_replaceable(kept_path(cfg, name, alpha), "--keep")
        fingerprints = hashing.result() if hashing else None

    output_folder(cfg.out)
    # one merge writes OUT at a time; the ranks of a torchrun sweep are one merge
    with (exclusive(cfg.out / LOCK_FILE, "merge", MergeError) if world.is_main
          else contextlib.nullcontext()):
        identity, logged = from_main(world, lambda: open_run(cfg, tasks, vlm_names, fingerprints))
        run = _Run(cfg, grid, keep, keep_chosen, method_cls, names, tasks, tokenizer, device, dtype,
                   vlm_names, identity, points={}, end_records={}, group_points={},
                   split=split_items(tasks, cfg.select_on, cfg.select_seed), summary=summary,
                   groups=groups)
        run.take_logged(logged)
        line = reuse_line(run.points, run.end_records, vlm_names, grid)
        if line and world.is_main:
            click.echo(line)
        if world.distributed:  # each rank scores its share, then rank 0 assembles the log
            for index, share in _shares(run, world).items():
                _sweep_vlm(run, index, share)
            barrier(world)
            if not world.is_main:
                return None
            run.take_logged(read_metrics(cfg.out / "metrics.jsonl"))
        records, ends, kept = [], {}, []
        for index, vlm_name in enumerate(vlm_names):
            recs, ends[vlm_name], kept_paths = _sweep_vlm(run, index)
            records += recs
            kept += kept_paths
        best = choose(run.on_selection(records), vlm_names)
        kept += _keep_the_winner(run, best)
        groups_found, tried = (_search_groups(run, best["alpha"]) if cfg.groups != "none"
                               else (None, []))
        shown, endpoints = _reported(run, records + tried, ends)
        shown, tried_shown = shown[:len(records)], shown[len(records):]
        best = next(r for r in shown if (r["vlm"], r["alpha"]) == (best["vlm"], best["alpha"]))
        results = {"tasks": summary, "records": shown, "chosen_alpha": best["alpha"],
                   "chosen_vlm": best["vlm"],
                   "chosen_per_vlm": {
                       n: choose(run.on_selection([r for r in records if r["vlm"] == n]),
                                 vlm_names)["alpha"]
                       for n in vlm_names},
                   "selection": _selection_summary(cfg, run.split),
                   **({"groups": _groups_summary(run, groups_found, shown, tried_shown, tried)}
                      if tried else {}),
                   "rule": rule_text(groups),
                   "objective_groups": {g: list(members) for g, members in groups.items()},
                   "method": {"name": cfg.method, "reference": method_cls.reference,
                              **method_settings(cfg)},
                   "lm": str(cfg.lm), "vlms": dict(zip(vlm_names, map(str, cfg.vlm))),
                   "endpoints": endpoints, "kept": sorted(kept), "device": str(device),
                   "dtype": cfg.dtype}
        _write_report(cfg, results)
        save_run_config(cfg, identity, restarted=False)  # finished: a --restart starts afresh
    where = "" if cfg.select_on == "all" else (
        f" on the selection half ({best['selection']['objective']:.4f} there); report half")
    click.echo(f"chosen alpha {best['alpha']} ({best['vlm']}){where}, objective "
               f"{best['objective']:.4f}; results in {cfg.out}")
    return results


def _reported(run: _Run, records: list[dict], ends: dict[str, dict]
              ) -> tuple[list[dict], dict[str, dict]]:
    """What results show: every record scored on the report items (all of them unless
    --select-on half, where its selection scores ride along), with its paired intervals against
    its VLM's unmerged endpoints; and each VLM's endpoints' report scores."""
    cfg = run.cfg

    def on_report(rec: dict) -> dict:
        head = {k: rec[k] for k in ("alpha", "vlm", "group_alphas") if k in rec}
        timings = {k: rec[k] for k in ("merge_s", "eval_s") if k in rec}
        if cfg.select_on == "all":
            return {k: v for k, v in rec.items() if k not in ("items", "endpoint")}
        return {**head, **rescore(rec, run.tasks, run.split.report, run.summary, run.groups),
                **timings, "selection": rescore(rec, run.tasks, run.split.select, run.summary,
                                                run.groups)}

    shown = []
    for rec in records:
        out = on_report(rec)
        if cfg.bootstrap:
            out["intervals"] = {
                f"vs_{which}": paired_interval(rec, ends[rec["vlm"]][which], run.tasks,
                                               run.split.report, run.summary, run.groups,
                                               cfg.bootstrap, cfg.select_seed)
                for which in ("vlm", "lm")}
        shown.append(out)
    endpoints = {name: {w: on_report(e)["scores"] for w, e in pair.items()}
                 for name, pair in ends.items()}
    return shown, endpoints


def _search_groups(run: _Run, start: float) -> tuple[ParameterGroups, list[dict]]:
    """--groups: the coordinate search from the chosen uniform ``start``, each point merged into
    the live model group by group, scored and logged (a logged point is reused); the best one
    kept as ``OUT/groups_best/``. Returns the groups and the records of the points tried (in the
    search's order, with ``"probe"`` and ``"best"`` marks)."""
    cfg = run.cfg
    groups = parse_groups(cfg.groups, run.names)
    loaded: dict = {}

    def score(alphas: dict[str, float]) -> dict:
        key = point_key(alphas)
        if key not in run.group_points:
            if not loaded:
                loaded["sweep"], loaded["method"] = run.start(0, score_vlm=False)
            sweep, method = loaded["sweep"], loaded["method"]
            t0 = time.perf_counter()
            merge_groups_(sweep.live, method.lm, method.vlm, groups, alphas)
            rec = sweep._score(None, time.perf_counter() - t0)
            run.group_points[key] = run.log({**rec, "group_alphas": dict(alphas)})
        return run.on_selection([run.group_points[key]])[0]

    tried = coordinate_search(groups.names, start, parse_alpha_grid(
        cfg.group_grid, cfg.allow_extrapolation), cfg.group_rounds, score)
    best = next(r for r in tried if r["best"])
    target = cfg.out / "groups_best"
    provenance = {"lm": str(cfg.lm), "vlm": str(cfg.vlm[0]), "method": "linear",
                  "groups": cfg.groups, "group_alphas": best["group_alphas"],
                  "identity": kept_identity(run.identity, run.vlm_names[0])}
    if _saved_provenance(target) != provenance:
        if not loaded:
            loaded["sweep"], loaded["method"] = run.start(0, score_vlm=False)
        sweep, method = loaded["sweep"], loaded["method"]
        merge_groups_(sweep.live, method.lm, method.vlm, groups, best["group_alphas"])
        sweep.write(target, provenance, "--groups")
    return groups, [{**run.group_points[point_key(r["group_alphas"])],
                     **{k: r[k] for k in ("round", "probe", "best") if k in r}} for r in tried]


def _saved_provenance(directory: Path) -> dict | None:
    try:
        return json.loads((directory / "merge.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _groups_summary(run: _Run, groups: ParameterGroups, uniform: list[dict], shown: list[dict],
                    tried: list[dict]) -> dict:
    """results.json's ``groups``: the groups, every point tried (report scores, intervals), the
    best, the Pareto front over the uniform and group points, and each group's reach on the
    first objective group (grammar, by default)."""
    axes = [g for g in run.groups if g in uniform[0]]
    for rec, raw in zip(shown, tried, strict=True):
        rec.update({k: raw[k] for k in ("round", "probe", "best") if k in raw})
    everything = ([{"point": f"uniform alpha={r['alpha']}", **r} for r in uniform]
                  + [{"point": point_key(r["group_alphas"]), **r} for r in shown])
    start = shown[0]  # every group at the uniform alpha: where the search began
    return {"spec": run.cfg.groups, "grid": parse_alpha_grid(run.cfg.group_grid,
                                                              run.cfg.allow_extrapolation),
            "rounds": run.cfg.group_rounds,
            "tensors": {g: [run.names[i] for i in idx] for g, idx in groups.members.items()},
            "points": shown, "best": point_key(next(r for r in shown if r["best"])[
                "group_alphas"]),
            "axes": axes,
            "pareto": [{k: everything[i][k] for k in ("point", *axes, "objective")}
                       for i in pareto_front(everything, axes)] if axes else [],
            "sensitivity": sensitivity(shown, start, axes[0]) if axes else {}}


def _selection_summary(cfg: MergeConfig, split: Split) -> dict:
    """results.json's account of which items chose and which report, and of the intervals."""
    return {"on": cfg.select_on, "seed": cfg.select_seed,
            "items": {n: {"select": len(split.select[n]), "report": len(split.report[n])}
                      for n in split.report},
            "bootstrap": cfg.bootstrap, "confidence": CONFIDENCE,
            "intervals": "paired bootstrap over the report items, stratified by UID; percentile"}


def _mergeable_names(cfg: MergeConfig, method_cls: type[MergeMethod]) -> list[str]:
    """The tensor names to merge, once every checkpoint's header agrees with its config and the
    checkpoints with each other (names both ways, shapes, the configs' computation)."""
    lm_shapes = read_shapes(cfg.lm)
    check_config_matches_weights(cfg.lm, lm_shapes, "--lm")
    base_shapes = read_shapes(cfg.base) if method_cls.needs_base else None
    if base_shapes is not None:
        check_config_matches_weights(cfg.base, base_shapes, "--base")
    names: list[str] = []
    for vlm_dir in cfg.vlm:
        vlm_shapes = read_shapes(vlm_dir)
        check_config_matches_weights(vlm_dir, vlm_shapes, "--vlm")
        names = check_mergeable(lm_shapes, vlm_shapes, cfg.lm, vlm_dir)
        check_same_computation(cfg.lm, vlm_dir)
        if base_shapes is not None:
            check_mergeable(base_shapes, vlm_shapes, cfg.base, vlm_dir, "--base")
            check_mergeable(lm_shapes, base_shapes, cfg.lm, cfg.base, "--lm")
            check_same_computation(cfg.base, vlm_dir, "--base")
    return names


def _objective_groups(cfg: MergeConfig, tasks: list[PreparedTask]) -> dict[str, tuple[str, ...]]:
    """--objective's groups, checked against the tasks: a member naming no task or kind, or no
    task in any group, is an error."""
    try:
        groups = parse_objective(cfg.objective, tuple(t.name for t in tasks))
    except ValueError as e:  # a member naming no task: known only now
        raise MergeError(str(e)) from None
    if not any(t.name in m or t.kind in m for t in tasks for m in groups.values()):
        raise MergeError(f"--objective {cfg.objective!r}: none of the tasks is in a group, so no "
                         "alpha can be chosen; name their kinds or names in a group")
    return groups


def _keep_the_winner(run: _Run, best: dict) -> list[str]:
    """A checkpoint sweep knows its winner only at the end: --keep chosen loads that VLM once
    more to save it (a single VLM's chosen alpha was kept during its sweep)."""
    if not (run.keep_chosen and len(run.vlm_names) > 1 and best["alpha"] not in run.keep):
        return []
    if run.unsaved(best["vlm"], best["alpha"]):
        sweep, method = run.start(run.vlm_names.index(best["vlm"]), score_vlm=False)
        sweep.save(method, best["alpha"])
    return [str(kept_path(run.cfg, best["vlm"], best["alpha"]))]


def _write_report(cfg: MergeConfig, results: dict) -> None:
    atomic_write_text(cfg.out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(cfg.out / "results.md", results_markdown(results))
    atomic_write_bytes(cfg.out / "alpha_curve.png", plot_alpha_curve(results))
    if len(results["vlms"]) > 1:
        atomic_write_bytes(cfg.out / "checkpoint_curve.png", plot_checkpoint_curve(results))
    if "groups" in results:
        atomic_write_bytes(cfg.out / "pareto.png", plot_pareto(results))
