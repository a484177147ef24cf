"""scripts/bench_merge.py and scripts/bench_eval.py run and report what they claim (tiny preset)."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_merge_paths_agree(capsys, monkeypatch):
    bench = load("bench_merge")
    assert bench.peak_bandwidth(torch.device("cpu")) is None  # CPU: no datasheet peak
    # a GPU's peak stood in for, so the % of peak (reported on GPUs only) is checked here too
    monkeypatch.setattr(bench, "peak_bandwidth", lambda device: 1e12)
    result = bench.main(["--preset", "tiny", "--vocab", "300", "--repeats", "1",
                         "--device", "cpu"])
    assert set(result["seconds_per_alpha"]) == {"inplace", "state_dict", "safetensors", "copy"}
    assert result["max_abs_diff_inplace_vs_naive_merge"] < 1e-6
    assert result["torch"] and result["device"] == "cpu"
    gbps = result["GBps"]
    assert result["peak_GBps"] == 1000
    assert result["inplace_pct_of_peak_bandwidth"] == pytest.approx(
        gbps["inplace (read 2P + write P)"] / 10)
    assert result["copy_pct_of_peak_bandwidth"] == pytest.approx(
        gbps["copy (read P + write P)"] / 10)


def test_bench_eval_batched_equals_one_at_a_time(capsys):
    result = load("bench_eval").main(["--preset", "tiny", "--vocab", "300", "--pairs", "4",
                                      "--device", "cpu"])
    assert result["max_abs_score_diff"] == pytest.approx(0, abs=1e-4)
    assert set(result["pairs_per_s"]) == {"batched", "batched_size1", "one_at_a_time"}


def test_bench_eval_flop_estimate_matches_torch_flop_counter(capsys, monkeypatch):
    """The estimate behind bench_eval's % of peak on a GPU agrees with torch's FLOP counter on
    the batched path (batch size 1: no padding, which the estimate does not count)."""
    from torch.utils.flop_counter import FlopCounterMode

    from babymerge.evaluate import TaskSpec, pack_task, score_candidates
    from babymerge.model import MODEL_PRESETS, build_model

    bench = load("bench_eval")
    cfg = MODEL_PRESETS["tiny"]
    model = build_model(cfg, seed=0, vocab_size=300, image_token_id=4, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2).eval()
    gen = torch.Generator().manual_seed(0)
    pairs = [[torch.randint(5, 300, (n,), generator=gen).tolist() for n in (9, 14)]
             for _ in range(3)]
    task = pack_task(TaskSpec("b", "minimal_pairs", "random"), [1, 4], [[]] * 3, pairs,
                     ["b"] * 3, [0] * 3, torch.randn(1, cfg.feature_dim, generator=gen))
    with FlopCounterMode(display=False) as counter:
        score_candidates(model, task, 1, progress=False)
    estimate = bench.scoring_flops(model, task)
    assert estimate == pytest.approx(counter.get_total_flops(), rel=0.1)
    result = bench.main(["--preset", "tiny", "--vocab", "300", "--pairs", "4", "--device", "cpu"])
    assert result["gflops_per_pass"] > 0 and result["pct_of_peak_batched"] is None  # CPU: no peak
    # with a peak (a GPU's, stood in for), the % is the achieved rate over it
    monkeypatch.setattr(bench, "peak_flops", lambda device, dtype: 1e9)
    result = bench.main(["--preset", "tiny", "--vocab", "300", "--pairs", "4", "--device", "cpu"])
    achieved = result["gflops_per_pass"] * 1e9 * result["pairs_per_s"]["batched"] / result["pairs"]
    assert result["peak_tflops"] == 1e-3
    assert result["pct_of_peak_batched"] == pytest.approx(100 * achieved / 1e9, rel=0.01)
