"""The one place that picks Triton or torch for each op.

Placeholder torch paths until the kernels land (issue: Triton kernels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def project(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
            b2: torch.Tensor | None) -> torch.Tensor:
    """``W2 gelu(W1 x + b1) + b2`` with exact (erf) GELU; differentiable."""
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


@torch.no_grad()
def interpolate_(dst: list[torch.Tensor], a: list[torch.Tensor], b: list[torch.Tensor],
                 alpha: float) -> None:
    """In place: ``dst[i] = alpha * a[i] + (1 - alpha) * b[i]`` for every i."""
    for d, x, y in zip(dst, a, b, strict=True):
        d.copy_(torch.lerp(y.float(), x.float(), alpha))
