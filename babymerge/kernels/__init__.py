"""babymerge's Triton kernels, each beside its PyTorch reference.

Imported as ``babymerge.kernels`` only: ``kernels`` at the top level is Hugging Face's
hub-kernels package, which transformers >= 5.25 requires and imports (tests/test_packaging.py
checks that the two never meet).

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

from babymerge.kernels.dispatch import interpolate, interpolate_, project
from babymerge.kernels.modules import FusedProjector

__all__ = ["project", "interpolate_", "interpolate", "FusedProjector"]
