"""``babymerge export``: a checkpoint's language part as a plain ``LlamaForCausalLM`` directory.

For tools that know only transformers' own classes (the BabyLM evaluation pipeline among them):
any checkpoint babymerge writes (``run/lm``, ``run/vlm``, its word-count checkpoints, a kept
``alpha_<a>/``) becomes a directory that ``LlamaForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load, in transformers 4.x and 5.x. The models were trained on
``[BOS, <image>] + text`` with the black image's feature in the image slot; the export writes that
feature's projection into the ``<image>`` embedding row, and its tokenizer puts ``[BOS, <image>]``
before every text, so a tool that calls ``tokenizer(text)`` scores text-only tasks exactly as
``babymerge eval`` does.

Export after merging, not before: the ``<image>`` row is the projector's output for the black
feature, and the projector is not linear, so the merge of two exports is not the export of their
merge.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from babymerge.config import InputError, arg, atomic_write_text, opt
from babymerge.model import (BLACK_FEATURE_FILE, IMAGE_TOKEN, BabyLlavaForConditionalGeneration,
                             check_replaceable, image_prefix_ids, load_black_feature, load_model,
                             save_checkpoint, transformers_bars_off)
from babymerge.tokenizer import TokenizerError, load_tokenizer, save_image_prefixed_tokenizer

EXPORT_NOTE_FILE = "babymerge_export.json"


@dataclass
class ExportConfig:
    """``babymerge export CHECKPOINT --out DIR``."""

    checkpoint: Path = arg(help="BabyLLaVA checkpoint directory written by train or merge")
    out: Path = opt(Path("run/export"), "output folder: a LlamaForCausalLM directory with the "
                    "tokenizer (every text starts [BOS, <image>]) and "
                    f"{EXPORT_NOTE_FILE}; export after merging (merging exports is not "
                    "exporting a merge: the <image> row is the projected black feature)")
    submission: bool = opt(False, "write instead a multimodal submission folder: the BabyLLaVA "
                           "with its DINOv2 encoder and black feature inside, its own modeling "
                           "and processor files (AutoModelForCausalLM / AutoProcessor with "
                           "trust_remote_code, no babymerge needed), pixels in")
    encoder: str | None = opt(None, "--submission: the encoder (hub id or folder) the checkpoint's "
                              "features came from (default: the one its config names)")


class ExportError(InputError):
    """A checkpoint that cannot be exported; the message names the file."""


def export(cfg: ExportConfig) -> Path:
    """Write ``cfg.out`` (a plain Llama, or with ``--submission`` the multimodal folder)."""
    check_replaceable(cfg.out)  # before any work: --out must be new, or an earlier export
    if not (cfg.checkpoint / "config.json").is_file():
        raise ExportError(f"{cfg.checkpoint}: not a checkpoint directory (no config.json)")
    black = load_black_feature(cfg.checkpoint)
    if black is None:
        raise ExportError(f"{cfg.checkpoint}: no {BLACK_FEATURE_FILE}, so the <image> token's "
                          "embedding for text-only input is unknown (babymerge train and merge "
                          "write it beside every checkpoint)")
    try:
        tokenizer = load_tokenizer(cfg.checkpoint)
    except TokenizerError as e:
        raise ExportError(f"{cfg.checkpoint}: {e}") from e
    model = load_model(cfg.checkpoint)
    if cfg.submission:
        return export_submission(model, cfg.out, tokenizer, black,
                                 cfg.encoder or model.config.encoder)
    try:
        out = export_language_model(model, cfg.out, tokenizer, black_feature=black)
    except ValueError as e:  # a checkpoint export_language_model cannot write (tied LM head)
        raise ExportError(f"{cfg.checkpoint}: {e}") from e
    note = {"source": str(cfg.checkpoint.resolve()),
            "prefix_ids": image_prefix_ids(tokenizer),
            "prefix": f"{tokenizer.bos_token} {IMAGE_TOKEN}",
            "why": "the model was trained with every sequence starting [BOS, <image>], the image "
                   "slot holding the black image's feature; the <image> embedding row holds that "
                   "feature's projection, and the tokenizer adds these ids before every text "
                   "(tokenizer(text, add_special_tokens=False) leaves them out)"}
    atomic_write_text(out / EXPORT_NOTE_FILE, json.dumps(note, indent=1) + "\n")
    return out


def export_language_model(model: BabyLlavaForConditionalGeneration, directory: str | Path,
                          tokenizer, black_feature: torch.Tensor) -> Path:
    """The decoder + LM head as a plain ``LlamaForCausalLM`` directory (no image path), with the
    image-prefixed tokenizer (:func:`babymerge.tokenizer.save_image_prefixed_tokenizer`).

    The ``<image>`` token's embedding row becomes what the model puts there for text-only input,
    the projected ``black_feature`` (the checkpoint's own ``/black``), so ``[BOS, <image>] + text``
    scores in the export exactly as text-only input does in the model. (The checkpoint's own row
    is never used in training: the projector's output replaces it at every step.)
    """
    lm = LlamaForCausalLM(model.config.text_config)
    lm.model.load_state_dict(model.model.language_model.state_dict())
    lm.lm_head.load_state_dict(model.lm_head.state_dict())
    if model.config.text_config.tie_word_embeddings:
        raise ValueError("export: this checkpoint ties its LM head to the embeddings, so the "
                         "<image> row cannot take the black feature without changing the head")
    with torch.no_grad():
        inner = model.model
        feature = black_feature.reshape(1, -1).to(inner.multi_modal_projector.linear_1.weight)
        row = inner.get_image_features(feature).pooler_output[0].reshape(-1)
        # the LM head is its own matrix (tie_word_embeddings=False): only the input row moves
        lm.model.embed_tokens.weight[model.config.image_token_index] = row.to(
            lm.model.embed_tokens.weight.dtype)
    return save_checkpoint(lm, directory,
                           write_extra=lambda d: save_image_prefixed_tokenizer(tokenizer, d))


PROCESSING_FILE = Path(__file__).with_name("processing_babyllava.py")


def export_submission(model: BabyLlavaForConditionalGeneration, directory: str | Path, tokenizer,
                      black_feature: torch.Tensor, encoder: str) -> Path:
    """A self-contained multimodal folder (:mod:`babymerge.modeling_babyllava` with
    ``vision_tower``): the model's weights, the encoder's, the black feature, the image-prefixed
    tokenizer, the encoder's image processor and :mod:`babymerge.processing_babyllava`."""
    from transformers import AutoConfig, AutoModel
    from transformers.utils import cached_file

    from babymerge import modeling_babyllava as portable

    try:
        with transformers_bars_off():
            encoder_config = AutoConfig.from_pretrained(encoder)
            encoder_model = AutoModel.from_pretrained(encoder, dtype=torch.float32)
            processor_file = cached_file(encoder, "preprocessor_config.json")
    except OSError as e:
        raise ExportError(f"--encoder {encoder}: cannot load it ({e}); pass the encoder the "
                          "checkpoint's features came from: --encoder PATH") from e
    if encoder_config.model_type not in ("dinov2", "dinov2_with_registers"):
        raise ExportError(f"--encoder {encoder}: model_type {encoder_config.model_type!r} is not "
                          "dinov2 or dinov2_with_registers")
    dim = model.config.vision_config.hidden_size
    if encoder_config.hidden_size != dim:
        raise ExportError(f"--encoder {encoder}: {encoder_config.hidden_size}-d features, but the "
                          f"checkpoint's projector takes {dim}-d ones (another encoder?)")
    fields = {k: v for k, v in model.config.to_dict().items()
              if k not in ("model_type", "auto_map", "architectures", "transformers_version")}
    config = portable.BabyLlavaConfig(**{**fields, "vision_config": encoder_config.to_dict(),
                                         "vision_tower": True})
    submission = portable.BabyLlavaForConditionalGeneration(config).eval()
    weights = {**model.state_dict(), "model.black_feature": black_feature.float(),
               **{f"model.vision_tower.{k}": v for k, v in encoder_model.state_dict().items()}}
    submission.load_state_dict(weights, strict=True)

    def write_processor(folder: Path) -> None:
        save_image_prefixed_tokenizer(tokenizer, folder)
        shutil.copyfile(processor_file, folder / "preprocessor_config.json")
        shutil.copyfile(PROCESSING_FILE, folder / PROCESSING_FILE.name)
        atomic_write_text(folder / "processor_config.json", json.dumps({
            "processor_class": "BabyLlavaProcessor",
            "auto_map": {"AutoProcessor": "processing_babyllava.BabyLlavaProcessor"}},
            indent=2) + "\n")

    return save_checkpoint(submission, directory, write_extra=write_processor)
