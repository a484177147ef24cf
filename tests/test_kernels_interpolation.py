"""Fused interpolation merge (babymerge/kernels/interpolation.py) against its torch reference
(interpolation_reference.py), on a real model's parameter list; ``kernels.interpolate_`` /
``interpolate`` on the reference path; tied and overlapping tensors in a merge. The dispatch rules
are test_kernels_dispatch.py's."""

import os

import pytest
import torch

from babymerge import kernels
from babymerge.model import MODEL_PRESETS, build_model
from babymerge.kernels.interpolation import interpolate_triton_
from babymerge.kernels.interpolation_reference import interpolate_reference_

IDS = dict(vocab_size=50, image_token_id=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# fp32: the kernel and torch may differ in FMA contraction, 1 ulp of the INPUTS' magnitude (up to 4
# for randn), which can be many ulps of a small output. bf16/fp16: one rounding of the fp32 result,
# which the interpreter truncates where torch rounds: 1 ulp of the format.
ULP = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
INPUT_SCALE = 4.0


def _model_tensors(seed, dtype, device):
    """A tiny BabyLLaVA's parameters (2-D and 1-D, mixed sizes) plus a 0-d and an empty tensor."""
    model = build_model(MODEL_PRESETS["tiny"], seed=seed, **IDS)
    tensors = [p.detach().to(device=device, dtype=dtype) for p in model.parameters()]
    extra = torch.Generator().manual_seed(seed)
    return tensors + [torch.randn((), generator=extra).to(device, dtype),
                      torch.empty(0, device=device, dtype=dtype)]


def _assert_close(got, want, dtype):
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, i
        torch.testing.assert_close(g.float(), w.float(), rtol=ULP[dtype],
                                   atol=ULP[dtype] * INPUT_SCALE,
                                   msg=lambda m: f"tensor {i}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_merge_of_model_parameters_matches_reference(kernel_device, dtype):
    lm, vlm = _model_tensors(1, dtype, kernel_device), _model_tensors(2, dtype, kernel_device)
    live = [torch.full_like(t, float("nan")) for t in vlm]
    interpolate_triton_(live, lm, vlm, 0.3)
    want = [torch.empty_like(t) for t in vlm]
    interpolate_reference_(want, lm, vlm, 0.3)
    _assert_close(live, want, dtype)
    # the ends are exact: alpha = 0 is the VLM and alpha = 1 the LM, bit for bit
    interpolate_triton_(live, lm, vlm, 0.0)
    assert all(torch.equal(d, v) for d, v in zip(live, vlm))
    interpolate_triton_(live, lm, vlm, 1.0)
    assert all(torch.equal(d, a) for d, a in zip(live, lm))


def test_in_place_into_a_or_b_and_mixed_dtypes(kernel_device):
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(s, generator=g).to(kernel_device) for s in [(300,), (7, 9), ()]]
    b = [torch.randn(s, generator=g).to(kernel_device) for s in [(300,), (7, 9), ()]]
    want = [torch.lerp(y, x, 0.25) for x, y in zip(a, b)]
    into_b = [t.clone() for t in b]
    interpolate_triton_(into_b, a, into_b, 0.25)
    _assert_close(into_b, want, torch.float32)
    into_a = [t.clone() for t in a]
    interpolate_triton_(into_a, into_a, b, 0.25)
    _assert_close(into_a, want, torch.float32)
    # bf16 live parameters from fp32 checkpoints: fp32 maths, one rounding (two launches: two
    # dtype combinations)
    live = [torch.empty_like(t, dtype=torch.bfloat16) for t in a[:2]] + [torch.empty_like(a[2])]
    interpolate_triton_(live, a, b, 0.25)
    _assert_close(live[:2], [w.bfloat16() for w in want[:2]], torch.bfloat16)
    _assert_close(live[2:], want[2:], torch.float32)


def test_unaligned_views(kernel_device):
    """Views starting 4 bytes into their storage: not 16-byte aligned, so no vector hint."""
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randn(20001, generator=g).to(kernel_device)[1:] for _ in range(2))
    dst = torch.empty(20001, device=kernel_device)[1:]
    interpolate_triton_([dst], [a], [b], 0.6)
    _assert_close([dst], [torch.lerp(b, a, 0.6)], torch.float32)


def test_refuses_what_the_kernel_cannot_take(kernel_device):
    a = [torch.randn(8, 6, device=kernel_device)]
    b = [torch.randn(8, 6, device=kernel_device)]
    with pytest.raises(ValueError, match=r"a\[0\] is not contiguous"):
        interpolate_triton_([torch.empty(6, 8, device=kernel_device)], [a[0].t()], [b[0].t()], 0.5)
    with pytest.raises(ValueError, match="shapes dst"):
        interpolate_triton_([torch.empty(8, 5, device=kernel_device)], a, b, 0.5)
    with pytest.raises(ValueError, match="differ in length"):
        interpolate_triton_([], a, b, 0.5)
    big = torch.randn(100, device=kernel_device)
    with pytest.raises(ValueError, match="partially overlaps"):
        interpolate_triton_([big[10:58].view(8, 6)], [big[:48].view(8, 6)], b, 0.5)
    with pytest.raises(ValueError, match="float64"):
        interpolate_triton_([a[0].double()], [a[0].double()], [b[0].double()], 0.5)


def test_cached_plan_still_refuses_changed_tensors(kernel_device):
    """A sweep reuses the validated plan of the same pointers, shapes and dtypes; a tensor that
    keeps its pointer and shape but changes strides or dtype is checked again, not trusted."""
    a, b, dst = (torch.randn(6, 6, device=kernel_device) for _ in range(3))
    interpolate_triton_([dst], [a], [b], 0.25)
    interpolate_triton_([dst], [a], [b], 0.75)  # cached plan
    torch.testing.assert_close(dst, torch.lerp(b, a, 0.75))
    with pytest.raises(ValueError, match=r"a\[0\] is not contiguous"):
        interpolate_triton_([dst], [a.t()], [b], 0.5)
    with pytest.raises(ValueError, match="int32"):
        interpolate_triton_([dst], [a.view(torch.int32)], [b], 0.5)


def test_bumps_version_counters(kernel_device):
    dst, a, b = (torch.zeros(10, device=kernel_device) for _ in range(3))
    before = dst._version
    interpolate_triton_([dst], [a], [b], 0.5)
    assert dst._version > before


def test_reference_path_and_out_of_place():
    """On CPU with the default mode, interpolate_ is the torch reference; interpolate allocates."""
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(5, 3, generator=g), torch.randn(4, generator=g).bfloat16()]
    b = [torch.randn(5, 3, generator=g), torch.randn(4, generator=g).bfloat16()]
    out = kernels.interpolate(a, b, 0.8)
    assert torch.equal(out[0], torch.lerp(b[0], a[0], 0.8))
    assert torch.equal(out[1], torch.lerp(b[1].float(), a[1].float(), 0.8).bfloat16())
    kernels.interpolate_(b, a, b, 0.8)  # in place into b: the _foreach_lerp_ path
    assert all(torch.equal(x, y) for x, y in zip(b, out))
    # non-contiguous is fine on the torch path
    c = [torch.randn(3, 5, generator=g).t()]
    d = [torch.randn(5, 3, generator=g)]
    dst = [torch.empty(5, 3)]
    kernels.interpolate_(dst, c, d, 0.5)
    assert torch.equal(dst[0], torch.lerp(d[0], c[0], 0.5))


# ---------------------------------------------------------------------------------------------
# Tensors listed twice or overlapping (both paths)


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
