"""The ``babymerge`` command: parses flags into each stage's config and calls the stage.

Every command is generated from a config dataclass (:func:`babymerge.config.config_command`), so
each flag is a field, ``--config FILE`` sets any of them, and tests call the stage functions
directly.
"""

from __future__ import annotations

import importlib

import click

from babymerge.config import config_command

# (command, module, config class, run function, help)
COMMANDS = [
    ("extract-features", "babymerge.features", "ExtractConfig", "extract_features",
     "Encode images (folder, jsonl, TSV or .tar shards) into one pooled DINOv2 feature each (HDF5)."),
    ("join-features", "babymerge.features", "JoinConfig", "join_features",
     "Join per-rank feature shards into one feature file."),
    ("tokenizer", "babymerge.tokenizer", "TokenizerConfig", "train_tokenizer",
     "Train the BPE tokenizer (BERT pre-tokenizer, <image> token) on text corpora."),
    ("train", "babymerge.train", "TrainConfig", "train",
     "Train the text-only LM (--kind lm) or the VLM (--kind vlm) from cached features."),
    ("eval", "babymerge.evaluate", "EvalConfig", "evaluate",
     "Evaluate a checkpoint on minimal pairs, image-text matching and VQA-style tasks."),
    ("merge", "babymerge.merge", "MergeConfig", "merge",
     "Interpolate the LM into the VLM over an alpha grid, evaluating every point."),
    ("demo", "babymerge.demo", "DemoConfig", "demo",
     "Run the whole pipeline on the built-in generated world (offline, CPU, minutes)."),
]


@click.group()
@click.version_option(package_name="babymerge")
def main() -> None:
    """babymerge: merge a text-only LM into a VLM (BabyLM multimodal track)."""


def _register() -> None:
    for name, module, cfg_name, fn_name, help_text in COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue  # stage not built yet
        config_command(main, name, getattr(mod, cfg_name), getattr(mod, fn_name), help_text)


_register()

if __name__ == "__main__":
    main()
