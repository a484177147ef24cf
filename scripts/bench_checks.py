"""What the finiteness checks cost, against the work they guard; prints one JSON object.

- ``load``: :func:`babymerge.model.check_finite` over a model's parameters (eval, merge and export
  load through it; merge also reads the LM's and base's tensors through it), against one alpha of
  a merge sweep (the in-place merge plus scoring ``--pairs`` minimal pairs);
- ``features``: :class:`babymerge.featurefile.FeatureTable`'s check of rows held in memory, per
  million rows of 1024-d float16 (the paper's cache is ~600k);
- ``train_step``: a training step with the gradient-norm check (the norm clipping computes
  anyway, then one ``isfinite``) against the same step without it.

Random model of ``--preset`` (default: paper on CUDA, small on a CPU), 30k vocabulary.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from babymerge.benchmark import environment, synchronize
from babymerge.evaluate import pack_task, score_candidates
from babymerge.kernels import interpolate_
from babymerge.model import MODEL_PRESETS, build_model, check_finite
from babymerge.tasks import TaskSpec


def seconds(fn, device, repeats: int = 3) -> float:
    """Best of ``repeats`` (the least disturbed by other work on the machine)."""
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, choices=sorted(MODEL_PRESETS))
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--rows", type=int, default=100_000, help="feature rows to check")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    preset = args.preset or ("small" if device.type == "cpu" else "paper")
    cfg = MODEL_PRESETS[preset]
    ids = dict(vocab_size=30000, image_token_id=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = build_model(cfg, seed=0, **ids).to(device)
    other = [p.detach().clone() for p in model.parameters()]
    params = [p.data for p in model.parameters()]
    gen = torch.Generator().manual_seed(0)
    pairs = [[torch.randint(5, 30000, (n,), generator=gen).tolist() for n in (12, 12)]
             for _ in range(args.pairs)]
    task = pack_task(TaskSpec("bench", "minimal_pairs", "random"), [1, 4], pairs,
                     [[0, 0]] * args.pairs, ["b"] * args.pairs, [0] * args.pairs,
                     torch.randn(1, cfg.feature_dim, generator=gen))

    def one_alpha():
        interpolate_(params, other, params, 0.5)
        score_candidates(model.eval(), task, progress=False)

    load = seconds(lambda: check_finite(model.named_parameters(), "bench"), device)
    alpha = seconds(one_alpha, device)

    rows = torch.randn(args.rows, cfg.feature_dim, generator=gen).half()
    features = seconds(lambda: bool(torch.isfinite(rows).all(dim=1).all()), device)

    model.train()
    batch = torch.randint(5, 30000, (8, 128), generator=gen)
    batch[:, 0], batch[:, 1] = 1, 4  # [BOS, <image>], as every training sequence starts
    batch = batch.to(device)
    feats = torch.randn(8, cfg.feature_dim, generator=gen).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(check: bool):
        loss = model(input_ids=batch, pixel_values=feats, labels=batch, use_cache=False).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if check and not torch.isfinite(norm):
            raise RuntimeError("non-finite")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(False)  # warm-up
    plain = seconds(lambda: step(False), device)
    checked = seconds(lambda: step(True), device)
    result = {
        "bench": "finiteness_checks", **environment(device), "preset": preset,
        "params": sum(p.numel() for p in params),
        "load_check_s": load, "one_alpha_s": alpha,
        "load_check_vs_one_alpha": load / alpha,
        "load_check_vs_sweep_0_1_0.1": load / (11 * alpha),
        "feature_check_s_per_million_rows": features * 1e6 / args.rows,
        "train_step_s": plain, "train_step_checked_s": checked,
        "train_step_overhead": checked / plain - 1,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
