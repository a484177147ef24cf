"""Shared fixtures. TRITON_INTERPRET must be set before any module holding @triton.jit kernels is
imported, so it is set here, at collection time (see ../shared/TRITON.md)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402  (after the environment is set)


@pytest.fixture(params=[pytest.param("cpu", id="interpreter"),
                        pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)])
def kernel_device(request):
    """Where a Triton kernel test runs: the CPU interpreter (the default test run), or a GPU with
    the interpreter off (``TRITON_INTERPRET=0 pytest -m gpu tests/test_kernels*.py``)."""
    import torch

    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if request.param == "cpu" and not interpreting:
        pytest.skip("CPU runs of the Triton kernels need TRITON_INTERPRET=1")
    if request.param == "cuda":
        if interpreting:
            pytest.skip("GPU kernel tests need the interpreter off: "
                        "TRITON_INTERPRET=0 pytest -m gpu")
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
    return torch.device(request.param)
