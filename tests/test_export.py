"""``babymerge export``: the exported plain Llama scores ``[BOS, <image>] + text`` exactly as the
BabyLLaVA checkpoint scores text-only input (the black feature in the image slot)."""

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from babymerge.export import EXPORT_NOTE_FILE, ExportConfig, ExportError, export
from babymerge.model import (MODEL_PRESETS, build_model, image_prefix_ids, save_black_feature,
                             save_checkpoint, set_feature_statistics)
from babymerge.tokenizer import load_tokenizer
from fixtures import world  # noqa: F401  (fixture)


@pytest.mark.parametrize("feature_norm", ["none", "standardize"])
def test_export_scores_like_the_text_only_model(world, tmp_path, feature_norm):
    tok = load_tokenizer(world["tokenizer"])
    ids = dict(vocab_size=len(tok), image_token_id=image_prefix_ids(tok)[1],
               pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id)
    model = build_model(MODEL_PRESETS["tiny"], seed=0, feature_norm=feature_norm, **ids).eval()
    g = torch.Generator().manual_seed(0)
    if feature_norm == "standardize":
        set_feature_statistics(model, torch.randn(1024, generator=g), torch.rand(1024) + 0.5)
    black = torch.randn(1024, generator=g)
    save_checkpoint(model, tmp_path / "ck", tok)
    save_black_feature(tmp_path / "ck", black)

    out = export(ExportConfig(checkpoint=tmp_path / "ck", out=tmp_path / "llama"))
    llama = LlamaForCausalLM.from_pretrained(out).eval()
    exported_tok = AutoTokenizer.from_pretrained(out)
    text = exported_tok("the red cat sees a dog", add_special_tokens=False)["input_ids"]
    seq = torch.tensor([image_prefix_ids(tok) + text])
    want = model(input_ids=seq, pixel_values=black[None]).logits
    assert torch.allclose(llama(input_ids=seq).logits, want, atol=1e-5)
    note = json.loads((out / EXPORT_NOTE_FILE).read_text())
    assert note["prefix_ids"] == image_prefix_ids(tok)


def test_export_refuses_a_checkpoint_without_its_black_feature(tmp_path):
    model = build_model(MODEL_PRESETS["tiny"], seed=0, vocab_size=50, image_token_id=4,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    save_checkpoint(model, tmp_path / "ck")
    with pytest.raises(ExportError, match="black_feature.safetensors"):
        export(ExportConfig(checkpoint=tmp_path / "ck", out=tmp_path / "out"))
    with pytest.raises(ExportError, match="not a checkpoint directory"):
        export(ExportConfig(checkpoint=tmp_path, out=tmp_path / "out"))


def test_export_refuses_a_tied_head_naming_the_checkpoint(world, tmp_path):
    """A checkpoint whose LM head is tied to the embeddings (not babymerge's own; another tool's)
    cannot take the black feature in its <image> row: an export error naming the checkpoint,
    which the CLI prints without a traceback, and nothing written."""
    tok = load_tokenizer(world["tokenizer"])
    model = build_model(MODEL_PRESETS["tiny"], seed=0, vocab_size=len(tok),
                        image_token_id=image_prefix_ids(tok)[1], pad_token_id=tok.pad_token_id,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model.config.text_config.tie_word_embeddings = True
    save_checkpoint(model, tmp_path / "ck", tok)
    save_black_feature(tmp_path / "ck", torch.zeros(1024))
    with pytest.raises(ExportError, match=r"ck: export: this checkpoint ties its LM head"):
        export(ExportConfig(checkpoint=tmp_path / "ck", out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()
