"""Benchmark stage 1: images/s of ``extract-features`` against the naive loop, in the same run.

Naive = what one would write first: per batch, in the main process, open the files with PIL,
``processor(images)``, ``model(..., output_hidden_states=True)``, pool ``hidden_states[-2]``.
Ours = :func:`babymerge.features.extract_features` end to end (decode + resize in DataLoader
workers, uint8 pinned transfers, normalise on the device, autocast, blocks up to layer -2 only,
crash-safe HDF5 parts and the final merge).

Prints one JSON object. Defaults run on CPU in well under a minute with a tiny random DINOv2 (so
the number is mostly the data path); ``--encoder`` takes a real model directory or hub id, and
``--shape large`` a random model with dinov2-large's shape (no download) for GPU FLOP/s figures.

    python scripts/bench_extract.py                       # CPU, tiny encoder, 128 JPEGs 640x480
    python scripts/bench_extract.py --shape large --images 2048 --batch-size 256   # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from babymerge.benchmark import environment, peak_flops
from babymerge.featurefile import LAYER, FeatureTable
from babymerge.features import (
    ExtractConfig,
    extract_features,
    num_decode_workers,
    pool_patch_tokens,
    save_random_dinov2,
)
from babymerge.images import gpu_jpeg_decoder_available

SHAPES = {"tiny": dict(hidden_size=64, num_layers=2, num_heads=4),
          "large": dict(hidden_size=1024, num_layers=24, num_heads=16)}


def make_images(folder: Path, n: int, size: tuple[int, int]) -> None:
    """Photo-like JPEGs (smooth colour fields, quality 90), as in a real image set."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        small = (rng.random((size[1] // 16, size[0] // 16, 3)) * 255).astype(np.uint8)
        image = Image.fromarray(small).resize(size, Image.BICUBIC).filter(ImageFilter.DETAIL)
        image.save(folder / f"{i:06d}.jpg", quality=90)


def encoder_flops_per_image(config, image_size: int) -> float:
    """Forward FLOPs of the blocks extraction runs (all but the last), patch embedding included."""
    d = config.hidden_size
    tokens = 1 + getattr(config, "num_register_tokens", 0) + (image_size // config.patch_size) ** 2
    mlp = int(d * config.mlp_ratio)
    per_block = 2 * tokens * (4 * d * d + 2 * d * mlp) + 2 * 2 * tokens * tokens * d
    blocks = config.num_hidden_layers + 1 + LAYER
    embed = 2 * (tokens - 1) * 3 * config.patch_size ** 2 * d
    return float(per_block * blocks + embed)


@torch.inference_mode()
def naive(files: list[Path], encoder: str, device: torch.device, batch_size: int,
          autocast: torch.dtype | None) -> tuple[float, torch.Tensor]:
    from transformers import AutoImageProcessor, AutoModel

    processor = AutoImageProcessor.from_pretrained(encoder)
    model = AutoModel.from_pretrained(encoder).eval().to(device)
    feats = []
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(files), batch_size):
        images = [Image.open(p).convert("RGB") for p in files[i:i + batch_size]]
        pixels = processor(images, return_tensors="pt")["pixel_values"].to(device)
        with torch.autocast(device.type, dtype=autocast or torch.float32,
                            enabled=autocast is not None):
            hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states[LAYER]
        feats.append(pool_patch_tokens(hidden, 1).cpu())
    return time.perf_counter() - start, torch.cat(feats)


def preprocess_rates(files: list[Path], encoder: str) -> dict:
    """Images/s of decode + preprocessing alone, one process: the processor on PIL images vs our
    worker path (draft, uint8 resize, crop) on bytes. This is what bounds the DataLoader per core."""
    from transformers import AutoImageProcessor

    from babymerge.features import load_encoder

    processor = AutoImageProcessor.from_pretrained(encoder)
    preprocess = load_encoder(encoder).preprocess
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker: one core each
    start = time.perf_counter()
    for p in files:
        processor([Image.open(p).convert("RGB")], return_tensors="pt")
    naive = time.perf_counter() - start
    start = time.perf_counter()
    for p in files:
        preprocess(p.read_bytes())
    ours = time.perf_counter() - start
    torch.set_num_threads(threads)
    return {"preprocess_per_core_images_per_s": {"processor": round(len(files) / naive, 1),
                                                 "ours": round(len(files) / ours, 1)}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--size", default="640x480", help="generated images' WxH")
    parser.add_argument("--source", help="benchmark on this folder of images instead")
    parser.add_argument("--encoder", help="model dir or hub id (default: a random --shape model)")
    parser.add_argument("--shape", choices=tuple(SHAPES), default="tiny")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=-1)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--skip-naive", action="store_true")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = Path(args.source) if args.source else tmp / "images"
        if not args.source:
            make_images(source, args.images, tuple(int(v) for v in args.size.split("x")))
        files = sorted(p for p in source.rglob("*") if p.is_file())
        encoder = args.encoder or str(save_random_dinov2(tmp / "encoder", **SHAPES[args.shape]))

        # JPEG decoding in the workers and, where the machine can, on the GPU: the same run
        decoders = ["workers"] + (["gpu"] if device.type == "cuda"
                                  and gpu_jpeg_decoder_available() else [])
        by_decode = {}
        for decode in decoders:
            cfg = ExtractConfig(source=str(source), out=tmp / f"features-{decode}.h5",
                                encoder=encoder, batch_size=args.batch_size, device=device.type,
                                dtype="float32", num_workers=args.num_workers, decode=decode)
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the result
                by_decode[decode] = extract_features(cfg)
        best = max(decoders, key=lambda d: by_decode[d]["images_per_s"])
        ours = by_decode[best]
        table = FeatureTable(tmp / f"features-{best}.h5", dtype=torch.float32)
        autocast = torch.bfloat16 if device.type == "cuda" else None
        result = {"bench": "extract_features", **environment(device),
                  "cpu_count": os.cpu_count(),
                  "images": len(files), "image_size_generated": None if args.source else args.size,
                  "encoder": args.encoder or f"random dinov2 ({args.shape} shape)",
                  "batch_size": args.batch_size,
                  "num_workers": num_decode_workers(args.num_workers),
                  "ours_images_per_s": ours["images_per_s"], "ours_failed": ours["failed"],
                  "ours_decode": best,
                  "ours_images_per_s_by_decode": {d: r["images_per_s"]
                                                  for d, r in by_decode.items()}}
        if len(decoders) > 1:
            tables = [FeatureTable(tmp / f"features-{d}.h5", dtype=torch.float32)
                      for d in decoders]
            result["max_abs_feature_diff_gpu_vs_workers_decode"] = (
                tables[0].features - tables[1].lookup(tables[0].ids)).abs().max().item()
        if not args.skip_naive:
            seconds, feats = naive(files, encoder, device, args.batch_size, autocast)
            order = [table.row[p.relative_to(source).with_suffix("").as_posix()] for p in files]
            diff = (table.features[order] - feats).abs().max().item()
            result |= {"naive_images_per_s": round(len(files) / seconds, 2),
                       "speedup": round(ours["images_per_s"] * seconds / len(files), 3),
                       "max_abs_feature_diff_vs_naive": diff,
                       "feature_scale_mean_abs": feats.abs().mean().item()}
        result |= preprocess_rates(files, encoder)
        if device.type == "cuda":
            from transformers import AutoConfig

            flops = encoder_flops_per_image(AutoConfig.from_pretrained(encoder), table.attrs[
                "image_size"])
            peak = peak_flops(device)
            result |= {"gflops_per_image": round(flops / 1e9, 2),
                       "achieved_tflops": round(flops * ours["images_per_s"] / 1e12, 2),
                       "peak_bf16_tflops": peak and peak / 1e12,
                       "pct_of_peak": peak and round(100 * flops * ours["images_per_s"] / peak, 2)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
