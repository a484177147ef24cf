"""Training throughput from cached features vs the same step running the image encoder on pixels.

What the feature cache saves: the ``cached`` step reads pooled features from the in-memory
table (as ``babymerge train`` does); the ``pixels`` step first runs the frozen encoder (forward
only, as LLaVA freezes it) on decoded 224x224 crops, then the identical model step. JPEG decoding
and resizing, which the cache also saves, are not counted. The loader (batch assembly from the
memory-mapped token cache and the feature table) is timed on its own and compared with the step.

``loader_in_loop`` answers "does the loader make the GPU wait": the same caption batches run
through a train-like loop (loader inline, as in ``babymerge train``, no sync until the end) with
features in memory and out of core (``FeatureTable(max_memory_bytes=0)``: one sorted HDF5 read per
batch; the file here sits in the page cache, so disk latency is not included), and once with
every batch prebuilt on the device. ``wait_ms`` = step time with the loader minus step time
with prebuilt batches: the loader's cost that the step does not hide. On CPU nothing overlaps
(both share the cores); on CUDA the loader runs while queued kernels execute.

Prints one JSON object. ``--quick`` (the default on CPU): tiny model and encoder, seconds. On CUDA
the default is the paper's model and a DINOv2-large-sized random encoder, with bf16 autocast and
the model FLOP utilisation (6N + 12·L·H·Q·T FLOPs per token, nanoGPT's estimate).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from babymerge.benchmark import (environment, peak_flops, synchronize,
                                 train_flops_per_token)
from babymerge.data import CAPTIONS, TEXT, load_captions, load_text
from babymerge.featurefile import BLACK, FAILED, FEATURES, IDS, STR_DTYPE, FeatureTable
from babymerge.features import load_encoder, save_random_dinov2
from babymerge.model import MODEL_PRESETS, build_model
from babymerge.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer
from babymerge.train import TrainConfig, make_optimizer


def parse_args() -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=not cuda,
                   help="tiny model and encoder (default on CPU)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None, help="caption sequence length")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    return p.parse_args()


def make_data(root: Path, n_images: int, dim: int, rng: np.random.Generator):
    """A generated corpus, captions and feature file, loaded through babymerge's data path."""
    words = [f"w{i}" for i in range(2000)]
    lines = [" ".join(rng.choice(words, rng.integers(5, 30))) + "." for _ in range(4000)]
    (root / "text.txt").write_text("\n".join(lines) + "\n")
    ids = [f"img{i}" for i in range(n_images)]
    (root / "caps.tsv").write_text("".join(f"{i}\t{' '.join(rng.choice(words, 40))}\n"
                                           for i in ids))
    with h5py.File(root / "f.h5", "w") as f:
        f[FEATURES] = rng.normal(size=(n_images, dim)).astype(np.float16)
        f.create_dataset(IDS, data=np.array(ids, dtype=object), dtype=STR_DTYPE)
        f[BLACK] = np.zeros(dim, dtype=np.float16)
        g = f.create_group(FAILED)
        g.create_dataset("ids", shape=(0,), dtype=STR_DTYPE)
        g.create_dataset("reasons", shape=(0,), dtype=STR_DTYPE)
        f.attrs.update({"complete": True, "count": n_images})
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the result
        train_tokenizer(TokenizerConfig(corpus=[root / "text.txt"], out=root / "tok",
                                        vocab_size=2500, ratio_lines=100,
                                        progress=False))
    return load_tokenizer(root / "tok"), FeatureTable(root / "f.h5")


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    quick = args.quick
    batch = args.batch_size or (8 if quick else 32)
    seq_len = args.seq_len or (64 if quick else 128)
    steps = args.steps or (4 if quick else 20)
    preset = "tiny" if quick else "paper"
    enc_kw = (dict(hidden_size=64, num_layers=2, num_heads=4) if quick else
              dict(hidden_size=1024, num_layers=24, num_heads=16))  # dinov2-large's shape
    use_bf16 = device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        encoder = load_encoder(save_random_dinov2(root / "enc", **enc_kw), device=device,
                               dtype=torch.bfloat16 if use_bf16 else torch.float32)
        tokenizer, table = make_data(root, 4096, encoder.dim, rng)
        sources = {TEXT: load_text([root / "text.txt"], tokenizer, root / "cache", seq_len,
                                   progress=False),
                   CAPTIONS: load_captions([root / "caps.tsv"], tokenizer, root / "cache",
                                           seq_len, table, progress=False)}
        cfg_model = MODEL_PRESETS[preset]
        cfg_model = type(cfg_model)(**{**cfg_model.__dict__, "feature_dim": encoder.dim})
        # The paper's 30k vocabulary, except in --quick where the LM head would swamp the tiny
        # model's step and hide the encoder's share.
        vocab = len(tokenizer) if quick else 30_000
        model = build_model(cfg_model, seed=0, vocab_size=vocab, image_token_id=4,
                            pad_token_id=3, bos_token_id=1, eos_token_id=2).to(device).train()
        cfg = TrainConfig(kind="vlm", captions=[root / "caps.tsv"], features=root / "f.h5",
                          tokenizer=root / "tok", out=root / "out", seq_len=seq_len)
        optimizer = make_optimizer(model, cfg, device)

        def to_device(b: dict) -> dict:
            if device.type == "cuda":
                return {k: v.pin_memory().to(device, non_blocking=True) for k, v in b.items()}
            return b

        def loop(batches) -> tuple[float, float]:
            """(ms per step, ms of it building batches) over ``batches`` (callables that build
            one), train-like: no sync until the end."""
            synchronize(device)
            load = 0.0
            t0 = time.perf_counter()
            for make in batches:
                t1 = time.perf_counter()
                b = make()
                load += time.perf_counter() - t1
                with autocast:
                    loss = model(input_ids=b["input_ids"], pixel_values=b["features"],
                                 labels=b["labels"], use_cache=False).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            return 1000 * (time.perf_counter() - t0) / len(batches), 1000 * load / len(batches)

        def loader_in_loop(n_steps: int) -> dict:
            ooc = load_captions([root / "caps.tsv"], tokenizer, root / "cache", seq_len,
                                FeatureTable(root / "f.h5", max_memory_bytes=0), progress=False)
            indices = [rng.integers(0, len(ooc), batch) for _ in range(n_steps)]
            prebuilt = [to_device(sources[CAPTIONS].batch(i)) for i in indices]
            variants = {"prebuilt": [lambda b=b: b for b in prebuilt],
                        "in_memory": [lambda i=i: to_device(sources[CAPTIONS].batch(i))
                                      for i in indices],
                        "out_of_core": [lambda i=i: to_device(ooc.batch(i)) for i in indices]}
            assert all(torch.equal(ooc.batch(i)["features"], sources[CAPTIONS].batch(i)["features"])
                       for i in indices[:2])
            loop(variants["prebuilt"][:2])  # warm-up
            # Rounds interleave the variants, and each keeps its fastest round: on a shared
            # machine the noise only ever adds time.
            rounds = [{name: loop(v) for name, v in variants.items()} for _ in range(3)]
            timed = {name: min((r[name] for r in rounds), key=lambda t: t[0]) for name in variants}
            base = timed["prebuilt"][0]
            out = {"step_ms_prebuilt": round(base, 3), "steps": n_steps, "rounds": len(rounds)}
            for name in ("in_memory", "out_of_core"):
                step_ms, load_ms = timed[name]
                out[name] = {"step_ms": round(step_ms, 3), "loader_ms": round(load_ms, 3),
                             "loader_share_of_step": round(load_ms / step_ms, 4),
                             "wait_ms": round(step_ms - base, 3),
                             "wait_share_of_step": round((step_ms - base) / step_ms, 4)}
            return out

        def loader_ms(src: int) -> float:
            n = len(sources[src])
            t0 = time.perf_counter()
            for _ in range(20):
                b = sources[src].batch(rng.integers(0, n, batch))
                if device.type == "cuda":
                    b = {k: v.pin_memory().to(device, non_blocking=True) for k, v in b.items()}
            return 1000 * (time.perf_counter() - t0) / 20

        # Model input: full-length sequences so both variants do the same work.
        ids = torch.randint(5, vocab, (batch, seq_len), device=device)
        ids[:, 0], ids[:, 1] = 1, 4
        labels = ids.clone()
        labels[:, :2] = -100
        pixels = torch.randint(0, 256, (batch, 3, encoder.image_size, encoder.image_size),
                               dtype=torch.uint8)
        rows = torch.from_numpy(rng.integers(0, len(table), batch))

        def step(from_pixels: bool) -> tuple[float, float]:
            t0 = time.perf_counter()
            if from_pixels:
                feats = encoder.encode_pixels(pixels).clone()  # frozen encoder, forward only
            else:
                feats = table.features[rows].to(device, non_blocking=True)
            synchronize(device)
            t_enc = time.perf_counter() - t0
            with autocast:
                loss = model(input_ids=ids, pixel_values=feats, labels=labels,
                             use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            return time.perf_counter() - t0, t_enc

        results = {}
        for name, from_pixels in (("cached_features", False), ("encoder_on_pixels", True)):
            for _ in range(args.warmup):
                step(from_pixels)
            times = [step(from_pixels) for _ in range(steps)]
            total = sum(t for t, _ in times)
            results[name] = {"step_ms": round(1000 * total / steps, 3),
                             "feature_ms": round(1000 * sum(e for _, e in times) / steps, 3),
                             "tokens_per_s": round(batch * seq_len * steps / total, 1)}
        fpt = train_flops_per_token(model, seq_len)
        peak = peak_flops(device)
        mfu = ({k: round(fpt * results[k]["tokens_per_s"] / peak, 4) for k in results}
               if peak else None)
        out = {
            "bench": "train_step", **environment(device), "preset": preset, "batch_size": batch,
            "seq_len": seq_len, "steps": steps, "vocab_size": vocab,
            "precision": "bf16" if use_bf16 else "fp32",
            "encoder": {**enc_kw, "image_size": encoder.image_size},
            **results,
            "speedup_cached_vs_pixels": round(results["encoder_on_pixels"]["step_ms"]
                                              / results["cached_features"]["step_ms"], 3),
            "loader_ms_per_batch": {"text": round(loader_ms(TEXT), 3),
                                    "captions": round(loader_ms(CAPTIONS), 3)},
            "loader_in_loop": loader_in_loop(max(steps, 8)),
            "model_flops_per_token": fpt, "mfu": mfu,
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
