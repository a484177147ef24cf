"""What ``babymerge merge`` accepts, checked before any tensor is loaded: the ``--alpha-grid`` and
``--keep`` values, the ``--vlm`` list (patterns, training order, short names), and whether the
checkpoints can be merged at all (tensor names and shapes from the safetensors headers, configs
that compute alike, one vocabulary). Every refusal is a :class:`MergeError` naming the flag, file
or tensor.
"""

from __future__ import annotations

import glob
import json
import math
from decimal import Decimal, InvalidOperation
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig

from babymerge.config import InputError
from babymerge.evaluate import checkpoint_tokenizer
from babymerge.model import check_finite, parameter_dtype

MAX_GRID_POINTS = 1001  # more is a typo in the step, not a sweep anyone means to run



class MergeError(InputError):
    """Checkpoints that cannot be merged, or a bad alpha; the message names the flag or tensor."""


# --- alphas ----------------------------------------------------------------------------------

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


# --- the --vlm list -----------------------------------------------------------------------------

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


def checkpoint_names(vlms: list[Path]) -> list[str]:
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


def check_tokenizers(lm: Path, vlms: list[Path], tokenizer) -> None:
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


# --- checkpoint headers and tensors -------------------------------------------------------------

def weight_files(directory: Path) -> list[Path]:
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
    for path in weight_files(directory):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except SafetensorError as e:
            raise MergeError(f"{path}: not a readable safetensors file ({e}): truncated or "
                             "damaged; write it again") from None
    return shapes


def read_tensors(directory: Path, names: list[str], device: torch.device,
                 dtype: torch.dtype) -> list[torch.Tensor]:
    """``names`` from a checkpoint, in that order, on ``device`` in ``dtype`` (bar the
    parameters every loaded model keeps float32, :func:`parameter_dtype`)."""
    wanted, found = set(names), {}
    for path in weight_files(directory):
        with safe_open(str(path), framework="pt") as f:  # reads only the wanted tensors
            found.update({k: f.get_tensor(k).to(device=device, dtype=parameter_dtype(k, dtype))
                          for k in f.keys() if k in wanted})
    check_finite(found.items(), directory)
    return [found[n] for n in names]


# Tensors a VLM may hold that the other checkpoint lacks (kept as the VLM's): the image path,
# for an LM written without one. Any other tensor on one side only is another architecture (an
# extra decoder layer would stay unmerged, and alpha = 1 would not be the LM).
VLM_ONLY = ("model.multi_modal_projector.", "model.feature_mean", "model.feature_std")


def _shown(names: list[str]) -> str:
    return ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")


def check_mergeable(lm: dict[str, tuple], vlm: dict[str, tuple], lm_dir: Path,
                    vlm_dir: Path, lm_flag: str = "--lm") -> list[str]:
    """Names to merge (all of the LM's); errors list every missing name, in both directions
    (bar :data:`VLM_ONLY`), and every shape mismatch."""
    missing = sorted(set(lm) - set(vlm))
    extra = sorted(n for n in set(vlm) - set(lm) if not n.startswith(VLM_ONLY))
    mismatched = sorted(n for n in set(lm) & set(vlm) if lm[n] != vlm[n])
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) of {lm_flag} {lm_dir} not in --vlm {vlm_dir}: "
                        f"{_shown(missing)}")
    if extra:
        problems.append(f"{len(extra)} tensor(s) of --vlm {vlm_dir} not in {lm_flag} {lm_dir}: "
                        f"{_shown(extra)}")
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


def check_config_matches_weights(directory: Path, shapes: dict[str, tuple[int, ...]],
                                 flag: str) -> None:
    """The tensors ``directory``'s config.json describes are the ones its weights hold (a model
    built from the config on the meta device, no memory used): the merged model runs with the
    VLM's config, so a config that disagrees with its weights would score other tensors than
    those merged."""
    from babymerge.model import BabyLlavaForConditionalGeneration

    try:
        config = AutoConfig.from_pretrained(str(directory))
        with torch.device("meta"):
            model = BabyLlavaForConditionalGeneration(config)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise MergeError(f"{flag} {directory}: config.json does not describe a BabyLLaVA model "
                         f"({type(e).__name__}: {e})") from None
    described = {n: tuple(p.shape) for n, p in model.named_parameters()}
    # an LM may be written without the image path (VLM_ONLY): the merge keeps the VLM's
    missing = sorted(n for n in set(described) - set(shapes) if not n.startswith(VLM_ONLY))
    extra = sorted(set(shapes) - set(described))
    wrong = sorted(n for n in set(described) & set(shapes) if described[n] != shapes[n])
    if missing or extra or wrong:
        parts = [f"{what}: {_shown(names)}" for what, names in (
            ("in the config but not the weights", missing),
            ("in the weights but not the config", extra),
            ("of another shape", [f"{n} {described[n]} vs {shapes[n]}" for n in wrong])) if names]
        raise MergeError(f"{flag} {directory}: config.json disagrees with its weights ("
                         + "; ".join(parts) + ")")
