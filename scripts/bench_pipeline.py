"""Wall time and throughput of each stage of `babymerge demo`, as one JSON object.

Baselines measured in the same run, so the pipeline's overhead is visible:
- ``train_step_baseline``: tokens/s of bare forward+backward+AdamW steps of the same model preset
  on random token ids at the same batch shape (no data loading, logging or checkpointing), against
  the train stages' tokens/s;
- ``encoder_baseline``: images/s of the encoder's forward on an already-normalised batch, against
  extract-features' images/s (which also decodes, resizes and writes HDF5).

    python scripts/bench_pipeline.py --quick          # ~1 minute on 2 CPU cores
    python scripts/bench_pipeline.py --scale small    # the README demo's size
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from babymerge.benchmark import environment
from babymerge.demo import SCALES, DemoConfig, Scale, run_demo
from babymerge.features import load_encoder
from babymerge.model import MODEL_PRESETS, build_model
from babymerge.world import WorldConfig

# --quick: the tiny scale, smaller still (the benchmark measures rates, not model quality)
QUICK = dataclasses.replace(
    SCALES["tiny"], world=WorldConfig(train_images=200, eval_images=40, captions_per_image=2,
                                      text_words=6_000, pairs_per_phenomenon=10),
    lm_epochs=1, vlm_epochs=1, warmup_steps=5)


def train_step_baseline(scale: Scale, vocab: int, feature_dim: int, steps: int = 10) -> float:
    """Tokens/s of bare training steps of ``scale``'s model at its batch shape."""
    cfg = dataclasses.replace(MODEL_PRESETS[scale.preset], feature_dim=feature_dim)
    model = build_model(cfg, seed=0, vocab_size=vocab, image_token_id=4, pad_token_id=3,
                        bos_token_id=1, eos_token_id=2).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(5, vocab, (scale.batch_size, scale.seq_len))
    ids[:, 0], ids[:, 1] = 1, 4
    feats = torch.randn(scale.batch_size, feature_dim)

    def step() -> None:
        loss = model(input_ids=ids, pixel_values=feats, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up: allocator, kernels' first calls
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * ids.numel() / (time.perf_counter() - t0)


def encoder_baseline(encoder_dir: Path, image_size: int, batch: int = 128, reps: int = 3) -> float:
    """Images/s of the encoder alone on already-cropped uint8 pixels (normalise, blocks, pool)."""
    enc = load_encoder(encoder_dir)
    pixels = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8)
    enc.encode_pixels(pixels)
    t0 = time.perf_counter()
    for _ in range(reps):
        enc.encode_pixels(pixels)
    return reps * batch / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller-than-tiny world (~1 min)")
    parser.add_argument("--scale", default="tiny", choices=tuple(SCALES))
    parser.add_argument("--out", type=Path, default=None,
                        help="keep the run here, a new or empty folder (default: temp)")
    args = parser.parse_args(argv)
    if args.out is not None and args.out.exists() and (not args.out.is_dir()
                                                      or any(args.out.iterdir())):
        # the demo reuses every stage a finished or interrupted run left there: its rates would
        # be of the work left over (none, or a fraction), not of the pipeline
        parser.error(f"--out {args.out} is not an empty folder: the demo would reuse the "
                     "stages done there and measure nothing; give a new or empty folder")
    scale = QUICK if args.quick else SCALES[args.scale]
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "run"
        cfg = DemoConfig(out=out, scale=args.scale, device="cpu", progress=False)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON object
            report = run_demo(cfg, scale)
        wall = time.perf_counter() - t0
        vocab = json.loads((out / "lm" / "config.json").read_text())["text_config"]["vocab_size"]
        base_train = train_step_baseline(scale, vocab, scale.encoder.hidden_size)
        base_enc = encoder_baseline(out / "encoder", scale.encoder.image_size)
    stages = report["stages"]
    result = {
        "benchmark": "pipeline", "scale": "quick" if args.quick else args.scale,
        "wall_seconds": round(wall, 2),
        "stages": {name: {k: v for k, v in s.items() if k != "note"} for name, s in stages.items()},
        "baseline": {
            "train_step_tokens_per_s": round(base_train, 1),
            "train_lm_vs_baseline": round(stages["train lm"]["tokens_per_s"] / base_train, 3),
            "train_vlm_vs_baseline": round(stages["train vlm"]["tokens_per_s"] / base_train, 3),
            "encoder_forward_images_per_s": round(base_enc, 1),
            "extract_vs_encoder_forward": round(stages["extract-features"]["images_per_s"]
                                                / base_enc, 3),
        },
        "finding_holds": report["holds"],
        **environment(torch.device("cpu")),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
