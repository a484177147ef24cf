"""BabyLLaVA: the paper's model, one architecture for the text-only LM and the VLM.

A ``LlavaForConditionalGeneration`` whose vision tower is replaced by a cached feature: the image
is ONE token whose embedding is ``projector(feature)``, the feature being DINOv2's
``hidden_states[-2]`` mean-pooled over patch tokens (stage 1). Attention, the decoder and
generation are transformers' own Llama code; only the image path is ours. Text-only inputs carry
the black image's feature.

Checkpoints are HF directories (``model_type: babyllava``); ``import babymerge`` registers the
classes with the ``Auto*`` factories so ``AutoModelForImageTextToText.from_pretrained(dir)`` works,
and every checkpoint folder carries a self-contained copy of the model code
(:mod:`babymerge.modeling_babyllava`) for tools without babymerge; ``babymerge export``
(:mod:`babymerge.export`) writes the language part as a plain ``LlamaForCausalLM`` directory.
"""

from __future__ import annotations

import contextlib
import glob
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal
from pathlib import Path

import torch
from huggingface_hub.dataclasses import strict
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText,
                          LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          LlavaModel)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from babymerge import kernels
from babymerge.config import InputError, plain_modes

IMAGE_TOKEN = "<image>"
# The /black feature a model was trained with (text-only inputs carry it), saved in its checkpoint
# so text-only scoring needs no feature file.
BLACK_FEATURE_FILE = "black_feature.safetensors"

# The self-contained modeling file written into every BabyLLaVA checkpoint, and the auto_map that
# points transformers at it: the folder then loads with trust_remote_code=True and no babymerge.
MODELING_FILE = Path(__file__).with_name("modeling_babyllava.py")
AUTO_MAP = {"AutoConfig": "modeling_babyllava.BabyLlavaConfig",
            "AutoModel": "modeling_babyllava.BabyLlavaModel",
            "AutoModelForCausalLM": "modeling_babyllava.BabyLlavaForConditionalGeneration",
            "AutoModelForImageTextToText": "modeling_babyllava.BabyLlavaForConditionalGeneration"}


@dataclass
class ModelConfig:
    """Decoder sizes. Defaults are the paper's: 6 Llama layers, hidden 768, 30k vocabulary."""

    num_layers: int = 6
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_heads: int = 12
    max_positions: int = 1024
    feature_dim: int = 1024  # DINOv2-large hidden size; the projector's input


MODEL_PRESETS: dict[str, ModelConfig] = {
    "paper": ModelConfig(),
    "small": ModelConfig(num_layers=4, hidden_size=256, intermediate_size=1024, num_heads=4,
                         max_positions=512),
    "tiny": ModelConfig(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4,
                        max_positions=256),
}


# The encoder whose pooled feature the paper's projector reads.
DINOV2_LARGE = {"model_type": "dinov2", "hidden_size": 1024, "num_hidden_layers": 24,
                "num_attention_heads": 16, "intermediate_size": 4096, "patch_size": 14}


@strict
class BabyLlavaConfig(LlavaConfig):
    """LlavaConfig with one image token and a pooled-feature input.

    ``vision_config`` describes the encoder whose pooled feature the projector reads (its
    ``hidden_size`` is the feature dimension); no vision weights live in the checkpoint.
    """

    model_type = "babyllava"
    image_seq_length: int = 1
    encoder: str = "facebook/dinov2-large"
    pooling: str = "mean_patch"
    # "none" is the paper's projector on raw features. "standardize" first maps each feature
    # dimension to zero mean and unit variance with statistics of the training feature file,
    # stored as frozen tensors (model.feature_mean, model.feature_std): pooled features of a
    # randomly initialised encoder share one large offset (norm ~70 against variations of ~1),
    # and a projector trained on them learns to ignore the image (see babymerge/demo.py).
    feature_norm: Literal["none", "standardize"] = "none"

    def __post_init__(self, **kwargs):
        # The vision sub-config defaults to DINOv2-large, not Llava's CLIP. Filled in here rather
        # than through transformers' newer `sub_configs_defaults`, so that transformers 5.x
        # releases before it (5.17 ships on the GPU machines) load the same config.
        if self.vision_config is None:
            self.vision_config = dict(DINOV2_LARGE)
        elif isinstance(self.vision_config, dict) and "model_type" not in self.vision_config:
            self.vision_config = {**self.vision_config, "model_type": "dinov2"}
        if isinstance(self.text_config, dict) and "model_type" not in self.text_config:
            self.text_config = {**self.text_config, "model_type": "llama"}
        super().__post_init__(**kwargs)


class BabyLlavaModel(LlavaModel):
    config_class = BabyLlavaConfig

    def __init__(self, config: BabyLlavaConfig):
        # LlavaModel.__init__ would build a vision tower; the feature is cached, so skip it.
        super(LlavaModel, self).__init__(config)
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        if config.feature_norm == "standardize":
            dim = config.vision_config.hidden_size
            # Parameters (frozen), not buffers, so that merging interpolates them like every
            # other tensor; two models trained on one feature file hold equal values.
            self.feature_mean = torch.nn.Parameter(torch.zeros(dim), requires_grad=False)
            self.feature_std = torch.nn.Parameter(torch.ones(dim), requires_grad=False)
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs
                           ) -> BaseModelOutputWithPooling:
        """``pixel_values`` is the pooled feature, shape (B, D): one image token per image."""
        if pixel_values.dim() != 2:
            raise ValueError("BabyLLaVA takes pooled image features of shape (batch, feature_dim); "
                             f"got {tuple(pixel_values.shape)}. Encode pixels with "
                             "babymerge.features first.")
        proj = self.multi_modal_projector
        if self.config.feature_norm == "standardize":
            # detached: from_pretrained makes every parameter trainable again, these must not be
            pixel_values = ((pixel_values.float() - self.feature_mean.detach())
                            / self.feature_std.detach())
        x = pixel_values.to(proj.linear_1.weight.dtype)
        out = kernels.project(x, proj.linear_1.weight, proj.linear_1.bias, proj.linear_2.weight,
                              proj.linear_2.bias)
        return BaseModelOutputWithPooling(pooler_output=list(out.unsqueeze(1)))


class BabyLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    config_class = BabyLlavaConfig

    def __init__(self, config: BabyLlavaConfig):
        super(LlavaForConditionalGeneration, self).__init__(config)
        self.model = BabyLlavaModel(config)
        self.lm_head = torch.nn.Linear(config.text_config.hidden_size,
                                       config.text_config.vocab_size, bias=False)
        self.post_init()

    def should_save_on_this_rank(self, is_main_process: bool) -> bool:
        """Whoever calls save_pretrained writes. transformers (5.25) writes only on rank 0 of an
        initialised process group: each rank of a torchrun merge keeps its own points, and a
        rank's kept checkpoint lost its weights and config.json without a word."""
        return is_main_process


def register_with_auto_classes() -> None:
    """Let ``Auto*.from_pretrained`` load ``babyllava`` directories (idempotent)."""
    try:
        AutoConfig.register("babyllava", BabyLlavaConfig)
    except ValueError:
        return  # already registered
    AutoModel.register(BabyLlavaConfig, BabyLlavaModel)
    AutoModelForImageTextToText.register(BabyLlavaConfig, BabyLlavaForConditionalGeneration)
    AutoModelForCausalLM.register(BabyLlavaConfig, BabyLlavaForConditionalGeneration)


register_with_auto_classes()


def encoder_name(name: str) -> str:
    """How a checkpoint's config names its encoder, the same on every machine: a hub id as it is;
    a hub cache snapshot (``.../models--facebook--dinov2-large/snapshots/<commit>``) as the hub id
    it caches; any other local folder by its folder name only (give the folder itself where it is
    needed: ``load_vlm_with_encoder(..., encoder=PATH)``)."""
    parts = str(name).rstrip("/").split("/")
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].removeprefix("models--").replace("--", "/")
    if len(parts) == 2 and not Path(name).is_absolute() and not Path(name).exists():
        return str(name)  # org/name: a hub id
    return parts[-1]


def build_config(model: ModelConfig, *, vocab_size: int, image_token_id: int, pad_token_id: int,
                 bos_token_id: int, eos_token_id: int, encoder: str = "facebook/dinov2-large",
                 feature_norm: str = "none"
                 ) -> BabyLlavaConfig:
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=model.hidden_size,
                       intermediate_size=model.intermediate_size,
                       num_hidden_layers=model.num_layers, num_attention_heads=model.num_heads,
                       num_key_value_heads=model.num_heads,
                       max_position_embeddings=model.max_positions, pad_token_id=pad_token_id,
                       bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                       tie_word_embeddings=False)
    return BabyLlavaConfig(text_config=text, vision_config={"model_type": "dinov2",
                                                            "hidden_size": model.feature_dim},
                           image_token_index=image_token_id, encoder=encoder_name(encoder),
                           feature_norm=feature_norm,
                           pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                           eos_token_id=eos_token_id)


def set_feature_statistics(model: BabyLlavaForConditionalGeneration, mean: torch.Tensor,
                           std: torch.Tensor) -> None:
    """Store the training features' per-dimension mean and std (``feature_norm="standardize"``)."""
    inner = model.model
    if model.config.feature_norm != "standardize":
        raise ValueError("set_feature_statistics needs a model built with "
                         "feature_norm='standardize'")
    with torch.no_grad():
        inner.feature_mean.copy_(mean)
        # a constant dimension would divide by zero; it carries no information anyway
        inner.feature_std.copy_(std.clamp_min(1e-6))


def build_model(model: ModelConfig, *, seed: int,
                **config_kwargs) -> BabyLlavaForConditionalGeneration:
    """A randomly initialised BabyLLaVA (``config_kwargs`` go to :func:`build_config`); the same
    seed gives the same weights (one basin)."""
    cfg = build_config(model, **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BabyLlavaForConditionalGeneration(cfg)


# Parameters kept float32 in a model loaded (or merged) in bfloat16/float16: the feature
# statistics of feature_norm="standardize". Every feature is standardised with them; rounded to
# bf16, the means of the demo encoder's features (|mean| ~7.5 against standard deviations of
# ~1.3; base world, 2026-11-27) move by up to 3% of a standard deviation (median 0.6%), the same
# shift in every image, which the model was not trained with.
FLOAT32_PARAMETERS = ("feature_mean", "feature_std")


def parameter_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype parameter ``name`` has in a model loaded in ``dtype``."""
    return torch.float32 if name.rsplit(".", 1)[-1] in FLOAT32_PARAMETERS else dtype


@contextlib.contextmanager
def transformers_bars_off() -> Iterator[None]:
    """transformers' own progress bars (loading and writing checkpoints) hidden for the block,
    then restored as they were: a stage's one bar is the one that says anything, and
    ``--no-progress`` must leave none. Also a decorator (``@transformers_bars_off()``)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


@transformers_bars_off()
def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> BabyLlavaForConditionalGeneration:
    """Load a BabyLLaVA checkpoint directory (safetensors only) in ``dtype``, bar
    :data:`FLOAT32_PARAMETERS`. Loaded in float32 (lossless from any stored dtype) and cast
    here, not by from_pretrained, whose keep-in-fp32 options differ between transformers
    releases."""
    model = read_checkpoint(path)
    for name, param in model.named_parameters():
        param.data = param.data.to(parameter_dtype(name, dtype))
    return model.to(device).eval()


class CheckpointError(InputError):
    """A checkpoint folder that cannot be loaded; the message names the folder and the file."""


def read_checkpoint(path: str | Path) -> BabyLlavaForConditionalGeneration:
    """A checkpoint folder's model in float32, trainable as from_pretrained leaves it
    (safetensors only: a pickle is never loaded); its failures are one line naming the folder and
    what is wrong, and non-finite weights are refused."""
    from safetensors import SafetensorError

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a checkpoint folder (no config.json)")
    if not any((path / n).is_file() for n in ("model.safetensors",
                                               "model.safetensors.index.json")):
        pickled = [n for n in ("pytorch_model.bin", "model.bin") if (path / n).is_file()]
        raise CheckpointError(f"{path}: no model.safetensors" + (
            f" (only {pickled[0]}: babymerge never loads pickle files; convert it with "
            "safetensors' save_file)" if pickled else ""))
    try:
        model = BabyLlavaForConditionalGeneration.from_pretrained(str(path), use_safetensors=True,
                                                                  dtype=torch.float32)
    except SafetensorError as e:
        raise CheckpointError(f"{path}: model.safetensors is not readable ({e}): truncated or "
                              "damaged; write it again") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot load ({e})") from None
    check_finite(model.named_parameters(), path)
    return model


class NonFiniteError(InputError):
    """A NaN or infinity where a number is needed; the message names the file and tensor."""


def check_finite(named: Iterable[tuple[str, torch.Tensor]], where: str | Path) -> None:
    """Refuse tensors holding a NaN or infinity: every score computed from them would be
    garbage (an accuracy of 0.0 reported as a result; a merge where 0 x NaN is NaN at every
    alpha).

    A tensor's float32 sum is finite when all its values are, so one sum per tensor clears it
    (14 ms per 100M parameters on 2 CPU cores, against 206 ms for ``isfinite().all()``); only a
    tensor whose sum is not finite (a NaN, an infinity, or finite values summing past float32's
    range) is checked element by element, so the answer is exact."""
    bad = [name for name, t in named if t.is_floating_point()
           and not torch.isfinite(t.sum(dtype=torch.float32))
           and not torch.isfinite(t).all()]
    if bad:
        shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise NonFiniteError(f"{where}: {len(bad)} tensor(s) hold NaN or infinite values: "
                             f"{shown}")


def recover_checkpoint(directory: str | Path) -> bool:
    """Undo a :func:`save_checkpoint` swap cut short between its two renames (the old directory
    moved aside, the new one not yet in place): the old one goes back. True if it did. Without
    this a kill in that instant left no ``directory`` at all, and a run looking for its resume
    state there started over."""
    directory = Path(directory)
    old = directory.with_name(f".{directory.name}.old")
    if directory.exists() or not old.is_dir():
        return False
    try:
        old.rename(directory)
    except FileNotFoundError:  # another rank of the same run restored it first
        return False
    return True


# Every folder save_checkpoint writes holds this file: a folder it may replace. A folder without
# it may be replaced only if it holds nothing but checkpoint files (written before the marker).
OWNED_MARKER = ".babymerge"
CHECKPOINT_FILES = re.compile(
    r"config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|"
    r"model\.safetensors\.index\.json|tokenizer(_config)?\.json|special_tokens_map\.json|"
    r"chat_template\.(jinja|json)|(modeling|processing)_babyllava\.py|processor_config\.json|"
    r"preprocessor_config\.json|black_feature\.safetensors|merge\.json|train_state\.json|"
    r"optimizer\.pt|rng\.pt|state\.json|babymerge_export\.json")


class OutputError(InputError):
    """A destination babymerge will not write: it would replace what it did not write."""


def check_replaceable(directory: Path, flag: str = "--out") -> None:
    """Refuse to replace ``directory`` unless babymerge wrote it: a file, or a folder holding
    anything but what save_checkpoint writes, is the user's (export --out on an existing file
    deleted it; on a folder of theirs, every file in it)."""
    if not directory.exists() and not directory.is_symlink():
        return
    if not directory.is_dir() or directory.is_symlink():
        raise OutputError(f"{flag} {directory}: exists and is not a folder babymerge wrote; "
                          "nothing replaced: give another path, or remove it first")
    if (directory / OWNED_MARKER).is_file():
        return
    foreign = sorted(p.name for p in directory.iterdir() if not CHECKPOINT_FILES.fullmatch(p.name))
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise OutputError(f"{flag} {directory}: holds files babymerge did not write ({shown}); "
                          "nothing replaced: give another path, or remove it first")


@transformers_bars_off()
def save_checkpoint(model: torch.nn.Module, directory: str | Path, tokenizer=None,
                    extra_files: dict[str, str] | None = None,
                    write_extra: Callable[[Path], None] | None = None,
                    flag: str = "--out") -> Path:
    """Write an HF directory atomically: a crash leaves the old directory or the complete new one.
    An existing ``directory`` is replaced only if babymerge wrote it (:func:`check_replaceable`;
    ``flag`` names the option that chose it in the error).

    ``write_extra(tmp_dir)`` may add more files (e.g. optimizer state) inside the same atomic swap.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover_checkpoint(directory)
    check_replaceable(directory, flag)
    for stale in directory.parent.glob(f".{glob.escape(directory.name)}.*"):
        # the temporary folder of a save killed midway (its own cleanup never ran); a moved-aside
        # old directory is only left beside a complete new one once recovered above
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        if getattr(getattr(model, "config", None), "model_type", None) == "babyllava":
            model.config.auto_map = dict(AUTO_MAP)
            shutil.copyfile(MODELING_FILE, tmp / MODELING_FILE.name)
        model.save_pretrained(tmp, safe_serialization=True)
        if not (tmp / "config.json").is_file() or not (
                (tmp / "model.safetensors").is_file()
                or (tmp / "model.safetensors.index.json").is_file()):
            raise RuntimeError(f"save_pretrained wrote no weights or config for {directory} "
                               "(transformers saves on rank 0 only where a process group "
                               "exists); nothing was replaced")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        if write_extra is not None:
            write_extra(tmp)
        (tmp / OWNED_MARKER).write_text("written by babymerge; it may replace this folder\n",
                                        encoding="utf-8")
        plain_modes(tmp)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def save_black_feature(directory: str | Path, feature: torch.Tensor) -> None:
    """Write the ``/black`` feature (D,) into a checkpoint directory, as float32 safetensors (the
    feature file's fp16 values convert exactly)."""
    from safetensors.torch import save_file

    save_file({"black": feature.detach().to("cpu", torch.float32).contiguous()},
              str(Path(directory) / BLACK_FEATURE_FILE))


def load_black_feature(directory: str | Path) -> torch.Tensor | None:
    """The ``/black`` feature (D,) float32 saved in a checkpoint by ``babymerge train``; None for a
    checkpoint without one (made before it was saved, or by other tools)."""
    from safetensors.torch import load_file

    path = Path(directory) / BLACK_FEATURE_FILE
    if not path.is_file():
        return None
    black = load_file(str(path))
    check_finite(black.items(), path)
    return black["black"]


def image_prefix_ids(tokenizer) -> list[int]:
    """Token ids that start every sequence: BOS then the one image token (the paper's
    ``"<image> " + sentence``)."""
    return [tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)]
