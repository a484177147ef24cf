"""The processor of a babymerge submission folder (``babymerge export --submission``): written into
the folder beside ``processor_config.json``, whose ``auto_map`` makes

    AutoProcessor.from_pretrained(folder, trust_remote_code=True)

return it with no babymerge installed, on transformers 4.51 (the BabyLM pipeline's pin) and 5.x.
It imports only transformers.

``processor(text=..., images=..., return_offsets_mapping=True)`` gives what the pipeline's
multimodal path reads: ``input_ids`` and ``attention_mask`` from the folder's tokenizer (which
starts every text with ``[BOS, <image>]``, the training layout), ``offset_mapping``, and, when
images are given, ``pixel_values`` from the folder's DINOv2 image processor (resize, centre crop,
normalise), which the model pools into its one image token.
"""

from __future__ import annotations

from transformers import AutoImageProcessor, AutoTokenizer, BatchEncoding


class BabyLlavaProcessor:
    """Tokenizer plus image processor, called like a transformers processor."""

    def __init__(self, image_processor, tokenizer):
        self.image_processor = image_processor
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, folder, **kwargs):
        # the folder's config.json has an auto_map (the model's remote code): without the flag the
        # Auto classes that read it stop to ask whether to run it
        shared = {"trust_remote_code": True,
                  **{k: kwargs[k] for k in ("revision", "cache_dir") if k in kwargs}}
        tokenizer_kwargs = {k: kwargs[k] for k in ("padding_side",) if k in kwargs}
        return cls(AutoImageProcessor.from_pretrained(folder, **shared),
                   AutoTokenizer.from_pretrained(folder, **shared, **tokenizer_kwargs))

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoProcessor"):
        """AutoProcessor calls this on remote-code processors; nothing to register here."""

    def __call__(self, text=None, images=None, return_tensors=None, **kwargs) -> BatchEncoding:
        if text is None and images is None:
            raise ValueError("give text, images or both")
        encoding = (self.tokenizer(text, return_tensors=return_tensors, **kwargs)
                    if text is not None else BatchEncoding({}))
        if images is not None:
            # tensors whatever return_tensors says: the pipeline wraps them in torch.FloatTensor
            encoding["pixel_values"] = self.image_processor(
                images, return_tensors="pt")["pixel_values"]
        return encoding

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)
