"""babymerge's Triton kernels, each beside its PyTorch reference.

Not the Hugging Face ``kernels`` hub package: this distribution is ``babymerge`` and has no
``kernels`` dist metadata, so ``transformers.utils.is_kernels_available()`` stays False
(tests/test_kernels_package.py checks it).

Public dispatch points (CUDA tensors -> Triton, anything else -> torch; ``BABYMERGE_KERNELS=
torch|triton|auto`` forces a path):
- :func:`project` — the VLM's projector ``W2 gelu(W1 x + b1) + b2``;
- :func:`interpolate_` — ``dst = alpha * a + (1 - alpha) * b`` over lists of tensors, in place.
"""

from kernels.dispatch import interpolate_, project

__all__ = ["project", "interpolate_"]
