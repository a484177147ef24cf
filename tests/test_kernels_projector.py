"""Fused projector (babymerge/kernels/projector.py, its module form FusedProjector) against its
torch reference: output and every gradient, every dtype, shapes that are not multiples of any
block, on the CPU interpreter (default run) and on a GPU (``-m gpu``, interpreter off); plans and
their timing; the kernel as a researcher calls it (in-place ops on its output, gradient penalties,
torch.compile); the host-side helpers that must give Triton's values."""

import contextlib
import os

import pytest
import torch
from transformers import LlavaConfig
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from babymerge import kernels
from babymerge.kernels import measured
from babymerge.model import MODEL_PRESETS, build_model
from babymerge.kernels.modules import FusedProjector
from babymerge.kernels.projector import project_triton
from babymerge.kernels.projector_reference import project_reference

# Max error relative to max |reference|, the reference being fp32 maths on the same (rounded)
# inputs. fp32: only summation order differs. fp16: z, gelu(z), da and dz are each rounded to fp16
# (unit 2^-11) as eager does, errors chain through two GEMMs. bf16: the same with unit 2^-8, and the
# interpreter's fp32->bf16 stores truncate instead of rounding (up to a full ulp each).
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
# On the GPU fp32 dots are exact-fp32 ("ieee") unless torch itself allows tf32; 1e-4 covers the
# reordering of K = 1000 products.
GPU_FP32_TOL = 1e-4

IDS = dict(vocab_size=50, image_token_id=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _inputs(m, k, h, n, dtype, device, bias=True, seed=0):
    """x, W1, b1, W2, b2 scaled so every stage is O(1), as leaf tensors requiring grad."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(m, k), (h, k), (h,), (n, h), (n,)]
    scales = [1.0, k ** -0.5, 0.5, h ** -0.5, 0.5]
    out = []
    for i, (shape, scale) in enumerate(zip(shapes, scales)):
        if not bias and i in (2, 4):
            out.append(None)
            continue
        t = (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)
        out.append(t.requires_grad_())
    return out


def _rel_err(actual, expected):
    return ((actual.float() - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def _check_against_reference(inputs, tol):
    """Output and all gradients of the Triton path vs fp32 reference maths on the same inputs."""
    y = project_triton(*inputs)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    grads = torch.autograd.grad(y, [t for t in inputs if t is not None], dy)
    ref_in = [t.detach().float().requires_grad_() if t is not None else None for t in inputs]
    y_ref = project_reference(*ref_in)
    ref_grads = torch.autograd.grad(y_ref, [t for t in ref_in if t is not None], dy.float())
    assert y.dtype == inputs[0].dtype and y.shape == y_ref.shape
    names = ["y"] + [n for n, t in zip(["dx", "dW1", "db1", "dW2", "db2"], inputs) if t is not None]
    for name, got, want in zip(names, (y, *grads), (y_ref, *ref_grads)):
        assert got.shape == want.shape, name
        err = _rel_err(got, want)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


def test_issue_shape_fp32(kernel_device):
    """M=3, K=1000, N=770 (the issue's odd shape): 3 rows in a 16-row block, K and H split over
    several masked loop steps, several column blocks."""
    tol = GPU_FP32_TOL if kernel_device.type == "cuda" else TOL[torch.float32]
    _check_against_reference(_inputs(3, 1000, 770, 770, torch.float32, kernel_device), tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_every_dtype(kernel_device, dtype):
    """67 rows = two row blocks; K = 300 two K steps; H = 160 two hidden chunks; N = 130 two
    column blocks (so z is written by one column block and recomputed by the other)."""
    tol = GPU_FP32_TOL if kernel_device.type == "cuda" and dtype == torch.float32 else TOL[dtype]
    _check_against_reference(_inputs(67, 300, 160, 130, dtype, kernel_device), tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_two_kernel_forward_and_split_weight_grads(kernel_device, dtype, monkeypatch):
    """The large-M plan at a small M: the forward as two GEMM launches (z, then gelu(z) W2^T),
    and weight gradients reduced in 4 row slices (the last one empty) summed on the host."""
    from babymerge.kernels import projector

    # On CUDA plans are measured, which would ignore these rules (and at 67 rows try no split):
    # pin the rules so the GPU run checks the compiled two-GEMM forward and split reduction too.
    monkeypatch.setenv(measured.PLAN_ENV_VAR, "rule")
    monkeypatch.setattr(projector, "FUSED_FORWARD_MAX_ROWS", 16)
    monkeypatch.setattr(projector, "ROWS_PER_WEIGHT_GRAD_SPLIT", 16)
    assert projector.weight_grad_splits(67) == 4
    tol = GPU_FP32_TOL if kernel_device.type == "cuda" and dtype == torch.float32 else TOL[dtype]
    _check_against_reference(_inputs(67, 300, 160, 130, dtype, kernel_device), tol)
    # no biases, only dW1 asked for
    x, w1, _, w2, _ = _inputs(67, 48, 32, 16, dtype, kernel_device, bias=False)
    (dw1,) = torch.autograd.grad(project_triton(x.detach(), w1, None, w2.detach(), None).sum(),
                                 [w1])
    ref = [t.detach().float().requires_grad_() for t in (w1, w2)]
    (dw1_ref,) = torch.autograd.grad(
        project_reference(x.detach().float(), ref[0], None, ref[1], None).sum(), [ref[0]])
    assert _rel_err(dw1, dw1_ref) <= tol
    # frozen weights (only dx): nothing to split, whatever the rule says at this M
    (dx,) = torch.autograd.grad(project_triton(x, w1.detach(), None, w2.detach(), None).sum(), [x])
    x_ref = x.detach().float().requires_grad_()
    (dx_ref,) = torch.autograd.grad(
        project_reference(x_ref, ref[0].detach(), None, ref[1].detach(), None).sum(), [x_ref])
    assert _rel_err(dx, dx_ref) <= tol


def test_no_weight_gradients_no_split(kernel_device, monkeypatch):
    """A backward asked for dx only has no reduction over M to split: the grads kernel launches
    with SPLIT_R=1 even under an explicit split (a split there only compiled and autotuned
    another kernel variant and allocated an empty workspace). Its launch is spied on; the dx
    values are the test above's."""
    from babymerge.kernels import projector

    launched = []

    class Spy:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(kwargs["SPLIT_R"])

    monkeypatch.setattr(projector, "_projector_bwd_grads_kernel", Spy())
    x, w1, b1, w2, b2 = (t.detach() for t in _inputs(67, 32, 16, 16, torch.float32,
                                                      kernel_device))
    _, z = projector.projector_forward(x, w1, b1, w2, b2, save_z=True, plan="two_gemm")
    dy = torch.ones(67, 16, device=kernel_device)
    grads = projector.projector_backward(dy, x, w1, w2, z, (True, False, False, False, False),
                                         True, True, split=4)
    assert launched == [1] and grads[1:] == (None,) * 4


def test_measured_plans_pick_the_fastest_once(kernel_device, monkeypatch):
    """Where plans are measured (CUDA), every candidate runs on the real inputs, the fastest is
    kept per shape bucket and reused without timing again; the gradients stay right whichever
    plan wins. Timings are scripted: the first call times each forward plan, the backward each
    split (1, 2, 4 at 67 rows with 16-row slices allowed)."""
    from babymerge.kernels import projector

    monkeypatch.setattr(measured, "_MEASURED", {})
    monkeypatch.setattr(projector, "MIN_ROWS_PER_WEIGHT_GRAD_SPLIT", 16)
    monkeypatch.setattr(measured, "plans_are_measured", lambda device: True)
    scripted = iter([3.0, 1.0,  # forward: fused, two_gemm
                     5.0, 1.0, 3.0])  # backward: split 1, 2, 4
    timed = []

    def fake_measure(fn):
        fn()  # the candidate really runs
        timed.append(1)
        return next(scripted)

    monkeypatch.setattr(measured, "measure", fake_measure)
    assert projector.weight_grad_split_candidates(67) == (1, 2, 4)
    inputs = _inputs(67, 300, 160, 130, torch.float32, kernel_device)
    tol = GPU_FP32_TOL if kernel_device.type == "cuda" else TOL[torch.float32]
    _check_against_reference(inputs, tol)
    assert len(timed) == 5
    assert sorted(map(str, measured._MEASURED.values())) == ["2", "two_gemm"]
    _check_against_reference(_inputs(70, 300, 160, 130, torch.float32, kernel_device, seed=3), tol)
    assert len(timed) == 5  # 70 rows share 67's bucket: nothing timed again


def test_plan_timing_out_of_memory_falls_back_to_the_rule(kernel_device, monkeypatch):
    """do_bench allocates a 256 MB L2-flush buffer and every candidate's outputs: on a nearly full
    GPU the first step of a new shape must not fail for want of room to time plans."""
    from babymerge.kernels import projector

    monkeypatch.setattr(measured, "_MEASURED", {})
    monkeypatch.setattr(measured, "plans_are_measured", lambda device: True)

    def no_room(fn):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(measured, "measure", no_room)
    x, w1, b1, w2, b2 = (t.detach() if t is not None else None
                         for t in _inputs(20, 32, 16, 16, torch.float32, kernel_device))
    y, _ = projector.projector_forward(x, w1, b1, w2, b2, save_z=False)
    assert _rel_err(y, project_reference(x, w1, b1, w2, b2)) < 1e-4
    assert list(measured._MEASURED.values()) == ["fused"]  # the rule's choice, kept


def test_plan_switch(kernel_device, monkeypatch):
    """BABYMERGE_PROJECTOR_PLAN=rule pins the rules (no timing, even on CUDA); a typo is an
    error naming the variable; plans are never timed in the interpreter, under torch.compile's
    tracing or during CUDA graph capture."""
    from babymerge.kernels import projector

    monkeypatch.setenv(measured.PLAN_ENV_VAR, "rule")
    assert not measured.plans_are_measured(torch.device("cuda"))
    monkeypatch.setenv(measured.PLAN_ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="BABYMERGE_PROJECTOR_PLAN='fastest'"):
        measured.plans_are_measured(kernel_device)
    monkeypatch.delenv(measured.PLAN_ENV_VAR)
    assert measured.plans_are_measured(kernel_device) == (kernel_device.type == "cuda")
    # compiled kernels on CUDA: measured, except while torch.compile traces or a graph is captured
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for compiling, capturing in ((False, False), (True, False), (False, True)):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
        timed = measured.plans_are_measured(torch.device("cuda"))
        assert timed == (not compiling and not capturing)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="plan 'fast'"):
        projector.projector_forward(*_inputs(4, 16, 16, 16, torch.float32, kernel_device)[:5],
                                    save_z=False, plan="fast")


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1000, 4099, 16411])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_paper_shape_gpu(kernel_device, dtype, rows, monkeypatch):
    """The paper's projector (1024 -> 768 -> 768), autotuned, at the three plans: one fused
    forward kernel (1000 rows), two forward GEMMs (4099), and split weight gradients (16411).
    The rules pin those plans: measured plans would test only whichever timed fastest."""
    if kernel_device.type != "cuda":
        pytest.skip("paper-size shape only on the GPU (minutes in the interpreter)")
    from babymerge.kernels import projector

    monkeypatch.setenv(measured.PLAN_ENV_VAR, "rule")
    want = {1000: ("fused", 1), 4099: ("two_gemm", 1), 16411: ("two_gemm", 4)}[rows]
    assert (("fused" if rows <= projector.FUSED_FORWARD_MAX_ROWS else "two_gemm"),
            projector.weight_grad_splits(rows)) == want
    tol = GPU_FP32_TOL if dtype == torch.float32 else TOL[dtype]
    _check_against_reference(_inputs(rows, 1024, 768, 768, dtype, kernel_device), tol)


def test_no_bias_leading_dims_and_partial_grads(kernel_device):
    """Biases absent, x of shape (2, 5, K), frozen weights: only dx is computed and returned."""
    x, w1, _, w2, _ = _inputs(10, 48, 32, 16, torch.float32, kernel_device, bias=False)
    x3 = x.detach().reshape(2, 5, 48).requires_grad_()
    w1, w2 = w1.detach(), w2.detach()
    y = project_triton(x3, w1, None, w2, None)
    assert y.shape == (2, 5, 16)
    (dx,) = torch.autograd.grad(y.sum(), [x3])
    x_ref = x3.detach().clone().requires_grad_()
    (dx_ref,) = torch.autograd.grad(project_reference(x_ref, w1, None, w2, None).sum(), [x_ref])
    assert _rel_err(y.detach(), project_reference(x_ref, w1, None, w2, None).detach()) < 1e-4
    assert _rel_err(dx, dx_ref) < 1e-4
    with torch.no_grad():  # inference: no autograd node, no saved pre-activation
        y_eval = project_triton(x3, w1, None, w2, None)
    assert y_eval.grad_fn is None and torch.equal(y_eval, y.detach())


def test_zero_rows(kernel_device):
    x, w1, b1, w2, b2 = _inputs(0, 32, 16, 16, torch.float32, kernel_device)
    y = project_triton(x, w1, b1, w2, b2)
    assert y.shape == (0, 16)
    grads = torch.autograd.grad(y.sum(), [w1, b1, w2, b2])
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_autocast_casts_like_linear(kernel_device):
    """Under autocast the kernel runs in the autocast dtype and fp32 weights get fp32 gradients."""
    x, w1, b1, w2, b2 = _inputs(20, 32, 16, 16, torch.float32, kernel_device)
    with torch.autocast(kernel_device.type, dtype=torch.bfloat16):
        y = project_triton(x, w1, b1, w2, b2)
        y_ref = project_reference(x, w1, b1, w2, b2)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert _rel_err(y, y_ref.float()) < TOL[torch.bfloat16]
    y.float().sum().backward()
    assert w1.grad is not None and w1.grad.dtype == torch.float32


def test_refuses_bad_inputs(kernel_device):
    x, w1, b1, w2, b2 = _inputs(8, 32, 16, 16, torch.float32, kernel_device)
    with pytest.raises(ValueError, match="x is not contiguous"):
        project_triton(x.detach().t().contiguous().t(), w1, b1, w2, b2)
    with pytest.raises(ValueError, match="w1 is not contiguous"):
        project_triton(x, torch.empty(32, 16, device=kernel_device).t(), b1, w2, b2)
    with pytest.raises(ValueError, match="shapes do not chain"):
        project_triton(x, w1, b1, w2.detach()[:, :8].contiguous(), b2)
    with pytest.raises(ValueError, match="b1 is torch.float16"):
        project_triton(x, w1, b1.detach().half(), w2, b2)


def test_fused_projector_is_a_drop_in_for_llava(kernel_device, monkeypatch):
    """Same state-dict keys and shapes as LlavaMultiModalProjector; same outputs."""
    monkeypatch.setenv("BABYMERGE_KERNELS", "triton")
    cfg = LlavaConfig(vision_config={"model_type": "dinov2", "hidden_size": 96},
                      text_config={"model_type": "llama", "hidden_size": 48,
                                   "num_attention_heads": 4})
    torch.manual_seed(0)
    llava = LlavaMultiModalProjector(cfg).to(kernel_device)
    fused = FusedProjector.from_llava_config(cfg).to(kernel_device)
    assert {k: v.shape for k, v in fused.state_dict().items()} == \
        {k: v.shape for k, v in llava.state_dict().items()}
    fused.load_state_dict(llava.state_dict(), strict=True)
    x = torch.randn(5, 96, device=kernel_device)
    assert _rel_err(fused(x).detach(), llava(x).detach()) < 1e-5


def test_model_trains_through_the_kernel(kernel_device, monkeypatch):
    """BabyLLaVA's image path with the Triton projector: logits and projector gradients equal the
    torch path's (babymerge/model.py calls kernels.project)."""
    model = build_model(MODEL_PRESETS["tiny"], seed=0, **IDS).to(kernel_device)
    results = {mode: _train_step(model, model, mode, monkeypatch) for mode in ("torch", "triton")}
    for got, want in zip(results["triton"], results["torch"]):
        assert _rel_err(got, want) < 1e-4
    assert kernels.dispatch.backend(kernel_device) == "triton"


def _train_step(model, run, mode: str, monkeypatch) -> tuple[torch.Tensor, ...]:
    """One training step of ``model`` through ``run`` (the model or its compiled form) on a
    two-caption batch with image features, kernels per ``mode``: logits and projector grads."""
    device = next(model.parameters()).device
    ids = torch.tensor([[1, 4, 7, 8, 9], [1, 4, 10, 11, 12]], device=device)
    feats = torch.randn(2, 1024, generator=torch.Generator().manual_seed(0)).to(device)
    proj = model.model.multi_modal_projector
    monkeypatch.setenv("BABYMERGE_KERNELS", mode)
    model.zero_grad()
    out = run(input_ids=ids, pixel_values=feats, labels=ids)
    out.loss.backward()
    return (out.logits.detach(), proj.linear_1.weight.grad.clone(),
            proj.linear_2.bias.grad.clone())


def test_compiled_model_trains_through_the_kernel(kernel_device, monkeypatch):
    """``train --compile`` on CUDA: dynamo traces BabyLLaVA with the Triton projector inside (the
    autograd.Function, its autotuned launches, plans by rule while tracing); loss and projector
    gradients equal the eager torch path's. Not run in the interpreter, where the kernel call is
    a graph break and inductor's CPU build alone outlasts the test budget."""
    if kernel_device.type != "cuda":
        pytest.skip("torch.compile with the Triton projector is checked on a GPU")
    model = build_model(MODEL_PRESETS["tiny"], seed=0, **IDS).to(kernel_device)
    torch._dynamo.reset()
    want = _train_step(model, model, "torch", monkeypatch)
    got = _train_step(model, torch.compile(model), "triton", monkeypatch)
    for g, w in zip(got, want):
        assert _rel_err(g, w) < 1e-4


def test_plans_are_timed_on_the_tensors_device(kernel_device, monkeypatch):
    """do_bench records its events on the current CUDA device and allocates its L2-flush buffer
    there: tensors on cuda:1 with cuda:0 current would be timed on the wrong GPU (near-zero times,
    a random plan) with 256 MB taken on GPU 0. The timing must run inside the tensors' device."""
    from babymerge.kernels import projector

    inside = []

    @contextlib.contextmanager
    def recording(device):
        inside.append(device)
        try:
            yield
        finally:
            inside.pop()

    monkeypatch.setattr(measured, "_MEASURED", {})
    monkeypatch.setattr(measured, "plans_are_measured", lambda device: True)
    monkeypatch.setattr(measured, "on_device", recording)
    seen = []

    def fake_measure(fn):
        seen.append(list(inside))
        fn()
        return 1.0

    monkeypatch.setattr(measured, "measure", fake_measure)
    x, w1, b1, w2, b2 = (t.detach() for t in _inputs(20, 32, 16, 16, torch.float32,
                                                      kernel_device))
    projector.projector_forward(x, w1, b1, w2, b2, save_z=False)
    assert seen and all(s == [x.device] for s in seen), seen


def test_plan_timing_counts_host_time(monkeypatch):
    """Plans are timed as a training loop runs them, calls back to back: a plan whose cost is on
    the host (extra launches, a split reduction's workspace, sum and cast) must show it.
    triton.testing.do_bench enqueues a 256 MB L2-flush memset (~85 us on an H100) before each
    call, behind which that much host time per call vanished. CUDA events are faked with the
    host clock here: the GPU side is idle, so host time is all there is to see. The clock is
    simulated (each call advances it 1 ms), so the figure does not depend on the machine's load."""
    clock = [0.0]  # host milliseconds

    class HostEvent:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self, stream=None):
            self.t = clock[0]

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return end.t - self.t

    monkeypatch.setattr(torch.cuda, "Event", HostEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    calls = []

    def host_bound():  # 1 ms of host work per call, nothing on the GPU
        calls.append(1)
        clock[0] += 1.0

    ms = measured.measure(host_bound, budget_ms=5.0)
    assert ms == 1.0
    assert len(calls) == 1 + 2 + 4 + 8  # the untimed first call, then doubling batches to 5 ms


# ---------------------------------------------------------------------------------------------
# The kernel as a researcher calls it: in-place ops on the projector's output, gradient
# penalties, torch.compile (small shapes: the interpreter is slow)


def _small_inputs(m=6, k=32, h=16, n=16, seed=0):
    """x, W1, b1, W2, b2 in fp32 on the CPU, small (the interpreter is slow), requiring grad."""
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
    inputs = [t.detach().to(kernel_device).requires_grad_() for t in _small_inputs()]
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
    x, w1, b1, w2, b2 = [t.detach().to(kernel_device).requires_grad_() for t in _small_inputs()]
    y = project_triton(x, w1, b1, w2, b2)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice|once_differentiable"):
        (y.sum() + gx.square().sum()).backward()


def test_first_order_gradients_unchanged_with_create_graph(kernel_device):
    """create_graph=True alone (no second derivative taken) still gives the right gradients."""
    inputs = [t.detach().to(kernel_device).requires_grad_() for t in _small_inputs()]
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


# ---------------------------------------------------------------------------------------------
# Host-side helpers


def test_host_side_cdiv_and_next_power_of_2_match_tritons():
    """babymerge/kernels/projector.py computes grids, block caps and plan keys with its own ceil
    division and next power of two (Triton's are slow constexpr functions): they must give Triton's
    values, or grids would miss tiles and plans be keyed apart."""
    import triton

    from babymerge.kernels.projector import _cdiv, _next_power_of_2

    assert [_next_power_of_2(n) for n in range(2100)] == [
        triton.next_power_of_2(n) for n in range(2100)]
    assert all(_cdiv(a, b) == triton.cdiv(a, b) for a in range(600) for b in (1, 3, 16, 64, 256))
