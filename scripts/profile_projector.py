"""Where the host time of one projector training step goes (forward + backward, weights needing
grad), fused Triton path vs torch eager: torch.profiler tables sorted by CPU time, plus the host
time of the smallest Triton call we make (a one-tensor merge: plan lookup, one launch, version
bump), about the floor of one launch. For the launch-bound regime (M <= a few thousand rows), where
both paths wait on the CPU, not the GPU.

The Triton step's host time is split three ways (``triton_host_split``): autograd's own cost (a
custom Function whose forward and backward only allocate the outputs), our Python around the
launches (the same step with every kernel launch replaced by a no-op), and Triton's launch path
(the rest, per launch).

    python scripts/profile_projector.py --rows 1024 --dtype bf16     # on a GPU
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from babymerge.benchmark import environment
from babymerge.kernels import projector
from babymerge.kernels.projector import project_triton
from babymerge.kernels.projector_reference import project_reference


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


class _AllocateOnly(torch.autograd.Function):
    """The projector's autograd shape with no work: forward and backward allocate their outputs
    and save what the real one saves. Its step is autograd's own host cost."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        z = x.new_empty(x.shape[0], w1.shape[0])
        ctx.save_for_backward(x, w1, w2, z)
        return x.new_empty(x.shape[0], w2.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, w1, w2, z = ctx.saved_tensors
        return (x.new_empty(x.shape), w1.new_empty(w1.shape), w1.new_empty(w1.shape[0]),
                w2.new_empty(w2.shape), w2.new_empty(w2.shape[0]))


class _CountedLaunches:
    """Stands in for the projector module's Triton kernels: counts the launches of a step and,
    with ``launch=False``, skips them (what is left is our Python around them)."""

    KERNELS = ("_projector_fwd_kernel", "_linear_kernel", "_projector_bwd_dz_kernel",
               "_projector_bwd_grads_kernel")

    def __init__(self, launch: bool):
        self.launch, self.count, self.saved = launch, 0, {}

    def __enter__(self):
        counter = self

        class Proxy:
            def __init__(self, kernel):
                self.kernel = kernel

            def __getitem__(self, grid):
                counter.count += 1
                return self.kernel[grid] if counter.launch else lambda *args, **kwargs: None

        for name in self.KERNELS:
            self.saved[name] = getattr(projector, name)
            setattr(projector, name, Proxy(self.saved[name]))
        return self

    def __exit__(self, *exc):
        for name, kernel in self.saved.items():
            setattr(projector, name, kernel)


def triton_host_split(step, triton_us: float) -> dict:
    """Autograd, our wrapper and Triton's launch path in one Triton step's host time. Run after
    the real step has been timed: its launch plans are measured and cached by then, so the
    stubbed steps below take the same plans and time nothing."""
    with _CountedLaunches(launch=True) as counted:
        step(project_triton)
    with _CountedLaunches(launch=False):
        wrapper_us = host_us_per_call(lambda: step(project_triton))
    autograd_us = host_us_per_call(lambda: step(_AllocateOnly.apply))
    return {"launches_per_step": counted.count, "autograd_us": autograd_us,
            "wrapper_us": round(wrapper_us - autograd_us, 1),
            "triton_launch_us_per_launch": round((triton_us - wrapper_us) / counted.count, 1)}


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

    from babymerge.kernels import interpolation

    one = [torch.zeros(1, device=device)]
    report = {"benchmark": "profile_projector", **environment(device), "rows": args.rows,
              "dtype": args.dtype,
              "host_us_per_step": {name: host_us_per_call(lambda fn=fn: step(fn))
                                   for name, fn in (("triton", project_triton),
                                                    ("torch_eager", project_reference))},
              "host_us_per_one_tensor_merge_call": host_us_per_call(
                  lambda: interpolation.interpolate_triton_(one, one, one, 0.5))}
    report["triton_host_split"] = triton_host_split(step, report["host_us_per_step"]["triton"])
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
