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
