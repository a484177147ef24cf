import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from babymerge.model import MODEL_PRESETS, BabyLlavaConfig, build_model, save_checkpoint

IDS = dict(vocab_size=50, image_token_id=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def test_same_seed_same_weights_and_one_image_token():
    a = build_model(MODEL_PRESETS["tiny"], seed=3, **IDS)
    b = build_model(MODEL_PRESETS["tiny"], seed=3, **IDS)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    ids = torch.tensor([[1, 4, 7, 8]])
    f1, f2 = torch.randn(1, 1024), torch.randn(1, 1024)
    la = a(input_ids=ids, pixel_values=f1).logits
    lb = a(input_ids=ids, pixel_values=f2).logits
    assert not torch.allclose(la[:, 1:], lb[:, 1:])  # the image token's embedding is the feature's


def test_checkpoint_loads_with_auto_classes(tmp_path):
    m = build_model(MODEL_PRESETS["tiny"], seed=0, **IDS).eval()
    save_checkpoint(m, tmp_path / "ck")
    ids = torch.tensor([[1, 4, 9, 10, 11]])
    feat = torch.randn(1, 1024)
    ref = m(input_ids=ids, pixel_values=feat).logits
    for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
        m2 = auto.from_pretrained(tmp_path / "ck")
        assert torch.allclose(m2(input_ids=ids, pixel_values=feat).logits, ref, atol=1e-6)


def test_standardized_features_are_stored_frozen_and_applied(tmp_path):
    from babymerge.model import load_model, set_feature_statistics

    m = build_model(MODEL_PRESETS["tiny"], seed=0, feature_norm="standardize", **IDS).eval()
    plain = build_model(MODEL_PRESETS["tiny"], seed=0, **IDS).eval()
    mean, std = torch.randn(1024), torch.rand(1024) + 0.5
    set_feature_statistics(m, mean, std)
    save_checkpoint(m, tmp_path / "ck")
    loaded = load_model(tmp_path / "ck")
    ids, feat = torch.tensor([[1, 4, 9, 10]]), torch.randn(1, 1024) * 50
    got = loaded(input_ids=ids, pixel_values=feat).logits
    # the same weights without normalisation, fed the z-scored feature by hand
    want = plain(input_ids=ids, pixel_values=(feat - mean) / std).logits
    assert torch.allclose(got, want, atol=1e-5)
    loaded.train()
    loaded(input_ids=ids, pixel_values=feat, labels=ids).loss.backward()
    assert loaded.model.feature_mean.grad is None and loaded.model.feature_std.grad is None


def test_config_defaults_to_dinov2_large_not_llavas_clip():
    """The vision sub-config (whose hidden size is the projector's input) defaults to
    DINOv2-large; a dict without model_type is read as DINOv2 too."""
    vision = BabyLlavaConfig().vision_config
    assert (vision.model_type, vision.hidden_size, vision.num_hidden_layers) == ("dinov2", 1024, 24)
    assert BabyLlavaConfig(vision_config={"hidden_size": 64}).vision_config.model_type == "dinov2"
    assert BabyLlavaConfig().text_config.model_type == "llama"


def test_feature_statistics_stay_float32_in_a_half_precision_model(tmp_path):
    """--dtype bfloat16 (evaluate, merge) rounded the standardisation statistics with every other
    weight, shifting every feature; they stay float32, the rest takes the dtype."""
    from babymerge.merge import read_tensors
    from babymerge.model import load_model, save_checkpoint, set_feature_statistics

    model = build_model(MODEL_PRESETS["tiny"], seed=0, vocab_size=50, image_token_id=4,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        feature_norm="standardize")
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(1024, generator=g) + 2.0, torch.rand(1024, generator=g) * 0.05 + 0.01
    set_feature_statistics(model, mean, std)
    save_checkpoint(model, tmp_path / "ck")
    half = load_model(tmp_path / "ck", dtype=torch.bfloat16)
    params = dict(half.named_parameters())
    assert torch.equal(params["model.feature_mean"], mean)
    assert torch.equal(params["model.feature_std"], std)
    assert {p.dtype for n, p in params.items() if "feature_" not in n} == {torch.bfloat16}
    tensors = read_tensors(tmp_path / "ck", ["model.feature_mean", "lm_head.weight"],
                           torch.device("cpu"), torch.bfloat16)
    assert [t.dtype for t in tensors] == [torch.float32, torch.bfloat16]
    assert torch.equal(tensors[0], mean)


def test_a_bfloat16_merge_keeps_the_statistics_exact_in_its_kept_checkpoint(tmp_path):
    """merge --dtype bfloat16: the live model, the LM's resident tensors and the kept checkpoint
    hold the standardisation statistics in float32 (the merge interpolates a list of mixed
    dtypes); the kept checkpoint reloads them exactly, with load_model and with transformers."""
    import dataclasses

    from safetensors import safe_open

    from babymerge.merge import MergeConfig, merge
    from babymerge.model import IMAGE_TOKEN, load_model, set_feature_statistics
    from fixtures import FEATURE_DIM, make_tokenizer, write_features, write_tasks

    tok = make_tokenizer(tmp_path / "tokenizer")
    features = write_features(tmp_path / "features.h5", [f"img{i}" for i in range(8)])
    g = torch.Generator().manual_seed(0)
    # not representable in bfloat16: a rounded copy anywhere on the way would show
    mean = torch.randn(FEATURE_DIM, generator=g) * 3 + 7.5
    std = torch.rand(FEATURE_DIM, generator=g) + 0.9

    def checkpoint(name, seed):
        model = build_model(dataclasses.replace(MODEL_PRESETS["tiny"], feature_dim=FEATURE_DIM),
                            seed=seed, vocab_size=len(tok),
                            image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, feature_norm="standardize")
        set_feature_statistics(model, mean, std)
        return save_checkpoint(model, tmp_path / name, tok)

    results = merge(MergeConfig(lm=checkpoint("lm", 2), vlm=[checkpoint("vlm", 1)],
                                features=features, task=list(write_tasks(tmp_path).values()),
                                out=tmp_path / "out", dtype="bfloat16", alpha_grid="0.5",
                                keep="0.5", progress=False))
    (kept,) = results["kept"]
    with safe_open(f"{kept}/model.safetensors", framework="pt") as f:
        assert f.get_slice("model.feature_mean").get_dtype() == "F32"
        assert f.get_slice("lm_head.weight").get_dtype() == "BF16"
    params = dict(load_model(kept, dtype=torch.bfloat16).named_parameters())
    assert torch.equal(params["model.feature_mean"], mean)
    assert torch.equal(params["model.feature_std"], std)
    assert params["lm_head.weight"].dtype == torch.bfloat16
    params = dict(AutoModelForImageTextToText.from_pretrained(kept).named_parameters())
    assert torch.equal(params["model.feature_mean"].float(), mean)


def test_loading_and_saving_checkpoints_draw_no_transformers_bar(tmp_path, capfd):
    """transformers 5 draws 'Loading weights' and 'Writing model shards' bars; every stage's
    --no-progress must be silent, so babymerge's own loads and saves never show them."""
    from babymerge.model import load_model, save_checkpoint
    from transformers.utils import logging as hf_logging

    model = build_model(MODEL_PRESETS["tiny"], seed=0, vocab_size=50, image_token_id=4,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    save_checkpoint(model, tmp_path / "ck")
    load_model(tmp_path / "ck")
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err, err
    assert hf_logging.is_progress_bar_enabled()  # restored for the caller's own transformers use


def test_non_finite_weights_and_black_feature_are_refused(tmp_path):
    """eval, merge and export load through load_model: a NaN tensor is one error naming the
    folder and the tensor, not accuracies of 0.0 reported as results."""
    from safetensors.torch import load_file, save_file

    from babymerge.model import NonFiniteError, load_black_feature, load_model, save_black_feature

    folder = save_checkpoint(build_model(MODEL_PRESETS["tiny"], seed=0, **IDS), tmp_path / "ck")
    weights = load_file(folder / "model.safetensors")
    name = "model.language_model.layers.1.mlp.up_proj.weight"
    weights[name][3, 4] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NonFiniteError, match=rf"ck: 1 tensor\(s\) hold NaN or infinite values: "
                                             rf"{name}"):
        load_model(folder)
    black = torch.zeros(1024)
    black[7] = float("inf")
    save_black_feature(folder, black)
    with pytest.raises(NonFiniteError, match="black_feature.safetensors: 1 tensor"):
        load_black_feature(folder)


@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_a_checkpoint_has_the_modes_a_plain_write_gives(tmp_path, umask):
    """safetensors writes through a private temporary file (0600) and mkdtemp makes 0700: a
    checkpoint shared on a cluster was unreadable by the group. Every file and folder gets what
    open() and mkdir() give under the user's umask."""
    import os
    import stat

    from babymerge.model import save_black_feature

    old = os.umask(umask)
    try:
        folder = save_checkpoint(build_model(MODEL_PRESETS["tiny"], seed=0, **IDS),
                                 tmp_path / "ck",
                                 write_extra=lambda d: save_black_feature(d, torch.zeros(8)))
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.iterdir()]}
    assert {"model.safetensors", "black_feature.safetensors", "config.json"} <= set(modes)
    assert modes == {n: (0o777 if n == "ck" else 0o666) & ~umask for n in modes}


def test_check_finite_is_exact_where_a_sum_would_mislead():
    """The quick test is a tensor's sum: finite values summing past float32's range are still
    finite, and +inf with -inf (a NaN sum) or a NaN in half precision are still refused."""
    from babymerge.model import NonFiniteError, check_finite

    huge = torch.full((8,), 3e38)  # sums to inf in float32, every value finite
    half = torch.full((100_000,), 60000.0, dtype=torch.float16)  # past float16's range summed
    check_finite([("huge", huge), ("half", half), ("ints", torch.arange(5))], "ok")
    both = torch.tensor([float("inf"), 1.0, float("-inf")])
    nan16 = torch.zeros(10, dtype=torch.bfloat16)
    nan16[3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"2 tensor\(s\) .*: both, nan16"):
        check_finite([("huge", huge), ("both", both), ("nan16", nan16)], "where")


def test_checkpoints_that_cannot_load_are_one_line_naming_the_folder(tmp_path):
    """Truncated or garbage weights, a config.json that is not JSON, a folder with only a pickle
    (never loaded): a CheckpointError each, the CLI's one line, not a traceback."""
    import shutil

    from babymerge.model import CheckpointError, load_model

    base = save_checkpoint(build_model(MODEL_PRESETS["tiny"], seed=0, **IDS), tmp_path / "base")
    data = (base / "model.safetensors").read_bytes()
    cases = {"garbage": lambda d: (d / "model.safetensors").write_bytes(b"not safetensors"),
             "truncated": lambda d: (d / "model.safetensors").write_bytes(data[:len(data) // 2]),
             "badjson": lambda d: (d / "config.json").write_text("{not json"),
             "pickle": lambda d: ((d / "model.safetensors").rename(d / "pytorch_model.bin"))}
    says = {"garbage": "model.safetensors is not readable", "truncated": "truncated or damaged",
            "badjson": "not a valid JSON file", "pickle": "only pytorch_model.bin: babymerge "
                                                          "never loads pickle files"}
    for name, damage in cases.items():
        folder = shutil.copytree(base, tmp_path / name)
        damage(folder)
        with pytest.raises(CheckpointError, match=f"{name}: .*{says[name]}"):
            load_model(folder)
