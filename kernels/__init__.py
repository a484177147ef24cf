"""babymerge's Triton kernels, each beside its PyTorch reference.

Not the Hugging Face ``kernels`` hub package: this distribution is ``babymerge`` and has no
``kernels`` dist metadata, so ``transformers.utils.is_kernels_available()`` stays False
(tests/test_kernels_package.py checks it).

Public dispatch points (CUDA tensors -> Triton, anything else -> torch; ``BABYMERGE_KERNELS=
torch|triton|auto`` forces a path):
- :func:`project` — the VLM's projector ``W2 gelu(W1 x + b1) + b2`` (differentiable);
  :class:`FusedProjector` is the module form, a drop-in for ``LlavaMultiModalProjector``;
- :func:`interpolate_` — ``dst = alpha * a + (1 - alpha) * b`` over lists of tensors, in place;
  :func:`interpolate` its out-of-place form.

Layout: ``projector.py`` / ``projector_reference.py`` and ``interpolation.py`` /
``interpolation_reference.py`` (Triton kernel + autograd wrapper / torch reference),
``dispatch.py``; ``gpu_compile.py`` builds every kernel for a GPU target without a GPU.

On a GPU: ``TRITON_INTERPRET=0 pytest -m gpu tests/test_kernels_*.py`` and
``python scripts/bench_kernels.py``.
"""

from kernels.dispatch import interpolate, interpolate_, project
from kernels.modules import FusedProjector

__all__ = ["project", "interpolate_", "interpolate", "FusedProjector"]
