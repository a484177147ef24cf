"""Time one alpha of the merge sweep three ways, against a plain copy of the same bytes.

- ``inplace``: what ``babymerge merge`` does: ``kernels.interpolate_`` overwrites the live model's
  parameters from the two resident endpoints (reads 2P bytes, writes P);
- ``state_dict``: the naive script: build a merged state dict, then ``model.load_state_dict``;
- ``safetensors``: the naive state dict written with safetensors and read back before loading
  (the floor of any merge-to-disk-then-evaluate loop; from_pretrained adds model construction);
- ``copy``: ``dst.copy_(src)`` over the same tensors (reads P, writes P): the memory-bandwidth
  limit.

Prints one JSON object, with (on a GPU) the % of the memory's datasheet bandwidth. ``--quick`` (and
the default on CPU) uses the ``small`` preset.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from safetensors.torch import load_file, save_file

from babymerge import kernels
from babymerge.benchmark import environment, peak_bandwidth, synchronize
from babymerge.model import MODEL_PRESETS, build_model


def timed(fns: dict, device: torch.device, repeats: int) -> dict[str, float]:
    """Fastest of ``repeats`` calls of each function after one warm-up. The functions take turns
    (round robin) so that a burst of load on a shared machine hits all of them alike, and the
    minimum is the least disturbed measurement of a bandwidth-bound op."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return {name: min(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, choices=sorted(MODEL_PRESETS),
                        help="model size (default: paper on CUDA, small on CPU)")
    parser.add_argument("--vocab", type=int, default=30000)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="small preset, 5 repeats")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    preset = args.preset or ("small" if args.quick or device.type == "cpu" else "paper")
    repeats = args.repeats or (5 if args.quick else 10)
    dtype = getattr(torch, args.dtype)

    ids = dict(vocab_size=args.vocab, image_token_id=4, pad_token_id=0, bos_token_id=1,
               eos_token_id=2)
    live = build_model(MODEL_PRESETS[preset], seed=0, **ids).to(device, dtype)
    names = [n for n, _ in live.named_parameters()]
    params = [p.data for p in live.parameters()]
    lm = [torch.randn_like(p) for p in params]  # values do not matter to a bandwidth-bound op
    vlm = [p.clone() for p in params]
    nbytes = sum(p.numel() * p.element_size() for p in params)
    alpha = 0.3

    def inplace() -> None:
        kernels.interpolate_(params, lm, vlm, alpha)

    def naive_state_dict() -> dict[str, torch.Tensor]:
        return {n: alpha * a + (1 - alpha) * b for n, a, b in zip(names, lm, vlm)}

    def state_dict() -> None:
        live.load_state_dict(naive_state_dict(), strict=False)

    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "merged.safetensors")

    def safetensors_round_trip() -> None:
        save_file({n: t.contiguous().cpu() for n, t in naive_state_dict().items()}, path)
        live.load_state_dict({n: t.to(device) for n, t in load_file(path).items()}, strict=False)

    def copy() -> None:
        for d, s in zip(params, lm):
            d.copy_(s)

    # the merge paths must produce the same model, or the timings compare different work (the
    # round trip goes through the naive state dict, so one comparison covers both)
    inplace()
    merged_inplace = [p.clone() for p in params]
    safetensors_round_trip()
    max_diff = max(float((a - b).abs().max()) for a, b in zip(merged_inplace, params, strict=True))
    seconds = timed({"inplace": inplace, "state_dict": state_dict,
                     "safetensors": safetensors_round_trip, "copy": copy}, device, repeats)
    os.remove(path)
    os.rmdir(tmp)
    inplace_gbps = 3 * nbytes / seconds["inplace"] / 1e9
    copy_gbps = 2 * nbytes / seconds["copy"] / 1e9
    peak = peak_bandwidth(device)
    result = {
        "bench": "merge_one_alpha", **environment(device),
        "kernel_path": os.environ.get("BABYMERGE_KERNELS", "auto"),
        "preset": preset, "vocab": args.vocab, "dtype": args.dtype, "params": sum(
            p.numel() for p in params), "param_bytes": nbytes, "repeats": repeats,
        "seconds_per_alpha": seconds,
        "GBps": {"inplace (read 2P + write P)": inplace_gbps, "copy (read P + write P)": copy_gbps},
        "inplace_fraction_of_copy_bandwidth": inplace_gbps / copy_gbps,
        # % of the memory's datasheet bandwidth (None on a CPU or a GPU missing from the table)
        "peak_GBps": peak and peak / 1e9,
        "inplace_pct_of_peak_bandwidth": peak and 100 * inplace_gbps * 1e9 / peak,
        "copy_pct_of_peak_bandwidth": peak and 100 * copy_gbps * 1e9 / peak,
        "speedup_inplace_vs_state_dict": seconds["state_dict"] / seconds["inplace"],
        "speedup_inplace_vs_safetensors": seconds["safetensors"] / seconds["inplace"],
        "max_abs_diff_inplace_vs_naive_merge": max_diff,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
