"""What every benchmark in ``scripts/`` records beside its timings: the device, the library
versions, and the hardware's peak FLOP/s (one table, so every script computes % of peak alike)."""

from __future__ import annotations

import platform
import sys
import time

import torch

# Dense (no sparsity) tensor-core peaks in FLOP/s from the vendors' datasheets, matched as a
# substring of torch.cuda.get_device_name, longest first: "A100" before "A10", "H100 PCIe" before
# "H100" (an H100 SXM reports itself as "NVIDIA H100 80GB HBM3").
_T = 1e12
PEAK_FLOPS: dict[str, dict[torch.dtype, float]] = {
    "H100 PCIe": {torch.bfloat16: 756 * _T, torch.float16: 756 * _T, torch.float32: 51 * _T},
    "H100 NVL": {torch.bfloat16: 835 * _T, torch.float16: 835 * _T, torch.float32: 60 * _T},
    "H100": {torch.bfloat16: 989 * _T, torch.float16: 989 * _T, torch.float32: 67 * _T},
    "H200": {torch.bfloat16: 989 * _T, torch.float16: 989 * _T, torch.float32: 67 * _T},
    "A100": {torch.bfloat16: 312 * _T, torch.float16: 312 * _T, torch.float32: 19.5 * _T},
    "L40S": {torch.bfloat16: 362 * _T, torch.float16: 362 * _T, torch.float32: 91.6 * _T},
    # without its own row "NVIDIA L40" matched "L4" and took the L4's third of its peak
    "L40": {torch.bfloat16: 181 * _T, torch.float16: 181 * _T, torch.float32: 90.5 * _T},
    "A10": {torch.bfloat16: 125 * _T, torch.float16: 125 * _T, torch.float32: 31.2 * _T},
    "L4": {torch.bfloat16: 121 * _T, torch.float16: 121 * _T, torch.float32: 30.3 * _T},
}


# Memory bandwidth in bytes/s from the same datasheets, for bandwidth-bound work (the merge's
# interpolation), matched the same way. The A100's depends on its memory: 40GB parts are "A100".
PEAK_BANDWIDTH: dict[str, float] = {
    "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H100": 3.35e12, "H200": 4.8e12,
    "A100-SXM4-80GB": 2.039e12, "A100 80GB PCIe": 1.935e12, "A100": 1.555e12,
    "L40S": 0.864e12, "L40": 0.864e12, "A10": 0.6e12, "L4": 0.3e12,
}


def _match(name: str, table: dict):
    for key in sorted(table, key=len, reverse=True):
        if key in name:
            return table[key]
    return None


def peak_bandwidth(device: torch.device) -> float | None:
    """The device's memory bandwidth in bytes/s; None on a CPU or an unknown GPU."""
    return _match(device_name(device), PEAK_BANDWIDTH) if device.type == "cuda" else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or device.type


def peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """The device's dense peak FLOP/s for ``dtype``; None on a CPU or an unknown GPU."""
    return peak_flops_of(device_name(device), dtype) if device.type == "cuda" else None


def peak_flops_of(name: str, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Peak FLOP/s of the GPU called ``name`` (as CUDA reports it); None if not in the table."""
    peaks = _match(name, PEAK_FLOPS)
    return peaks.get(dtype) if peaks else None


def environment(device: torch.device) -> dict:
    """Device and versions, flat, for the top level of a benchmark's JSON object."""
    import transformers

    from babymerge import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": str(device), "device_name": device_name(device),
            "threads": torch.get_num_threads(), "babymerge": __version__,
            "python": sys.version.split()[0], "torch": torch.__version__,
            "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "triton": triton_version}


def train_flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token of a BabyLLaVA ``model`` at ``seq_len``, nanoGPT's estimate:
    ``6N`` for the N non-embedding parameters plus ``12·L·H·Q·T`` for attention (L layers, H heads
    of size Q, T tokens)."""
    text = model.config.text_config
    n = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    head_dim = text.hidden_size // text.num_attention_heads
    return 6 * n + 12 * text.num_hidden_layers * text.num_attention_heads * head_dim * seq_len


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a host clock times it (nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def encoder_images_per_s(encoder, device: torch.device, batch_size: int, repeats: int,
                         warmups: int = 2) -> float:
    """Images/s of the encoder alone (normalise, blocks, pool) on a uint8 batch already on the
    device, in extract-features' precision (bf16 on CUDA, fp32 elsewhere): the ceiling of the
    whole extraction pipeline on this device."""
    from babymerge.features import load_encoder

    model = load_encoder(encoder, device,
                         torch.bfloat16 if device.type == "cuda" else torch.float32)
    size = model.image_size
    pixels = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, device=device)
    for _ in range(warmups):  # kernel selection and allocator warm-up
        model.encode_pixels(pixels)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        model.encode_pixels(pixels)
    synchronize(device)
    return batch_size * repeats / (time.perf_counter() - start)
