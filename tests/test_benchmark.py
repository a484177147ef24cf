"""babymerge.benchmark: the datasheet peak tables (FLOP/s, memory bandwidth) matched by device
name, the environment record, and the FLOP estimate the benchmarks report their MFU with."""

import torch

from babymerge.benchmark import PEAK_BANDWIDTH, _match, environment, peak_flops, peak_flops_of


def test_peak_table_matches_the_most_specific_name():
    assert peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12  # the SXM part
    assert peak_flops_of("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_of("NVIDIA A100-SXM4-80GB") == 312e12  # not the A10's
    assert peak_flops_of("NVIDIA A10") == 125e12
    assert peak_flops_of("NVIDIA L40S") == 362e12  # not the L4's
    assert peak_flops_of("NVIDIA L40") == 181e12  # not the L4's either
    assert peak_flops_of("NVIDIA L4") == 121e12
    assert peak_flops_of("NVIDIA H100 PCIe", torch.float32) == 51e12
    assert peak_flops_of("Some Future GPU") is None
    assert peak_flops(torch.device("cpu")) is None


def test_environment_records_device_and_versions():
    env = environment(torch.device("cpu"))
    assert env["device"] == "cpu" and env["torch"] == torch.__version__
    assert env["transformers"] and env["babymerge"] and env["threads"] >= 1


def test_bandwidth_table_matches_the_most_specific_name():
    assert _match("NVIDIA H100 80GB HBM3", PEAK_BANDWIDTH) == 3.35e12
    assert _match("NVIDIA H200", PEAK_BANDWIDTH) == 4.8e12
    assert _match("NVIDIA A100-SXM4-80GB", PEAK_BANDWIDTH) == 2.039e12
    assert _match("NVIDIA A100-SXM4-40GB", PEAK_BANDWIDTH) == 1.555e12
    assert _match("NVIDIA L40", PEAK_BANDWIDTH) == 0.864e12


def test_train_flops_per_token_is_the_nanogpt_estimate():
    """6 x the non-embedding parameters plus 12 x layers x hidden x tokens of attention: the one
    estimate bench_train and bench_pipeline report their MFU with (babymerge.benchmark)."""
    from babymerge.benchmark import train_flops_per_token
    from babymerge.model import MODEL_PRESETS, build_model

    cfg = MODEL_PRESETS["tiny"]
    model = build_model(cfg, seed=0, vocab_size=300, image_token_id=4, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2)
    text = model.config.text_config
    embeddings = model.get_input_embeddings().weight.numel()
    non_embedding = sum(p.numel() for p in model.parameters()) - embeddings
    want = 6 * non_embedding + 12 * text.num_hidden_layers * text.hidden_size * 64
    assert train_flops_per_token(model, 64) == want
