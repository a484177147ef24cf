"""babymerge/modeling_babyllava.py: every BabyLLaVA checkpoint folder (train's output, its
word-count checkpoints, merge's kept alphas) loads in plain transformers with trust_remote_code and
no babymerge, and gives load_model's logits and greedy generations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from babymerge.model import (AUTO_MAP, MODEL_PRESETS, MODELING_FILE, build_model, load_model,
                             save_checkpoint, set_feature_statistics)

# Run in a fresh interpreter in which importing babymerge fails: what a user without babymerge
# (or the BabyLM pipeline) has. Inputs and outputs travel as safetensors files.
LOADER = r"""
import sys
class NoBabymerge:
    def find_spec(self, name, path=None, target=None):
        if name == "babymerge" or name.startswith("babymerge."):
            raise ImportError("babymerge must not be imported here")
sys.meta_path.insert(0, NoBabymerge())
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM
for folder, inputs, outputs in zip(*[iter(sys.argv[1:])] * 3):
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    x = load_file(inputs)
    ids, features = x["ids"], x["features"]
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=features).logits
        generated = model.generate(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]),
                                   pixel_values=features[:1], max_new_tokens=5, do_sample=False)
    save_file({"logits": logits.contiguous(), "generated": generated.contiguous()}, outputs)
    print(type(config).__module__, type(model).__module__)
assert not any(m == "babymerge" or m.startswith("babymerge.") for m in sys.modules)
"""

IDS = dict(vocab_size=50, image_token_id=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def assert_same_as_babymerge(folders: list[Path], tmp_path: Path,
                             python: str = sys.executable) -> None:
    """Each folder, loaded without babymerge in one fresh interpreter, gives load_model's logits
    and greedy generation."""
    args, wanted = [], []
    for i, folder in enumerate(folders):
        model = load_model(folder)
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(5, model.config.text_config.vocab_size, (2, 7), generator=g)
        ids[:, 0], ids[:, 1] = model.config.text_config.bos_token_id, model.config.image_token_index
        features = torch.randn(2, model.config.vision_config.hidden_size, generator=g) * 3 + 5
        save_file({"ids": ids, "features": features}, str(tmp_path / f"in{i}.safetensors"))
        args += [str(folder), str(tmp_path / f"in{i}.safetensors"),
                 str(tmp_path / f"out{i}.safetensors")]
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=features).logits
            generated = model.generate(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]),
                                       pixel_values=features[:1], max_new_tokens=5,
                                       do_sample=False)
        wanted.append((logits, generated))
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "HF_MODULES_CACHE": str(tmp_path / "modules")}  # a fresh copy of the remote code
    env.pop("PYTHONPATH", None)
    done = subprocess.run([python, "-c", LOADER, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # the folder's own file (transformers_modules.*), not a class registered by an import
    assert done.stdout.count("transformers_modules") == 2 * len(folders), done.stdout
    for i, (logits, generated) in enumerate(wanted):
        got = load_file(str(tmp_path / f"out{i}.safetensors"))
        torch.testing.assert_close(got["logits"], logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(got["generated"], generated)


@pytest.mark.parametrize("feature_norm", ["none", "standardize"])
def test_checkpoint_loads_without_babymerge(tmp_path, feature_norm):
    model = build_model(MODEL_PRESETS["tiny"], seed=0, feature_norm=feature_norm, **IDS)
    if feature_norm == "standardize":
        set_feature_statistics(model, torch.full((1024,), 5.0), torch.full((1024,), 3.0))
    folder = save_checkpoint(model, tmp_path / "ck")
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    assert (folder / MODELING_FILE.name).read_bytes() == MODELING_FILE.read_bytes()
    assert_same_as_babymerge([folder], tmp_path)


@pytest.mark.skipif(not os.environ.get("BABYMERGE_TRANSFORMERS4_PYTHON"),
                    reason="set BABYMERGE_TRANSFORMERS4_PYTHON to a Python with transformers "
                           "4.51.3 (the BabyLM pipeline's pin), torch and safetensors")
def test_checkpoint_loads_in_transformers_4(tmp_path):
    model = build_model(MODEL_PRESETS["tiny"], seed=0, feature_norm="standardize", **IDS)
    set_feature_statistics(model, torch.full((1024,), 5.0), torch.full((1024,), 3.0))
    folder = save_checkpoint(model, tmp_path / "ck")
    assert_same_as_babymerge([folder], tmp_path, os.environ["BABYMERGE_TRANSFORMERS4_PYTHON"])


@pytest.mark.filterwarnings("ignore:captions skipped")  # the world's deliberately bad captions
def test_train_and_merge_outputs_carry_the_modeling_file(tmp_path):
    """The final model, a word-count checkpoint and a kept merge all load without babymerge."""
    from fixtures import make_world

    from babymerge.merge import MergeConfig, merge
    from babymerge.train import TrainConfig, train

    world = make_world(tmp_path / "world", n_images=32, n_lines=80)
    runs = {}
    for kind in ("lm", "vlm"):
        runs[kind] = train(TrainConfig(
            kind=kind, text=[world["text"]], captions=[world["captions"]] if kind == "vlm" else [],
            features=world["features"], tokenizer=world["tokenizer"], out=tmp_path / kind,
            preset="tiny", seq_len=32, batch_size=8, epochs=1, warmup_steps=1,
            checkpoint_unit=100, save_every=0, progress=False, cache_dir=tmp_path / "cache"))
    (word_checkpoint, *_) = sorted((runs["vlm"] / "checkpoints").iterdir())
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"sentence_good": "the cat sees the dog.",
                                 "sentence_bad": "the cat see the dog."}) + "\n")
    merge(MergeConfig(lm=runs["lm"], vlm=[runs["vlm"]], task=[f"minimal_pairs:{pairs}"],
                      features=world["features"], alpha_grid="0,0.5,1", keep="0.5",
                      out=tmp_path / "merge", progress=False))
    assert_same_as_babymerge([runs["vlm"], word_checkpoint, tmp_path / "merge" / "alpha_0.5"],
                             tmp_path)
