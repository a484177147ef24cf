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
     "Encode images (folder, jsonl, TSV or .tar shards) into one pooled DINOv2 feature each "
     "(HDF5)."),
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
    ("export", "babymerge.export", "ExportConfig", "export",
     "Write a checkpoint's language part as a plain LlamaForCausalLM directory."),
    ("demo", "babymerge.demo", "DemoConfig", "demo",
     "Run the whole pipeline on the built-in generated world (offline, CPU, minutes)."),
]


class StageGroup(click.Group):
    """Imports a stage's module only when its command is used: each stage pulls in torch and
    transformers, and ``babymerge --help`` should not pay for all of them."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, *_ in COMMANDS]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        for name, module, cfg_name, fn_name, help_text in COMMANDS:
            if name == cmd_name:
                mod = importlib.import_module(module)
                return config_command(name, getattr(mod, cfg_name), getattr(mod, fn_name),
                                      help_text)
        return None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_text.split(". ")[0]) for name, *_, help_text in COMMANDS]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=StageGroup)
@click.version_option(package_name="babymerge")
def main() -> None:
    """babymerge: merge a text-only LM into a VLM (BabyLM multimodal track)."""


if __name__ == "__main__":
    main()
