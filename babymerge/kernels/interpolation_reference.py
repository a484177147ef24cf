"""PyTorch reference for the fused interpolation merge (babymerge/kernels/interpolation.py): the
CPU path, the oracle of the Triton kernel's tests, and the validation both paths share.

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


def distinct_indices(dst: list[torch.Tensor], a: list[torch.Tensor],
                     b: list[torch.Tensor]) -> list[int]:
    """The indices to merge: each (dst, a, b) triple once, in order. Lists built from
    ``state_dict()`` hold a tied tensor (tied embeddings) under every name it has; merging it in
    place once per name interpolated it again from its own output, and on a GPU the copies race.
    Any other overlap between a dst and a tensor of another index makes the result depend on the
    order of the merges, and is a ValueError naming both. Only contiguous tensors are compared
    (their memory is one interval; the Triton path refuses the rest)."""
    seen, keep, spans = set(), [], []
    for i, triple in enumerate(zip(dst, a, b)):
        key = tuple((t.device, t.data_ptr(), t.shape, t.stride(), t.dtype) for t in triple)
        if key in seen:
            continue
        seen.add(key)
        keep.append(i)
        for role, t in zip(("dst", "a", "b"), triple):
            if t.numel() and t.device.type != "meta" and t.is_contiguous():
                lo = t.data_ptr()
                spans.append((str(t.device), lo, lo + t.numel() * t.element_size(), role, i))
    spans.sort(key=lambda span: span[:2])
    active: list[tuple] = []  # spans still open at the current start: few, allocations are apart
    for span in spans:
        active = [p for p in active if p[0] == span[0] and p[2] > span[1]]
        for other in active:
            if other[4] != span[4] and "dst" in (other[3], span[3]):
                d, o = ((span, other) if span[3] == "dst" and (other[3] != "dst"
                                                               or span[4] > other[4])
                        else (other, span))
                raise ValueError(f"interpolate_: dst[{d[4]}] overlaps {o[3]}[{o[4]}]: a merged "
                                 "tensor may share memory only with its own a or b (the same "
                                 "index); the result would depend on the order of the merges")
        active.append(span)
    return keep


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
    keep = distinct_indices(dst, a, b)
    if len(keep) < len(dst):
        dst, a, b = [dst[i] for i in keep], [a[i] for i in keep], [b[i] for i in keep]
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
