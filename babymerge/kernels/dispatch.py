"""The one place that picks Triton or torch for each op.

``auto`` (the default): CUDA tensors run the Triton kernels, anything else the torch reference.
``BABYMERGE_KERNELS=torch`` forces the reference everywhere (a debugging switch, or a GPU without a
working Triton); ``BABYMERGE_KERNELS=triton`` forces the kernels, which needs CUDA tensors or the
CPU interpreter (``TRITON_INTERPRET=1``, how the tests run them). The Triton modules are imported on
first use, so ``import babymerge.kernels`` needs neither a GPU nor Triton.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from babymerge.kernels.interpolation_reference import interpolate_reference_
from babymerge.kernels.projector_reference import project_reference

ENV_VAR = "BABYMERGE_KERNELS"
MODES = ("auto", "torch", "triton")


def backend(device: torch.device) -> str:
    """``"triton"`` or ``"torch"`` for tensors on ``device``, per :data:`ENV_VAR` (read per call so
    that tests and users can switch it at run time)."""
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: expected one of {', '.join(MODES)}")
    has_triton = importlib.util.find_spec("triton") is not None
    if mode == "auto":
        return "triton" if device.type == "cuda" and has_triton else "torch"
    if mode == "triton":
        interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
        if not has_triton:
            raise RuntimeError(f"{ENV_VAR}=triton but Triton is not installed (pip install triton)")
        # the interpreter runs CPU tensors only: a meta tensor (no data) failed deep inside it
        if device.type != "cuda" and not (interpreting and device.type == "cpu"):
            raise RuntimeError(f"{ENV_VAR}=triton but the tensors are on {device}: the Triton "
                               "kernels need CUDA tensors, or TRITON_INTERPRET=1 to interpret them "
                               "on the CPU")
    return mode


def project(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
            b2: torch.Tensor | None) -> torch.Tensor:
    """``W2 gelu(W1 x + b1) + b2`` over the last dim of ``x``, exact (erf) GELU; differentiable."""
    if backend(x.device) == "triton":
        from babymerge.kernels.projector import project_triton

        return project_triton(x, w1, b1, w2, b2)
    return project_reference(x, w1, b1, w2, b2)


@torch.no_grad()
def interpolate_(dst: list[torch.Tensor], a: list[torch.Tensor], b: list[torch.Tensor],
                 alpha: float) -> None:
    """In place: ``dst[i] = alpha * a[i] + (1 - alpha) * b[i]`` for every i, in fp32 math.

    ``dst`` is usually a third set (the live model's parameters) but may be ``a`` or ``b`` itself.
    alpha = 0 gives b and alpha = 1 gives a exactly.
    """
    if not dst and not a and not b:
        return
    device = (dst or a or b)[0].device
    if backend(device) == "triton":
        from babymerge.kernels.interpolation import interpolate_triton_

        interpolate_triton_(dst, a, b, alpha)
    else:
        interpolate_reference_(dst, a, b, alpha)


@torch.no_grad()
def interpolate(a: list[torch.Tensor], b: list[torch.Tensor], alpha: float) -> list[torch.Tensor]:
    """Out of place: new tensors ``alpha * a[i] + (1 - alpha) * b[i]`` (dtype and layout of b)."""
    dst = [torch.empty_like(y, memory_format=torch.contiguous_format) for y in b]
    interpolate_(dst, a, b, alpha)
    return dst
