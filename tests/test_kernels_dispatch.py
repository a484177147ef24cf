"""babymerge.kernels.dispatch: which path (Triton or the torch reference) each op takes, per
``BABYMERGE_KERNELS`` and the tensors' device, and the errors of a path that cannot run."""

import os

import pytest
import torch

from babymerge.kernels.dispatch import backend


def test_dispatch_modes(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("BABYMERGE_KERNELS", raising=False)
    assert backend(cpu) == "torch"
    assert backend(torch.device("cuda")) == "triton"
    monkeypatch.setenv("BABYMERGE_KERNELS", "torch")
    assert backend(torch.device("cuda")) == "torch"
    monkeypatch.setenv("BABYMERGE_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        backend(cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend(cpu) == "triton"
    monkeypatch.setenv("BABYMERGE_KERNELS", "fast")
    with pytest.raises(ValueError, match="BABYMERGE_KERNELS='fast'"):
        backend(cpu)


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


# --- BABYMERGE_KERNELS=auto: the faster path, measured ------------------------------------------
# Off CUDA nothing is measured, so these run auto's choice on CPU tensors: backend() is made to
# offer the Triton path (which the interpreter runs), measuring is switched on, and the timings
# are scripted by path. Each candidate really runs while it is "timed".

def _auto_on_cpu(monkeypatch, times: dict[str, float]):
    from babymerge.kernels import dispatch, measured

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton path runs on CPU tensors only under TRITON_INTERPRET=1")
    monkeypatch.setenv("BABYMERGE_KERNELS", "auto")
    monkeypatch.setattr(dispatch, "backend", lambda device: "triton")
    monkeypatch.setattr(measured, "_MEASURED", {})
    monkeypatch.setattr(measured, "plans_are_measured", lambda device: True)
    ran = []

    def scripted(fn):
        before = len(calls)
        fn()
        if len(calls) == before:  # the Triton path's own launch plans, measured inside it
            return 1.0
        ran.append(calls[before:])
        return times[calls[-1]]

    calls: list[str] = []
    monkeypatch.setattr(measured, "measure", scripted)
    return calls, ran


def _times(faster: str) -> dict[str, float]:
    return {path: 1.0 if path == faster else 2.0 for path in ("triton", "torch")}


def _spy(monkeypatch, module, name, label, calls):
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(label)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)


@pytest.mark.parametrize("faster", ["triton", "torch"])
def test_auto_runs_the_projector_path_that_measured_faster(monkeypatch, faster):
    """Training and inference calls are measured separately, once per size bucket; the winner
    runs; measuring a training call leaves every .grad untouched."""
    from babymerge import kernels
    from babymerge.kernels import dispatch, measured, projector

    calls, ran = _auto_on_cpu(monkeypatch, _times(faster))
    _spy(monkeypatch, projector, "project_triton", "triton", calls)
    _spy(monkeypatch, dispatch, "project_reference", "torch", calls)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 32, generator=g)
    w1, b1, w2, b2 = (torch.randn(s, generator=g, requires_grad=True)
                      for s in ((16, 32), (16,), (16, 16), (16,)))
    want = dispatch.project_reference(x, w1, b1, w2, b2)
    calls.clear()
    y = kernels.project(x, w1, b1, w2, b2)
    assert [c[-1] for c in ran] == ["triton", "torch"]  # both measured, forward and backward
    assert calls[-1] == faster and all(w.grad is None for w in (w1, b1, w2, b2))
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    y.sum().backward()  # the chosen path's gradients reach the real parameters
    assert w1.grad is not None
    kernels.project(x[:33], w1, b1, w2, b2)  # same bucket (64 rows): not measured again
    assert len(ran) == 2 and calls[-1] == faster
    with torch.no_grad():
        kernels.project(x, w1, b1, w2, b2)  # inference: its own measurement
    assert len(ran) == 4 and calls[-1] == faster
    kinds = sorted(key[3] for key in measured.measured_choices() if key[0] == "project")
    assert kinds == [False, True]


@pytest.mark.parametrize("faster", ["triton", "torch"])
def test_auto_runs_the_merge_path_that_measured_faster(monkeypatch, faster):
    """The merge is measured into scratch tensors: merging in place into b (dst is b) gives the
    same result as one merge, however many times the candidates ran while timed."""
    from babymerge import kernels
    from babymerge.kernels import dispatch, interpolation

    calls, ran = _auto_on_cpu(monkeypatch, _times(faster))
    _spy(monkeypatch, interpolation, "interpolate_triton_", "triton", calls)
    _spy(monkeypatch, dispatch, "interpolate_reference_", "torch", calls)
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(s, generator=g) for s in ((300,), (20, 7))]
    b = [torch.randn(t.shape, generator=g) for t in a]
    want = [0.3 * x + 0.7 * y for x, y in zip(a, b)]
    kernels.interpolate_(b, a, b, 0.3)
    assert [c[-1] for c in ran] == ["triton", "torch"] and calls[-1] == faster
    for got, expected in zip(b, want):
        torch.testing.assert_close(got, expected)
    kernels.interpolate_(b, a, b, 1.0)  # cached: nothing measured again
    assert len(ran) == 2 and calls[-1] == faster


def test_auto_without_measuring_runs_the_triton_kernel(monkeypatch):
    """Where nothing can be measured (BABYMERGE_PROJECTOR_PLAN=rule, torch.compile tracing, CUDA
    graph capture) auto keeps the Triton kernel, as before the choice existed."""
    from babymerge import kernels
    from babymerge.kernels import measured, projector

    calls, ran = _auto_on_cpu(monkeypatch, {})
    monkeypatch.setattr(measured, "plans_are_measured", lambda device: False)
    _spy(monkeypatch, projector, "project_triton", "triton", calls)
    x, w1, w2 = torch.randn(5, 16), torch.randn(16, 16), torch.randn(16, 16)
    kernels.project(x, w1, None, w2, None)
    assert calls == ["triton"] and not ran and not measured.measured_choices()
