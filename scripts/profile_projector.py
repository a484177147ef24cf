"""Where the host time of one projector training step goes (forward + backward, weights needing
grad), fused Triton path vs torch eager: torch.profiler tables sorted by CPU time, plus the host
time of the smallest Triton call we make (a one-tensor merge: plan lookup, one launch, version
bump), about the floor of one launch. For the launch-bound regime (M <= a few thousand rows), where
both paths wait on the CPU, not the GPU.

    python scripts/profile_projector.py --rows 1024 --dtype bf16     # on a GPU
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from babymerge.benchmark import environment
from kernels.projector import project_triton
from kernels.projector_reference import project_reference


def host_us_per_call(fn, calls: int = 200) -> float:
    """Host microseconds per call, calls queued without synchronising (the GPU lags behind)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    return round(host / calls * 1e6, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_projector: needs a CUDA device")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    k, h, n = 1024, 768, 768
    weights = [(torch.randn(*s, generator=g) * 0.03).to(device, dtype).requires_grad_()
               for s in ((h, k), (h,), (n, h), (n,))]
    x = torch.randn(args.rows, k, generator=g).to(device, dtype)
    dy = torch.randn(args.rows, n, generator=g).to(device, dtype)

    def step(fn):
        for w in weights:
            w.grad = None
        fn(x, *weights).backward(dy)

    from kernels import interpolation

    one = [torch.zeros(1, device=device)]
    report = {"benchmark": "profile_projector", **environment(device), "rows": args.rows,
              "dtype": args.dtype,
              "host_us_per_step": {name: host_us_per_call(lambda fn=fn: step(fn))
                                   for name, fn in (("triton", project_triton),
                                                    ("torch_eager", project_reference))},
              "host_us_per_one_tensor_merge_call": host_us_per_call(
                  lambda: interpolation.interpolate_triton_(one, one, one, 0.5))}
    print(json.dumps(report, indent=1))
    for name, fn in (("triton", project_triton), ("torch_eager", project_reference)):
        for _ in range(3):
            step(fn)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                step(fn)
            torch.cuda.synchronize()
        print(f"\n== {name}: 20 steps, M={args.rows}, {args.dtype}")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
