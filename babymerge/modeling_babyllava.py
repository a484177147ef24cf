"""BabyLLaVA for plain transformers: written into every babymerge checkpoint folder, beside an
``auto_map`` in its config.json, so that

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

loads the checkpoint with no babymerge installed (the BabyLM evaluation pipeline loads models this
way). It imports only torch and transformers, and runs on transformers 4.51 (the pipeline's pin)
and 5.x.

The computation is babymerge's (``babymerge.model``): ONE image token whose input embedding is
``projector(feature)``, the feature being the image's pooled encoder feature (``pixel_values`` of
shape (batch, feature_dim)), standardised first when the model was trained with
``feature_norm="standardize"``; text-only input carries the black image's feature (the folder's
``black_feature.safetensors``).

A submission folder (``babymerge export --submission``, ``config.vision_tower = True``) also holds
the DINOv2 encoder and the black feature as weights: ``pixel_values`` may then be images
(batch, 3, H, W) from the folder's processor, pooled as stage 1 pools them (``hidden_states[-2]``,
CLS and register tokens dropped, mean over patches), and input without ``pixel_values`` gets the
black feature in its image slot. Module and parameter names are those of the checkpoint. It is a
second implementation on purpose: babymerge's own classes build on transformers' Llava classes of
the installed 5.x release and on babymerge's Triton projector; this one must stand alone on either
major version of transformers, so it is written out on Llama's decoder and plain PyTorch layers
(tests check that both give the same logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (AutoConfig, AutoModel, Dinov2Config, GenerationMixin, LlamaConfig,
                          LlamaModel, PretrainedConfig, PreTrainedModel)
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

IGNORE_INDEX = -100  # label of positions without a loss, as in transformers


def _sub_config(value, config_class, **defaults):
    """A sub-config from what config.json holds (a dict) or a config object; a dict naming another
    model type (dinov2_with_registers) gets that type's config class."""
    if value is None:
        return config_class(**defaults)
    if isinstance(value, dict):
        fields = {k: v for k, v in value.items() if k != "model_type"}
        model_type = value.get("model_type", config_class.model_type)
        if model_type != config_class.model_type:
            return AutoConfig.for_model(model_type, **{**defaults, **fields})
        return config_class(**{**defaults, **fields})
    return value


class BabyLlavaConfig(PretrainedConfig):
    """The decoder's Llama config (``text_config``), the encoder whose pooled feature the
    projector reads (``vision_config``; only its ``hidden_size`` is used: no vision weights live in
    the checkpoint), and the image path's settings."""

    model_type = "babyllava"
    attribute_map = {"image_token_id": "image_token_index"}
    sub_configs = {"text_config": LlamaConfig, "vision_config": Dinov2Config}

    def __init__(self, text_config=None, vision_config=None, image_token_index: int = 32000,
                 projector_hidden_act: str = "gelu", multimodal_projector_bias: bool = True,
                 feature_norm: str = "none", encoder: str = "facebook/dinov2-large",
                 pooling: str = "mean_patch", image_seq_length: int = 1,
                 vision_tower: bool = False, vision_feature_layer: int = -2, **kwargs):
        self.text_config = _sub_config(text_config, LlamaConfig)
        self.vision_config = _sub_config(vision_config, Dinov2Config, hidden_size=1024)
        self.image_token_index = image_token_index
        self.projector_hidden_act = projector_hidden_act
        self.multimodal_projector_bias = multimodal_projector_bias
        self.feature_norm = feature_norm
        self.encoder = encoder
        self.pooling = pooling
        self.image_seq_length = image_seq_length
        self.vision_tower = vision_tower
        self.vision_feature_layer = vision_feature_layer
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


class BabyLlavaProjector(nn.Module):
    """Linear(feature_dim, hidden) - activation - Linear(hidden, hidden), LLaVA 1.5's projector."""

    def __init__(self, config: BabyLlavaConfig):
        super().__init__()
        hidden, bias = config.text_config.hidden_size, config.multimodal_projector_bias
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, hidden, bias=bias)
        if config.projector_hidden_act != "gelu":
            raise ValueError(f"projector_hidden_act {config.projector_hidden_act!r}: this file "
                             "implements babymerge's 'gelu' (exact, erf) projector only")
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden, hidden, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class BabyLlavaPreTrainedModel(PreTrainedModel):
    config_class = BabyLlavaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn_2 = True
    _supports_flash_attn = True

    def _init_weights(self, module):
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)


class BabyLlavaModel(BabyLlavaPreTrainedModel):
    """Decoder (``language_model``) and projector; ``pixel_values`` are pooled features."""

    def __init__(self, config: BabyLlavaConfig):
        super().__init__(config)
        self.multi_modal_projector = BabyLlavaProjector(config)
        self.language_model = LlamaModel(config.text_config)
        if config.feature_norm == "standardize":
            dim = config.vision_config.hidden_size
            self.feature_mean = nn.Parameter(torch.zeros(dim), requires_grad=False)
            self.feature_std = nn.Parameter(torch.ones(dim), requires_grad=False)
        elif config.feature_norm != "none":
            raise ValueError(f"feature_norm {config.feature_norm!r}: expected none or standardize")
        if config.vision_tower:
            self.vision_tower = AutoModel.from_config(config.vision_config)
            dim = config.vision_config.hidden_size
            self.black_feature = nn.Parameter(torch.zeros(dim), requires_grad=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        """(batch, feature_dim) float32: the encoder's hidden_states[vision_feature_layer], CLS
        and register tokens dropped, mean over patch tokens."""
        hidden = self.vision_tower(pixel_values=images, output_hidden_states=True).hidden_states
        prefix = 1 + int(getattr(self.config.vision_config, "num_register_tokens", 0) or 0)
        return hidden[self.config.vision_feature_layer][:, prefix:].float().mean(dim=1)

    def image_embeddings(self, features: torch.Tensor) -> torch.Tensor:
        """(batch, hidden): what the image token's embedding becomes for each pooled feature (or
        image, in a folder with the encoder)."""
        if features.dim() == 4 and self.config.vision_tower:
            features = self.pooled_features(features)
        if features.dim() != 2:
            raise ValueError("BabyLLaVA takes pooled image features of shape (batch, feature_dim)"
                             f"; got {tuple(features.shape)}")
        if self.config.feature_norm == "standardize":
            # in float32, as trained: the features share a large offset that bf16 would blur
            features = (features.float() - self.feature_mean) / self.feature_std
        weight = self.multi_modal_projector.linear_1.weight
        return self.multi_modal_projector(features.to(weight.dtype))

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None,
                inputs_embeds=None, **kwargs) -> BaseModelOutputWithPast:
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is None and input_ids is not None and self.config.vision_tower:
            # text-only input (the pipeline's text tasks): the black image, as in training
            rows = int((input_ids == self.config.image_token_index).sum())
            pixel_values = self.black_feature.expand(rows, -1)
        if pixel_values is not None and input_ids is not None:
            slots = input_ids == self.config.image_token_index
            # generation's later steps see only new tokens (4.x passes pixel_values every step)
            if slots.any():
                if int(slots.sum()) != pixel_values.shape[0]:
                    raise ValueError(f"{int(slots.sum())} image tokens but "
                                     f"{pixel_values.shape[0]} image features")
                image = self.image_embeddings(pixel_values).to(inputs_embeds.dtype)
                inputs_embeds = inputs_embeds.masked_scatter(
                    slots.unsqueeze(-1).expand_as(inputs_embeds), image)
        return self.language_model(attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                   **kwargs)


class BabyLlavaForConditionalGeneration(BabyLlavaPreTrainedModel, GenerationMixin):
    """:class:`BabyLlavaModel` plus the LM head (its own matrix, not tied to the embeddings)."""

    def __init__(self, config: BabyLlavaConfig):
        super().__init__(config)
        self.model = BabyLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size,
                                 bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None,
                inputs_embeds=None, labels=None, logits_to_keep: int = 0,
                **kwargs) -> CausalLMOutputWithPast:
        kwargs.pop("return_dict", None)
        out = self.model(input_ids=input_ids, pixel_values=pixel_values,
                         attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            # next-token loss over labelled positions, in float32 (transformers' ForCausalLMLoss)
            shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].to(logits.device)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                   shifted.reshape(-1), ignore_index=IGNORE_INDEX)
        # the cache field is named as the installed transformers names it
        rest = {k: v for k, v in out.items() if k != "last_hidden_state"}
        return CausalLMOutputWithPast(loss=loss, logits=logits, **rest)

