"""Benchmark babymerge's kernels against their baselines, in one run; prints ONE JSON object.

- projector forward+backward (training shape: features need no grad, weights do) at several M:
  fused Triton vs torch eager vs torch.compile of the same reference, with TFLOP/s and % of the
  device's dense peak;
- merge ``dst = alpha*a + (1-alpha)*b`` over a BabyLLaVA preset's parameter list: GB/s (bytes read +
  written) of the fused Triton kernel vs ``torch._foreach_lerp_`` vs a per-tensor ``lerp(out=)``
  loop, and each as a % of a device-to-device copy moving the same bytes.

On CPU only the torch paths run (interpreted Triton timings mean nothing).

    python scripts/bench_kernels.py --quick          # CPU, < 1 minute
    python scripts/bench_kernels.py                  # GPU: M in 256..16384, the paper preset
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

# The interpreter would make "Triton" timings meaningless; never let the environment turn it on.
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("bench_kernels: unset TRITON_INTERPRET (timings of interpreted kernels mean nothing)")

from babymerge import kernels  # noqa: E402
from babymerge.benchmark import environment, peak_flops  # noqa: E402
from babymerge.kernels import measured  # noqa: E402
from babymerge.model import MODEL_PRESETS, build_model  # noqa: E402
from babymerge.kernels.projector_reference import project_reference  # noqa: E402

IDS = dict(vocab_size=30000, image_token_id=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def timed(fn, device: torch.device, reps: int) -> float:
    """Median seconds of ONE isolated ``fn()`` after two warm-up calls, synchronised before each
    (CUDA: events). Host time spent before the launch counts: the latency of a lone call."""
    fn()
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timed_back_to_back(fn, device: torch.device, reps: int) -> float:
    """Seconds per call of ``reps`` calls queued back to back (the usual kernel-benchmark figure,
    as triton.testing.do_bench): host work of call i+1 overlaps the GPU work of call i, as inside
    a training step or an alpha sweep, so a GPU-bound op shows its device time and a host-bound
    one its host time."""
    fn()
    fn()
    if device.type != "cuda":
        return timed(fn, device, reps)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def steady_peak_mb(step, device: torch.device) -> float:
    """Peak CUDA memory (MB) of one ``step`` after warm-up. Not over the first calls: there the
    Triton path autotunes (each of the autotuner's triton.testing.do_bench allocates a 256 MB
    L2-flush buffer) and times its launch plans, which would be charged to the projector."""
    step()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def bench_projector(device, dtype, ms: list[int], k: int, h: int, n: int, reps: int,
                    with_compile: bool) -> list[dict]:
    """fwd+bwd of x (M,K) -> (M,N) with weight gradients (x is data: no dx, as in training)."""
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(h, k, generator=g) * k ** -0.5, torch.zeros(h),
               torch.randn(n, h, generator=g) * h ** -0.5, torch.zeros(n)]
    weights = [w.to(device, dtype).requires_grad_() for w in weights]
    paths = {"torch_eager": project_reference}
    if with_compile:
        # Dynamo keeps its compiled graphs per code object, across torch.compile wrappers, and
        # past recompile_limit (8) graphs it silently runs the function eagerly: 4 M values x 3
        # dtypes would report eager times as torch.compile's. One dtype's graphs at a time.
        torch._dynamo.reset()
        paths["torch_compile"] = torch.compile(project_reference, dynamic=False)
    if device.type == "cuda":
        from babymerge.kernels.projector import project_triton
        paths["triton"] = project_triton
        # what BABYMERGE_KERNELS=auto runs: the faster of triton and eager, measured per bucket
        paths["auto"] = kernels.project
    peak = peak_flops(device, dtype)
    rows = []
    for m in ms:
        x = torch.randn(m, k, generator=g).to(device, dtype)
        dy = torch.randn(m, n, generator=g).to(device, dtype)
        flops = 2 * m * (k * h + h * n) + 2 * m * (2 * h * n + h * k)  # fwd; bwd: dW2, da, dW1
        row = {"M": m, "K": k, "H": h, "N": n, "dtype": str(dtype).removeprefix("torch.")}
        for name, fn in paths.items():
            def step(fn=fn):
                for w in weights:
                    w.grad = None
                fn(x, *weights).backward(dy)
            sec = timed_back_to_back(step, device, reps)
            row[f"{name}_ms"] = round(sec * 1e3, 4)
            row[f"{name}_isolated_ms"] = round(timed(step, device, reps) * 1e3, 4)
            row[f"{name}_tflops"] = round(flops / sec / 1e12, 3)
            if peak:
                row[f"{name}_pct_peak"] = round(100 * flops / sec / peak, 1)
            if device.type == "cuda":
                row[f"{name}_peak_mem_mb"] = steady_peak_mb(step, device)
        if "auto" in paths:
            row["auto_chose"] = auto_choice("project", m)
        if "triton" in paths:
            row |= triton_breakdown(x, weights, dy, device, reps)
            row["triton_speedup_vs_eager"] = round(row["torch_eager_ms"] / row["triton_ms"], 3)
            row["triton_speedup_vs_eager_isolated"] = round(
                row["torch_eager_isolated_ms"] / row["triton_isolated_ms"], 3)
            if with_compile:
                row["triton_speedup_vs_compile"] = round(
                    row["torch_compile_ms"] / row["triton_ms"], 3)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)  # survives a run cut short
    return rows


def triton_breakdown(x, weights, dy, device, reps: int) -> dict:
    """Where the fused step's time goes: the forward alone (saving z, as in training) under each
    plan, the backward under each weight-gradient split, eager's forward alone; the plans the
    projector measured as fastest, and the block sizes the autotuner chose."""
    import triton

    from babymerge.kernels import projector as kp

    w1, b1, w2, b2 = (w.detach() for w in weights)
    _, z = kp.projector_forward(x, w1, b1, w2, b2, save_z=True)
    needs = (False, True, True, True, True)
    m = x.shape[0]
    out = {f"triton_fwd_{plan}_ms": timed_back_to_back(
        lambda plan=plan: kp.projector_forward(x, w1, b1, w2, b2, save_z=True, plan=plan),
        device, reps) for plan in kp.FORWARD_PLANS}
    out |= {f"triton_bwd_split{split}_ms": timed_back_to_back(
        lambda split=split: kp.projector_backward(dy, x, w1, w2, z, needs, True, True, split),
        device, reps) for split in kp.weight_grad_split_candidates(m)}
    out["torch_eager_fwd_ms"] = timed_back_to_back(
        lambda: project_reference(x, w1, b1, w2, b2), device, reps)
    out = {k: round(v * 1e3, 4) for k, v in out.items()}
    out["triton_measured_plans"] = {  # keys: (kind, device, dtype, precision, M bucket, ...)
        key[0]: plan for key, plan in measured.measured_choices().items()
        if key[0] in ("forward", "backward") and key[2] == x.dtype
        and key[4] == triton.next_power_of_2(m)}
    out["triton_configs"] = {
        name: getattr(getattr(kp, name), "best_config", None).__str__()
        for name in ("_projector_fwd_kernel", "_linear_kernel", "_projector_bwd_dz_kernel",
                     "_projector_bwd_grads_kernel")}
    return out


def bench_merge(device, dtype, preset: str, reps: int) -> dict:
    """GB/s of the merge over the preset model's parameter shapes (meta-built: no init cost)."""
    with torch.device("meta"):
        shapes = [p.shape for p in build_model(MODEL_PRESETS[preset], seed=0, **IDS).parameters()]
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(s, generator=g).to(device, dtype) for s in shapes]
    b = [torch.randn(s, generator=g).to(device, dtype) for s in shapes]
    dst = [torch.empty_like(t) for t in a]
    elems = sum(t.numel() for t in a)
    moved = 3 * elems * a[0].element_size()  # read a, read b, write dst
    # A copy of 1.5x the parameter bytes moves (reads + writes) the same bytes as the merge.
    src = torch.empty(moved // 2, dtype=torch.uint8, device=device)
    out = torch.empty_like(src)
    alpha = 0.3
    paths = {
        "copy": lambda: out.copy_(src),
        "foreach_lerp": lambda: torch._foreach_lerp_(b, a, alpha),  # in place into b: 3 units too
        "per_tensor_lerp": lambda: [torch.lerp(y, x, alpha, out=d) for d, x, y in zip(dst, a, b)],
    }
    result = {"preset": preset, "tensors": len(shapes), "params": elems,
              "dtype": str(dtype).removeprefix("torch."), "bytes_moved": moved}
    if device.type == "cuda":
        from babymerge.kernels.interpolation import interpolate_triton_
        paths["triton"] = lambda: interpolate_triton_(dst, a, b, alpha)
        paths["auto"] = lambda: kernels.interpolate_(dst, a, b, alpha)  # the faster, measured
        for block in (1024, 2048, 4096, 8192, 16384):
            for warps in (4, 8):
                paths[f"triton_block{block}_warps{warps}"] = (
                    lambda block=block, warps=warps: interpolate_triton_(dst, a, b, alpha,
                                                                          block=block,
                                                                          num_warps=warps))
    for name, fn in paths.items():
        sec = timed_back_to_back(fn, device, reps)
        result[f"{name}_ms"] = round(sec * 1e3, 4)
        result[f"{name}_gbps"] = round(moved / sec / 1e9, 2)
        result[f"{name}_isolated_ms"] = round(timed(fn, device, reps) * 1e3, 4)
    for name in paths:
        if name != "copy":
            result[f"{name}_pct_of_copy"] = round(
                100 * result[f"{name}_gbps"] / result["copy_gbps"], 1)
    if "auto" in paths:
        result["auto_chose"] = auto_choice("interpolate", elems)
    return result


def auto_choice(kind: str, size: int) -> str | None:
    """The path BABYMERGE_KERNELS=auto measured as faster for ``kind`` at ``size`` (projector rows
    or merged elements; keys hold the power-of-two bucket at index 4 or 3)."""
    index = 4 if kind == "project" else 3
    bucket = 1 << max(0, size - 1).bit_length()
    found = [path for key, path in measured.measured_choices().items()
             if key[0] == kind and key[index] == bucket]
    return found[-1] if found else None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="projector and merge kernels vs their baselines")
    p.add_argument("--quick", action="store_true", help="small sizes (CPU, under a minute)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="include the torch.compile baseline (default: yes, except --quick on CPU "
                        "where inductor's C++ build alone takes longer than the whole run)")
    p.add_argument("--dtypes", default=None,
                   help="projector dtypes, comma list of bf16,fp16,fp32 (default: bf16,fp32 on "
                        "CUDA; fp32 on CPU). The merge runs in the first.")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    wanted = args.dtypes or ("bf16,fp32" if on_gpu else "fp32")
    try:
        dtypes = [names[d.strip()] for d in wanted.split(",") if d.strip()]
    except KeyError as e:
        p.error(f"--dtypes: unknown {e}; choose from {', '.join(names)}")
    ms = [256, 1024] if args.quick else [256, 1024, 4096, 16384]
    reps = 3 if args.quick else 30
    with_compile = args.compile if args.compile is not None else (on_gpu or not args.quick)
    preset = "small" if args.quick else "paper"
    t0 = time.perf_counter()
    # The merge first, and on stderr as soon as it is measured: it takes seconds, while the
    # projector's compiles, autotuning and plan timing can outrun a caller's time limit
    # (gpu_checks.sh kills the run, and the JSON on stdout is printed only at the end).
    merge = bench_merge(device, dtypes[0], preset, reps)
    print(json.dumps({"merge": merge}), file=sys.stderr, flush=True)
    report = {
        "benchmark": "bench_kernels",
        **environment(device),
        "note": ("torch paths only: Triton needs a GPU (interpreted timings mean nothing)"
                 if not on_gpu else "Triton vs torch eager vs torch.compile, same run"),
        "torch_compile": "included" if with_compile else "skipped (--no-compile or --quick on CPU)",
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "merge": merge,
        "projector": [row for dtype in dtypes
                      for row in bench_projector(device, dtype, ms, 1024, 768, 768, reps,
                                                 with_compile=with_compile)],
    }
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
