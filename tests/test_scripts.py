"""The benchmark and profiling scripts (scripts/bench_merge.py, bench_eval.py, bench_pipeline.py,
bench_kernels.py, profile_projector.py) run and report what they claim, on the CPU at the tiny
preset. scripts/gpu_checks.sh is test_gpu_checks.py's; babymerge/benchmark.py (the peak tables and
FLOP estimates the scripts report with) is test_benchmark.py's."""

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# scripts/bench_merge.py and scripts/bench_eval.py


def test_bench_merge_paths_agree(capsys, monkeypatch):
    import babymerge.benchmark

    bench = load("bench_merge")
    assert babymerge.benchmark.peak_bandwidth(torch.device("cpu")) is None  # CPU: no peak
    # a GPU's peak stood in for, so the % of peak (reported on GPUs only) is checked here too
    monkeypatch.setattr(babymerge.benchmark, "peak_bandwidth", lambda device: 1e12)
    result = bench.main(["--preset", "tiny", "--vocab", "300", "--repeats", "1",
                         "--device", "cpu"])
    assert set(result["seconds_per_alpha"]) == {"inplace", "lerp_state_dict", "naive_state_dict",
                                                "safetensors", "copy"}
    assert max(result["max_abs_diff_vs_inplace"].values()) < 1e-6
    assert set(result["inplace_speedup"]) == set(result["seconds_per_alpha"]) - {"inplace"}
    assert result["torch"] and result["device"] == "cpu"
    gbps = result["GBps"]
    assert result["peak_GBps"] == 1000
    assert result["inplace_pct_of_peak_bandwidth"] == pytest.approx(
        gbps["inplace (read 2P + write P)"] / 10)
    assert result["copy_pct_of_peak_bandwidth"] == pytest.approx(
        gbps["copy (read P + write P)"] / 10)


def test_bench_merge_sweeps_start_cold_and_name_what_they_did_not_run(capsys):
    """The whole-sweep part: each sweep a fresh process whose phases add up to less than its
    wall time (the interpreter's start is in the wall); without mergekit it says so. With
    BABYMERGE_MERGEKIT_PYTHON (a Python with mergekit), mergekit's library and CLI run too and
    their merge must equal torch.lerp of the exported tensors."""
    import os

    bench = load("bench_merge")
    mergekit = os.environ.get("BABYMERGE_MERGEKIT_PYTHON")
    result = bench.main(["--preset", "tiny", "--vocab", "300", "--repeats", "1", "--device",
                         "cpu", "--sweep", "--alphas", "0,0.5,1"]
                        + (["--mergekit-python", mergekit, "--mergekit-cli"] if mergekit else []))
    sweep = result["sweep"]
    assert set(sweep["runs"]) >= {"babymerge", "lerp_script"}
    for run in sweep["runs"].values():
        assert len(run["alpha_s"]) == 3
        phases = run.get("import_s", 0) + run.get("load_s", 0) + sum(run["alpha_s"])
        assert phases < run["wall_s"]
    if mergekit:
        assert {"mergekit_library", "mergekit_cli"} <= set(sweep["runs"])
        check = sweep["mergekit_check"]
        assert check["tensors_compared"] == check["tensors_in_export"]
        assert check["max_abs_diff_vs_lerp"] < 1e-5
    elif "mergekit_library" not in sweep["runs"]:
        assert sweep["mergekit"].startswith("not run")


def test_bench_merge_times_the_command_across_ranks_with_the_same_scores(capsys):
    result = load("bench_merge").main(["--preset", "tiny", "--vocab", "300", "--repeats", "1",
                                       "--device", "cpu", "--ranks", "2", "--pairs", "5",
                                       "--alphas", "0,1"])["ranks_sweep"]
    assert result["same_scores"] and result["points"] == 2 and result["items"] == 35
    assert set(result["wall_s"]) == {"one_process", "torchrun_2"} and result["speedup"] > 0


def test_bench_eval_packed_equals_the_pipelines_way(capsys):
    result = load("bench_eval").main(["--preset", "tiny", "--vocab", "300", "--pairs", "4",
                                      "--device", "cpu", "--with-single"])
    assert result["max_abs_score_diff_single"] == pytest.approx(0, abs=1e-4)
    assert result["max_abs_score_diff"] == pytest.approx(0, abs=1e-4)
    assert set(result["pairs_per_s"]) == {"packed", "pipeline_like", "one_at_a_time"}
    assert 0 < result["positions"]["saved_fraction"] < 1  # [BOS, <image>] and shared words


def test_bench_eval_flop_estimate_matches_torch_flop_counter(capsys, monkeypatch):
    """The estimate behind bench_eval's % of peak on a GPU agrees with torch's FLOP counter on
    the packed path (batch size 1: no padding, which the estimate does not count)."""
    from torch.utils.flop_counter import FlopCounterMode

    from babymerge.evaluate import pack_task, score_candidates
    from babymerge.tasks import TaskSpec
    from babymerge.model import MODEL_PRESETS, build_model

    bench = load("bench_eval")
    cfg = MODEL_PRESETS["tiny"]
    model = build_model(cfg, seed=0, vocab_size=300, image_token_id=4, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2).eval()
    gen = torch.Generator().manual_seed(0)
    pairs = [[torch.randint(5, 300, (n,), generator=gen).tolist() for n in (9, 14)]
             for _ in range(3)]
    task = pack_task(TaskSpec("b", "minimal_pairs", "random"), [1, 4], pairs, [[0, 0]] * 3,
                     ["b"] * 3, [0] * 3, torch.randn(1, cfg.feature_dim, generator=gen))
    with FlopCounterMode(display=False) as counter:
        score_candidates(model, task, 1, progress=False)
    estimate = bench.scoring_flops(model, task)
    assert estimate == pytest.approx(counter.get_total_flops(), rel=0.1)
    result = bench.main(["--preset", "tiny", "--vocab", "300", "--pairs", "4", "--device", "cpu"])
    assert result["gflops_per_pass"] > 0 and result["pct_of_peak_packed"] is None  # CPU: no peak
    # with a peak (a GPU's, stood in for), the % is the achieved rate over it
    monkeypatch.setattr(bench, "peak_flops", lambda device, dtype: 1e9)
    result = bench.main(["--preset", "tiny", "--vocab", "300", "--pairs", "4", "--device", "cpu"])
    achieved = result["gflops_per_pass"] * 1e9 * result["pairs_per_s"]["packed"] / result["pairs"]
    assert result["peak_tflops"] == 1e-3
    assert result["pct_of_peak_packed"] == pytest.approx(100 * achieved / 1e9, rel=0.01)


# ---------------------------------------------------------------------------------------------
# scripts/bench_pipeline.py --quick: one JSON object, same-run baselines, a --device choice


def test_bench_pipeline_quick_prints_one_object_with_baselines(capsys):
    spec = importlib.util.spec_from_file_location("bench_pipeline", SCRIPTS / "bench_pipeline.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--device", "cpu"])
    out = capsys.readouterr().out
    result = json.loads(out)  # stdout holds exactly one JSON object
    assert result["device"] == "cpu" and result["scale"] == "quick"
    assert result["baseline"]["train_step_tokens_per_s"] > 0
    assert result["model_flops_per_token"] > 0
    # % of peak only where the device has a known peak: not on a CPU
    assert result["mfu"] == {"train lm": None, "train vlm": None, "train_step_baseline": None}


# ---------------------------------------------------------------------------------------------
# scripts/bench_kernels.py as the GPU pass runs it: under a time limit (scripts/gpu_checks.sh
# kills it), so what it measured must already be on stderr when it is cut short


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


# ---------------------------------------------------------------------------------------------
# scripts/profile_projector.py


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


def test_bench_checks_reports_each_checks_cost(capsys):
    result = load("bench_checks").main(["--preset", "tiny", "--pairs", "4", "--rows", "1000",
                                        "--device", "cpu"])
    assert result["params"] > 0 and result["load_check_s"] > 0 and result["one_alpha_s"] > 0
    assert result["load_check_vs_sweep_0_1_0.1"] == pytest.approx(
        result["load_check_s"] / (11 * result["one_alpha_s"]))
    assert result["feature_check_s_per_million_rows"] > 0
    assert result["train_step_s"] > 0 and result["train_step_checked_s"] > 0
