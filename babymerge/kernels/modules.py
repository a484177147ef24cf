"""Module wrappers over the dispatch points (the Liger shape: kernel, autograd.Function, module)."""

from __future__ import annotations

import torch
from torch import nn

from babymerge.kernels.dispatch import project


class FusedProjector(nn.Module):
    """Drop-in for transformers' ``LlavaMultiModalProjector`` with ``projector_hidden_act="gelu"``:
    the same parameter names and shapes (``linear_1``, ``linear_2``), so checkpoints load either
    way; forward runs :func:`babymerge.kernels.project` (the fused Triton kernel on CUDA)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.linear_2 = nn.Linear(hidden_features, out_features or hidden_features, bias=bias)

    @classmethod
    def from_llava_config(cls, config) -> "FusedProjector":
        """Sized as ``LlavaMultiModalProjector(config)`` (one vision feature layer)."""
        if not isinstance(config.vision_feature_layer, int):
            raise ValueError("FusedProjector takes one vision feature layer; config has "
                             f"{config.vision_feature_layer}")
        if config.projector_hidden_act != "gelu":
            raise ValueError(f"FusedProjector implements gelu; config has "
                             f"{config.projector_hidden_act!r}")
        hidden = config.text_config.hidden_size
        return cls(config.vision_config.hidden_size, hidden, hidden,
                   bias=config.multimodal_projector_bias)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return project(image_features, self.linear_1.weight, self.linear_1.bias,
                       self.linear_2.weight, self.linear_2.bias)
