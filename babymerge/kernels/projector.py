"""Fused projector ``y = W2 gelu(W1 x + b1) + b2``: Triton kernels, launchers, autograd.Function.

Shapes: x (M, K), W1 (H, K), b1 (H,), W2 (N, H), b2 (N,), y (M, N). In the paper's model K = 1024
(DINOv2-large), H = N = 768, and M is the number of images in a batch: a few hundred rows in
training, a few thousand in evaluation. These are small GEMMs, so launches and HBM round trips of
the hidden activation cost as much as the FLOPs; the launch plan is built around that:

- forward, plan "fused": ONE kernel. A program owns BLOCK_M rows and BLOCK_N output columns and
  walks the hidden dim in BLOCK_H chunks: z = x W1[h]^T + b1 (K loop), a = gelu(z) in registers,
  y += a W2[:, h]^T. The activation never goes to memory. When BLOCK_N < N the first GEMM is
  recomputed once per column block: at small M that recompute runs on SMs that would otherwise
  idle (it buys parallelism). At large M it does not pay: on an H100 at M = 16384 the fused kernel
  took 0.74 ms against eager's 0.13 ms. Plan "two_gemm" is two GEMM launches instead, the second
  applying gelu to z as it loads it. On CUDA the faster plan is measured per shape bucket.
- training saves the pre-activation z (M x H in the input dtype, 1.5 KB per row in bf16) instead of
  recomputing it in backward: recomputing costs a whole M x K x H GEMM, saving costs one write and
  one read of M x H, and eager PyTorch keeps the same tensor (gelu's input) anyway.
- backward: TWO kernels. (1) dz = (dy W2) * gelu'(z), tiles over (M, H). (2) one grouped launch
  whose programs compute, by program-id range, tiles of dW2 (+ db2), dW1 (+ db1) and dx. All three
  read only dy, z, dz, x and the weights, so they run side by side (eager runs 6-8 kernels). Weight
  gradients reduce over M inside one program per tile, or for large M over slices of M in several
  programs writing fp32 partials summed afterwards (deterministic either way, no atomics); their
  tiles get the low program ids because they are the long ones and should start first.

Rounding follows eager PyTorch in the input dtype: z, a = gelu(z), da and dz are rounded to it
between steps and every accumulation is fp32, so bf16/fp16 results match eager to about one ulp.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from babymerge.kernels.measured import choose, on_device

# Triton decides when a @triton.jit function is decorated whether it is interpreted; read the same
# switch. The interpreter runs only ONE autotune config, and its tl.dot multiplies bf16 bit patterns
# (shared/TRITON.md), so interpreted kernels upcast dot operands to fp32.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _configs(names: tuple[str, ...], tuned: list[tuple]) -> list[triton.Config]:
    """Autotune search space on CUDA: (block sizes..., num_warps, num_stages) tuples."""
    return [triton.Config(dict(zip(names, t[:-2])), num_warps=t[-2], num_stages=t[-1])
            for t in tuned]


def _autotuned(configs: dict[str, list[triton.Config]], key: list[str]):
    """triton.autotune on CUDA over ``configs["16bit"]`` for bf16/fp16 operands and
    ``configs["fp32"]`` for fp32 (the kernel's first argument decides). fp32 dots run on FMA units
    with every operand in registers: the tensor-core tile sizes spill kilobytes there (ptxas,
    sm_90), so fp32 gets smaller tiles. The interpreter can run only one config and its tl.dot is a
    plain numpy loop whose cost is the padded tile volume, so there the launchers pass block sizes
    fitted to the shape instead (:func:`_fitted`)."""
    def by_dtype(_configs, named_args, **_):
        first = next(iter(named_args.values()))
        return configs["fp32" if first.dtype == torch.float32 else "16bit"]

    def wrap(fn):
        if INTERPRET:
            return fn
        return triton.autotune(configs=configs["16bit"] + configs["fp32"], key=key,
                               prune_configs_by={"early_config_prune": by_dtype})(fn)
    return wrap


def _cdiv(a: int, b: int) -> int:
    """Ceiling division on the host. triton.cdiv and triton.next_power_of_2 are constexpr
    functions that unwrap their arguments and read a knob per call (~2.6 us each, Triton 3.9), and a
    training step made 15 such calls: host time is what bounds this op at training sizes."""
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, as triton.next_power_of_2 (which gives 0 for 0)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _fitted(**dims: tuple[int, int]) -> dict[str, int]:
    """Interpreter block sizes: each dim rounded up to a power of two, between 16 (tl.dot's
    minimum) and a cap. Empty on CUDA, where the autotuner supplies them."""
    if not INTERPRET:
        return {}
    return {name: min(max(16, _next_power_of_2(size)), cap)
            for name, (size, cap) in dims.items()}


# Block sizes are >= 16 everywhere: tl.dot on the GPU needs every dimension >= 16. Every config
# compiles for sm_90 with the JIT's usual specialisation (babymerge/kernels/gpu_compile.py;
# ptxas -v) without register spills (Triton 3.6 and 3.9; tests/test_kernels_gpu_compile.py); bf16 at
# 72-255 registers and 37-110 KB of shared memory, every 64-row tile on warpgroup MMAs (wgmma).
_FWD = ("BLOCK_M", "BLOCK_N", "BLOCK_H", "BLOCK_K")
_FWD_CONFIGS = {
    "16bit": _configs(_FWD, [(64, 64, 64, 64, 4, 3), (64, 128, 64, 64, 4, 3),
                             (64, 256, 64, 64, 8, 3), (128, 128, 64, 64, 8, 3),
                             (64, 512, 32, 64, 8, 3), (32, 256, 64, 64, 4, 4),
                             (16, 256, 64, 128, 4, 4)]),
    "fp32": _configs(_FWD, [(32, 64, 32, 32, 4, 2), (32, 128, 32, 32, 4, 2), (64, 64, 32, 32, 4, 2),
                            (16, 128, 32, 64, 4, 2), (64, 128, 32, 32, 8, 2),
                            (32, 256, 32, 32, 8, 2)]),
}
_DZ = ("BLOCK_M", "BLOCK_H", "BLOCK_N")
_DZ_CONFIGS = {
    "16bit": _configs(_DZ, [(64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3),
                            (128, 128, 64, 8, 3), (32, 128, 128, 4, 3), (16, 128, 128, 4, 4)]),
    "fp32": _configs(_DZ, [(64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3),
                           (16, 128, 128, 4, 4)]),
}
# Weight-gradient tiles (A, B = output dims, R = the M reduction) and dx tiles (XM, XK, XH = the H
# reduction) have their own sizes: in dW the rows M are the reduction, in dx they are an output dim.
_GRAD = ("BLOCK_A", "BLOCK_B", "BLOCK_R", "BLOCK_XM", "BLOCK_XK", "BLOCK_XH")
_GRAD_CONFIGS = {
    "16bit": _configs(_GRAD, [(64, 64, 64, 64, 64, 64, 4, 3), (64, 128, 64, 64, 128, 64, 4, 3),
                              (128, 64, 64, 128, 64, 64, 4, 3),
                              (128, 128, 64, 128, 128, 64, 8, 3),
                              (128, 128, 32, 64, 128, 64, 8, 4),
                              (64, 64, 128, 32, 128, 64, 4, 3)]),
    "fp32": _configs(_GRAD, [(64, 64, 32, 64, 64, 32, 8, 2), (32, 32, 32, 32, 32, 32, 4, 2)]),
}

# The two-kernel forward's GEMMs (A, B = output tile, R = reduction).
_LIN = ("BLOCK_A", "BLOCK_B", "BLOCK_R")
_LIN_CONFIGS = {
    "16bit": _configs(_LIN, [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4),
                             (128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (128, 256, 64, 8, 3)]),
    "fp32": _configs(_LIN, [(64, 64, 32, 8, 2), (64, 128, 32, 8, 2), (32, 32, 32, 4, 2)]),
}

# Launch plans. Which forward (one fused kernel or two GEMM launches) and how many slices the
# weight-gradient reduction takes depend on the GPU, the dtype and M in ways one H100 profile does
# not settle (fused forward at M = 1024: 74 us on an H100; the two-GEMM forward there unmeasured),
# so on CUDA each is MEASURED once per shape bucket, as the autotuner measures block sizes
# (babymerge/kernels/measured.py). The rules below are what the interpreter, and
# BABYMERGE_PROJECTOR_PLAN=rule, use instead: fused up to FUSED_FORWARD_MAX_ROWS rows (a training
# batch of images is small, its GEMMs take microseconds and the launch count is what costs; above
# it the first GEMM's recompute per column block, the price of never writing the activation,
# outgrows one write and one read of z, which training saves anyway).
FORWARD_PLANS = ("fused", "two_gemm")
FUSED_FORWARD_MAX_ROWS = 1024
# Weight-gradient reductions over M by rule are split into slices of at least this many rows (up
# to MAX_WEIGHT_GRAD_SPLITS): one 128x128 tile over 4096 rows is ~134 MFLOP, long enough to
# amortise writing its fp32 partial and the sum of the partials. Measured choices try every split
# in WEIGHT_GRAD_SPLITS that leaves a slice at least MIN_ROWS_PER_WEIGHT_GRAD_SPLIT rows: already
# at M = 1024 the paper's 84 weight tiles of 128x128 leave 48 of an H100's 132 SMs idle, and the
# grads kernel took 42 us there against ~30 us for eager's weight-gradient GEMMs.
ROWS_PER_WEIGHT_GRAD_SPLIT = 4096
MAX_WEIGHT_GRAD_SPLITS = 8
WEIGHT_GRAD_SPLITS = (1, 2, 4, 8)
MIN_ROWS_PER_WEIGHT_GRAD_SPLIT = 256


# Autotuning is keyed on M rounded up to a power of two (M_BUCKET), not on M: the last batch of an
# epoch or an evaluation batch must not trigger a fresh search.
_KEY = ["M_BUCKET", "K", "H", "N"]


@triton.jit
def _gelu(z):
    """Exact GELU, as torch's default ``F.gelu`` (not the tanh approximation). fp32 in and out."""
    return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))


@triton.jit
def _gelu_grad(z):
    """d gelu(z) / dz = Phi(z) + z phi(z), the formula of torch's gelu_backward."""
    cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
    pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
    return cdf + z * pdf


@_autotuned(_FWD_CONFIGS, _KEY + ["SAVE_Z"])
@triton.jit
def _projector_fwd_kernel(x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, y_ptr, z_ptr, M, K, H, N, M_BUCKET,
                          HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, SAVE_Z: tl.constexpr,
                          UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    dtype = x_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc_y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        acc_z = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w1t = tl.load(w1_ptr + offs_h[None, :] * K + offs_k[:, None],
                          mask=mask_h[None, :] & mask_k[:, None], other=0.0)  # W1^T tile (K, H)
            if UPCAST:
                x, w1t = x.to(tl.float32), w1t.to(tl.float32)
            acc_z = tl.dot(x, w1t, acc_z, input_precision=PRECISION)
        if HAS_B1:
            acc_z += tl.load(b1_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
        z = acc_z.to(dtype)
        if SAVE_Z:
            if pid_n == 0:  # every column block computes the same z; one writes it
                tl.store(z_ptr + offs_m[:, None] * H + offs_h[None, :], z,
                         mask=mask_m[:, None] & mask_h[None, :])
        # Padded hidden columns hold z = 0 -> gelu = 0, and their W2 rows load as 0: no effect on y.
        a = _gelu(z.to(tl.float32)).to(dtype)
        w2t = tl.load(w2_ptr + offs_n[None, :] * H + offs_h[:, None],
                      mask=mask_n[None, :] & mask_h[:, None], other=0.0)  # W2^T tile (H, N)
        if UPCAST:
            a, w2t = a.to(tl.float32), w2t.to(tl.float32)
        acc_y = tl.dot(a, w2t, acc_y, input_precision=PRECISION)
    if HAS_B2:
        acc_y += tl.load(b2_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc_y.to(dtype),
             mask=mask_m[:, None] & mask_n[None, :])


@_autotuned(_DZ_CONFIGS, _KEY)
@triton.jit
def _projector_bwd_dz_kernel(dy_ptr, w2_ptr, z_ptr, dz_ptr, M, K, H, N, M_BUCKET,
                             UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr):
    """dz = (dy W2) * gelu'(z), da rounded to the input dtype first as eager's matmul output is."""
    dtype = dy_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_m = offs_m < M
    mask_h = offs_h < H
    acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        dy = tl.load(dy_ptr + offs_m[:, None] * N + offs_n[None, :],
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        w2 = tl.load(w2_ptr + offs_n[:, None] * H + offs_h[None, :],
                     mask=mask_n[:, None] & mask_h[None, :], other=0.0)
        if UPCAST:
            dy, w2 = dy.to(tl.float32), w2.to(tl.float32)
        acc = tl.dot(dy, w2, acc, input_precision=PRECISION)
    mask = mask_m[:, None] & mask_h[None, :]
    z = tl.load(z_ptr + offs_m[:, None] * H + offs_h[None, :], mask=mask, other=0.0)
    dz = acc.to(dtype).to(tl.float32) * _gelu_grad(z.to(tl.float32))
    tl.store(dz_ptr + offs_m[:, None] * H + offs_h[None, :], dz.to(dtype), mask=mask)


@triton.jit
def _matmul_tile(a_ptr, stride_aa, stride_ar, b_ptr, stride_br, stride_bb, n_a, n_b, r_lo, r_hi,
                 tile, c_ptr, vec_ptr, GELU_A: tl.constexpr, GELU_B: tl.constexpr,
                 COL_BIAS: tl.constexpr, ROW_SUM: tl.constexpr, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                 BLOCK_R: tl.constexpr):
    """One (BLOCK_A, BLOCK_B) tile of C = A B (+ bias), C contiguous (n_a, n_b), reducing over
    rows [r_lo, r_hi) of the shared dim, in the dtype of ``c_ptr`` (fp32 for split partials).

    GELU_A / GELU_B apply gelu to A / B as they are loaded (z in memory gives a = gelu(z), rounded
    to the input dtype as eager's gelu output is, without storing a). COL_BIAS adds ``vec`` per
    output column (a forward bias); ROW_SUM writes the row sums of A to ``vec`` from the first
    column of tiles (a bias gradient).
    """
    tiles_b = tl.cdiv(n_b, BLOCK_B)
    pid_a = tile // tiles_b
    pid_b = tile % tiles_b
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_a = offs_a < n_a
    mask_b = offs_b < n_b
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_A,), dtype=tl.float32)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < r_hi
        a = tl.load(a_ptr + offs_a[:, None] * stride_aa + offs_r[None, :] * stride_ar,
                    mask=mask_a[:, None] & mask_r[None, :], other=0.0)
        b = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_b[None, :] * stride_bb,
                    mask=mask_r[:, None] & mask_b[None, :], other=0.0)
        if GELU_A:
            a = _gelu(a.to(tl.float32)).to(a_ptr.dtype.element_ty)
        if GELU_B:
            b = _gelu(b.to(tl.float32)).to(b_ptr.dtype.element_ty)
        if ROW_SUM:
            row_sum += tl.sum(a.to(tl.float32), axis=1)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if COL_BIAS:
        acc += tl.load(vec_ptr + offs_b, mask=mask_b, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + offs_a[:, None] * n_b + offs_b[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=mask_a[:, None] & mask_b[None, :])
    if ROW_SUM:
        if pid_b == 0:
            tl.store(vec_ptr + offs_a, row_sum.to(vec_ptr.dtype.element_ty), mask=mask_a)


@_autotuned(_LIN_CONFIGS, ["M_BUCKET", "N_OUT", "K_IN", "GELU_A", "HAS_BIAS"])
@triton.jit
def _linear_kernel(a_ptr, w_ptr, bias_ptr, c_ptr, M, N_OUT, K_IN, M_BUCKET,
                   GELU_A: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                   BLOCK_R: tl.constexpr):
    """C (M, N_OUT) = act(A) W^T + bias, A (M, K_IN), W (N_OUT, K_IN): one launch of the two-
    kernel forward (z = x W1^T + b1, then y = gelu(z) W2^T + b2)."""
    _matmul_tile(a_ptr, K_IN, 1, w_ptr, 1, K_IN, M, N_OUT, 0, K_IN, tl.program_id(0), c_ptr,
                 bias_ptr, GELU_A, False, HAS_BIAS, False, UPCAST, PRECISION, BLOCK_A, BLOCK_B,
                 BLOCK_R)


@_autotuned(_GRAD_CONFIGS, _KEY + ["DO_X", "DO_W1", "DO_W2", "SPLIT_R"])
@triton.jit
def _projector_bwd_grads_kernel(x_ptr, w1_ptr, dy_ptr, z_ptr, dz_ptr, dx_ptr, dw1_ptr, db1_ptr,
                                dw2_ptr, db2_ptr, M, K, H, N, M_BUCKET, SLAB, DO_X: tl.constexpr,
                                DO_W1: tl.constexpr, DO_W2: tl.constexpr, HAS_B1: tl.constexpr,
                                HAS_B2: tl.constexpr, SPLIT_R: tl.constexpr, UPCAST: tl.constexpr,
                                PRECISION: tl.constexpr, BLOCK_A: tl.constexpr,
                                BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr,
                                BLOCK_XM: tl.constexpr, BLOCK_XK: tl.constexpr,
                                BLOCK_XH: tl.constexpr):
    """Grouped launch: program ids [0, T2 * S) -> dW2 tiles, then T1 * S dW1 tiles, the rest dx.

    With SPLIT_R = S > 1 each weight tile is S programs, each reducing one slice of the M rows
    into its own fp32 slab: the gradient pointers then point into slab 0 of one (S, SLAB)
    workspace and slice s writes s * SLAB elements further on; the slabs are summed afterwards.
    Split rather than one long program per tile: at M = 16384 the paper's 84 weight tiles of
    128x128 would fill 84 of an H100's 132 SMs for the whole launch. Slabs,
    not atomics, so gradients stay deterministic.
    """
    pid = tl.program_id(0)
    tiles_w2 = 0
    if DO_W2:
        tiles_w2 = tl.cdiv(N, BLOCK_A) * tl.cdiv(H, BLOCK_B) * SPLIT_R
    tiles_w1 = 0
    if DO_W1:
        tiles_w1 = tl.cdiv(H, BLOCK_A) * tl.cdiv(K, BLOCK_B) * SPLIT_R
    chunk = tl.cdiv(tl.cdiv(M, SPLIT_R), BLOCK_R) * BLOCK_R
    if pid < tiles_w2:
        # dW2[n, h] = sum_m dy[m, n] gelu(z[m, h]);  db2[n] = sum_m dy[m, n]
        split = pid % SPLIT_R
        r_lo = tl.minimum(split * chunk, M)  # trailing slices may be empty: [M, M)
        _matmul_tile(dy_ptr, 1, N, z_ptr, H, 1, N, H, r_lo, tl.minimum(r_lo + chunk, M),
                     pid // SPLIT_R, dw2_ptr + split * SLAB, db2_ptr + split * SLAB, False, True,
                     False, HAS_B2, UPCAST, PRECISION, BLOCK_A, BLOCK_B, BLOCK_R)
    elif pid < tiles_w2 + tiles_w1:
        # dW1[h, k] = sum_m dz[m, h] x[m, k];  db1[h] = sum_m dz[m, h]
        split = (pid - tiles_w2) % SPLIT_R
        r_lo = tl.minimum(split * chunk, M)
        _matmul_tile(dz_ptr, 1, H, x_ptr, K, 1, H, K, r_lo, tl.minimum(r_lo + chunk, M),
                     (pid - tiles_w2) // SPLIT_R, dw1_ptr + split * SLAB, db1_ptr + split * SLAB,
                     False, False, False, HAS_B1, UPCAST, PRECISION, BLOCK_A, BLOCK_B, BLOCK_R)
    elif DO_X:
        # dx[m, k] = sum_h dz[m, h] W1[h, k]
        _matmul_tile(dz_ptr, H, 1, w1_ptr, K, 1, M, K, 0, H, pid - tiles_w2 - tiles_w1, dx_ptr,
                     dx_ptr, False, False, False, False, UPCAST, PRECISION, BLOCK_XM, BLOCK_XK,
                     BLOCK_XH)


def _precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's own switch (tf32 only if torch would use it); 16-bit dots are exact
    products with fp32 accumulation either way."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _check_inputs(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                  b2: torch.Tensor | None) -> None:
    """Clear errors for what the kernels cannot take (they index flat, contiguous memory)."""
    named = {"x": x, "w1": w1, "b1": b1, "w2": w2, "b2": b2}
    if x.dim() < 1 or w1.dim() != 2 or w2.dim() != 2:
        raise ValueError(f"project: expected x (..., K), w1 (H, K), w2 (N, H); got x "
                         f"{tuple(x.shape)}, w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}")
    hidden, k = w1.shape
    if x.shape[-1] != k or w2.shape[1] != hidden:
        raise ValueError(f"project: shapes do not chain: x {tuple(x.shape)}, w1 {tuple(w1.shape)}, "
                         f"w2 {tuple(w2.shape)}")
    for name, bias, size in (("b1", b1, hidden), ("b2", b2, w2.shape[0])):
        if bias is not None and tuple(bias.shape) != (size,):
            raise ValueError(f"project: {name} must have shape ({size},), got {tuple(bias.shape)}")
    for name, t in named.items():
        if t is None:
            continue
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"project: {name} is {t.dtype} on {t.device} but x is {x.dtype} on "
                             f"{x.device}; the Triton path wants one dtype and device")
        if not t.is_contiguous():
            raise ValueError(f"project: {name} is not contiguous (shape {tuple(t.shape)}, stride "
                             f"{t.stride()}); the Triton path reads flat memory: pass "
                             f"{name}.contiguous() or set BABYMERGE_KERNELS=torch")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"project: dtype {x.dtype} not supported by the Triton path "
                         f"(float32, bfloat16, float16)")
    # Offsets are 32-bit in the kernels (cheaper address arithmetic); refuse instead of wrapping.
    rows = x.numel() // k if k else 0
    if rows * max(k, hidden, w2.shape[0]) >= 2**31:
        raise ValueError(f"project: {rows} rows x {max(k, hidden, w2.shape[0])} columns exceeds "
                         "the kernels' 32-bit offsets; split the batch")


def projector_forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                      b2: torch.Tensor | None, save_z: bool, plan: str | None = None,
                      out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y (M, N) for x (M, K), and the pre-activation z (M, H) when ``save_z`` (for backward).
    ``plan`` is one of FORWARD_PLANS; None measures them on CUDA
    (:mod:`~babymerge.kernels.measured`). ``out``: a contiguous (M, N) tensor to write y into
    (returned as y)."""
    m, k = x.shape
    hidden, n = w1.shape[0], w2.shape[0]
    if plan is None:
        key = ("forward", x.device, x.dtype, _precision(x.dtype), _next_power_of_2(m), k,
               hidden, n, b1 is None, b2 is None, save_z)
        plan = choose(key, x.device, "fused" if m <= FUSED_FORWARD_MAX_ROWS else "two_gemm",
                       FORWARD_PLANS,
                       lambda p: projector_forward(x, w1, b1, w2, b2, save_z, plan=p))
    if plan not in FORWARD_PLANS:
        raise ValueError(f"projector_forward: plan {plan!r} is not one of {FORWARD_PLANS}")
    y = out if out is not None else torch.empty((m, n), device=x.device, dtype=x.dtype)
    z = torch.empty((m, hidden), device=x.device, dtype=x.dtype) if save_z else None
    if m == 0:
        return y, z

    def grid(meta):
        return _cdiv(m, meta["BLOCK_M"]), _cdiv(n, meta["BLOCK_N"])

    with on_device(x.device):
        if plan == "fused":
            # Absent biases and z get a dummy pointer; constexpr flags keep the kernel off them.
            _projector_fwd_kernel[grid](
                x, w1, b1 if b1 is not None else x, w2, b2 if b2 is not None else x, y,
                z if z is not None else y, m, k, hidden, n, _next_power_of_2(m),
                HAS_B1=b1 is not None, HAS_B2=b2 is not None, SAVE_Z=save_z, UPCAST=INTERPRET,
                PRECISION=_precision(x.dtype),
                **_fitted(BLOCK_M=(m, 64), BLOCK_N=(n, 128), BLOCK_H=(hidden, 128),
                          BLOCK_K=(k, 256)))
        else:
            pre = z if z is not None else torch.empty((m, hidden), device=x.device, dtype=x.dtype)
            _linear(x, w1, b1, pre, gelu_in=False)
            _linear(pre, w2, b2, y, gelu_in=True)
    return y, z


def _linear(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
            gelu_in: bool) -> None:
    """out = act(a) w^T + bias, act = gelu if ``gelu_in`` (one launch of the two-kernel forward)."""
    m, k = a.shape
    n = w.shape[0]

    def grid(meta):
        return (_cdiv(m, meta["BLOCK_A"]) * _cdiv(n, meta["BLOCK_B"]),)

    with on_device(a.device):
        _linear_kernel[grid](a, w, bias if bias is not None else a, out, m, n, k,
                             _next_power_of_2(m), GELU_A=gelu_in, HAS_BIAS=bias is not None,
                             UPCAST=INTERPRET, PRECISION=_precision(a.dtype),
                             **_fitted(BLOCK_A=(m, 64), BLOCK_B=(n, 128), BLOCK_R=(k, 256)))


def weight_grad_splits(m: int) -> int:
    """Slices of the weight gradients' reduction over ``m`` rows by rule (1 = no split)."""
    return max(1, min(MAX_WEIGHT_GRAD_SPLITS, m // ROWS_PER_WEIGHT_GRAD_SPLIT))


def weight_grad_split_candidates(m: int) -> tuple[int, ...]:
    """The splits a measured plan tries at ``m`` rows."""
    return tuple(s for s in WEIGHT_GRAD_SPLITS
                 if s == 1 or m // s >= MIN_ROWS_PER_WEIGHT_GRAD_SPLIT)


def projector_backward(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                       z: torch.Tensor, needs: tuple[bool, ...], has_b1: bool, has_b2: bool,
                       split: int | None = None) -> tuple[torch.Tensor | None, ...]:
    """(dx, dW1, db1, dW2, db2) for the flags in ``needs`` (autograd's needs_input_grad); None for
    the gradients not asked for. ``split``: slices of the weight gradients' reduction over M;
    None measures the candidates on CUDA (:mod:`~babymerge.kernels.measured`)."""
    need_x, need_w1, need_b1, need_w2, need_b2 = needs
    do_w1, do_w2 = need_w1 or need_b1, need_w2 or need_b2
    m, k = x.shape
    hidden, n = w1.shape[0], w2.shape[0]
    if not (do_w1 or do_w2) or m == 0:
        split = 1  # no weight gradient to reduce over M, or no rows to split
    elif split is None:
        key = ("backward", x.device, x.dtype, _precision(x.dtype), _next_power_of_2(m), k,
               hidden, n, tuple(needs), has_b1, has_b2)
        split = choose(key, x.device, weight_grad_splits(m), weight_grad_split_candidates(m),
                        lambda s: projector_backward(dy, x, w1, w2, z, needs, has_b1, has_b2, s))
    # The weight gradients' shapes in the kernel's order (dW2, db2, dW1, db1); absent ones None.
    shapes = ((n, hidden) if do_w2 else None, (n,) if do_w2 and has_b2 else None,
              (hidden, k) if do_w1 else None, (hidden,) if do_w1 and has_b1 else None)
    if split == 1:
        dw2, db2, dw1, db1 = (torch.empty(s, device=x.device, dtype=x.dtype) if s else None
                              for s in shapes)
        slab = 0
    else:
        # One fp32 workspace of `split` slabs, each holding every partial gradient: one sum and
        # one cast over all of them afterwards instead of four of each.
        sizes = [math.prod(s) for s in shapes if s]
        slab = sum(sizes)
        workspace = torch.empty((split, slab), device=x.device, dtype=torch.float32)
        parts = iter(workspace[0].split(sizes))
        dw2, db2, dw1, db1 = (next(parts) if s else None for s in shapes)
    dx = torch.empty_like(x) if need_x else None
    if m == 0:  # no rows: zero weight gradients, nothing to launch
        for g in (dw2, db2, dw1, db1):
            if g is not None:
                g.zero_()
    else:
        dz = torch.empty_like(z) if need_x or do_w1 else None

        def dz_grid(meta):
            return _cdiv(m, meta["BLOCK_M"]), _cdiv(hidden, meta["BLOCK_H"])

        def grads_grid(meta):
            tiles = _cdiv(n, meta["BLOCK_A"]) * _cdiv(hidden, meta["BLOCK_B"]) * do_w2
            tiles += _cdiv(hidden, meta["BLOCK_A"]) * _cdiv(k, meta["BLOCK_B"]) * do_w1
            tiles *= split
            tiles += _cdiv(m, meta["BLOCK_XM"]) * _cdiv(k, meta["BLOCK_XK"]) * need_x
            return (tiles,)

        def or_dummy(t):  # absent outputs get a dummy pointer the constexpr flags never touch
            return t if t is not None else dy

        with on_device(x.device):
            if dz is not None:
                _projector_bwd_dz_kernel[dz_grid](
                    dy, w2, z, dz, m, k, hidden, n, _next_power_of_2(m), UPCAST=INTERPRET,
                    PRECISION=_precision(x.dtype),
                    **_fitted(BLOCK_M=(m, 64), BLOCK_H=(hidden, 128), BLOCK_N=(n, 256)))
            _projector_bwd_grads_kernel[grads_grid](
                x, w1, dy, z, *map(or_dummy, (dz, dx, dw1, db1, dw2, db2)),
                m, k, hidden, n, _next_power_of_2(m), slab, DO_X=need_x, DO_W1=do_w1,
                DO_W2=do_w2, HAS_B1=db1 is not None, HAS_B2=db2 is not None, SPLIT_R=split,
                UPCAST=INTERPRET, PRECISION=_precision(x.dtype),
                **_fitted(BLOCK_A=(max(n, hidden), 128), BLOCK_B=(max(hidden, k), 256),
                          BLOCK_R=(-(-m // split), 64), BLOCK_XM=(m, 64), BLOCK_XK=(k, 256),
                          BLOCK_XH=(hidden, 128)))
    if split > 1:  # the slabs summed in a fixed order: deterministic
        parts = iter(workspace.sum(0).to(x.dtype).split(sizes))
        dw2, db2, dw1, db1 = (next(parts).view(s) if s else None for s in shapes)
    return (dx, dw1 if need_w1 else None, db1 if need_b1 else None, dw2 if need_w2 else None,
            db2 if need_b2 else None)


class FusedProjectorFunction(torch.autograd.Function):
    """Autograd wrapper: forward saves (x, W1, W2, z); backward runs the two gradient kernels."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        x2 = x.reshape(-1, x.shape[-1])
        save = any(ctx.needs_input_grad)
        # The output is allocated in its final shape and the kernel writes a 2-D view of it: an
        # output that is itself a view (y.reshape(...)) makes autograd refuse any in-place op on
        # it (y.mul_, relu_, +=), which the module this replaces allows.
        y = torch.empty((*x.shape[:-1], w2.shape[0]), device=x.device, dtype=x.dtype)
        _, z = projector_forward(x2, w1, b1, w2, b2, save_z=save, out=y.view(-1, w2.shape[0]))
        if save:
            ctx.save_for_backward(x2, w1, w2, z)
            ctx.x_shape = x.shape
            ctx.has_biases = (b1 is not None, b2 is not None)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        # once_differentiable: the kernels' gradients carry no graph, so with create_graph=True
        # (a gradient penalty) second derivatives would silently be zero; it makes that an error.
        x2, w1, w2, z = ctx.saved_tensors
        # Incoming gradients may be expanded or strided views; the kernels read flat memory.
        dy2 = dy.reshape(-1, w2.shape[0]).contiguous()
        dx, dw1, db1, dw2, db2 = projector_backward(dy2, x2, w1, w2, z, ctx.needs_input_grad,
                                                    *ctx.has_biases)
        return (dx.reshape(ctx.x_shape) if dx is not None else None), dw1, db1, dw2, db2


def project_triton(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                   b2: torch.Tensor | None) -> torch.Tensor:
    """The fused projector on Triton, differentiable. Under autocast the inputs are cast to the
    autocast dtype first, as autocast does for ``F.linear`` (the casts stay on the autograd tape,
    so fp32 master weights still receive their gradients)."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w1, w2 = x.to(dtype), w1.to(dtype), w2.to(dtype)
        b1 = b1.to(dtype) if b1 is not None else None
        b2 = b2.to(dtype) if b2 is not None else None
    _check_inputs(x, w1, b1, w2, b2)
    params = (x, w1, b1, w2, b2)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params):
        return FusedProjectorFunction.apply(*params)
    # Inference (evaluation, merge sweeps): no autograd node, no saved pre-activation.
    y, _ = projector_forward(x.reshape(-1, x.shape[-1]), w1, b1, w2, b2, save_z=False)
    return y.reshape(*x.shape[:-1], w2.shape[0])


if INTERPRET:
    # Dynamo cannot trace the interpreter: it inlines the interpreter's numpy emulation of the
    # kernels and fails on fake tensors (KeyError(torch.uint64), Triton 3.9 / torch 2.13). Under
    # torch.compile the kernel call is a graph break instead, run eagerly between the compiled
    # graphs (autograd included). On CUDA Dynamo takes compiled @triton.jit kernels as
    # user-defined Triton kernels; that path is left as it was (untested here: no GPU).
    project_triton = torch.compiler.disable(
        project_triton, reason="babymerge/kernels/projector.py: the Triton interpreter "
        "(TRITON_INTERPRET=1) cannot be traced; set BABYMERGE_KERNELS=torch to compile the torch "
        "reference")
