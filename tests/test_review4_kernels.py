"""Review: the kernels as a researcher calls them (in-place ops on the projector's output, gradient
penalties, torch.compile, tied tensors in a merge, meta tensors), on the CPU interpreter. Small
shapes: the interpreter is slow."""

import os

import pytest
import torch

from babymerge.kernels.modules import FusedProjector
from babymerge.kernels.projector import project_triton
from babymerge.kernels.projector_reference import project_reference


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


def test_double_backward_raises_instead_of_dropping_second_derivatives(kernel_device):
    """A gradient penalty (create_graph=True) through the kernel: its backward returned gradients
    with no graph, so the penalty's contribution to the weights' gradients was silently dropped
    (w1.grad off by ~100 %). It must raise instead."""
    x, w1, b1, w2, b2 = [t.detach().to(kernel_device).requires_grad_() for t in _inputs()]
    y = project_triton(x, w1, b1, w2, b2)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice|once_differentiable"):
        (y.sum() + gx.square().sum()).backward()


def test_first_order_gradients_unchanged_with_create_graph(kernel_device):
    """create_graph=True alone (no second derivative taken) still gives the right gradients."""
    inputs = [t.detach().to(kernel_device).requires_grad_() for t in _inputs()]
    ref = _clone(inputs)
    grads = torch.autograd.grad(project_triton(*inputs).square().sum(), inputs,
                                create_graph=True)
    want = torch.autograd.grad(project_reference(*ref).square().sum(), ref)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g.detach(), w, rtol=1e-4, atol=1e-5)


def test_torch_compile_falls_back_under_the_interpreter(monkeypatch):
    """torch.compile of a module using FusedProjector, with BABYMERGE_KERNELS=triton on the CPU
    interpreter: Dynamo traced into the interpreter's numpy emulation and failed with
    'KeyError(torch.uint64)' on fake tensors. The kernel call is now a graph break: same outputs
    and gradients as eager."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("interpreter-only behaviour")
    monkeypatch.setenv("BABYMERGE_KERNELS", "triton")
    torch.manual_seed(0)
    module = FusedProjector(32, 16, 16)
    x = torch.randn(5, 32)
    want = module(x)
    (want_grad,) = torch.autograd.grad(want.sum(), module.linear_1.weight)
    compiled = torch.compile(module, backend="eager")
    got = compiled(x)
    (got_grad,) = torch.autograd.grad(got.sum(), module.linear_1.weight)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)


@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_a_tied_tensor_listed_twice_is_merged_once(monkeypatch, mode):
    """Lists built from state_dict() hold a tied weight (an LM's tied embeddings) under two names:
    merging in place into b interpolated it twice, alpha*a + (1-alpha)*(alpha*a + (1-alpha)*b),
    on both paths (the second merge read the first's output); on a GPU the two merges race."""
    if mode == "triton" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("CPU tensors on the Triton path need TRITON_INTERPRET=1")
    monkeypatch.setenv("BABYMERGE_KERNELS", mode)
    from babymerge import kernels

    g = torch.Generator().manual_seed(0)
    tied_a, tied_b, other_a, other_b = (torch.randn(7, generator=g) for _ in range(4))
    want = [torch.lerp(tied_b, tied_a, 0.3), torch.lerp(other_b, other_a, 0.3)]
    a, b = [tied_a, other_a, tied_a], [tied_b, other_b, tied_b]
    kernels.interpolate_(b, a, b, 0.3)
    torch.testing.assert_close(tied_b, want[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(other_b, want[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_dst_overlapping_another_index_is_refused(monkeypatch, mode):
    """dst[0] is a[1]: the result depended on the order the tensors were merged in (a race on a
    GPU); refused with an error naming both indices."""
    if mode == "triton" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("CPU tensors on the Triton path need TRITON_INTERPRET=1")
    monkeypatch.setenv("BABYMERGE_KERNELS", mode)
    from babymerge import kernels

    x, y, z, w = (torch.randn(5) for _ in range(4))
    with pytest.raises(ValueError, match=r"dst\[0\] overlaps a\[1\]"):
        kernels.interpolate_([x, torch.empty(5)], [y, x], [z, w], 0.5)
    with pytest.raises(ValueError, match=r"dst\[1\] overlaps dst\[0\]"):
        kernels.interpolate_([x, x[1:3]], [y, y[:2].clone()], [z, z[:2].clone()], 0.5)


def test_meta_tensors_under_forced_triton_get_a_clear_error(monkeypatch):
    """BABYMERGE_KERNELS=triton with the interpreter on and tensors on the meta device (a model
    built with no data): project failed inside autocast's device lookup and interpolate_ with
    'Cannot copy out of meta tensor'; both now name the device and the switch."""
    monkeypatch.setenv("BABYMERGE_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from babymerge import kernels

    meta = torch.device("meta")
    x, w1, w2 = (torch.empty(s, device=meta) for s in ((3, 8), (4, 8), (4, 4)))
    with pytest.raises(RuntimeError, match="tensors are on meta"):
        kernels.project(x, w1, None, w2, None)
    with pytest.raises(RuntimeError, match="tensors are on meta"):
        kernels.interpolate_([torch.empty(3, device=meta)], [torch.empty(3, device=meta)],
                             [torch.empty(3, device=meta)], 0.5)
