"""scripts/bench_merge.py and scripts/bench_eval.py run and report what they claim (tiny preset)."""

import importlib.util
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_merge_paths_agree(capsys):
    result = load("bench_merge").main(["--preset", "tiny", "--vocab", "300", "--repeats", "1",
                                       "--device", "cpu"])
    assert set(result["seconds_per_alpha"]) == {"inplace", "state_dict", "safetensors", "copy"}
    assert result["max_abs_diff_inplace_vs_naive_merge"] < 1e-6
    assert result["torch"] and result["device"] == "cpu"


def test_bench_eval_batched_equals_one_at_a_time(capsys):
    result = load("bench_eval").main(["--preset", "tiny", "--vocab", "300", "--pairs", "4",
                                      "--device", "cpu"])
    assert result["max_abs_score_diff"] == pytest.approx(0, abs=1e-4)
    assert set(result["pairs_per_s"]) == {"batched", "batched_size1", "one_at_a_time"}
