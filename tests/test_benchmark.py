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
