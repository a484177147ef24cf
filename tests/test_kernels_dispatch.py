"""babymerge.kernels.dispatch: which path (Triton or the torch reference) each op takes, per
``BABYMERGE_KERNELS`` and the tensors' device, and the errors of a path that cannot run."""

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
