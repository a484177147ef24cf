"""A saved VLM run on raw images: the checkpoint plus the image encoder its features came from.

Above the stages it joins (model, stage 1's encoder, the evaluation scorer, the tokenizer), so that
:mod:`babymerge.model` stays the bottom of stages 2 and 3.
"""

from __future__ import annotations

from pathlib import Path

import torch

from babymerge.evaluate import pack_task, score_candidates
from babymerge.tasks import TaskSpec
from babymerge.features import EncoderError, load_encoder
from babymerge.model import BabyLlavaForConditionalGeneration, image_prefix_ids, load_model
from babymerge.tokenizer import load_tokenizer


class ImageTextModel:
    """A saved BabyLLaVA with its image encoder: it answers for raw images, not cached features.

    The encoder pools exactly as stage 1 does (:meth:`babymerge.features.ImageEncoder.encode`)
    and texts are scored by the evaluation scorer, so a score from pixels equals the score
    ``babymerge eval`` gives with the image's row of a feature file (up to that file's storage
    precision). Build it with :func:`load_vlm_with_encoder`.
    """

    def __init__(self, model: BabyLlavaForConditionalGeneration, tokenizer, encoder):
        want = model.config.vision_config.hidden_size
        if encoder.dim != want:
            raise EncoderError(f"encoder {encoder.name} gives {encoder.dim}-d features but the "
                               f"model takes {want}-d ones (trained on features of "
                               f"{model.config.encoder}); pass the encoder it was trained with")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.prefix = image_prefix_ids(tokenizer)

    def features(self, images: list) -> torch.Tensor:
        """Pooled features (N, D) float32 of PIL images, as ``extract-features`` stores them."""
        return self.encoder.encode(images)

    def score(self, image, texts: list[str], batch_size: int = 64) -> list[float]:
        """Sum of the log-probabilities of each text's tokens after ``[BOS, <image>]``."""
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
        limit = self.model.config.text_config.max_position_embeddings
        for text, t in zip(texts, ids, strict=True):
            if not t or len(self.prefix) + len(t) > limit:
                raise ValueError(f"text {text!r}: {len(t)} tokens; need 1 to "
                                 f"{limit - len(self.prefix)} (the model's positions)")
        task = pack_task(TaskSpec("image", "winoground", Path()), self.prefix, [ids],
                         [[0] * len(ids)], ["image"], [0], self.features([image]))
        return score_candidates(self.model, task, batch_size, progress=False).tolist()

    @torch.no_grad()
    def generate(self, image, prompt: str = "", max_new_tokens: int = 20) -> str:
        """Greedy continuation of ``[BOS, <image>] + prompt`` for ``image``, decoded."""
        device = next(self.model.parameters()).device
        # "<image>" typed in a prompt stays text: the model takes exactly one image token.
        body = self.tokenizer(prompt, add_special_tokens=False,
                              split_special_tokens=True)["input_ids"] if prompt else []
        ids = torch.tensor([self.prefix + body], device=device)
        feats = self.features([image]).to(device)  # float32: the model casts (as in scoring)
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  pixel_values=feats, max_new_tokens=max_new_tokens,
                                  do_sample=False)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def load_vlm_with_encoder(model_dir: str | Path, encoder: str | Path | None = None,
                          device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32) -> ImageTextModel:
    """A checkpoint directory (model + its tokenizer) and the image encoder its features came
    from: ``encoder`` (hub id or folder) defaults to the checkpoint config's ``encoder``, which is
    a hub id, or only the name of a local folder (:func:`babymerge.model.encoder_name`)."""
    model = load_model(model_dir, device, dtype)
    if encoder is not None:
        return ImageTextModel(model, load_tokenizer(model_dir), load_encoder(encoder, device))
    # the config names the encoder portably (a hub id, or a local folder's name only)
    name = model.config.encoder
    try:
        loaded = load_encoder(name, device)
    except EncoderError as e:
        raise EncoderError(f"{model_dir} was trained on features of encoder {name!r}, which does "
                           f"not load here ({e}); pass its folder: encoder=PATH") from e
    return ImageTextModel(model, load_tokenizer(model_dir), loaded)
