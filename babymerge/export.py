"""``babymerge export``: a checkpoint's language part as a plain ``LlamaForCausalLM`` directory.

For tools that know only transformers' own classes (the BabyLM evaluation pipeline among them):
any checkpoint babymerge writes (``run/lm``, ``run/vlm``, its word-count checkpoints, a kept
``alpha_<a>/``) becomes a directory that ``LlamaForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load. The models were trained on ``[BOS, <image>] + text`` with
the black image's feature in the image slot; the export writes that feature's projection into the
``<image>`` embedding row, so the same ids score the same in the export. A tool that does not put
``<image>`` after BOS feeds the model text it was never trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from babymerge.config import InputError, arg, atomic_write_text, opt
from babymerge.model import (BLACK_FEATURE_FILE, IMAGE_TOKEN, export_language_model,
                             image_prefix_ids, load_black_feature, load_model)
from babymerge.tokenizer import TokenizerError, load_tokenizer

EXPORT_NOTE_FILE = "babymerge_export.json"


@dataclass
class ExportConfig:
    """``babymerge export CHECKPOINT --out DIR``."""

    checkpoint: Path = arg(help="BabyLLaVA checkpoint directory written by train or merge")
    out: Path = opt(Path("run/export"), "output folder: a LlamaForCausalLM directory with the "
                    f"tokenizer and {EXPORT_NOTE_FILE}")


class ExportError(InputError):
    """A checkpoint that cannot be exported; the message names the file."""


def export(cfg: ExportConfig) -> Path:
    """Write ``cfg.out``; returns it."""
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
    try:
        out = export_language_model(model, cfg.out, tokenizer, black_feature=black)
    except ValueError as e:  # a checkpoint export_language_model cannot write (tied LM head)
        raise ExportError(f"{cfg.checkpoint}: {e}") from e
    note = {"source": str(cfg.checkpoint.resolve()),
            "prefix_ids": image_prefix_ids(tokenizer),
            "prefix": f"{tokenizer.bos_token} {IMAGE_TOKEN}",
            "why": "the model was trained with every sequence starting [BOS, <image>], the image "
                   "slot holding the black image's feature; the <image> embedding row holds that "
                   "feature's projection, so start every input with these ids"}
    atomic_write_text(out / EXPORT_NOTE_FILE, json.dumps(note, indent=1) + "\n")
    return out
