"""Choices measured once per process and shape bucket on CUDA, as Triton's autotuner measures block
sizes: the projector's launch plans (:mod:`babymerge.kernels.projector`), and which path
``BABYMERGE_KERNELS=auto`` runs for each op (:mod:`babymerge.kernels.dispatch`): the Triton
kernel, or the torch path, whichever measured faster, so that auto is never the slower one.

``BABYMERGE_PROJECTOR_PLAN=rule`` pins every such choice to fixed rules, for runs that must
repeat bit for bit: a measured choice can differ from one run to the next when two candidates
time alike, and candidates differ in summation order. Nothing is measured off CUDA, under the
Triton interpreter, while torch.compile traces or while a CUDA graph is being captured.
"""

from __future__ import annotations

import contextlib
import os

import torch

PLAN_ENV_VAR = "BABYMERGE_PROJECTOR_PLAN"
PLAN_MODES = ("measured", "rule")
_MEASURED: dict[tuple, object] = {}


def on_device(device: torch.device):
    """Triton launches (and CUDA events) use the current CUDA device: make it ``device``."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def plans_are_measured(device: torch.device) -> bool:
    """Whether choices are timed on ``device`` (CUDA, compiled kernels, and
    BABYMERGE_PROJECTOR_PLAN unset or ``measured``) or follow the fixed rules."""
    mode = os.environ.get(PLAN_ENV_VAR, "measured").strip().lower() or "measured"
    if mode not in PLAN_MODES:
        raise ValueError(f"{PLAN_ENV_VAR}={os.environ[PLAN_ENV_VAR]!r}: expected one of "
                         f"{', '.join(PLAN_MODES)}")
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if mode != "measured" or device.type != "cuda" or interpreting:
        return False
    # Nothing can be timed while torch.compile traces (fake tensors) or a CUDA graph is being
    # captured (a synchronising benchmark would break the capture): the rules decide there.
    return not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing()


def measure(fn, budget_ms: float = 10.0) -> float:
    """Milliseconds per call of ``fn``, calls queued back to back on the current CUDA stream, as
    in a training loop: a GPU-bound candidate shows its GPU time, a host-bound one its host time
    (its launches, allocations and small torch ops). Not triton.testing.do_bench: it enqueues a
    256 MB L2-flush memset (~85 us on an H100) before every call, which hides up to that much host
    time per call, so a candidate that adds launches or host ops to a host-bound step would time
    as if they were free. The first call (compiles, autotuning) is not timed; the calls double
    until ``budget_ms``."""
    fn()
    torch.cuda.synchronize()
    calls = 2
    while True:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end)
        if ms >= budget_ms or calls >= 1024:
            return ms / calls
        calls *= 2


def choose(key: tuple, device: torch.device, rule_choice, candidates: tuple, run):
    """The fastest of ``candidates`` for ``key``, timed once per process with ``run(candidate)``
    on the real inputs (or same-sized stand-ins); ``rule_choice`` where choices are not
    measured. The first call of a candidate also runs its kernels' autotuning, outside the
    timed calls."""
    if len(candidates) < 2 or not plans_are_measured(device):
        return rule_choice
    choice = _MEASURED.get(key)
    if choice is None:
        try:
            # the timing's events and synchronisation (and the autotuner's do_bench with its
            # 256 MB L2-flush buffer) use the CURRENT device: for tensors on another GPU (cuda:1
            # without set_device) they would time nothing and fill GPU 0, so time on theirs.
            with on_device(device):
                times = {c: measure(lambda c=c: run(c)) for c in candidates}
            choice = min(times, key=times.get)
        except torch.cuda.OutOfMemoryError:
            # timing needs room for every candidate's outputs and, on its first call, for the
            # autotuner's do_bench and its 256 MB L2-flush buffer; on a nearly full GPU the rule
            # decides instead of the step failing
            choice = rule_choice
        _MEASURED[key] = choice
    return choice


def measured_choices() -> dict[tuple, object]:
    """Every choice measured so far in this process, by key (benchmarks report them)."""
    return dict(_MEASURED)
