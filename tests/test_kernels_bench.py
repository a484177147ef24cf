"""scripts/bench_kernels.py as the GPU pass runs it: under a time limit (scripts/gpu_checks.sh
kills it), so what it measured must already be on stderr when it is cut short."""

import importlib
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture
def bench_kernels(monkeypatch):
    """The script as a module; it refuses to import under the interpreter (meaningless timings),
    which conftest turns on, so import it with the switch off and put the switch back."""
    import babymerge.kernels.projector  # noqa: F401  (its kernels decide at import whether they are interpreted)

    monkeypatch.syspath_prepend(str(SCRIPTS))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    sys.modules.pop("bench_kernels", None)
    module = importlib.import_module("bench_kernels")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield module
    sys.modules.pop("bench_kernels", None)


def test_merge_figures_survive_a_projector_run_cut_short(bench_kernels, monkeypatch, capsys):
    """The projector part (compiles, autotuning, plan timing per shape) is what outruns the
    phase limit; the merge takes seconds and must not be lost with it."""
    def cut_short(*args, **kwargs):
        raise KeyboardInterrupt("the phase's time limit")

    monkeypatch.setattr(bench_kernels, "bench_projector", cut_short)
    with pytest.raises(KeyboardInterrupt):
        bench_kernels.main(["--quick", "--device", "cpu", "--no-compile"])
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()
             if line.startswith("{")]
    merges = [line["merge"] for line in lines if "merge" in line]
    assert merges and merges[0]["foreach_lerp_gbps"] > 0, lines


def test_peak_memory_is_a_warm_steps(bench_kernels, monkeypatch):
    """The first Triton step of a shape autotunes and times plans (do_bench's 256 MB L2-flush
    buffer); the reported peak must be a warm step's, not that one-off buffer."""
    import torch

    allocated = {"now": 10, "peak": 10}
    calls = []

    def step():
        calls.append(1)
        if len(calls) == 1:  # the first call's benchmarking buffer, freed again
            allocated["peak"] = max(allocated["peak"], allocated["now"] + 256 * 2**20)
        allocated["peak"] = max(allocated["peak"], allocated["now"] + 2**20)

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device=None: allocated.update(peak=allocated["now"]))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocated["peak"])
    step()  # what the benchmark's timing loops ran before (the first, benchmarking, call)
    assert bench_kernels.steady_peak_mb(step, torch.device("cuda")) == 1.0


def test_compile_baseline_stays_compiled_over_every_dtype(bench_kernels, monkeypatch):
    """--dtypes bf16,fp16,fp32 at several M: past dynamo's recompile_limit (8 graphs per code
    object, shared by every torch.compile wrapper of it) the "torch_compile" rows would silently
    time eager code. A counting backend stands in for inductor."""
    import torch
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=counter, **kw))
    ms = [4, 8, 12]
    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    for dtype in dtypes:
        bench_kernels.bench_projector(torch.device("cpu"), dtype, ms, 16, 16, 16, reps=1,
                                      with_compile=True)
    assert counter.frame_count == len(ms) * len(dtypes)


def test_profile_splits_the_triton_steps_host_time(monkeypatch):
    """profile_projector's split (autograd / our wrapper / Triton's launch path) counts the
    launches of a real step, times the step with launches skipped, and puts the kernels back."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import torch

    import profile_projector
    from babymerge.kernels import projector

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)  # CPU tensors: nothing queued
    names = profile_projector._CountedLaunches.KERNELS
    kernels = {name: getattr(projector, name) for name in names}
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(*s, generator=g).requires_grad_() for s in ((8, 16), (8,), (4, 8), (4,))]
    x, dy = torch.randn(3, 16, generator=g), torch.randn(3, 4, generator=g)

    def step(fn):
        for w in weights:
            w.grad = None
        fn(x, *weights).backward(dy)

    split = profile_projector.triton_host_split(step, triton_us=1000.0)
    assert split["launches_per_step"] == 3  # one fused forward (3 rows), dz, the grads launch
    assert split["autograd_us"] > 0 and set(split) == {
        "launches_per_step", "autograd_us", "wrapper_us", "triton_launch_us_per_launch"}
    assert {name: getattr(projector, name) for name in kernels} == kernels
    step(profile_projector.project_triton)  # the kernels launch again after the split
    got = [w.grad.clone() for w in weights]
    step(profile_projector.project_reference)
    for g_triton, w in zip(got, weights):
        torch.testing.assert_close(g_triton, w.grad, rtol=1e-5, atol=1e-5)


def test_host_side_cdiv_and_next_power_of_2_match_tritons():
    """babymerge/kernels/projector.py computes grids, block caps and plan keys with its own ceil
    division and next power of two (Triton's are slow constexpr functions): they must give Triton's
    values, or grids would miss tiles and plans be keyed apart."""
    import triton

    from babymerge.kernels.projector import _cdiv, _next_power_of_2

    assert [_next_power_of_2(n) for n in range(2100)] == [
        triton.next_power_of_2(n) for n in range(2100)]
    assert all(_cdiv(a, b) == triton.cdiv(a, b) for a in range(600) for b in (1, 3, 16, 64, 256))
