"""Benchmark stage 1: images/s of ``extract-features`` against the naive loop, in the same run.

Naive = what one would write first: per batch, in the main process, open the files with PIL,
``processor(images)``, ``model(..., output_hidden_states=True)``, pool ``hidden_states[-2]``.
Ours = :func:`babymerge.features.extract_features` end to end (decode + resize in DataLoader
workers or nvJPEG, uint8 pinned transfers, normalise on the device, autocast, blocks up to layer
-2 only, crash-safe HDF5 parts and the final merge), once per ``--decode`` the machine has.

Two rates per decoder: ``whole_run`` = images / wall time of the ``extract_features`` call
(listing, encoder load, worker start-up and the final merge included); ``steady`` = images /
time over the batches after the first 2 x num_workers (what the DataLoader has in flight at start,
prefetch_factor 2 per worker, so the start-up burst is left out), timed from the end of that
batch to the end of the last one, the device synchronised at both ends (clock: the progress bar's
per-batch update, the one per-batch hook extract_features has). On CUDA, ``encoder_only`` is the
ceiling the data path chases: ``encode_pixels`` on a uint8 batch already on the device.

Prints one JSON object. Defaults run on CPU in well under a minute with a tiny random DINOv2 (so
the number is mostly the data path); ``--encoder`` takes a real model directory or hub id, and
``--shape large`` a random model with dinov2-large's shape (no download) for GPU FLOP/s figures.
Generated sets hold ``--distinct`` different JPEGs; the other files are byte copies of them (under
their own ids), so a long steady-state run costs no minute of JPEG encoding. On CUDA the default
``--images`` is long enough for the steady window to hold most of the run.

    python scripts/bench_extract.py                       # CPU, tiny encoder, 256 JPEGs 640x480
    python scripts/bench_extract.py --shape large --batch-size 256     # on a GPU

Measured 2026-11-27 on an H100 80GB HBM3 (16 cores, 15 workers, 15,360 images 640x480, batch 256):
steady 1992 img/s with worker decode, 1763 with nvJPEG, against 2033 for the encoder alone (32% of
bf16 peak): the data path keeps the GPU fed, and nvJPEG's decode time is taken from the encoder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from babymerge import features
from babymerge.benchmark import encoder_images_per_s, environment, peak_flops, synchronize
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


def make_images(folder: Path, n: int, size: tuple[int, int], distinct: int | None = None) -> None:
    """``n`` photo-like JPEGs (smooth colour fields, quality 90), as in a real image set; past the
    first ``distinct`` each file is a byte copy of one of those (decoding costs the same)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    distinct = n if distinct is None else min(n, distinct)
    for i in range(distinct):
        small = (rng.random((size[1] // 16, size[0] // 16, 3)) * 255).astype(np.uint8)
        image = Image.fromarray(small).resize(size, Image.BICUBIC).filter(ImageFilter.DETAIL)
        image.save(folder / f"{i:06d}.jpg", quality=90)
    for i in range(distinct, n):
        shutil.copyfile(folder / f"{i % distinct:06d}.jpg", folder / f"{i:06d}.jpg")


class BatchClock:
    """Installed as ``babymerge.features.tqdm``: the progress bar's ``update`` runs once per batch
    after its encode is queued, so it is where batch ends are timed. The device is synchronised
    only at the two timed batches (the first after ``skip`` and the last): a sync per batch
    would stall the pipeline being measured."""

    def __init__(self, skip: int, device: torch.device, base: type):
        self.skip, self.device, self.base = skip, device, base
        self.marks: list[tuple[float, int]] = []  # (time, images done) at both ends

    def bar(self, *args, **kwargs):
        clock = self

        class Bar(self.base):
            batches = done = 0

            def update(self, n=1):
                super().update(n)
                self.batches, self.done = self.batches + 1, self.done + n
                if self.batches == clock.skip or self.done == self.total:
                    synchronize(clock.device)
                    clock.marks.append((time.perf_counter(), self.done))

        return Bar(*args, **kwargs)

    def rate(self) -> tuple[float | None, int]:
        """(images/s over the timed window, images in it); None when the run had no batch
        past the skipped ones."""
        if len(self.marks) < 2:
            return None, 0
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        return (round((n1 - n0) / (t1 - t0), 2) if t1 > t0 else None), n1 - n0


def timed_extract(cfg: ExtractConfig, images: int, device: torch.device) -> dict:
    """extract_features' summary plus ``whole_run`` and ``steady`` images/s (module docstring)."""
    # batches past the first 2 x workers are asked of the workers only as earlier ones are used
    skip = 2 * max(num_decode_workers(cfg.num_workers), 1)
    base = features.tqdm
    clock = BatchClock(skip, device, base)
    features.tqdm = clock.bar
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the result
            summary = extract_features(cfg)
    finally:
        features.tqdm = base
    whole = time.perf_counter() - start
    steady, steady_images = clock.rate()  # None when the run has no batch past the skipped
    return {**summary, "whole_run": round(summary["new"] / whole, 2), "steady": steady,
            "steady_images": steady_images, "steady_skipped_batches": skip}


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
    worker path (exact decode unless --jpeg-draft, uint8 resize, crop) on bytes. This is what
    bounds the DataLoader per core."""
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
    parser.add_argument("--images", type=int, default=None,
                        help="generated images (default: 256 on CPU; on CUDA at least 8192 and "
                             "enough for the steady window to hold half the run)")
    parser.add_argument("--distinct", type=int, default=384,
                        help="different JPEGs among them; the rest are byte copies")
    parser.add_argument("--size", default="640x480", help="generated images' WxH")
    parser.add_argument("--source", help="benchmark on this folder of images instead")
    parser.add_argument("--encoder", help="model dir or hub id (default: a random --shape model)")
    parser.add_argument("--shape", choices=tuple(SHAPES), default="tiny")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=-1)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--naive-images", type=int, default=1024,
                        help="the naive loop runs on the first N images (it has no start-up "
                             "to amortise, and is slow)")
    parser.add_argument("--skip-naive", action="store_true")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    workers = num_decode_workers(args.num_workers)
    n_images = args.images or (256 if device.type == "cpu" else
                               max(8192, 2 * 2 * max(workers, 1) * args.batch_size))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = Path(args.source) if args.source else tmp / "images"
        if not args.source:
            make_images(source, n_images, tuple(int(v) for v in args.size.split("x")),
                        args.distinct)
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
            by_decode[decode] = timed_extract(cfg, len(files), device)

        def rate(d: str) -> float:  # steady where there is a window, else the whole run
            return by_decode[d]["steady"] or by_decode[d]["whole_run"]

        best = max(decoders, key=rate)
        ours = rate(best)
        table = FeatureTable(tmp / f"features-{best}.h5", dtype=torch.float32)
        autocast = torch.bfloat16 if device.type == "cuda" else None
        result = {"bench": "extract_features", **environment(device),
                  "cpu_count": os.cpu_count(),
                  "images": len(files), "image_size_generated": None if args.source else args.size,
                  "distinct_images": None if args.source else min(args.distinct, len(files)),
                  "encoder": args.encoder or f"random dinov2 ({args.shape} shape)",
                  "batch_size": args.batch_size, "num_workers": workers,
                  "ours_images_per_s": ours, "ours_decode": best,
                  "ours_measure": "steady" if by_decode[best]["steady"] else "whole_run",
                  "ours_failed": by_decode[best]["failed"],
                  "ours_images_per_s_by_decode": {
                      d: {"whole_run": r["whole_run"], "steady": r["steady"],
                          "steady_images": r["steady_images"],
                          "steady_skipped_batches": r["steady_skipped_batches"],
                          "extract_reported": r["images_per_s"]}
                      for d, r in by_decode.items()}}
        if len(decoders) > 1:
            tables = [FeatureTable(tmp / f"features-{d}.h5", dtype=torch.float32)
                      for d in decoders]
            result["max_abs_feature_diff_gpu_vs_workers_decode"] = (
                tables[0].features - tables[1].lookup(tables[0].ids)).abs().max().item()
        if not args.skip_naive:
            naive_files = files[:args.naive_images]
            seconds, feats = naive(naive_files, encoder, device, args.batch_size, autocast)
            order = [table.row[p.relative_to(source).with_suffix("").as_posix()]
                     for p in naive_files]
            diff = (table.features[order] - feats).abs().max().item()
            naive_rate = len(naive_files) / seconds
            result |= {"naive_images": len(naive_files),
                       "naive_images_per_s": round(naive_rate, 2),
                       "speedup": round(ours / naive_rate, 3),
                       "max_abs_feature_diff_vs_naive": diff,
                       "feature_scale_mean_abs": feats.abs().mean().item()}
        result |= preprocess_rates(files[:128], encoder)
        if device.type == "cuda":
            from transformers import AutoConfig

            flops = encoder_flops_per_image(AutoConfig.from_pretrained(encoder), table.attrs[
                "image_size"])
            peak = peak_flops(device)
            ceiling = encoder_images_per_s(encoder, device, args.batch_size, repeats=10)
            result |= {"gflops_per_image": round(flops / 1e9, 2),
                       "achieved_tflops": round(flops * ours / 1e12, 2),
                       "peak_bf16_tflops": peak and peak / 1e12,
                       "pct_of_peak": peak and round(100 * flops * ours / peak, 2),
                       "encoder_only_images_per_s": round(ceiling, 2),
                       "encoder_only_pct_of_peak": peak and round(100 * flops * ceiling / peak, 2),
                       "ours_vs_encoder_only": round(ours / ceiling, 3)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
