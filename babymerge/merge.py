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
again after an interruption resumes the sweep it began (see :func:`_restart`).

The chosen alpha follows :data:`RULE`: the grid point maximising the mean of the grammar score (mean
over minimal-pairs tasks) and the multimodal score (mean over image tasks).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import math
import shutil
import time
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path

import click
import torch
from safetensors import safe_open
from transformers import AutoConfig

from babymerge.config import (InputError, atomic_write_bytes, atomic_write_text, opt,
                              save_config)
from babymerge.distributed import resolve_device
from babymerge.evaluate import (DTYPES, GRAMMAR_KINDS, MULTIMODAL_KINDS, PreparedTask,
                                check_feature_dim, check_feature_encoder, checkpoint_max_positions,
                                checkpoint_tokenizer, evaluate_tasks, load_tasks, parse_task_spec,
                                task_summary)
from babymerge.merge_methods import MERGE_METHODS, MergeMethod
from babymerge.model import BLACK_FEATURE_FILE, load_model, parameter_dtype, save_checkpoint

RULE = ("chosen_alpha maximises the mean of the grammar score (mean accuracy over minimal_pairs "
        "tasks) and the multimodal score (mean over winoground and vqa tasks), a kind absent from "
        "the tasks left out; over every grid point of every --vlm; ties (objectives within 1e-9) "
        "go to the smaller alpha, then to the VLM earlier in training")
MAX_GRID_POINTS = 1001  # more is a typo in the step, not a sweep anyone means to run


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
        parse_alpha_grid(self.alpha_grid, self.allow_extrapolation)
        parse_keep(self.keep, self.allow_extrapolation)
        for spec in self.task:
            parse_task_spec(spec)


def expand_checkpoint_patterns(paths: list[Path]) -> list[Path]:
    """``--vlm 'run/vlm/checkpoints/*'`` (quoted, so the shell leaves it alone) as the folders it
    matches: a list flag takes one value per flag, so an unquoted shell glob stops the CLI at its
    second match. A path that exists is taken as it is, glob characters and all."""
    expanded = []
    for path in paths:
        if path.exists() or not glob.has_magic(str(path)):
            expanded.append(path)
            continue
        matches = sorted(Path(m) for m in glob.glob(str(path)) if Path(m).is_dir())
        if not matches:
            raise ValueError(f"--vlm {path}: the pattern matches no checkpoint folder")
        expanded.extend(matches)
    return expanded


class MergeError(InputError):
    """Checkpoints that cannot be merged, or a bad alpha; the message names the flag or tensor."""


def _alpha(text: str, flag: str) -> Decimal:
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise MergeError(f"{flag}: {text.strip()!r} is not a number") from None
    if not value.is_finite():
        raise MergeError(f"{flag}: {text.strip()!r} is not a finite number")
    return value


def _check_range(alphas: list[float], allow_extrapolation: bool, flag: str) -> None:
    outside = [a for a in alphas if not 0.0 <= a <= 1.0]
    if outside and not allow_extrapolation:
        raise MergeError(f"{flag}: {', '.join(map(repr, outside))} outside [0, 1] (extrapolation); "
                         "pass --allow-extrapolation if that is meant")


def parse_alpha_grid(text: str, allow_extrapolation: bool = False) -> list[float]:
    """``START:STOP:STEP`` (STOP included when on the grid) or ``a,b,c``; sorted, exact decimals.

    Decimal arithmetic makes ``0:1:0.1`` exactly the 11 floats 0.0, 0.1, ..., 1.0 (float steps
    would give 0.30000000000000004 and might drop 1.0).
    """
    flag = f"--alpha-grid {text!r}"
    if not text or not text.strip():
        raise MergeError("--alpha-grid: empty")
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise MergeError(f"{flag}: expected START:STOP:STEP")
        start, stop, step = (_alpha(p, flag) for p in parts)
        if step == 0 or (stop - start) * step < 0:
            raise MergeError(f"{flag}: STEP must be non-zero and point from START to STOP")
        try:
            count = int((stop - start) / step) + 1
        except ArithmeticError:  # decimal.Overflow of an absurd STEP (1e-99999999)
            raise MergeError(f"{flag}: STEP {step} is too small for a grid") from None
        if count > MAX_GRID_POINTS:
            raise MergeError(f"{flag}: {count} points (more than {MAX_GRID_POINTS}); check STEP")
        values = [start + i * step for i in range(count)]
    else:
        values = [_alpha(p, flag) for p in text.split(",")]
    # + 0.0: a typed -0 is 0.0, not -0.0 (an alpha_-0.0/ folder and "-0.0" in the results)
    alphas = sorted(float(v) + 0.0 for v in values)
    if not all(math.isfinite(a) for a in alphas):  # 1e400 is a finite Decimal but float inf
        raise MergeError(f"{flag}: an alpha beyond the float range is not a finite number")
    if len(set(alphas)) != len(alphas):
        raise MergeError(f"{flag}: repeated alpha")
    _check_range(alphas, allow_extrapolation, "--alpha-grid")
    return alphas


def parse_keep(text: str, allow_extrapolation: bool = False) -> tuple[list[float], bool]:
    """``--keep``: (alphas, whether the chosen alpha is kept too)."""
    if text.strip().lower() in ("", "none"):
        return [], False
    parts = [p.strip() for p in text.split(",")]
    chosen = "chosen" in parts
    alphas = sorted({float(_alpha(p, f"--keep {text!r}")) + 0.0 for p in parts if p != "chosen"})
    _check_range(alphas, allow_extrapolation, "--keep")
    return alphas, chosen


def format_alpha(alpha: float) -> str:
    """``alpha_<a>`` directory suffix: the shortest decimal that reads back as ``alpha``."""
    return repr(float(alpha))


# --- checkpoint headers and tensors -------------------------------------------------------------

def _weight_files(directory: Path) -> list[Path]:
    """The safetensors file(s) of an HF directory, single or sharded."""
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / s for s in shards]
    raise MergeError(f"{directory}: no model.safetensors (or sharded index); not a checkpoint "
                     "directory written by babymerge train")


def read_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the safetensors headers (no tensor data is read)."""
    shapes = {}
    for path in _weight_files(directory):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def read_tensors(directory: Path, names: list[str], device: torch.device,
                 dtype: torch.dtype) -> list[torch.Tensor]:
    """``names`` from a checkpoint, in that order, on ``device`` in ``dtype`` (bar the
    parameters every loaded model keeps float32, :func:`parameter_dtype`)."""
    wanted, found = set(names), {}
    for path in _weight_files(directory):
        with safe_open(str(path), framework="pt") as f:  # reads only the wanted tensors
            found.update({k: f.get_tensor(k).to(device=device, dtype=parameter_dtype(k, dtype))
                          for k in f.keys() if k in wanted})
    return [found[n] for n in names]


def check_mergeable(lm: dict[str, tuple], vlm: dict[str, tuple], lm_dir: Path,
                    vlm_dir: Path, lm_flag: str = "--lm") -> list[str]:
    """Names to merge (all of the LM's); errors list every missing name and shape mismatch."""
    missing = sorted(set(lm) - set(vlm))
    mismatched = sorted(n for n in set(lm) & set(vlm) if lm[n] != vlm[n])
    problems = []
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        problems.append(f"{len(missing)} tensor(s) of {lm_flag} {lm_dir} not in --vlm {vlm_dir}: "
                        f"{shown}")
    if mismatched:
        shown = ", ".join(f"{n} {lm[n]} vs {vlm[n]}" for n in mismatched[:8])
        problems.append(f"{len(mismatched)} shape mismatch(es) between {lm_flag} {lm_dir} and "
                        f"--vlm {vlm_dir}: {shown}{' ...' if len(mismatched) > 8 else ''}")
    if problems:
        raise MergeError("cannot merge: " + "; ".join(problems) + " (both must be BabyLLaVA "
                         "checkpoints of one architecture preset)")
    return sorted(lm)


# Config fields that change what a model computes without changing any tensor's name or shape.
# The merged model runs with the VLM's config: an LM trained under other values would have its
# weights scored (alpha = 1 included) in a computation they were never trained for, silently.
COMPUTE_FIELDS = ("feature_norm", "image_token_index", "projector_hidden_act")
TEXT_COMPUTE_FIELDS = ("hidden_act", "num_attention_heads", "num_key_value_heads", "head_dim",
                       "rms_norm_eps", "rope_parameters", "rope_theta", "rope_scaling",
                       "tie_word_embeddings")


def check_same_computation(lm_dir: Path, vlm_dir: Path, lm_flag: str = "--lm") -> None:
    """Configs that agree on :data:`COMPUTE_FIELDS` and :data:`TEXT_COMPUTE_FIELDS` (read through
    AutoConfig, so two transformers versions' spellings of one config compare equal)."""
    a, b = (AutoConfig.from_pretrained(str(d)) for d in (lm_dir, vlm_dir))
    diffs = [f"{name} {getattr(a, name, None)!r} vs {getattr(b, name, None)!r}"
             for name in COMPUTE_FIELDS if getattr(a, name, None) != getattr(b, name, None)]
    diffs += [f"text_config.{name} {getattr(a.text_config, name, None)!r} vs "
              f"{getattr(b.text_config, name, None)!r}" for name in TEXT_COMPUTE_FIELDS
              if getattr(a.text_config, name, None) != getattr(b.text_config, name, None)]
    if diffs:
        raise MergeError(f"cannot merge: {lm_flag} {lm_dir} and --vlm {vlm_dir} compute "
                         f"differently ({'; '.join(diffs)}); the merged model runs with the VLM's "
                         "config, so train both with the same preset and --feature-norm")


# --- scores and the chosen alpha ----------------------------------------------------------------

def objective(scores: dict[str, float], tasks: dict[str, dict]) -> dict[str, float]:
    """Grammar and multimodal means and the rule's objective (their mean) for one record."""
    out = {}
    for key, kinds in (("grammar", GRAMMAR_KINDS), ("multimodal", MULTIMODAL_KINDS)):
        vals = [s for n, s in scores.items() if tasks[n]["kind"] in kinds]
        if vals:
            out[key] = sum(vals) / len(vals)
    out["objective"] = sum(out.values()) / len(out)
    return out


# Objectives this close are one value: accuracies are ratios of counts, and two sums equal in
# exact arithmetic (3/300 + 298/300 and 1/300 + 300/300) can differ in their float's last bit,
# which max() would then let decide the tie instead of the rule (seen in 23 of 29 sums tried).
# A real difference this small (sums of ratios with co-prime denominators can make one) is a
# millionth of one item of a 1,000-item task: far below any standard error, a tie in all but name.
TIE_TOLERANCE = 1e-9


def choose(records: list[dict], vlm_names: list[str]) -> dict:
    """The record :data:`RULE` picks."""
    top = max(r["objective"] for r in records)
    tied = [r for r in records if r["objective"] >= top - TIE_TOLERANCE]
    return min(tied, key=lambda r: (r["alpha"], vlm_names.index(r["vlm"])))


# --- the sweep ----------------------------------------------------------------------------------

def training_words(directory: Path) -> int | None:
    """Words a word-count checkpoint had seen (its ``train_state.json``, written by train); None
    for a directory without one (a run's final model, another tool's checkpoint)."""
    try:
        state = json.loads((directory / "train_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    words = state.get("words") if isinstance(state, dict) else None
    return words if isinstance(words, int) and not isinstance(words, bool) else None


def order_by_training(vlms: list[Path]) -> list[Path]:
    """``--vlm`` in training order: word-count checkpoints by their words, then the others (the
    final model) in the order given. The README's ``--vlm 'run/vlm/checkpoints/*'`` expands (as
    a shell glob would) in lexicographic order (words_100M, words_10M, words_1B, words_1M, ...),
    which would scramble the curve over training and the rule's tie-break."""
    words = [training_words(v) for v in vlms]
    order = sorted(range(len(vlms)), key=lambda i: (words[i] is None, words[i] or 0, i))
    return [vlms[i] for i in order]


def _vlm_names(vlms: list[Path]) -> list[str]:
    """Short names of the --vlm checkpoints (record labels and kept sub-folders): the folder name,
    or parent_folder when two share a name (run1/vlm, run2/vlm)."""
    resolved = [v.resolve() for v in vlms]
    if len(set(resolved)) != len(resolved):
        raise MergeError("--vlm: the same checkpoint is given twice")
    for names in ([r.name for r in resolved], ["_".join(r.parts[-2:]) for r in resolved]):
        if len(set(names)) == len(names):
            return names
    raise MergeError("--vlm: checkpoints whose folder and parent names coincide; give them "
                     "distinct folder names")


def _check_tokenizers(lm: Path, vlms: list[Path], tokenizer) -> None:
    """One vocabulary (``tokenizer`` is the first VLM's), or the merge mixes rows of different
    tokens. Every VLM is compared too: the tasks are tokenised once, with the first VLM's
    tokenizer, so another VLM's other vocabulary would be scored on wrong token ids."""
    vocab = tokenizer.get_vocab()
    for vlm in vlms[1:]:
        if checkpoint_tokenizer(vlm, "--vlm").get_vocab() != vocab:
            raise MergeError(f"--vlm {vlms[0]} and --vlm {vlm} have different tokenizer "
                             "vocabularies; the tasks are tokenised once for every VLM")
    if not (lm / "tokenizer.json").is_file():
        return  # an LM without tokenizer files: nothing to compare
    if checkpoint_tokenizer(lm, "--lm").get_vocab() != vocab:
        raise MergeError(f"--lm {lm} and --vlm {vlms[0]} have different tokenizer vocabularies; "
                         "merging them would mix the embeddings of different tokens")


class _Sweep:
    """One VLM of the sweep: the live model loaded from it and a resident copy of its tensors."""

    def __init__(self, cfg: MergeConfig, index: int, vlm_name: str, names: list[str],
                 tasks: list[PreparedTask], tokenizer, device: torch.device, dtype: torch.dtype,
                 kept_identity: str):
        self.cfg, self.vlm_dir, self.vlm_name = cfg, cfg.vlm[index], vlm_name
        self.kept_identity = kept_identity
        self.tasks, self.tokenizer, self.device = tasks, tokenizer, device
        self.summary = task_summary(tasks)
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
        scores = {n: r["accuracy"] for n, r in result.items()}
        return {"alpha": alpha, "vlm": self.vlm_name, "scores": scores,
                **objective(scores, self.summary),
                "groups": {n: r["groups"] for n, r in result.items() if len(r["groups"]) > 1},
                "merge_s": merge_s, "eval_s": time.perf_counter() - t0}

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
        black = self.vlm_dir / BLACK_FEATURE_FILE

        def copy_black(tmp: Path) -> None:
            # the merged model takes text-only input as the VLM did: with the VLM's /black feature
            if black.is_file():
                shutil.copy2(black, tmp / BLACK_FEATURE_FILE)

        target = _kept_path(self.cfg, self.vlm_name, alpha)
        return str(save_checkpoint(self.model, target, self.tokenizer,
                                   extra_files={"merge.json": json.dumps(provenance, indent=2)},
                                   write_extra=copy_black))


def _kept_path(cfg: MergeConfig, vlm_name: str, alpha: float) -> Path:
    sub = cfg.out if len(cfg.vlm) == 1 else cfg.out / vlm_name
    return sub / f"alpha_{format_alpha(alpha)}"


def _log(path: Path, rec: dict) -> None:
    # one write of one whole line per record, appended as soon as it is scored: a kill leaves at
    # most the last line cut short, which read_metrics drops (that point is scored again)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
    shown = " ".join(f"{n}={s:.4f}" for n, s in rec["scores"].items())
    what = f"{rec['endpoint'].upper()} unmerged" if "endpoint" in rec else f"alpha={rec['alpha']}"
    click.echo(f"[{rec['vlm']}] {what}: {shown} objective={rec['objective']:.4f}")


# --- resuming -----------------------------------------------------------------------------------
# A sweep's identity is what its scores and kept checkpoints are a function of: the checkpoints'
# contents (not their paths: a moved run resumes), the prepared tasks (token ids and feature rows,
# so task files, --features and the tokenizer are all covered), the method with the settings it
# uses, and the dtype. Free to change on resume: the alpha grid and --keep (points are keyed by
# (VLM name, alpha)), the --vlm list (each VLM has its own identity), --device and --batch-size
# (as train's resume, they change only the rounding of the scoring: DARE's masks are drawn on the
# CPU whatever the device), --allow-extrapolation.

_HASH_CHUNK = 1 << 20


def _file_digest(path: Path, cached: dict | None) -> dict:
    """sha256 of a file, reusing ``cached`` (this function's earlier answer, stored in
    merge_config.json) when path, size, inode, mtime and ctime are unchanged, so a resume reads no
    weights to recognise them; a rewritten file (a retrained checkpoint) is hashed again, and an
    identical rewrite (train re-publishing the same weights) still matches.

    mtime alone can be set back (``os.utime``, ``cp -p``, ``rsync -t``) over other contents of the
    same size; ctime cannot be set from user space and changes on every write, rename onto the
    file and utime, and a file replaced by a rename (as save_checkpoint publishes) has a new inode.
    """
    st = path.stat()
    entry = {"path": str(path.resolve()), "size": st.st_size, "inode": st.st_ino,
             "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}
    if cached and all(cached.get(k) == v for k, v in entry.items()) and "sha256" in cached:
        return cached
    h = hashlib.sha256()  # chunked: hashlib.file_digest needs Python 3.11, babymerge runs on 3.10
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    entry["sha256"] = h.hexdigest()
    return entry


def _checkpoint_fingerprint(directory: Path, cached: dict | None) -> dict:
    """{file name: digest} of the files the loaded model is made of (not the tokenizer: the
    prepared tasks' token ids cover it, and merge checks that the LM's vocabulary matches)."""
    files = [directory / "config.json", *_weight_files(directory), directory / BLACK_FEATURE_FILE]
    cached = cached or {}
    return {f.name: _file_digest(f, cached.get(f.name)) for f in files if f.is_file()}


def _task_digest(task: PreparedTask) -> str:
    """sha256 of exactly what scoring reads from a prepared task."""
    h = hashlib.sha256(json.dumps([task.name, task.kind, task.input_ids, task.score_from,
                                   task.groups]).encode())
    for t in (task.feature_rows, task.item_start, task.features):
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def method_settings(cfg: MergeConfig) -> dict:
    """The flags the method reads (--density, --seed, --scale, where they apply): in results.json
    and in the sweep identity, so a rerun with another of them is refused."""
    method_cls = MERGE_METHODS[cfg.method]
    return {**({"density": cfg.density} if method_cls.uses_density else {}),
            **({"seed": cfg.seed} if method_cls.uses_seed else {}),
            **({"scale": cfg.scale} if method_cls.needs_base else {})}


def _identity(cfg: MergeConfig, tasks: list[PreparedTask], vlm_names: list[str],
              old: dict | None) -> dict:
    method_cls = MERGE_METHODS[cfg.method]
    old = old or {}
    return {
        "method": {"name": cfg.method, **method_settings(cfg)},
        "dtype": cfg.dtype,
        "lm": _checkpoint_fingerprint(cfg.lm, old.get("lm")),
        "base": (_checkpoint_fingerprint(cfg.base, old.get("base")) if method_cls.needs_base
                 else None),
        "tasks": [[t.name, _task_digest(t)] for t in tasks],
        "vlms": {name: _checkpoint_fingerprint(d, old.get("vlms", {}).get(name))
                 for name, d in zip(vlm_names, cfg.vlm, strict=True)},
    }


def _contents(fingerprint: dict | None) -> dict | None:
    """A checkpoint fingerprint without paths and times: what identity comparisons look at."""
    return None if fingerprint is None else {n: d["sha256"] for n, d in fingerprint.items()}


# the identity's parts common to every --vlm, and the flags that set each
_SHARED_IDENTITY_FLAGS = (("method", "--method/--density/--scale/--seed"), ("dtype", "--dtype"),
                          ("lm", "--lm"), ("base", "--base"), ("tasks", "--task/--features"))


def _kept_identity(identity: dict, vlm_name: str) -> str:
    """Digest of what a kept checkpoint of ``vlm_name`` is a function of (not the tasks), written
    into its merge.json: a complete ``alpha_<a>/`` (saved atomically) with the same digest is not
    saved again on resume."""
    essence = {"method": identity["method"], "dtype": identity["dtype"],
               "lm": _contents(identity["lm"]), "base": _contents(identity["base"]),
               "vlm": _contents(identity["vlms"][vlm_name])}
    return hashlib.sha256(json.dumps(essence, sort_keys=True).encode()).hexdigest()


def _is_kept(cfg: MergeConfig, identity: dict, vlm_name: str, alpha: float) -> bool:
    path = _kept_path(cfg, vlm_name, alpha) / "merge.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (saved.get("identity") == _kept_identity(identity, vlm_name)
            and saved.get("alpha") == alpha)


def read_metrics(path: Path) -> list[dict]:
    """Every complete record of a merge's ``metrics.jsonl`` (a scored point, or an unmerged
    endpoint's score with ``"endpoint"``); a last line cut short by a kill is dropped (its point
    is scored again); any other bad line is an error. [] when there is no such file."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: the write was cut short
                break
            rec = None
        if not (isinstance(rec, dict) and isinstance(rec.get("vlm"), str)
                and isinstance(rec.get("scores"), dict)
                and (rec.get("endpoint") in ("vlm", "lm") or isinstance(rec.get("alpha"), float))):
            raise MergeError(f"{path}:{number}: not a merge record; fix or remove the line, or "
                             "pass --restart to discard every logged point")
        out.append(rec)
    return out


def _differences(old: dict, new: dict, have: set[str], cfg: MergeConfig,
                 vlm_names: list[str]) -> list[str]:
    """What differs between the logged sweep's identity and this run's, as flags."""
    diffs = []
    for key, flag in _SHARED_IDENTITY_FLAGS:
        before, now = old.get(key), new[key]
        if key in ("lm", "base"):
            before, now = _contents(before), _contents(now)
        if before == now:
            continue
        if key in ("lm", "base") and before and now:
            changed = sorted(n for n in set(before) | set(now) if before.get(n) != now.get(n))
            diffs.append(f"{flag} {getattr(cfg, key)}: {', '.join(changed)} changed")
        elif key == "tasks":
            names_before, names_now = [n for n, _ in before or []], [n for n, _ in now]
            changed = [n for n, d in now if [n, d] not in (before or [])]
            diffs.append(f"{flag}: tasks {names_before} -> {names_now}"
                         if names_before != names_now else
                         f"{flag}: the items or image features of {', '.join(changed)} changed")
        else:
            diffs.append(f"{flag}: {before!r} -> {now!r}")
    for name, directory in zip(vlm_names, cfg.vlm, strict=True):
        if name not in have:
            continue  # nothing of it to reuse: its identity is simply replaced
        before = _contents(old.get("vlms", {}).get(name))
        now = _contents(new["vlms"][name])
        if before != now:
            changed = sorted(n for n in set(before or {}) | set(now)
                             if (before or {}).get(n) != now.get(n))
            diffs.append(f"--vlm {directory}: {', '.join(changed)} changed since its points "
                         f"(as {name!r}) were logged")
    return diffs


def _open_run(cfg: MergeConfig, tasks: list[PreparedTask], vlm_names: list[str]
              ) -> tuple[dict, list[dict]]:
    """Check the out folder's logged points against this run's identity (or discard them for
    --restart); rewrite metrics.jsonl without a cut-short last line and merge_config.json with the
    identity. Returns (identity, the logged records to reuse)."""
    config_path, metrics_path = cfg.out / "merge_config.json", cfg.out / "metrics.jsonl"
    try:
        saved = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved = {}
    saved = saved if isinstance(saved, dict) else {}
    old = saved.get("identity") if isinstance(saved.get("identity"), dict) else None
    # old serves as a cache of file hashes (keyed by path and stat), even for --restart
    identity = _identity(cfg, tasks, vlm_names, old)
    if cfg.restart:
        logged = _restart(cfg, saved, old, identity, vlm_names)
    else:
        logged = read_metrics(metrics_path)
        if logged and old is None:
            raise MergeError(f"{metrics_path} holds {len(logged)} record(s) but {config_path} no "
                             "sweep identity to check them against (written by an older babymerge, "
                             "or removed); pass --restart to discard them, or use another --out")
        diffs = _differences(old, identity, {r["vlm"] for r in logged}, cfg, vlm_names) \
            if logged else []
        if diffs:
            raise MergeError(f"{cfg.out} holds points of a sweep with other inputs ("
                             + "; ".join(diffs) + "); rerun with the same ones, pass --restart to "
                             "discard those points, or use another --out")
    if logged:
        # VLMs of earlier runs keep their identity: their logged points stay reusable
        identity["vlms"] = {**old.get("vlms", {}), **identity["vlms"]}
    # metrics.jsonl first: a kill between the two writes must not leave old points under a new
    # identity (the reverse, old identity and no points, only starts afresh)
    atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in logged))
    # the log stays one that a --restart began while the runs resuming it have not finished it
    _save_run_config(cfg, identity, restarted=cfg.restart
                     or (bool(logged) and saved.get(_RESTARTED_KEY) is True))
    return identity, logged


_RESTARTED_KEY = "restarted_unfinished"


def _save_run_config(cfg: MergeConfig, identity: dict, restarted: bool) -> None:
    """merge_config.json: the command, the sweep identity, and whether the logged points are of a
    sweep a --restart run began that no run has finished yet (:func:`_restart`)."""
    save_config(cfg, cfg.out / "merge_config.json", identity=identity,
                **{_RESTARTED_KEY: restarted})


def _restart(cfg: MergeConfig, saved: dict, old: dict | None, identity: dict,
             vlm_names: list[str]) -> list[dict]:
    """The logged records a --restart run keeps: none, unless they are the points of a sweep that
    an earlier --restart run with the same inputs began and no run has finished since.

    --restart means "throw the old points away and sweep afresh", once. Long sweeps get killed,
    and the researcher's next move is the same command again: discarding the points the first
    --restart run made would throw away the very work it was asked to start (hours of it, as
    often as the sweep is interrupted). So the same --restart command resumes its own unfinished
    sweep, and discards the log whenever that could be what is meant: points logged under other
    inputs, points of a sweep that finished (a --restart then asks to score it all again), and
    points of a sweep begun without --restart (which may predate the fix the user restarts for).
    To throw away an unfinished restarted sweep too, remove OUT/metrics.jsonl."""
    metrics_path = cfg.out / "metrics.jsonl"
    try:
        logged = read_metrics(metrics_path)
    except MergeError:  # a damaged log is discarded as asked
        logged = None
    if (logged and old is not None and saved.get(_RESTARTED_KEY) is True
            and not _differences(old, identity, {r["vlm"] for r in logged}, cfg, vlm_names)):
        click.echo(f"--restart: resuming the unfinished sweep an earlier --restart of the same "
                   f"inputs began ({len(logged)} record(s) in {metrics_path}; remove that file to "
                   f"discard them)")
        return logged
    count = len(logged) if logged is not None else sum(
        1 for line in metrics_path.read_text(encoding="utf-8", errors="replace").splitlines()
        if line.strip())
    if count:
        click.echo(f"--restart: discarding {count} record(s) logged in {metrics_path}")
    return []


def _reuse_line(points: dict, ends: dict, vlm_names: list[str], grid: list[float]) -> str | None:
    """One line naming the logged points this run reuses; None when there are none."""
    parts = []
    for name in vlm_names:
        alphas = [a for a in grid if (name, a) in points]
        endpoints = [w.upper() for w in ("vlm", "lm") if (name, w) in ends]
        if not alphas and not endpoints:
            continue
        shown = (f"all {len(grid)} alphas" if len(alphas) == len(grid) else
                 "alpha " + ", ".join(map(str, alphas)) if alphas else "no alpha")
        parts.append(f"{name}: {shown}" + (f" + unmerged {'/'.join(endpoints)}" if endpoints
                                           else ""))
    if not parts:
        return None
    count = sum((n, a) in points for n in vlm_names for a in grid)
    return (f"resuming: reused {count} of {len(grid) * len(vlm_names)} point(s) logged in "
            f"metrics.jsonl ({'; '.join(parts)})")


@dataclass
class _Run:
    """What every VLM's sweep shares: its inputs, the endpoints' resident tensors, and the resume
    state (the points and unmerged endpoint scores logged so far, keyed by VLM name)."""

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
    end_scores: dict[tuple[str, str], dict]
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
        _log(self.cfg.out / "metrics.jsonl", rec)
        if "endpoint" in rec:
            self.end_scores[(rec["vlm"], rec["endpoint"])] = rec["scores"]
        return rec

    def start(self, index: int, score_vlm: bool) -> tuple[_Sweep, MergeMethod]:
        """Load VLM ``index`` and build the method on it (scoring the unmerged VLM first)."""
        name = self.vlm_names[index]
        sweep = _Sweep(self.cfg, index, name, self.names, self.tasks, self.tokenizer,
                       self.device, self.dtype, _kept_identity(self.identity, name))
        if score_vlm:  # before the method is built, which may turn vlm_copy into a task vector
            self.log(sweep.score_unmerged(sweep.vlm_copy, "vlm"))
        method = self.method_cls(self.endpoint("lm"), sweep.vlm_copy, self.endpoint("base"),
                                 density=self.cfg.density, scale=self.cfg.scale,
                                 seed=self.cfg.seed)
        return sweep, method

    def unsaved(self, name: str, alpha: float) -> bool:
        return not _is_kept(self.cfg, self.identity, name, alpha)

    def to_keep(self, name: str) -> list[float]:
        """--keep's alphas for VLM ``name``, plus a single VLM's chosen one (needs its whole grid
        scored; a checkpoint sweep keeps only the winner over all VLMs, after the loop)."""
        if not (self.keep_chosen and len(self.vlm_names) == 1):
            return self.keep
        chosen = choose([self.points[(name, a)] for a in self.grid], self.vlm_names)["alpha"]
        return self.keep + ([chosen] if chosen not in self.keep else [])


def _sweep_vlm(run: _Run, index: int) -> tuple[list[dict], dict, list[str]]:
    """VLM ``index``'s grid (logged points reused, the rest merged, scored and logged), its
    unmerged endpoints and its kept checkpoints: (records, endpoints, kept paths). Its live model
    and copies are freed on return: one VLM's resident at a time."""
    cfg, grid, name = run.cfg, run.grid, run.vlm_names[index]
    linear = cfg.method == "linear"
    # with linear merging the grid's 0 and 1 ARE the endpoints; other methods score the two
    # unmerged models, so the plot shows what the method gains or loses. Unmerged scores are
    # logged like the points, so a resumed run need not load a finished VLM just for them.
    needed_ends = [w for w, a in (("vlm", 0.0), ("lm", 1.0)) if not (linear and a in grid)]
    todo = [a for a in grid if (name, a) not in run.points]
    missing_ends = [w for w in needed_ends if (name, w) not in run.end_scores]
    sweep = method = None
    # a VLM whose points are all logged and whose kept checkpoints are all there is not even
    # read (to_keep needs the whole grid: evaluated only when todo is empty)
    if todo or missing_ends or any(run.unsaved(name, a) for a in run.to_keep(name)):
        sweep, method = run.start(index, score_vlm="vlm" in missing_ends)
    records = []
    for alpha in grid:
        if (name, alpha) in run.points:
            rec = run.points[(name, alpha)]
        else:
            rec = run.points[(name, alpha)] = run.log(sweep.merge_and_score(method, alpha))
            if alpha in run.keep and run.unsaved(name, alpha):
                sweep.save(method, alpha, current=alpha)  # live already: no merge to redo
        records.append(rec)
    if "lm" in missing_ends:
        run.log(sweep.score_unmerged(run.endpoint("lm"), "lm"))
    ends = {w: run.end_scores[(name, w)] for w in needed_ends}
    if linear:
        ends.update({w: run.points[(name, a)]["scores"] for w, a in (("vlm", 0.0), ("lm", 1.0))
                     if a in grid})
    kept = []
    for alpha in run.to_keep(name):
        if run.unsaved(name, alpha):
            sweep.save(method, alpha)
        kept.append(str(_kept_path(cfg, name, alpha)))
    return records, {"vlm": ends["vlm"], "lm": ends["lm"]}, kept


def merge(cfg: MergeConfig) -> dict:
    """Run the sweep(s); write results.json/.md, alpha_curve.png (and checkpoint_curve.png for a
    checkpoint sweep), metrics.jsonl and the kept checkpoints; return the results.json content."""
    cfg = replace(cfg, vlm=order_by_training(cfg.vlm))
    grid = parse_alpha_grid(cfg.alpha_grid, cfg.allow_extrapolation)
    keep, keep_chosen = parse_keep(cfg.keep, cfg.allow_extrapolation)
    method_cls = MERGE_METHODS[cfg.method]
    device, dtype = resolve_device(cfg.device), DTYPES[cfg.dtype]

    # every check that reads only headers, configs and task files runs before any tensor is loaded
    lm_shapes = read_shapes(cfg.lm)
    base_shapes = read_shapes(cfg.base) if method_cls.needs_base else None
    names: list[str] = []
    for vlm_dir in cfg.vlm:
        vlm_shapes = read_shapes(vlm_dir)
        names = check_mergeable(lm_shapes, vlm_shapes, cfg.lm, vlm_dir)
        check_same_computation(cfg.lm, vlm_dir)
        if base_shapes is not None:
            check_mergeable(base_shapes, vlm_shapes, cfg.base, vlm_dir, "--base")
            check_mergeable(lm_shapes, base_shapes, cfg.lm, cfg.base, "--lm")
            check_same_computation(cfg.base, vlm_dir, "--base")
    vlm_names = _vlm_names(cfg.vlm)
    tokenizer = checkpoint_tokenizer(cfg.vlm[0], "--vlm")
    _check_tokenizers(cfg.lm, cfg.vlm, tokenizer)
    # without --features, text-only tasks use the /black feature the (first) VLM was trained with
    tasks = load_tasks(cfg.task, tokenizer, cfg.features, checkpoint_max_positions(cfg.vlm[0]),
                       checkpoint=cfg.vlm[0])
    check_feature_encoder(cfg.vlm[0], cfg.features)

    cfg.out.mkdir(parents=True, exist_ok=True)
    identity, logged = _open_run(cfg, tasks, vlm_names)
    run = _Run(cfg, grid, keep, keep_chosen, method_cls, names, tasks, tokenizer, device, dtype,
               vlm_names, identity,
               points={(r["vlm"], r["alpha"]): r for r in logged if "endpoint" not in r},
               end_scores={(r["vlm"], r["endpoint"]): r["scores"]
                           for r in logged if "endpoint" in r})
    line = _reuse_line(run.points, run.end_scores, vlm_names, grid)
    if line:
        click.echo(line)

    records: list[dict] = []
    endpoints: dict[str, dict] = {}
    kept: list[str] = []
    for index, vlm_name in enumerate(vlm_names):
        recs, endpoints[vlm_name], kept_paths = _sweep_vlm(run, index)
        records += recs
        kept += kept_paths

    best = choose(records, vlm_names)
    if keep_chosen and len(vlm_names) > 1 and best["alpha"] not in keep:
        # a checkpoint sweep knows its winner only at the end: load that VLM once more
        if run.unsaved(best["vlm"], best["alpha"]):
            sweep, method = run.start(vlm_names.index(best["vlm"]), score_vlm=False)
            sweep.save(method, best["alpha"])
        kept.append(str(_kept_path(cfg, best["vlm"], best["alpha"])))

    results = {"tasks": task_summary(tasks), "records": records, "chosen_alpha": best["alpha"],
               "chosen_vlm": best["vlm"],
               "chosen_per_vlm": {
                   n: choose([r for r in records if r["vlm"] == n], vlm_names)["alpha"]
                   for n in vlm_names},
               "rule": RULE,
               "method": {"name": cfg.method, "reference": method_cls.reference,
                          **method_settings(cfg)},
               "lm": str(cfg.lm), "vlms": dict(zip(vlm_names, map(str, cfg.vlm))),
               "endpoints": endpoints, "kept": sorted(kept), "device": str(device),
               "dtype": cfg.dtype}
    atomic_write_text(cfg.out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(cfg.out / "results.md", results_markdown(results))
    atomic_write_bytes(cfg.out / "alpha_curve.png", plot_alpha_curve(results))
    if len(vlm_names) > 1:
        atomic_write_bytes(cfg.out / "checkpoint_curve.png", plot_checkpoint_curve(results))
    _save_run_config(cfg, identity, restarted=False)  # finished: a --restart now starts afresh
    click.echo(f"chosen alpha {best['alpha']} ({best['vlm']}), objective {best['objective']:.4f}; "
               f"results in {cfg.out}")
    return results


# --- reports ------------------------------------------------------------------------------------

def results_markdown(results: dict) -> str:
    """results.json as tables: tasks, every (VLM, alpha) record, the unmerged endpoints."""
    tasks = list(results["tasks"])
    m = results["method"]
    lines = ["# babymerge merge results", "",
             f"- method: `{m['name']}`: {m['reference']}",
             f"- LM: `{results['lm']}`; VLM(s): "
             + ", ".join(f"`{p}`" for p in results["vlms"].values()),
             f"- chosen: alpha = **{results['chosen_alpha']}** on `{results['chosen_vlm']}`",
             f"- rule: {results['rule']}", "", "## Tasks", "", "| task | kind | items | chance |",
             "|---|---|---|---|"]
    lines += [f"| {n} | {t['kind']} | {t['items']} | {t['chance']:.3f} |"
              for n, t in results["tasks"].items()]
    means = [k for k in ("grammar", "multimodal") if k in results["records"][0]]
    cols = tasks + means + ["objective"]
    lines += ["", "## Scores (accuracy)", "", "| vlm | alpha | " + " | ".join(cols) + " |",
              "|---|---|" + "---|" * len(cols)]
    for r in results["records"]:
        chosen = r["alpha"] == results["chosen_alpha"] and r["vlm"] == results["chosen_vlm"]
        vals = [r["scores"][c] if c in r["scores"] else r[c] for c in cols]
        cells = [f"**{v:.4f}**" if chosen else f"{v:.4f}" for v in vals]
        lines.append(f"| {r['vlm']} | {r['alpha']}{' (chosen)' if chosen else ''} | "
                     + " | ".join(cells) + " |")
    # with the rule's means too: the chosen alpha is the best GRID point, and without them the
    # table did not show when the unmerged VLM (off a grid like 0.3,0.5,0.8) scores higher
    lines += ["", "## Unmerged endpoints", "", "| vlm | model | " + " | ".join(cols) + " |",
              "|---|---|" + "---|" * len(cols)]
    for vlm, ends in results["endpoints"].items():
        for which in ("vlm", "lm"):
            vals = {**ends[which], **objective(ends[which], results["tasks"])}
            lines.append(f"| {vlm} | {which.upper()} | "
                         + " | ".join(f"{vals[c]:.4f}" for c in cols) + " |")
    if results["kept"]:
        lines += ["", "## Kept checkpoints", ""] + [f"- `{k}`" for k in results["kept"]]
    return "\n".join(lines) + "\n"


def _panels(results: dict):
    """A figure with one panel per task plus the rule's objective, and each panel's value of a
    scores dict."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    panels = list(results["tasks"]) + ["objective"]
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    for ax in axes[len(panels):]:
        ax.set_visible(False)

    def value(scores: dict, panel: str) -> float:
        return objective(scores, results["tasks"])["objective"] if panel == "objective" \
            else scores[panel]

    return fig, list(zip(axes, panels)), value


def _title(ax, results: dict, panel: str) -> None:
    """Panel title, chance line and y label."""
    if panel != "objective":
        ax.axhline(results["tasks"][panel]["chance"], color="grey", ls="--", lw=0.8,
                   label="chance")
        ax.set_title(f"{panel} ({results['tasks'][panel]['kind']})")
    else:
        # the objective of a model at chance on every task: without it the panel alone does not
        # say whether a merge's objective is anything above guessing
        chance = objective({n: t["chance"] for n, t in results["tasks"].items()},
                           results["tasks"])["objective"]
        ax.axhline(chance, color="grey", ls="--", lw=0.8)
        # the rule in brief, so the figure says why the circled point is the chosen one
        ax.set_title("objective = mean(grammar, multimodal)\n"
                     "chosen: its max, ties to smaller alpha", fontsize=9)
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _vlm_colors(count: int) -> list:
    """One colour per --vlm, distinct however many: tab10 up to 10, else a sequential map in
    training order (BabyLM's schedule gives 28 checkpoints; cycling C0..C9 drew words_1M,
    words_20M and words_300M alike)."""
    if count <= 10:
        return [f"C{i}" for i in range(count)]
    from matplotlib import colormaps

    shades = colormaps["plasma"]  # dark early to light late; stops before the palest yellow
    return [shades(0.9 * i / (count - 1)) for i in range(count)]


def _outside_legend(fig, ax) -> None:
    """The legend beside the panels (one entry per curve: over the curves it hid them, and
    constrained layout shrank every panel to fit a tall one)."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=7,
               ncols=1 if len(labels) <= 30 else 2)


def _alpha_figure(results: dict):
    """:func:`plot_alpha_curve`'s figure."""
    fig, panels, value = _panels(results)
    vlms = list(results["vlms"])
    colors = _vlm_colors(len(vlms))
    for ax, panel in panels:
        for vlm, color in zip(vlms, colors):
            recs = [r for r in results["records"] if r["vlm"] == vlm]
            ax.plot([r["alpha"] for r in recs], [value(r["scores"], panel) for r in recs], "o-",
                    color=color, ms=3, label=vlm if len(vlms) > 1 else "merged")
            ends = results["endpoints"][vlm]
            ax.plot([0.0], [value(ends["vlm"], panel)], "*", color=color, ms=13, mfc="none",
                    label="VLM (unmerged)" if vlm == vlms[0] else None)
            ax.plot([1.0], [value(ends["lm"], panel)], "s", color=color, ms=9, mfc="none",
                    label="LM (unmerged)" if vlm == vlms[0] else None)
        best = next(r for r in results["records"] if r["alpha"] == results["chosen_alpha"]
                    and r["vlm"] == results["chosen_vlm"])
        ax.axvline(best["alpha"], color="crimson", ls=":", lw=1.2)
        ax.plot([best["alpha"]], [value(best["scores"], panel)], "o", color="crimson", ms=9,
                mfc="none", mew=2, label=f"chosen alpha={best['alpha']}")
        _title(ax, results, panel)
        ax.set_xlabel("alpha (0 = VLM, 1 = LM)")
    if len(vlms) > 1:
        _outside_legend(fig, panels[0][0])
    else:
        panels[0][0].legend(fontsize=7)
    fig.suptitle(f"{results['method']['name']} merge: score against alpha")
    return fig


def plot_alpha_curve(results: dict) -> bytes:
    """PNG: one panel per task plus the rule's objective; score against alpha for every VLM, the
    unmerged LM (alpha = 1) and VLM (alpha = 0) marked, the chosen alpha highlighted."""
    return _png(_alpha_figure(results))


MAX_LEGEND_ALPHAS = 12  # more grid points get a colour bar: a legend taller than the figure
MAX_TICK_LABELS = 12  # checkpoint names shown on the x axis; more pile up into a black smear


def _checkpoint_figure(results: dict):
    """:func:`plot_checkpoint_curve`'s figure."""
    fig, panels, value = _panels(results)
    vlms = list(results["vlms"])
    alphas = sorted({r["alpha"] for r in results["records"]})
    from matplotlib import colormaps  # imported here: matplotlib loads only when plotting
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    shades = colormaps["viridis"]  # alpha 0 dark to alpha 1 light, however many grid points
    norm = Normalize(min(alphas), max(alphas) if len(alphas) > 1 else min(alphas) + 1)
    many = len(alphas) > MAX_LEGEND_ALPHAS
    x = list(range(len(vlms)))
    # every MAX_TICK_LABELS-th name, counted back from the last (the final model) so it is shown
    every = -(-len(vlms) // MAX_TICK_LABELS)
    tick_labels = [v if (len(vlms) - 1 - i) % every == 0 else "" for i, v in enumerate(vlms)]
    for ax, panel in panels:
        for alpha in alphas:
            by_vlm = {r["vlm"]: r for r in results["records"] if r["alpha"] == alpha}
            ax.plot(x, [value(by_vlm[v]["scores"], panel) for v in vlms], "o-", ms=3, lw=1,
                    color=shades(norm(alpha)), label=None if many else f"alpha={alpha}")
        for which, style in (("vlm", "*--"), ("lm", "s--")):
            ax.plot(x, [value(results["endpoints"][v][which], panel) for v in vlms], style,
                    color="black" if which == "vlm" else "grey", ms=7, mfc="none",
                    label=f"{which.upper()} (unmerged)")
        best = next(r for r in results["records"] if r["alpha"] == results["chosen_alpha"]
                    and r["vlm"] == results["chosen_vlm"])
        ax.plot([vlms.index(best["vlm"])], [value(best["scores"], panel)], "o", color="crimson",
                ms=10, mfc="none", mew=2, label="chosen")
        _title(ax, results, panel)
        ax.set_xticks(x, tick_labels, rotation=30, ha="right", fontsize=7)
        ax.set_xlabel("VLM checkpoint (training order)")
    # one line per grid point: the legend goes beside the panels, not over the curves
    _outside_legend(fig, panels[0][0])
    if many:
        fig.colorbar(ScalarMappable(norm=norm, cmap=shades), ax=[ax for ax, _ in panels],
                     label="alpha (0 = VLM, 1 = LM)", shrink=0.6)
    fig.suptitle(f"{results['method']['name']} merge: score over the VLM checkpoints")
    return fig


def plot_checkpoint_curve(results: dict) -> bytes:
    """PNG for a checkpoint sweep, the paper's curves over training: score against the --vlm
    checkpoints (in training order, :func:`order_by_training`), one line per alpha beside the
    unmerged VLM and LM, the chosen (checkpoint, alpha) circled."""
    return _png(_checkpoint_figure(results))
