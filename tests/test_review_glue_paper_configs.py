"""configs/paper/*.toml load through the CLI's own path (types, choices, validation) and hold the
paper's set-up (../shared/PAPER.md): DINOv2-large layer -2, 6 layers, hidden 768, vocabulary
30,000, 10 epochs, one seed for both models, the poster's alphas 0, 0.3, 0.5, 0.8."""

import importlib
from pathlib import Path

import pytest

from babymerge.config import build_config, load_config_file
from babymerge.merge import parse_alpha_grid, parse_keep
from babymerge.model import MODEL_PRESETS

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"
CLASSES = {"extract": ("babymerge.features", "ExtractConfig"),
           "tokenizer": ("babymerge.tokenizer", "TokenizerConfig"),
           "train_lm": ("babymerge.train", "TrainConfig"),
           "train_vlm": ("babymerge.train", "TrainConfig"),
           "merge": ("babymerge.merge", "MergeConfig")}


@pytest.fixture()
def configs(tmp_path, monkeypatch):
    """Each paper config built as `babymerge STAGE --config FILE` builds it, run from a folder
    holding (empty stand-ins of) the data files the configs name, as the README lays out."""
    monkeypatch.chdir(tmp_path)
    for name in ("data/text/babylm_text_50M.txt", "data/text/captions_50M.txt",
                 "data/captions/ln_cc3m_captions.jsonl", "cache/features.h5"):
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).touch()
    Path("run/tokenizer").mkdir(parents=True)
    out = {}
    for name, (module, cls) in CLASSES.items():
        cls = getattr(importlib.import_module(module), cls)
        out[name] = build_config(cls, load_config_file(PAPER / f"{name}.toml"), f"{name}.toml")
    return out


def test_paper_configs_load_and_match_the_paper(configs):
    ext, tok, lm, vlm, merge = (configs[k] for k in CLASSES)
    assert ext.encoder == "facebook/dinov2-large" and ext.source  # SOURCE from the file
    assert tok.vocab_size == 30_000
    for train, kind in ((lm, "lm"), (vlm, "vlm")):
        assert train.kind == kind and train.epochs == 10 and train.preset == "paper"
        preset = MODEL_PRESETS[train.preset]
        assert (preset.num_layers, preset.hidden_size) == (6, 768)
        assert train.tokenizer == tok.out and train.features == Path(ext.out)
    assert lm.seed == vlm.seed  # one initial point for both models
    assert vlm.captions and not lm.captions
    assert merge.lm == lm.out and merge.vlm == [vlm.out]
    grid = parse_alpha_grid(merge.alpha_grid)
    assert grid[0] == 0.0 and grid[-1] == 1.0
    assert {0.0, 0.3, 0.5, 0.8} <= {round(a, 6) for a in grid}
    assert parse_keep(merge.keep)[0] == [0.3, 0.5, 0.8]
