"""Stage 2c: ``babymerge train``: the text-only LM (``--kind lm``) or the VLM (``--kind vlm``) from
cached image features, one architecture for both (``babymerge.model``).

The run reads top to bottom in :func:`_train`, nanoGPT style: set-up, resume, the loop (one step,
a metrics record, word-count checkpoints, the resume state) and the final save, each a named
function. Around it: the config, the learning-rate schedule, the BabyLM word-count checkpoint
schedule, and the checkpoint/resume component. A run writes to ``--out``:

    out/config.json, model.safetensors, tokenizer files   the final model (HF directory)
    out/black_feature.safetensors                          the /black feature it was trained with
                                                           (in every checkpoint; eval's fallback)
    out/metrics.jsonl                                      one JSON record per logged step
    out/train_config.json                                  the resolved config and versions
    out/checkpoints/words_1M/ ... words_1B/                 HF directories at BabyLM word counts
    out/resume/                                            model, optimizer, RNG, data position

Running the same command again resumes from ``out/resume`` and ends with the same weights as an
uninterrupted run (on CPU; CUDA kernels are not bitwise deterministic).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from babymerge import distributed
from babymerge.config import (InputError, atomic_write_text, config_to_dict, exclusive, opt,
                              output_folder, save_config)
from babymerge.data import (CAPTIONS, ORDERS, TEXT, EpochPlan, load_captions, load_text,
                            tokenizer_fingerprint)
from babymerge.featurefile import FeatureFileError, FeatureTable, feature_statistics
from babymerge.model import (MODEL_PRESETS, BabyLlavaForConditionalGeneration, build_model,
                             read_checkpoint, recover_checkpoint, save_black_feature,
                             save_checkpoint, set_feature_statistics, transformers_bars_off)
from babymerge.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

BABYLM_MAX_EPOCHS = 10
RESUME_DIR = "resume"
CHECKPOINTS_DIR = "checkpoints"
LOCK_FILE = ".lock"


class TrainError(InputError):
    """A run that cannot start as asked (resume mismatch, model and data that do not fit)."""


class NonFiniteStep(Exception):
    """The step's gradients are NaN or infinite (:class:`_Stepper`); _train says where."""


# Fields that may change between a run and its resumption without changing what it computes.
RESUME_FREE_FIELDS = {"max_steps", "progress", "log_every", "save_every", "resume", "device",
                      "compile", "cache_dir", "feature_memory_gb"}


@dataclass
class TrainConfig:
    """``babymerge train --kind lm|vlm ...``; defaults are the paper's set-up."""

    kind: str = opt("", help="lm: text only (with the black image); vlm: captions + text",
                    choices=("lm", "vlm"))
    text: list[Path] = opt([], help="text corpus file (BabyLM style, one document per "
                                "line); repeat the flag for several")
    captions: list[Path] = opt([], help="caption file: jsonl {image_id, caption} or TSV "
                                    "id<TAB>text; repeat the flag for several")
    features: Path | None = opt(None, help="feature file (.h5): caption images and /black")
    tokenizer: Path | None = opt(None,
                                 help="tokenizer directory (default: the --init-from model's)")
    out: Path | None = opt(None, help="output directory (final model, checkpoints, metrics)")
    preset: str = opt("paper", help="model size", choices=tuple(MODEL_PRESETS))
    init_from: Path | None = opt(None, help="start from this checkpoint instead of a random init")
    seed: int = opt(0, help="initial weights and data order; same seed = same init for LM and VLM")
    order: str = opt("mixed", help="VLM curriculum over the run", choices=ORDERS)
    seq_len: int = opt(256, help="tokens per sequence, [BOS, <image>] included")
    batch_size: int = opt(32, help="sequences per micro-batch per device")
    grad_accum: int = opt(1, help="micro-batches per optimizer step")
    epochs: int = opt(10, help="passes over the data (BabyLM allows at most 10)")
    lr: float = opt(5e-4, help="peak learning rate")
    min_lr_ratio: float = opt(0.1, help="cosine decays to lr * this")
    warmup_steps: int = opt(500, help="linear warm-up steps (at most a tenth of the run)")
    weight_decay: float = opt(0.1, help="AdamW weight decay on matrices (not on norms or biases)")
    beta1: float = opt(0.9, help="AdamW beta1")
    beta2: float = opt(0.95, help="AdamW beta2")
    grad_clip: float = opt(1.0, help="clip the gradient norm to this (0: no clipping)")
    precision: str = opt("auto", help="auto: bf16 autocast on CUDA, fp32 on CPU",
                         choices=("auto", "bf16", "fp32"))
    compile: bool = opt(False, help="torch.compile the model")
    device: str = opt("auto", help="auto, cpu, cuda, cuda:N")
    checkpoint_unit: int = opt(1_000_000, help="words per first checkpoint; the schedule is "
                               "1..10, 20..100, 200..1000 units (BabyLM: 1M)")
    save_every: int = opt(1000, help="also save the resume state every N steps (0: only at "
                          "word-count checkpoints)")
    log_every: int = opt(10, help="steps between metrics records")
    max_steps: int = opt(0, help="stop (resumably) after this many steps in total; 0: no limit")
    cache_dir: Path = opt(Path("cache/tokens"), help="where tokenised corpora are cached")
    feature_memory_gb: float = opt(-1.0, help="hold the feature matrix (fp16) in memory when it "
                                   "needs at most this many GB per process, else read each "
                                   "batch's rows from the file (same results); negative: half "
                                   "the memory available at start, shared by the node's ranks")
    feature_norm: str = opt("none", help="none: the paper's projector on raw features; "
                            "standardize: per-dimension z-score with the feature file's "
                            "statistics, stored in the model (a new model only)",
                            choices=("none", "standardize"))
    resume: bool = opt(True, help="resume from OUT/resume if present; --no-resume refuses an "
                       "OUT that holds a run instead of going on with it")
    progress: bool = opt(True, help="show progress bars")

    def __post_init__(self) -> None:
        if self.kind not in ("lm", "vlm"):
            raise ValueError("--kind is required: lm or vlm")
        if self.out is None:
            raise ValueError("--out is required")
        if self.features is None:
            raise ValueError("--features is required: caption samples use its image rows and "
                             "text samples its /black feature (the LM too)")
        if self.kind == "lm" and not self.text:
            raise ValueError("--kind lm needs --text")
        if self.kind == "lm" and self.captions:
            raise ValueError("--captions are for --kind vlm; the LM is trained on text only")
        if self.kind == "vlm" and not self.captions:
            raise ValueError("--kind vlm needs --captions")
        if self.tokenizer is None and self.init_from is None:
            raise ValueError("--tokenizer is required (or --init-from a model holding one)")
        for flag, paths in (("--text", self.text), ("--captions", self.captions),
                            ("--features", [self.features])):
            for p in paths:
                if not Path(p).is_file():
                    raise ValueError(f"{flag}: file not found: {p}")
        for flag in ("batch_size", "grad_accum", "epochs", "seq_len", "checkpoint_unit",
                     "log_every"):
            if getattr(self, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
        if self.init_from is None and self.seq_len > MODEL_PRESETS[self.preset].max_positions:
            raise ValueError(f"--seq-len {self.seq_len} exceeds preset {self.preset}'s "
                             f"{MODEL_PRESETS[self.preset].max_positions} positions")


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------

def checkpoint_schedule(unit: int = 1_000_000) -> list[int]:
    """BabyLM's word counts: every unit to 10, every 10 to 100, every 100 to 1000 units."""
    return ([unit * k for k in range(1, 10)] + [unit * 10 * k for k in range(1, 10)]
            + [unit * 100 * k for k in range(1, 11)])


def words_label(n: int) -> str:
    """1_000_000 -> '1M', 20_000_000 -> '20M', 1_000_000_000 -> '1B', 1500 -> '1500'."""
    for size, suffix in ((10**9, "B"), (10**6, "M"), (10**3, "K")):
        if n % size == 0:
            return f"{n // size}{suffix}"
    return str(n)


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up to ``cfg.lr``, then cosine to ``cfg.lr * cfg.min_lr_ratio``."""
    warmup = min(cfg.warmup_steps, max(total_steps // 10, 1))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(total_steps - warmup, 1))
    low = cfg.lr * cfg.min_lr_ratio
    return low + 0.5 * (cfg.lr - low) * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# Checkpoint / resume component
# ---------------------------------------------------------------------------------------------

def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def save_resume(directory: Path, model, tokenizer, optimizer, state: dict,
                black: torch.Tensor) -> None:
    """Model, optimizer (torch.save of tensors and numbers), RNG and ``state`` (JSON: step, data
    position, counters, config) in one atomic directory swap."""

    def write(tmp: Path) -> None:
        save_black_feature(tmp, black)
        _save_tensors(optimizer.state_dict(), tmp / "optimizer.pt")
        _save_tensors(_rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")

    save_checkpoint(model, directory, tokenizer, write_extra=write)


def _save_tensors(obj, path: Path) -> None:
    """torch.save through memory: written to the file directly, a full disk surfaced as
    "unexpected pos 452736 vs 452624" (measured on a full tmpfs); a plain write of the bytes
    raises OSError ENOSPC, which the CLI turns into "disk full ..., run the same command"."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    path.write_bytes(buffer.getbuffer())


def read_resume_state(directory: Path) -> dict | None:
    path = directory / "state.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def load_resume(directory: Path, optimizer, device: torch.device) -> None:
    """Restore optimizer and RNG saved by :func:`save_resume` (``weights_only`` loads: no
    pickle)."""
    optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location=device,
                                         weights_only=True))
    rng = torch.load(directory / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _check_resumable(cfg: TrainConfig, state: dict, directory: Path) -> None:
    old, new = state["config"], config_to_dict(cfg)
    diff = sorted(k for k in new if k not in RESUME_FREE_FIELDS and old.get(k) != new[k])
    if diff:
        shown = "; ".join(f"--{k.replace('_', '-')}: {old.get(k)!r} -> {new[k]!r}" for k in diff)
        raise TrainError(f"{directory} holds a run with another config ({shown}); resume with the "
                         "same options, or start afresh with a new --out")


def _publish_final(model, tokenizer, out: Path, black: torch.Tensor) -> None:
    """Write the final HF files into ``out`` itself (beside checkpoints/ and metrics), each file
    replaced atomically."""
    tmp = save_checkpoint(model, out / ".final", tokenizer,
                          write_extra=lambda d: save_black_feature(d, black))
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    shutil.rmtree(tmp)


def feature_memory_budget(cfg: TrainConfig) -> int:
    """Bytes of feature rows this process may hold: ``--feature-memory-gb``, or by default half
    of the memory available now, split between the node's ranks (each holds its own copy)."""
    if cfg.feature_memory_gb >= 0:
        return int(cfg.feature_memory_gb * 2**30)
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:  # Linux: MemAvailable counts the reclaimable page cache that "free pages" leaves out
        with open("/proc/meminfo", encoding="ascii") as f:
            available = next(int(line.split()[1]) * 1024 for line in f
                             if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        pass
    return available // 2 // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


# ---------------------------------------------------------------------------------------------
# Model and optimizer
# ---------------------------------------------------------------------------------------------

def build_initial_model(cfg: TrainConfig, tokenizer, feature_dim: int,
                        encoder: str | None = None) -> BabyLlavaForConditionalGeneration:
    """The starting weights: ``--init-from`` or a seeded random init that is the same for the LM
    and the VLM (same seed, tokenizer and feature dimension: one basin for merging).

    ``encoder`` (the feature file's ``encoder`` attribute) is recorded in the config, so the saved
    model can be run on pixels (:func:`babymerge.pixels.load_vlm_with_encoder`)."""
    from babymerge.model import IMAGE_TOKEN

    if cfg.init_from is not None:
        model = read_checkpoint(cfg.init_from)
        # A retrained tokenizer keeps --vocab-size, so the size check alone would let the model
        # go on with every embedding row meaning another token.
        if cfg.tokenizer is not None and (Path(cfg.init_from) / "tokenizer.json").is_file():
            if load_tokenizer(cfg.init_from).get_vocab() != tokenizer.get_vocab():
                raise TrainError(f"--tokenizer {cfg.tokenizer} is another tokenizer than the one "
                                 f"{cfg.init_from} was trained with (their vocabularies differ); "
                                 "drop --tokenizer to use the model's own")
        if cfg.feature_norm != "none" and model.config.feature_norm != cfg.feature_norm:
            raise TrainError(f"--feature-norm {cfg.feature_norm}: {cfg.init_from} was built with "
                             f"feature_norm={model.config.feature_norm}; "
                             "a started model keeps its own")
        freeze_feature_statistics_(model)
    else:
        preset = MODEL_PRESETS[cfg.preset]
        preset = type(preset)(**{**preset.__dict__, "feature_dim": feature_dim})
        model = build_model(preset, seed=cfg.seed, vocab_size=len(tokenizer),
                            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                            pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, feature_norm=cfg.feature_norm,
                            **({"encoder": encoder} if encoder else {}))
        if cfg.feature_norm == "standardize":
            set_feature_statistics(model, *feature_statistics(cfg.features))
    return model


def freeze_feature_statistics_(model: BabyLlavaForConditionalGeneration) -> None:
    """Mark the stored feature statistics (``feature_norm="standardize"``) frozen again.

    ``from_pretrained`` makes every parameter trainable. Left so, a resumed run's optimizer would
    hold two more parameters than the state it saved (which then does not load), and DDP would
    wait for gradients these never get."""
    for name in ("feature_mean", "feature_std"):
        stat = getattr(model.model, name, None)
        if stat is not None:
            stat.requires_grad_(False)


def _check_model(model, cfg: TrainConfig, tokenizer, table: FeatureTable, source: str) -> None:
    dim = model.config.vision_config.hidden_size
    if dim != table.dim:
        raise FeatureFileError(f"feature dimension mismatch: {source} takes {dim}-d features, "
                               f"{table.path} holds {table.dim}-d ones (another encoder?)")
    vocab = model.config.text_config.vocab_size
    if vocab != len(tokenizer):
        raise TrainError(f"vocabulary mismatch: {source} has {vocab} tokens, the tokenizer "
                         f"{cfg.tokenizer or cfg.init_from} {len(tokenizer)}")
    if cfg.seq_len > model.config.text_config.max_position_embeddings:
        raise TrainError(f"--seq-len {cfg.seq_len} exceeds {source}'s "
                         f"{model.config.text_config.max_position_embeddings} positions")


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device
                   ) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (nanoGPT); the fused kernel on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda")


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def train(cfg: TrainConfig) -> Path:
    """Train per ``cfg``; returns ``cfg.out``, the final HF checkpoint directory."""
    # transformers draws a bar per checkpoint write; ours is the one that matters.
    with transformers_bars_off():
        output_folder(cfg.out)
        world = distributed.setup(cfg.device)
        try:
            # one run writes OUT at a time (its main process holds the lock for all ranks)
            with (exclusive(cfg.out / LOCK_FILE, "train", TrainError) if world.is_main
                  else contextlib.nullcontext()):
                return _train(cfg, world)
        finally:
            distributed.teardown(world)


def _train(cfg: TrainConfig, world: distributed.World) -> Path:
    """The run, top-down: set-up, resume, the loop (step, log, word-count checkpoints, resume
    state), the final save."""
    out, resume_dir = cfg.out, cfg.out / RESUME_DIR
    state = _resume_state(cfg, world, resume_dir)
    if state is not None and _already_done(cfg, state, world):
        return out
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.init_from)
    table = _feature_table(cfg)
    sources = _load_sources(cfg, world, tokenizer, table)
    plan = EpochPlan(sources, cfg.batch_size, cfg.epochs, cfg.order,
                     cfg.grad_accum * world.world_size, cfg.seed)
    data = _data_fingerprint(tokenizer, sources)
    _check_same_data(state, data, resume_dir)
    raw, optimizer = _setup_model(cfg, world, tokenizer, table, state, resume_dir)
    model = _wrap_model(raw, cfg, world)
    pos = _Position(**{k: state[k] for k in _Position.__dataclass_fields__}) if state \
        else _Position()
    run_log = _RunLog(cfg, world, out / "metrics.jsonl", pos, plan.total_steps)
    if world.is_main:
        _save_run_config(cfg, world, plan, table, sources)
    step_fn = _Stepper(model, raw, optimizer, cfg, world, sources, table.black)
    schedule = checkpoint_schedule(cfg.checkpoint_unit)
    next_ckpt = sum(1 for w in schedule if w <= pos.words)

    def save_state(epoch: int, k: int, finished: bool = False) -> None:
        save_resume(resume_dir, raw, tokenizer, optimizer, {
            **pos.at(epoch, k), "finished": finished, "world_size": world.world_size,
            "data": data, "config": config_to_dict(cfg)}, table.black)

    stopped = False
    for epoch, k, batches, step_words, step_tokens in _plan_steps(plan, pos):
        lr = lr_at(pos.step, cfg, plan.total_steps)
        micro = plan.step_batches(batches, k, world.rank, world.world_size, cfg.grad_accum)
        try:
            grad_norm = step_fn(micro, lr)
        except NonFiniteStep as e:
            run_log.close()
            raise _non_finite_error(pos.step + 1, e.args[0], resume_dir) from None
        pos.advance(int(step_words[k]), int(step_tokens[k]))
        run_log.bar.update(1)
        last = pos.step == plan.total_steps or (cfg.max_steps and pos.step >= cfg.max_steps)
        if pos.step % cfg.log_every == 0 or last:
            run_log.record(epoch, lr, grad_norm, step_fn)
        crossed = [w for w in schedule[next_ckpt:] if w <= pos.words]
        next_ckpt += len(crossed)
        if world.is_main and crossed:
            _save_word_checkpoint(raw, tokenizer, table.black, out, pos, crossed, run_log)
        stop_now = bool(cfg.max_steps and pos.step >= cfg.max_steps
                        and pos.step != plan.total_steps)
        if world.is_main and (crossed or stop_now or
                              (cfg.save_every and pos.step % cfg.save_every == 0)):
            save_state(*((epoch, k + 1) if k + 1 < plan.steps[epoch] else (epoch + 1, 0)))
        if stop_now:
            stopped = True
            break
    run_log.close()
    if world.is_main and not stopped:
        _publish_final(raw, tokenizer, out, table.black)
        save_state(plan.epochs, 0, finished=True)
    distributed.barrier(world)
    return out


def _non_finite_error(step: int, norm: float, resume_dir: Path) -> TrainError:
    saved = read_resume_state(resume_dir)
    kept = (f"the last saved state is kept: {resume_dir} (step {saved['step']})" if saved
            else "no state was saved yet")
    return TrainError(f"step {step}: the loss or its gradients are NaN or infinite (gradient "
                      f"norm {norm}); stopped before the optimizer step, no weight changed; "
                      f"{kept}; lower --lr or fix the data, then run the same command")


# --- set-up and resume ------------------------------------------------------------------------

def _resume_state(cfg: TrainConfig, world: distributed.World, resume_dir: Path) -> dict | None:
    """The saved state to resume from (None for a fresh run), checked against this run's config
    and process count."""
    if recover_checkpoint(resume_dir):
        warnings.warn(f"{resume_dir}: the previous run was stopped while saving it; resuming from "
                      "the state saved before that")
    state = read_resume_state(resume_dir)
    if state is None:
        return None
    if not cfg.resume:
        raise TrainError(f"{cfg.out} already holds a run; use a new --out, or drop --no-resume")
    _check_resumable(cfg, state, resume_dir)
    if state["world_size"] != world.world_size:
        raise TrainError(f"{resume_dir} was saved by {state['world_size']} process(es); "
                         f"resume it with the same number (now {world.world_size}): the "
                         "data position counts global batches per step")
    return state


def _already_done(cfg: TrainConfig, state: dict, world: distributed.World) -> bool:
    if not (state["finished"] or (cfg.max_steps and state["step"] >= cfg.max_steps)):
        return False
    if world.is_main:
        print(f"{cfg.out}: already at step {state['step']} "
              f"({'finished' if state['finished'] else '--max-steps'}); nothing to do")
    return True


def _feature_table(cfg: TrainConfig) -> FeatureTable:
    budget = feature_memory_budget(cfg)
    table = FeatureTable(cfg.features, load_features=cfg.kind == "vlm", max_memory_bytes=budget)
    if not table.in_memory:
        log.warning("%s: %d x %d features exceed the %.2f GB in-memory budget "
                    "(--feature-memory-gb); each batch's rows are read from the file",
                    cfg.features, len(table), table.dim, budget / 2**30)
    return table


def _load_sources(cfg: TrainConfig, world: distributed.World, tokenizer,
                  table: FeatureTable) -> dict:
    """The tokenised text and captions. The first rank on each node tokenises into the cache,
    the others then read it."""
    if world.local_rank != 0:
        distributed.barrier(world)
    progress = cfg.progress and world.local_rank == 0
    sources = {}
    if cfg.text:
        sources[TEXT] = load_text(cfg.text, tokenizer, cfg.cache_dir, cfg.seq_len, progress)
    if cfg.captions:
        sources[CAPTIONS] = load_captions(cfg.captions, tokenizer, cfg.cache_dir, cfg.seq_len,
                                          table, progress)
    if world.local_rank == 0:
        distributed.barrier(world)
    if cfg.epochs > BABYLM_MAX_EPOCHS:
        warnings.warn(f"--epochs {cfg.epochs}: the BabyLM rules allow at most "
                      f"{BABYLM_MAX_EPOCHS} epochs over the data", stacklevel=3)
    return sources


def _data_fingerprint(tokenizer, sources: dict) -> dict:
    """What the saved data position indexes. An edited corpus, a feature file holding more (or
    fewer) of the captions' images, or another tokenizer makes another plan, and a resumed run
    would go on at the same step of other batches."""
    data = {"tokenizer": tokenizer_fingerprint(tokenizer)}
    if TEXT in sources:
        data.update(text_sequences=len(sources[TEXT]), text_tokens=int(sources[TEXT].starts[-1]))
    if CAPTIONS in sources:
        data.update(captions=len(sources[CAPTIONS]),
                    caption_tokens=int(sources[CAPTIONS].sizes.sum()))
    return data


def _check_same_data(state: dict | None, data: dict, resume_dir: Path) -> None:
    """Refuse to resume on other data (a state saved without a fingerprint is not checked)."""
    if state is None or state.get("data", data) == data:
        return
    changed = "; ".join(f"{k}: {state['data'].get(k)} -> {data.get(k)}"
                        for k in sorted(set(data) | set(state["data"]))
                        if state["data"].get(k) != data.get(k))
    raise TrainError(f"{resume_dir}: the training data changed since the run was saved "
                     f"({changed}); the saved position would point into other batches. "
                     "Restore the data, or start afresh with a new --out")


def _setup_model(cfg: TrainConfig, world: distributed.World, tokenizer, table: FeatureTable,
                 state: dict | None, resume_dir: Path):
    """(model, optimizer) on the device: resumed, ``--init-from``, or the shared seeded init."""
    if state is not None:
        raw = read_checkpoint(resume_dir)
        freeze_feature_statistics_(raw)
        source = str(resume_dir)
    else:
        raw = build_initial_model(cfg, tokenizer, table.dim, table.attrs.get("encoder"))
        source = str(cfg.init_from) if cfg.init_from else f"preset {cfg.preset}"
    _check_model(raw, cfg, tokenizer, table, source)
    raw.to(world.device).train()
    optimizer = make_optimizer(raw, cfg, world.device)
    if state is not None:
        load_resume(resume_dir, optimizer, world.device)
    return raw, optimizer


def _wrap_model(raw: torch.nn.Module, cfg: TrainConfig, world: distributed.World):
    """``--compile`` and, across processes, DDP around the model the optimizer holds."""
    model = torch.compile(raw) if cfg.compile else raw
    if world.distributed:
        device = world.device
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def _save_run_config(cfg: TrainConfig, world: distributed.World, plan: EpochPlan,
                     table: FeatureTable, sources: dict) -> None:
    captions = sources.get(CAPTIONS)
    save_config(cfg, cfg.out / "train_config.json", world_size=world.world_size,
                total_steps=plan.total_steps, epochs_planned=plan.epochs,
                features_in_memory=table.in_memory,
                samples={"text_sequences": len(sources.get(TEXT, ())),
                         "captions": len(sources.get(CAPTIONS, ())),
                         # by reason; the warning says it once, this keeps it with the run
                         "captions_skipped": dict(captions.skipped) if captions else {},
                         "captions_truncated": captions.truncated if captions else {}})


# --- the loop's parts -------------------------------------------------------------------------

@dataclass
class _Position:
    """Where the run is: optimizer steps, the data position, and what it has seen."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    words: int = 0
    tokens: int = 0

    def advance(self, words: int, tokens: int) -> None:
        self.step += 1
        self.words += words
        self.tokens += tokens

    def at(self, epoch: int, k: int) -> dict:
        """The resume state's position: counters now, data position (epoch, step k) next."""
        return {"step": self.step, "epoch": epoch, "step_in_epoch": k, "words": self.words,
                "tokens": self.tokens}


def _plan_steps(plan: EpochPlan, pos: _Position):
    """(epoch, step in epoch, the epoch's batches, words and tokens per step) from ``pos`` on."""
    for epoch in range(pos.epoch, plan.epochs):
        batches = plan.batches(epoch)
        step_words, step_tokens = plan.step_counts(batches)
        first = pos.step_in_epoch if epoch == pos.epoch else 0
        for k in range(first, plan.steps[epoch]):
            yield epoch, k, batches, step_words, step_tokens


class _Stepper:
    """One optimizer step over a step's micro-batches (gradient accumulation, DDP's no_sync, bf16
    autocast on CUDA, clipping); keeps the loss and data-loading time since the last log."""

    def __init__(self, model, raw, optimizer, cfg: TrainConfig, world: distributed.World,
                 sources: dict, black: torch.Tensor):
        self.model, self.raw, self.optimizer, self.cfg, self.world = (model, raw, optimizer, cfg,
                                                                      world)
        self.sources, self.device = sources, world.device
        self.black = black.to(device=world.device, dtype=torch.float32)
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto"
                                               and world.device.type == "cuda")
        self.autocast = (torch.autocast(world.device.type, dtype=torch.bfloat16) if use_bf16
                         else contextlib.nullcontext())
        self.data_s, self.loss_sum, self.loss_n = 0.0, 0.0, 0

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def __call__(self, micro: list, lr: float) -> torch.Tensor | None:
        """Run the step at learning rate ``lr``; returns the gradient norm before clipping."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accum = len(micro)
        for a, (src, index) in enumerate(micro):
            t0 = time.perf_counter()
            batch = self.sources[src].batch(index)
            ids, labels = self._to_device(batch["input_ids"]), self._to_device(batch["labels"])
            feats = (self._to_device(batch["features"]) if src == CAPTIONS
                     else self.black.expand(len(index), -1))
            self.data_s += time.perf_counter() - t0
            # Right padding + causal attention: a real token never attends to the pads after it,
            # so no attention mask is needed (and SDPA keeps its causal fast path).
            sync = (self.model.no_sync() if self.world.distributed and a < accum - 1
                    else contextlib.nullcontext())
            with sync, self.autocast:
                loss = self.model(input_ids=ids, pixel_values=feats, labels=labels,
                                  use_cache=False).loss
            (loss / accum).backward()
            self.loss_sum += loss.detach().float()
            self.loss_n += 1
        # the norm over all gradients (DDP has averaged them, so every rank sees the same): a NaN
        # or infinite loss makes it non-finite, and the step stops before any weight changes
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.raw.parameters(), self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf)
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteStep(float(grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm if self.cfg.grad_clip > 0 else None

    def take_loss_and_data_time(self) -> tuple[torch.Tensor, float]:
        """Mean loss and data seconds since the last call; both restart from zero."""
        mean = torch.as_tensor(self.loss_sum / max(self.loss_n, 1), device=self.device)
        data_s = self.data_s
        self.data_s, self.loss_sum, self.loss_n = 0.0, 0.0, 0
        return mean, data_s


class _RunLog:
    """``metrics.jsonl`` (main process) and the progress bar, with the throughput since the last
    record. A resumed run first drops the records past its saved step."""

    def __init__(self, cfg: TrainConfig, world: distributed.World, path: Path, pos: _Position,
                 total_steps: int):
        self.world, self.pos = world, pos
        self.file = None
        if world.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            _truncate_metrics(path, pos.step)
            self.file = open(path, "a", encoding="utf-8")
        self.bar = tqdm(total=total_steps, initial=pos.step, unit="step", dynamic_ncols=True,
                        disable=not (cfg.progress and world.is_main), desc=f"train {cfg.kind}")
        self.since = (time.perf_counter(), pos.tokens, pos.step)

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def record(self, epoch: int, lr: float, grad_norm: torch.Tensor | None,
               stepper: _Stepper) -> None:
        """A metrics record for the steps since the last one (loss averaged over ranks)."""
        pos = self.pos
        loss, data_s = stepper.take_loss_and_data_time()
        mean_loss = distributed.mean_over_ranks(loss, self.world).item()
        now = time.perf_counter()
        then, tokens_then, step_then = self.since
        tok_s = (pos.tokens - tokens_then) / max(now - then, 1e-9)
        self.write({"step": pos.step, "epoch": epoch, "loss": round(mean_loss, 5), "lr": lr,
                    "words": pos.words, "tokens": pos.tokens, "tokens_per_s": round(tok_s, 1),
                    "grad_norm": None if grad_norm is None else round(float(grad_norm), 4),
                    "data_ms_per_step": round(1000 * data_s / (pos.step - step_then), 3)})
        self.bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{tok_s:,.0f}")
        self.since = (now, pos.tokens, pos.step)

    def close(self) -> None:
        self.bar.close()
        if self.file:
            self.file.close()


def _save_word_checkpoint(raw, tokenizer, black: torch.Tensor, out: Path, pos: _Position,
                          crossed: list[int], run_log: _RunLog) -> None:
    """``checkpoints/words_<n>/`` for the BabyLM word counts this step crossed. One step can pass
    several counts only on tiny data; the checkpoint is named by the largest, and the record
    lists them all."""
    name = f"words_{words_label(crossed[-1])}"
    save_checkpoint(raw, out / CHECKPOINTS_DIR / name, tokenizer, extra_files={
        "train_state.json": json.dumps({"step": pos.step, "words": pos.words,
                                        "tokens": pos.tokens}) + "\n"},
        write_extra=lambda d: save_black_feature(d, black))
    run_log.write({"event": "checkpoint", "name": name, "step": pos.step, "words": pos.words,
                   "counts": [words_label(w) for w in crossed]})


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records past ``step`` (written after the resume state by a run that was killed), and
    a torn record (a process or node that died mid-write leaves a partial line or NUL bytes)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if line.strip():
                log.warning("%s: dropped a torn record: %.80r", path, line)
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))
