"""PyTorch reference for the fused interpolation merge (kernels/interpolation.py): the CPU path, the
oracle of the Triton kernel's tests, and the validation both paths share.

``dst[i] = alpha * a[i] + (1 - alpha) * b[i]`` is ``torch.lerp(b[i], a[i], alpha)``: lerp computes
in fp32 for bf16/fp16 storage, is exact at the ends (alpha = 0 gives b, alpha = 1 gives a, bit for
bit) and is the formula the Triton kernel reproduces.
"""

from __future__ import annotations

import math

import torch


def check_interpolation_args(dst: list[torch.Tensor], a: list[torch.Tensor],
                             b: list[torch.Tensor], alpha: float) -> None:
    """Same length, same shape and device per index, finite alpha; else a ValueError naming the
    offending index."""
    if not (len(dst) == len(a) == len(b)):
        raise ValueError(f"interpolate_: lists differ in length: dst {len(dst)}, a {len(a)}, "
                         f"b {len(b)}")
    if not math.isfinite(alpha):
        raise ValueError(f"interpolate_: alpha must be finite, got {alpha}")
    for i, (d, x, y) in enumerate(zip(dst, a, b)):
        if not (d.shape == x.shape == y.shape):
            raise ValueError(f"interpolate_: tensor {i} has shapes dst {tuple(d.shape)}, a "
                             f"{tuple(x.shape)}, b {tuple(y.shape)}; they must be equal")
        if not (d.device == x.device == y.device):
            raise ValueError(f"interpolate_: tensor {i} is on devices dst {d.device}, a "
                             f"{x.device}, b {y.device}; they must be the same")


@torch.no_grad()
def interpolate_reference_(dst: list[torch.Tensor], a: list[torch.Tensor], b: list[torch.Tensor],
                           alpha: float) -> None:
    """In place: ``dst[i] = alpha * a[i] + (1 - alpha) * b[i]``; dst may be a or b itself.

    In place into b (the common merge-into-a-copy case) is one multi-tensor ``_foreach_lerp_``;
    otherwise one ``lerp(out=dst)`` per tensor: still a single read-read-write pass (a copy then
    an in-place lerp would move the bytes twice). Mixed dtypes go through fp32.
    """
    alpha = float(alpha)
    check_interpolation_args(dst, a, b, alpha)
    into_b = [i for i, (d, x, y) in enumerate(zip(dst, a, b))
              if d is y and x.dtype == y.dtype]
    if into_b:
        torch._foreach_lerp_([b[i] for i in into_b], [a[i] for i in into_b], alpha)
    done = set(into_b)
    for i, (d, x, y) in enumerate(zip(dst, a, b)):
        if i in done:
            continue
        if d.dtype == x.dtype == y.dtype:
            torch.lerp(y, x, alpha, out=d)
        else:
            d.copy_(torch.lerp(y.float(), x.float(), alpha))
