"""PyTorch reference for the fused projector (babymerge/kernels/projector.py): the CPU path and
the oracle the Triton kernels are tested against. Same maths as transformers'
``LlavaMultiModalProjector`` with ``projector_hidden_act="gelu"`` (exact erf GELU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def project_reference(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                      b2: torch.Tensor | None) -> torch.Tensor:
    """``W2 gelu(W1 x + b1) + b2`` over the last dim of ``x``; differentiable through autograd."""
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
