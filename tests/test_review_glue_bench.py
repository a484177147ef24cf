"""scripts/bench_pipeline.py --quick: one JSON object, same-run baselines, a --device choice."""

import importlib.util
import json
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def test_bench_pipeline_quick_prints_one_object_with_baselines(capsys):
    spec = importlib.util.spec_from_file_location("bench_pipeline", SCRIPTS / "bench_pipeline.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--device", "cpu"])
    out = capsys.readouterr().out
    result = json.loads(out)  # stdout holds exactly one JSON object
    assert result["device"] == "cpu" and result["scale"] == "quick"
    assert result["baseline"]["train_step_tokens_per_s"] > 0
    assert result["model_flops_per_token"] > 0
    # % of peak only where the device has a known peak: not on a CPU
    assert result["mfu"] == {"train lm": None, "train vlm": None, "train_step_baseline": None}
