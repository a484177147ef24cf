"""Minimal pairs per second: babymerge's batched scoring against one sentence at a time.

- ``batched``: :func:`babymerge.evaluate.score_candidates` (length-sorted, right-padded batches,
  LM head only on scored positions);
- ``batched_size1``: the same function with batch size 1 (what batching alone buys);
- ``one_at_a_time``: the BabyLM pipeline's way: one sentence per forward, full-vocabulary logits,
  ``log_softmax``, gather.

Random BLiMP-like pairs (8-20 tokens after the [BOS, <image>] prefix) on a random model with the
paper's 30k vocabulary. Prints one JSON object, including the largest score difference between the
batched and the one-at-a-time paths and, on a GPU, the batched path's % of the device's peak.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from babymerge.benchmark import environment, peak_flops, synchronize
from babymerge.evaluate import pack_task, score_candidates
from babymerge.tasks import TaskSpec
from babymerge.model import MODEL_PRESETS, build_model


def one_at_a_time(model, task) -> torch.Tensor:
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for seq, start, row in zip(task.input_ids, task.score_from, task.feature_rows.tolist()):
            ids = torch.tensor([seq], device=device)
            logp = model(input_ids=ids, pixel_values=task.features[row:row + 1].to(device)
                         ).logits.float().log_softmax(-1)[0]
            targets = ids[0, start:]
            out.append(logp[start - 1:-1].gather(1, targets[:, None]).sum().item())
    return torch.tensor(out, dtype=torch.float64)


def scoring_flops(model, task) -> float:
    """Useful matmul FLOPs of scoring every candidate once (nanoGPT-style estimate; padding and
    the one projector matmul per sequence not counted): 2 x the decoder layers' weights per
    token, 2 x hidden x vocab per scored token (the batched path runs the LM head only there),
    and causal attention's QK^T and AV, 2 x hidden x T(T+1) per layer for a length-T sequence."""
    text = model.config.text_config
    layers = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
    total = 0
    for seq, start in zip(task.input_ids, task.score_from):
        t = len(seq)
        total += (2 * layers * t + 2 * text.hidden_size * text.vocab_size * (t - start)
                  + 2 * text.num_hidden_layers * text.hidden_size * t * (t + 1))
    return float(total)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, choices=sorted(MODEL_PRESETS),
                        help="model size (default: paper on CUDA, small on CPU)")
    parser.add_argument("--pairs", type=int, default=None, help="default 32 on CPU (--quick 16), "
                        "2000 on CUDA")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=30000)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    preset = args.preset or ("small" if args.quick or device.type == "cpu" else "paper")
    pairs = args.pairs or (16 if args.quick else 32 if device.type == "cpu" else 2000)

    cfg = MODEL_PRESETS[preset]
    model = build_model(cfg, seed=0, vocab_size=args.vocab, image_token_id=4, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2).to(device).eval()
    gen = torch.Generator().manual_seed(0)

    def sentence() -> list[int]:
        n = int(torch.randint(8, 21, (1,), generator=gen))
        return torch.randint(5, args.vocab, (n,), generator=gen).tolist()

    task = pack_task(TaskSpec("bench", "minimal_pairs", "random"), [1, 4],
                     [[sentence(), sentence()] for _ in range(pairs)], [[0, 0]] * pairs,
                     ["bench"] * pairs, [0] * pairs, torch.randn(1, cfg.feature_dim, generator=gen))

    def timed(fn):
        synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        synchronize(device)
        return out, time.perf_counter() - t0

    score_candidates(model, task, args.batch_size, progress=False)  # warm-up
    batched, t_batched = timed(lambda: score_candidates(model, task, args.batch_size,
                                                        progress=False))
    _, t_size1 = timed(lambda: score_candidates(model, task, 1, progress=False))
    reference, t_single = timed(lambda: one_at_a_time(model, task))
    result = {
        "bench": "eval_minimal_pairs", **environment(device),
        "preset": preset, "vocab": args.vocab, "pairs": pairs, "batch_size": args.batch_size,
        "pairs_per_s": {"batched": pairs / t_batched, "batched_size1": pairs / t_size1,
                        "one_at_a_time": pairs / t_single},
        "speedup_batched_vs_one_at_a_time": t_single / t_batched,
        "max_abs_score_diff": float((batched - reference).abs().max()),
    }
    # % of the device's peak (the model scores in float32: the CUDA-core fp32 peak, as torch
    # leaves TF32 matmuls off by default); None on a CPU or a GPU missing from the table
    flops = scoring_flops(model, task)
    peak = peak_flops(device, next(model.parameters()).dtype)
    result |= {"gflops_per_pass": round(flops / 1e9, 4),
               "achieved_tflops_batched": round(flops / t_batched / 1e12, 4),
               "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
               "peak_tflops": peak and peak / 1e12,
               "pct_of_peak_batched": peak and round(100 * flops / t_batched / peak, 3)}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
