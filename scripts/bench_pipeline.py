"""Wall time and throughput of each stage of `babymerge demo`, as one JSON object.

Baselines measured in the same run, so the pipeline's overhead is visible:
- ``train_step_baseline``: tokens/s of bare forward+backward+AdamW steps of the same model preset
  on random token ids at the same batch shape (no data loading, logging or checkpointing), against
  the train stages' tokens/s;
- ``encoder_baseline``: images/s of the encoder's forward on an already-normalised batch, against
  extract-features' images/s (which also decodes, resizes and writes HDF5).

On CUDA (``--device auto`` finds it) the stages run there, as ``babymerge demo`` does, and the
train stages and the bare step report their model FLOP utilisation (``6N + 12·L·H·Q·T`` FLOPs per
token: babymerge.benchmark.train_flops_per_token, as in scripts/bench_train.py) against the
device's bf16 peak.

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

from babymerge.benchmark import (encoder_images_per_s, environment, peak_flops, synchronize,
                                 train_flops_per_token)
from babymerge.demo import SCALES, DemoConfig, Scale, run_demo
from babymerge.model import MODEL_PRESETS, build_model
from babymerge.world import WorldConfig

# --quick: the tiny scale, smaller still (the benchmark measures rates, not model quality)
QUICK = dataclasses.replace(
    SCALES["tiny"], world=WorldConfig(train_images=200, eval_images=40, captions_per_image=2,
                                      text_words=6_000, pairs_per_phenomenon=10),
    lm_epochs=1, vlm_epochs=1, warmup_steps=5)


def train_step_baseline(scale: Scale, vocab: int, feature_dim: int,
                        device: torch.device = torch.device("cpu"), steps: int = 10
                        ) -> tuple[float, float]:
    """(tokens/s, FLOPs per token) of bare training steps of ``scale``'s model at its batch
    shape, in train's precision (bf16 autocast on CUDA)."""
    cfg = dataclasses.replace(MODEL_PRESETS[scale.preset], feature_dim=feature_dim)
    model = build_model(cfg, seed=0, vocab_size=vocab, image_token_id=4, pad_token_id=3,
                        bos_token_id=1, eos_token_id=2).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(5, vocab, (scale.batch_size, scale.seq_len))
    ids[:, 0], ids[:, 1] = 1, 4
    ids = ids.to(device)
    feats = torch.randn(scale.batch_size, feature_dim, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            loss = model(input_ids=ids, pixel_values=feats, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up: allocator, kernels' first calls
        step()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    rate = steps * ids.numel() / (time.perf_counter() - t0)
    return rate, train_flops_per_token(model, scale.seq_len)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller-than-tiny world (~1 min)")
    parser.add_argument("--scale", default="tiny", choices=tuple(SCALES))
    parser.add_argument("--out", type=Path, default=None,
                        help="keep the run here, a new or empty folder (default: temp)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where the stages and baselines run (auto: cuda when available)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or (
        args.device == "auto" and torch.cuda.is_available()) else "cpu")
    if args.out is not None and args.out.exists() and (not args.out.is_dir()
                                                      or any(args.out.iterdir())):
        # the demo reuses every stage a finished or interrupted run left there: its rates would
        # be of the work left over (none, or a fraction), not of the pipeline
        parser.error(f"--out {args.out} is not an empty folder: the demo would reuse the "
                     "stages done there and measure nothing; give a new or empty folder")
    scale = QUICK if args.quick else SCALES[args.scale]
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "run"
        cfg = DemoConfig(out=out, scale=args.scale, device=device.type, progress=False)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON object
            report = run_demo(cfg, scale)
        wall = time.perf_counter() - t0
        vocab = json.loads((out / "lm" / "config.json").read_text())["text_config"]["vocab_size"]
        base_train, fpt = train_step_baseline(scale, vocab, scale.encoder.hidden_size, device)
        base_enc = encoder_images_per_s(out / "encoder", device, batch_size=128, repeats=3,
                                        warmups=1)
    stages = report["stages"]
    peak = peak_flops(device)

    def mfu(tokens_per_s: float | None) -> float | None:
        return round(fpt * tokens_per_s / peak, 5) if peak and tokens_per_s else None

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
        "model_flops_per_token": fpt,
        "mfu": {"train lm": mfu(stages["train lm"]["tokens_per_s"]),
                "train vlm": mfu(stages["train vlm"]["tokens_per_s"]),
                "train_step_baseline": mfu(base_train)},
        "finding_holds": report["holds"],
        **environment(device),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
