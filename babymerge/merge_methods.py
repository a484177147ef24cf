"""Merge methods behind one interface, registered by name (as mergekit's ``merge_methods/``).

A method is built once per (LM, VLM) pair from aligned lists of tensors and then asked, for each
alpha of the sweep, to write the merged tensors into the live model's parameters in place
(:meth:`MergeMethod.merge_into_`). alpha weighs the LM and 1 - alpha the VLM in every method, so
alpha = 0 leans to the VLM and alpha = 1 to the LM.

Each class's docstring gives its definition; ``reference`` (written into results.json) cites the
paper it comes from.

Memory beside the live model, with P = the bytes of the merged tensors (416 MB in fp32 for the
paper preset): linear and slerp hold the two endpoints, 2P (the LM, shared by every VLM of a
checkpoint sweep, and the VLM's private copy). The task-vector methods hold 4P: the LM (the sweep
keeps it to score the unmerged LM), the base, and the two task vectors (the VLM's copy is turned
into its task vector in place). Transient memory is a few copies of the largest single tensor at
most: linear none (one fused pass), slerp two float64 copies while measuring an angle (once, when
built) and one temporary for a near-parallel tensor, TIES under ten temporaries of one tensor
during its sign election, DARE a float32 and a bool copy of one tensor in host memory (and the
bool mask on the device) while drawing that tensor's mask, when built.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from babymerge import kernels

MERGE_METHODS: dict[str, type["MergeMethod"]] = {}


def register(name: str) -> Callable[[type["MergeMethod"]], type["MergeMethod"]]:
    def wrap(cls: type[MergeMethod]) -> type[MergeMethod]:
        cls.name = name
        MERGE_METHODS[name] = cls
        return cls

    return wrap


class MergeMethod:
    """``merge_into_(dst, alpha)`` writes the merged tensors into ``dst`` (the live parameters).

    ``lm``, ``vlm`` and ``base`` are aligned lists (same names, same shapes). A method may reuse
    the storage of ``vlm`` (the caller's private copy) but never modifies ``lm`` or ``base``.
    """

    name = ""
    reference = ""
    needs_base = False
    uses_density = False  # whether --density (the fraction of task-vector entries kept) applies
    uses_seed = False  # whether --seed (of random drop masks) applies
    extrapolates = True  # whether alphas outside [0, 1] mean anything

    def __init__(self, lm: list[torch.Tensor], vlm: list[torch.Tensor],
                 base: list[torch.Tensor] | None, *, density: float = 1.0, scale: float = 1.0,
                 seed: int = 0):
        if self.needs_base and base is None:
            raise ValueError(f"--method {self.name} needs --base (the shared initial checkpoint)")
        self.lm, self.vlm, self.base = lm, vlm, base
        self.density, self.scale, self.seed = density, scale, seed

    @torch.no_grad()
    def merge_into_(self, dst: list[torch.Tensor], alpha: float) -> None:
        raise NotImplementedError


@register("linear")
class Linear(MergeMethod):
    """``theta = alpha * LM + (1 - alpha) * VLM`` for every tensor: the paper's merge."""

    reference = ("theta = alpha*LM + (1-alpha)*VLM (the paper; weight averaging as in Wortsman et "
                 "al. 2022, Model soups, arXiv:2203.05482)")

    @torch.no_grad()
    def merge_into_(self, dst: list[torch.Tensor], alpha: float) -> None:
        kernels.interpolate_(dst, self.lm, self.vlm, alpha)  # the fused kernel's dispatch point


@register("slerp")
class Slerp(MergeMethod):
    """Per tensor, with omega the angle between the flattened LM and VLM tensors:
    ``theta = sin((1 - alpha) omega) / sin(omega) * VLM + sin(alpha omega) / sin(omega) * LM``
    (the tensors themselves, not their unit vectors, are combined, as mergekit's slerp does);
    ``lerp`` where the two are nearly parallel."""

    reference = ("spherical linear interpolation per tensor (Shoemake 1985, Animating rotation "
                 "with quaternion curves, SIGGRAPH), linear where the two are nearly parallel")
    # |cos| above this: the arc is a line to float precision and sin(omega) ~ 0 would blow up
    PARALLEL_COS = 0.9995

    def __init__(self, lm, vlm, base, **kw):
        super().__init__(lm, vlm, base, **kw)
        self.omega = []
        for a, b in zip(lm, vlm, strict=True):
            cos = torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(),
                                                        dim=0).item()
            self.omega.append(None if abs(cos) > self.PARALLEL_COS else math.acos(cos))

    @torch.no_grad()
    def merge_into_(self, dst: list[torch.Tensor], alpha: float) -> None:
        for d, a, b, omega in zip(dst, self.lm, self.vlm, self.omega, strict=True):
            if omega is None:
                d.copy_(torch.lerp(b, a, alpha))
                continue
            s = math.sin(omega)
            d.copy_(b).mul_(math.sin((1 - alpha) * omega) / s)
            d.add_(a, alpha=math.sin(alpha * omega) / s)


@register("task-arithmetic")
class TaskArithmetic(MergeMethod):
    """``theta = base + scale * (alpha * tau_LM + (1 - alpha) * tau_VLM)`` with the task vectors
    ``tau = model - base``; at scale 1 this is the linear merge. Subclasses sparsify the task
    vectors (:meth:`sparsify`) or combine them differently (:meth:`combine_into_`)."""

    reference = ("base + scale*(alpha*tau_LM + (1-alpha)*tau_VLM), tau = model - base "
                 "(Ilharco et al. 2023, Editing models with task arithmetic, arXiv:2212.04089); "
                 "equals linear at scale 1")
    needs_base = True

    def __init__(self, lm, vlm, base, **kw):
        super().__init__(lm, vlm, base, **kw)
        # stream 2i / 2i+1: each tensor of each model gets its own random stream (DARE)
        self.tau_lm = [self.sparsify(a - c, 2 * i)
                       for i, (a, c) in enumerate(zip(lm, base, strict=True))]
        self.tau_vlm = [self.sparsify(b.sub_(c), 2 * i + 1)
                        for i, (b, c) in enumerate(zip(vlm, base, strict=True))]
        self.vlm = None  # its storage is tau_vlm now

    def sparsify(self, tau: torch.Tensor, stream: int) -> torch.Tensor:
        return tau

    def combine_into_(self, dst: list[torch.Tensor], alpha: float) -> None:
        kernels.interpolate_(dst, self.tau_lm, self.tau_vlm, alpha)

    @torch.no_grad()
    def merge_into_(self, dst: list[torch.Tensor], alpha: float) -> None:
        self.combine_into_(dst, alpha)
        if self.scale != 1.0:
            torch._foreach_mul_(dst, self.scale)
        torch._foreach_add_(dst, self.base)


@register("dare")
class Dare(TaskArithmetic):
    """Task arithmetic after DARE: each task vector's entries are dropped with probability
    ``1 - density`` (an independent seeded mask per tensor and model) and the survivors rescaled
    by ``1 / density``, which keeps each task vector's expectation."""

    reference = ("task arithmetic on task vectors with each entry dropped with probability "
                 "1-density and the rest rescaled by 1/density (Yu et al. 2024, DARE, Language "
                 "models are Super Mario, arXiv:2311.03099)")
    uses_density = True
    uses_seed = True

    def sparsify(self, tau: torch.Tensor, stream: int) -> torch.Tensor:
        if self.density >= 1.0:
            return tau
        # One seeded stream per tensor: the same masks at every alpha and for every VLM of a sweep.
        # Drawn on a CPU generator and moved to tau's device, so the masks do not depend on the
        # device (CPU and CUDA generators give different streams for one seed; a sweep resumed
        # on another device would mix the two) nor on the dtype. Uniform draws compared with the
        # density rather than bernoulli_, whose CPU kernel takes MKL's stream on Intel processors
        # and another elsewhere; uniform_ on the CPU is one serial mt19937 stream on any machine
        # and thread count. Cost: ~6 ns per entry (~1 s for a 100M-parameter model's two task
        # vectors) and a transient float32 copy of one tensor.
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + stream)
        keep = torch.rand(tau.shape, generator=gen) < self.density
        return tau.mul_(keep.to(tau.device)).div_(self.density)


@register("ties")
class Ties(TaskArithmetic):
    """TIES: (1) trim each tensor of each task vector to its top ``density`` fraction by
    magnitude; (2) elect each entry's sign as the sign of ``alpha * tau_LM + (1 - alpha) *
    tau_VLM``; (3) merge as the mean, weighted by alpha and 1 - alpha, of the trimmed entries
    whose sign agrees (0 where none does); then ``base + scale * merged`` as in task arithmetic.
    The paper's disjoint mean is the unweighted case (alpha = 0.5).

    The trim is per tensor, as mergekit's: the paper's code keeps the top fraction of the whole
    flattened task vector, which can empty a tensor whose updates are small (a norm's weights)
    and keep most of another. The weighted mean makes alpha a weight, not an interpolation: at
    any 0 < alpha < 1 an entry only one model kept enters at full size, so the merge jumps
    between alpha = 0 (base + trimmed tau_VLM) and any alpha above it (likewise at 1)."""

    reference = ("TIES (Yadav et al. 2023, TIES-Merging, arXiv:2306.01708): each tensor of each "
                 "task vector trimmed to its top-density magnitudes (per tensor, as mergekit; the "
                 "paper trims the whole vector), sign elected by the weighted sum, weighted mean "
                 "of the entries that agree")
    uses_density = True
    extrapolates = False  # negative weights would flip the sign election

    def sparsify(self, tau: torch.Tensor, stream: int) -> torch.Tensor:
        if self.density >= 1.0:
            return tau
        k = max(1, math.ceil(self.density * tau.numel()))
        magnitude = tau.abs().flatten()
        threshold = magnitude.kthvalue(tau.numel() - k + 1).values
        return tau.mul_(tau.abs() >= threshold)

    def combine_into_(self, dst: list[torch.Tensor], alpha: float) -> None:
        w_lm, w_vlm = alpha, 1.0 - alpha
        for d, a, b in zip(dst, self.tau_lm, self.tau_vlm, strict=True):
            sign = torch.sign(torch.lerp(b.float(), a.float(), alpha))
            agree_lm = (torch.sign(a) == sign) & (a != 0)
            agree_vlm = (torch.sign(b) == sign) & (b != 0)
            num = w_lm * a * agree_lm + w_vlm * b * agree_vlm
            den = w_lm * agree_lm + w_vlm * agree_vlm
            d.copy_(torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num)))
