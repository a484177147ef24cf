"""The one place that picks Triton or torch for each op.

``auto`` (the default): on CUDA, each op runs whichever of its Triton kernel and its torch path
(the reference: eager PyTorch; for the merge, ``torch._foreach_lerp_``) measured faster for the
shape bucket, once per process (:mod:`babymerge.kernels.measured`; where nothing can be measured,
the Triton kernel); anything else runs the torch reference.
``BABYMERGE_KERNELS=torch`` forces the reference everywhere (a debugging switch, or a GPU without a
working Triton); ``BABYMERGE_KERNELS=triton`` forces the kernels, which needs CUDA tensors or the
CPU interpreter (``TRITON_INTERPRET=1``, how the tests run them). The Triton modules are imported on
first use, so ``import babymerge.kernels`` needs neither a GPU nor Triton.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from babymerge.kernels import measured
from babymerge.kernels.interpolation_reference import interpolate_reference_
from babymerge.kernels.projector_reference import project_reference

ENV_VAR = "BABYMERGE_KERNELS"
MODES = ("auto", "torch", "triton")
PATHS = ("triton", "torch")  # auto's candidates; the first is its choice where nothing is measured


def _mode() -> str:
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: expected one of {', '.join(MODES)}")
    return mode


def backend(device: torch.device) -> str:
    """``"triton"`` or ``"torch"`` for tensors on ``device``, per :data:`ENV_VAR` (read per call so
    that tests and users can switch it at run time). Under ``auto`` on CUDA this is where the
    Triton kernel is a candidate; :func:`project` and :func:`interpolate_` then measure."""
    mode = _mode()
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


def _bucket(n: int) -> int:
    """Sizes are measured per power-of-two bucket: a last, shorter batch must not re-measure."""
    return 1 << max(0, n - 1).bit_length()


def project(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
            b2: torch.Tensor | None) -> torch.Tensor:
    """``W2 gelu(W1 x + b1) + b2`` over the last dim of ``x``, exact (erf) GELU; differentiable."""
    path = backend(x.device)
    if path == "triton":
        from babymerge.kernels.projector import project_triton

        if _mode() == "auto":
            path = _faster_projector(x, w1, b1, w2, b2, project_triton)
        if path == "triton":
            return project_triton(x, w1, b1, w2, b2)
    return project_reference(x, w1, b1, w2, b2)


def _faster_projector(x, w1, b1, w2, b2, project_triton) -> str:
    """Auto's path for this projector call: a training call is timed forward and backward (the
    gradients through ``torch.autograd.grad`` on detached inputs, so no ``.grad`` is touched), an
    inference call forward only."""
    params = (x, w1, b1, w2, b2)
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params)
    rows = x.numel() // max(1, x.shape[-1])
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    key = ("project", str(x.device), str(dtype), training, _bucket(rows), *w1.shape, w2.shape[0])
    paths = {"triton": project_triton, "torch": project_reference}
    if training:
        leaves = [t.detach().requires_grad_(t.requires_grad) if t is not None else None
                  for t in params]
        wanted = [t for t in leaves if t is not None and t.requires_grad]

        def run(path):
            y = paths[path](*leaves)
            torch.autograd.grad(y, wanted, torch.ones_like(y))
    else:
        def run(path):
            paths[path](*params)
    return measured.choose(key, x.device, PATHS[0], PATHS, run)


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
    path = backend(device)
    if path == "triton":
        from babymerge.kernels.interpolation import interpolate_triton_

        if _mode() == "auto":
            path = _faster_interpolation(dst, a, b, alpha, interpolate_triton_)
        if path == "triton":
            interpolate_triton_(dst, a, b, alpha)
            return
    interpolate_reference_(dst, a, b, alpha)


def _faster_interpolation(dst, a, b, alpha, interpolate_triton_) -> str:
    """Auto's path for this merge: both are timed writing into scratch tensors of dst's shapes
    (dst may be a or b itself, which repeated calls would change), the same bytes read and
    written; the scratch is freed after the one measurement."""
    device = dst[0].device
    key = ("interpolate", str(device), len(dst), _bucket(sum(t.numel() for t in dst)),
           tuple(sorted({str(t.dtype) for t in (*dst, *a, *b)})))
    run = None  # choose() answers from its rule or its cache without running anything
    if measured.plans_are_measured(device) and key not in measured.measured_choices():
        scratch = [torch.empty_like(t) for t in dst]
        paths = {"triton": interpolate_triton_, "torch": interpolate_reference_}

        def run(path):
            paths[path](scratch, a, b, alpha)
    return measured.choose(key, device, PATHS[0], PATHS, run)


@torch.no_grad()
def interpolate(a: list[torch.Tensor], b: list[torch.Tensor], alpha: float) -> list[torch.Tensor]:
    """Out of place: new tensors ``alpha * a[i] + (1 - alpha) * b[i]`` (dtype and layout of b)."""
    dst = [torch.empty_like(y, memory_format=torch.contiguous_format) for y in b]
    interpolate_(dst, a, b, alpha)
    return dst
