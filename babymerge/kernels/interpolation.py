"""Fused interpolation merge ``dst[i] = alpha * a[i] + (1 - alpha) * b[i]`` over every parameter of
a model in one launch per dtype combination (in practice one): a multi-tensor Triton kernel.

Layout choice: a POINTER TABLE, not a flat buffer. The tensors to merge are the live model's
parameters and the two checkpoints' tensors as loaded from safetensors: separate allocations. A
flat buffer would need either a copy in (and out) of every tensor, doubling the bytes moved by a
kernel whose whole cost is bytes moved, or re-pointing the model's parameters into views of one
buffer, which reaches into modules we do not own. The table costs one small host-to-device copy
(4 int64 per tensor + 2 per block: ~0.1 % of the bytes merged at BLOCK = 4096) and is cached per
set of pointers, so an alpha sweep over the same tensors builds it once.

Each program merges one BLOCK of one tensor: it reads its (tensor, offset) pair from the table,
then the tensor's three base pointers, and streams BLOCK elements of a and b in and of dst out.
Math is fp32 whatever the storage (bf16/fp16 parameters are upcast, interpolated, rounded once),
with torch.lerp's formula, which is exact at alpha = 0 and alpha = 1.
"""

from __future__ import annotations

import math
import operator
import os

import torch
import triton
import triton.language as tl

from babymerge.kernels.interpolation_reference import check_interpolation_args, distinct_indices
from babymerge.kernels.measured import on_device

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

# Elements per program. On the GPU 4096 elements over 8 warps is 16 per thread: four (fp32) or two
# (bf16) 128-bit accesses per tensor per thread, ~60 registers (ptxas, sm_90), plenty of bytes in
# flight per SM to cover HBM latency, and a table of one entry per 4096 elements.
# The interpreter pays ~ms per program, so it takes larger blocks.
BLOCK = 16384 if INTERPRET else 4096
NUM_WARPS = 8


_PLAN_CACHE: dict[tuple, list[tuple]] = {}
_PLAN_CACHE_SIZE = 16


@triton.jit
def _interpolate_kernel(table_ptr, n_tensors, alpha, DST: tl.constexpr, A: tl.constexpr,
                        B: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    # table layout (int64): dst ptrs [0, T), a ptrs [T, 2T), b ptrs [2T, 3T), numels [3T, 4T),
    # then per block: tensor index [4T, 4T + P), element offset [4T + P, 4T + 2P).
    pid = tl.program_id(0)
    blocks = table_ptr + 4 * n_tensors
    t = tl.load(blocks + pid)
    start = tl.load(blocks + tl.num_programs(0) + pid)
    remaining = tl.load(table_ptr + 3 * n_tensors + t) - start
    # Advance the base pointers by the 64-bit block start once; per-element offsets stay 32-bit.
    dst = tl.load(table_ptr + t).to(tl.pointer_type(DST)) + start
    a = tl.load(table_ptr + n_tensors + t).to(tl.pointer_type(A)) + start
    b = tl.load(table_ptr + 2 * n_tensors + t).to(tl.pointer_type(B)) + start
    if ALIGNED:  # every base is 16-byte aligned (checked on the host): 128-bit accesses
        dst, a, b = tl.multiple_of(dst, 16), tl.multiple_of(a, 16), tl.multiple_of(b, 16)
    offs = tl.arange(0, BLOCK)
    # Full blocks load unmasked (a mask against a size from the table would stop vectorisation);
    # only each tensor's last block is masked.
    if remaining >= BLOCK:
        av = tl.load(a + offs, eviction_policy="evict_first").to(tl.float32)
        bv = tl.load(b + offs, eviction_policy="evict_first").to(tl.float32)
    else:
        mask = offs < remaining
        av = tl.load(a + offs, mask=mask, eviction_policy="evict_first").to(tl.float32)
        bv = tl.load(b + offs, mask=mask, eviction_policy="evict_first").to(tl.float32)
    diff = av - bv
    # torch.lerp(b, a, alpha): start from the nearer end so that alpha = 0 and 1 are exact.
    if alpha < 0.5:
        out = bv + alpha * diff
    else:
        out = av - diff * (1.0 - alpha)
    if remaining >= BLOCK:
        tl.store(dst + offs, out.to(DST))
    else:
        tl.store(dst + offs, out.to(DST), mask=offs < remaining)


def _check_triton_args(dst: list[torch.Tensor], a: list[torch.Tensor],
                       b: list[torch.Tensor]) -> None:
    """What the kernel cannot take: non-contiguous tensors (it walks flat memory), unsupported
    dtypes, and a dst that partially overlaps its own a or b (exact aliasing is fine: each element
    is read before it is written, by the same program)."""
    for i, triple in enumerate(zip(dst, a, b)):
        for name, t in zip(("dst", "a", "b"), triple):
            if not t.is_contiguous():
                raise ValueError(f"interpolate_: {name}[{i}] is not contiguous (shape "
                                 f"{tuple(t.shape)}, stride {t.stride()}); the Triton path walks "
                                 "flat memory. Pass contiguous tensors or set "
                                 "BABYMERGE_KERNELS=torch")
            if t.dtype not in _TL_DTYPES:
                raise ValueError(f"interpolate_: {name}[{i}] has dtype {t.dtype}; the Triton path "
                                 "takes float32, bfloat16 and float16")
        d = triple[0]
        d_lo, d_hi = d.data_ptr(), d.data_ptr() + d.numel() * d.element_size()
        for name, t in zip(("a", "b"), triple[1:]):
            lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
            exact = lo == d_lo and hi == d_hi and t.dtype == d.dtype
            if not exact and lo < d_hi and d_lo < hi and d.numel():
                raise ValueError(f"interpolate_: dst[{i}] partially overlaps {name}[{i}]; dst "
                                 f"may be {name} itself but not another view of its memory")


_PTR = torch.Tensor.data_ptr
_SHAPE = operator.attrgetter("shape")
_DTYPE = operator.attrgetter("dtype")


def _signature(tensors: tuple[torch.Tensor, ...], block: int) -> tuple:
    """What a launch plan depends on: every tensor's pointer, shape and dtype (the device is
    implied: with CUDA's unified addressing no pointer value is on two devices). Built with
    C-level ``map`` calls: at 180 tensors this is ~70 us, against ~500 us for re-validating and
    re-planning, and the merge's host time is paid before its kernel starts."""
    return (block, tuple(map(_PTR, tensors)), tuple(map(_SHAPE, tensors)),
            tuple(map(_DTYPE, tensors)))


def _build_plan(dst: list[torch.Tensor], a: list[torch.Tensor], b: list[torch.Tensor],
                block: int) -> list[tuple]:
    """One launch per (device, dtypes) group: (device, tl dtypes, table, programs, aligned, n)."""
    groups: dict[tuple, list[int]] = {}
    for i, (d, x, y) in enumerate(zip(dst, a, b)):
        if d.numel():
            groups.setdefault((d.device, d.dtype, x.dtype, y.dtype), []).append(i)
    launches = []
    for (device, dt, at, bt), idx in groups.items():
        ds, xs, ys = [dst[i] for i in idx], [a[i] for i in idx], [b[i] for i in idx]
        numels = torch.tensor([d.numel() for d in ds], dtype=torch.int64)
        nblocks = (numels + block - 1) // block
        programs = int(nblocks.sum())
        tensor_of_block = torch.repeat_interleave(torch.arange(len(ds)), nblocks)
        first_block = torch.cumsum(nblocks, 0) - nblocks
        offset = (torch.arange(programs) - torch.repeat_interleave(first_block, nblocks)) * block
        pointers = torch.tensor([[t.data_ptr() for t in ts] for ts in (ds, xs, ys)],
                                dtype=torch.int64)
        table = torch.cat([pointers.flatten(), numels, tensor_of_block, offset]).to(device)
        aligned = all(t.data_ptr() % 16 == 0 for t in (*ds, *xs, *ys))
        launches.append((device, (_TL_DTYPES[dt], _TL_DTYPES[at], _TL_DTYPES[bt]), table,
                         programs, aligned, len(idx)))
    return launches


def _plan(dst: list[torch.Tensor], a: list[torch.Tensor], b: list[torch.Tensor], alpha: float,
          block: int) -> list[tuple]:
    """The validated launch plan, cached by :func:`_signature`: the same pointers, shapes and
    dtypes were validated and planned before, whichever tensor objects own them now, so an alpha
    sweep validates and uploads its tables once."""
    key = _signature((*dst, *a, *b), block)
    plan = _PLAN_CACHE.get(key)
    if plan is None:
        check_interpolation_args(dst, a, b, alpha)
        keep = distinct_indices(dst, a, b)  # a tied tensor listed twice is merged once
        if len(keep) < len(dst):
            dst, a, b = [dst[i] for i in keep], [a[i] for i in keep], [b[i] for i in keep]
        _check_triton_args(dst, a, b)
        plan = _build_plan(dst, a, b, block)
        if len(_PLAN_CACHE) >= _PLAN_CACHE_SIZE:
            _PLAN_CACHE.pop(next(iter(_PLAN_CACHE)))
        _PLAN_CACHE[key] = plan
    elif not all(map(torch.Tensor.is_contiguous, (*dst, *a, *b))):
        # the only property a signature does not pin down (same pointer and shape, new strides)
        _check_triton_args(dst, a, b)
    return plan


@torch.no_grad()
def interpolate_triton_(dst: list[torch.Tensor], a: list[torch.Tensor], b: list[torch.Tensor],
                        alpha: float, *, block: int = BLOCK, num_warps: int = NUM_WARPS) -> None:
    """In place: ``dst[i] = alpha * a[i] + (1 - alpha) * b[i]``, one launch per (device,
    dtypes) group.

    ``dst`` may be ``a`` or ``b`` itself (element-wise aliasing). ``block``/``num_warps`` are for
    the benchmark's sweep; the defaults are the tuned ones.
    """
    alpha = float(alpha)  # an int 0 or 1 would become a specialised integer argument
    if not (len(dst) == len(a) == len(b)) or not math.isfinite(alpha):
        check_interpolation_args(dst, a, b, alpha)  # raises the error naming the problem
    for device, (dt, at, bt), table, programs, aligned, n in _plan(dst, a, b, alpha, block):
        with on_device(device):
            _interpolate_kernel[(programs,)](table, n, alpha, DST=dt, A=at, B=bt, BLOCK=block,
                                             ALIGNED=aligned, num_warps=num_warps)
    # Raw-pointer writes bypass autograd's version counters; bump them as an in-place op would
    # (inference tensors have none).
    torch.autograd.graph.increment_version([t for t in dst if t.numel() and not t.is_inference()])
