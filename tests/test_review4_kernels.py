"""Review: the fused projector as a researcher calls it (in-place ops on its output, gradient
penalties, torch.compile), on the CPU interpreter. Small shapes: the interpreter is slow."""

import pytest
import torch

from kernels.projector import project_triton
from kernels.projector_reference import project_reference


def _inputs(m=6, k=32, h=16, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w1 = torch.randn(h, k, generator=g) * k ** -0.5
    b1 = torch.randn(h, generator=g) * 0.5
    w2 = torch.randn(n, h, generator=g) * h ** -0.5
    b2 = torch.randn(n, generator=g) * 0.5
    return [t.requires_grad_() for t in (x, w1, b1, w2, b2)]


def _clone(inputs):
    return [t.detach().clone().requires_grad_() for t in inputs]


@pytest.mark.parametrize("shape", [(6, 32), (2, 3, 32)], ids=["2d", "3d"])
def test_output_can_be_modified_in_place_while_training(kernel_device, shape):
    """The output was a view of the kernel's (M, N) buffer, so an in-place op on it (``y.mul_``,
    ``relu_``, a residual ``+=``) raised autograd's 'view created inside a custom Function'
    error; LlavaMultiModalProjector, which FusedProjector replaces, allows it."""
    inputs = [t.detach().to(kernel_device).requires_grad_() for t in _inputs()]
    x = inputs[0].detach().reshape(shape).requires_grad_()
    ref = [x.detach().clone().requires_grad_()] + _clone(inputs[1:])
    y = project_triton(x, *inputs[1:])
    y.mul_(2.0).add_(1.0)
    y.square().sum().backward()
    y_ref = project_reference(*ref).mul_(2.0).add_(1.0)
    y_ref.square().sum().backward()
    torch.testing.assert_close(y.detach(), y_ref.detach(), rtol=1e-5, atol=1e-5)
    for got, want in zip([x, *inputs[1:]], ref):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-4)
