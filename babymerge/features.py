"""Stage 1, ``babymerge extract-features``: one pooled DINOv2 feature per image, into HDF5.

Feature = ``hidden_states[-2]`` of the encoder (the second-to-last block's output, before the final
LayerNorm), CLS and register tokens dropped, mean over patch tokens: the paper's model code. Only
the blocks up to that layer are run.

Crash safety: an HDF5 file being written is not safe against SIGKILL (its metadata cache reaches
the disk in no particular order). So progress goes into small part files under ``OUT.partial/``,
each written to a temporary name and renamed into place, i.e. every part on disk is whole. A re-run
skips the ids found in OUT and in the parts (but tries again those whose bytes could not be read);
a clean finish merges them into OUT (again via a temporary name) with ``complete`` set, then
removes the parts. Until then OUT is a stub with the attributes, ``/black`` and
``complete = False``, so a reader gets a clear "did not finish".
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from babymerge import __version__
from babymerge.distributed import resolve_device
from babymerge.config import InputError, arg, config_to_dict, exclusive, opt, plain_modes
from babymerge.featurefile import (BLACK, FAILED, FEATURES, IDS, LAYER, POOLING, STR_DTYPE,
                                   FeatureFileError, decode_strings, reading)
from babymerge.images import (DEFAULT_MAX_PIXELS, UNREADABLE, GpuJpegDecoder, ImageDataset,
                              Preprocess, SourceError, collate, gpu_jpeg_decoder_available,
                              list_images,
                              tar_shards, to_rgb, upright)

DEFAULT_ENCODER = "facebook/dinov2-large"
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}
DECODERS = ("auto", "gpu", "workers")
# --decode auto sends JPEGs to nvJPEG only when this rank has fewer decode workers than this. On an
# H100 with 15 workers (DINOv2-large, 640x480 JPEGs, 2026-11-27) worker decoding ran at 1992 img/s
# steady, 98% of the encoder-only ceiling (2033 img/s), and nvJPEG at 1763 img/s: decoding on the
# GPU takes time from the encoder, the bottleneck. One worker preprocesses ~360 img/s, so about
# 6 keep that encoder fed; with fewer, the GPU's spare decode capacity is the better use.
GPU_DECODE_BELOW_WORKERS = 8
BLACK_SIZE = (640, 420)  # (width, height) of the black image whose feature text-only inputs carry
# Attributes that make two feature files comparable; appending or joining requires them equal.
IDENTITY = ("encoder", "layer", "pooling", "image_size", "dtype")
# /black of the same encoder recomputed on another device or precision differs by ~1e-2 relative;
# a different checkpoint behind the same name differs by O(1).
BLACK_RTOL = 0.05
MAX_LISTED_SHARDS = 2000  # ~30 KB of names in the config attribute; more: count, first, last
_READ_BLOCK = 65536  # rows per read when merging files: 128 MB at D=1024 in float16


@dataclass
class ExtractConfig:
    """``babymerge extract-features SOURCE --out FILE.h5``."""

    source: str = arg(help="images: a folder (recursive), a .jsonl (image_id + path), a .tsv "
                           "(id<TAB>path), web-dataset .tar shard(s) (file, glob, {000..009}), "
                           "or a datasets save_to_disk folder")
    out: Path = opt(Path("cache/features.h5"), "feature file to write (or complete, or extend)")
    encoder: str = opt(DEFAULT_ENCODER, "hub id or local directory of a DINOv2 model")
    batch_size: int = opt(128, "images per forward pass")
    device: str = opt("auto", "auto = cuda if available (cuda:LOCAL_RANK under torchrun)",
                      choices=("auto", "cpu", "cuda"))
    dtype: str = opt("float16", "storage dtype of /features", choices=tuple(STORAGE_DTYPES))
    precision: str = opt("auto", "compute precision; auto = bfloat16 autocast on CUDA, float32 "
                         "on CPU", choices=("auto", *PRECISIONS))
    num_workers: int = opt(-1, "decoding processes; -1 = one per CPU core (per local rank) "
                           "minus the main process")
    image_root: Path | None = opt(None, "folder that relative paths in a .jsonl/.tsv are under "
                                  "(default: the list's folder)")
    id_column: str = opt("image_id", "id key of a .jsonl or datasets SOURCE, or a template "
                         "filled from its fields: '{dataset_id}_{image_id}' keeps two data sets' "
                         "ids apart; {row} is a datasets SOURCE's row ('vqav2_{row}': the BabyLM "
                         "pipeline's VQA idx_in_hf_dataset; 'ex_{row}_img_0' with --path-column "
                         "image_0: its Winoground image_idx and image_key)")
    path_column: str = opt("path", "image path key of a .jsonl SOURCE, or a template filled from "
                           "each line such as '{dataset_id}/{image_id}.jpg'; image column of a "
                           "datasets SOURCE (default: its only Image column)")
    shard: str | None = opt(None, "i/n: encode only slice i of n, into OUT with .shard-0000i-of-"
                            "0000n before its suffix (features.shard-00000-of-00002.h5) "
                            "(torchrun's RANK/WORLD_SIZE do the same)")
    max_pixels: int = opt(DEFAULT_MAX_PIXELS, "larger images are recorded as failed "
                          "(decompression-bomb guard; PIL itself refuses > 2x its default)")
    jpeg_draft: bool = opt(False, "opt-in speed-up that changes the features: the JPEG decoder "
                           "downscales by 2/4/8 towards the resize target (1280x960 photos "
                           "preprocess 1.7x faster), which moved features by 1.0-1.6% of their "
                           "largest magnitude on 520-1024 px JPEGs (up to 9.5% on others), "
                           "against 0.03% for exact decoding (random DINOv2-architecture "
                           "encoder, 2026-12). On a GPU the encoder, not decoding, is the "
                           "bottleneck")
    decode: str = opt("auto", "where ordinary JPEGs are decoded: on the GPU with nvJPEG "
                      "(torchvision), or in the DataLoader workers with PIL; auto = gpu when "
                      "extracting on CUDA with torchvision installed and fewer than "
                      f"{GPU_DECODE_BELOW_WORKERS} decode workers, else workers; gpu decodes "
                      "at full resolution, so --jpeg-draft does not apply",
                      choices=DECODERS)
    flush_every: int = opt(8192, "images per crash-safe part file (rounded up to whole batches)")
    retry_failed: bool = opt(False, "try again the images recorded in /failed as bad images "
                             "(those that could not be read at all are always tried again)")
    progress: bool = opt(True, "show the progress bar")

    def __post_init__(self) -> None:
        for name in ("batch_size", "flush_every", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got "
                                 f"{getattr(self, name)}")
        if self.num_workers < -1:
            raise ValueError(f"--num-workers must be >= -1, got {self.num_workers}")
        for name, allowed in (("device", ("auto", "cpu", "cuda")), ("dtype", STORAGE_DTYPES),
                              ("precision", ("auto", *PRECISIONS)), ("decode", DECODERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {', '.join(allowed)}, got "
                                 f"{getattr(self, name)!r}")
        if self.shard is not None:
            parse_shard(self.shard)


@dataclass
class JoinConfig:
    """``babymerge join-features SHARDS... --out FILE.h5``."""

    shards: list[Path] = arg(help="feature files written by extract-features (e.g. one per rank)")
    out: Path = opt(Path("cache/features.h5"), "joined feature file")
    virtual: bool = opt(False, "make /features an HDF5 virtual dataset pointing into the shards "
                        "(no copy; the shards must stay beside it)")

    def __post_init__(self) -> None:
        if not self.shards:
            raise ValueError("join-features needs at least one shard")


# ---------------------------------------------------------------------------------------------
# The encoder


class EncoderError(InputError):
    """An encoder that cannot be loaded or is not a DINOv2-family model."""


def pool_patch_tokens(hidden: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Mean over patch tokens in float32; the first ``num_prefix_tokens`` (CLS, registers) are
    dropped."""
    return hidden[:, num_prefix_tokens:].float().mean(dim=1)


class ImageEncoder:
    """A DINOv2 model cut after the pooled layer, with its processor's preprocessing.

    ``preprocess`` (picklable) turns bytes into uint8 crops in DataLoader workers;
    :meth:`encode_pixels` normalises on the device and pools. :meth:`encode` does both for PIL
    images: the same path as extraction.
    """

    def __init__(self, model: torch.nn.Module, preprocess: Preprocess, mean: list[float],
                 std: list[float], rescale: float, name: str, device: torch.device,
                 dtype: torch.dtype):
        blocks = model.encoder.layer
        keep = len(blocks) + 1 + LAYER if LAYER < 0 else LAYER  # hidden_states[0] = embeddings
        # The later blocks never run: free them (dinov2-large: 1 of 24 blocks).
        model.encoder.layer = blocks[:keep]
        self.model = model.eval().to(device)
        self.preprocess = preprocess
        self.name = name
        self.device = device
        self.dtype = dtype
        self.dim = int(model.config.hidden_size)
        self.num_prefix_tokens = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
        self.image_size = preprocess.crop_height
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.rescale = rescale

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 crops (B, 3, H, W) -> the model's float32 input on the device: rescale, then
        normalise, in the processor's order."""
        x = pixels.to(self.device, non_blocking=True).float()
        return (x * self.rescale - self.mean) / self.std

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, D) float32, on the device, of uint8 crops (B, 3, H, W)."""
        x = self.normalize(pixels)
        with torch.autocast(self.device.type, dtype=self.dtype,
                            enabled=self.dtype != torch.float32):
            hidden = self.model.embeddings(x)
            for block in self.model.encoder.layer:
                hidden = block(hidden)
        return pool_patch_tokens(hidden, self.num_prefix_tokens)

    def encode(self, images: list[Image.Image], batch_size: int = 64) -> torch.Tensor:
        """Pooled features (N, D) float32 on the CPU, exactly as ``extract-features`` computes
        (an EXIF orientation still on an image is applied, as extraction does)."""
        out = [self.encode_pixels(torch.stack([self.preprocess.pixels(to_rgb(upright(im)))
                                               for im in images[i:i + batch_size]])).cpu()
               for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.dim)


_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL resample codes in processor configs


def load_encoder(name_or_path: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, max_pixels: int = DEFAULT_MAX_PIXELS,
                 jpeg_draft: bool = False) -> ImageEncoder:
    """Load a DINOv2(-with-registers) model and its image processor's settings (hub id or dir).

    ``dtype`` is the compute precision (autocast when not float32; weights stay float32).
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    from babymerge.model import transformers_bars_off

    name = str(name_or_path)
    local = Path(name).expanduser()
    if not local.exists() and (local.is_absolute() or name.startswith((".", "~"))
                               or name.count("/") != 1):
        # not ORG/NAME: a folder that is missing (the hub's "Repo id must be in the form" said
        # nothing of it)
        raise EncoderError(f"--encoder {name}: no such folder (a hub id is ORG/NAME, e.g. "
                           "facebook/dinov2-large)")
    try:
        with transformers_bars_off():
            config = AutoConfig.from_pretrained(name)
            if config.model_type not in ("dinov2", "dinov2_with_registers"):
                raise EncoderError(f"--encoder {name}: model_type {config.model_type!r} is not "
                                   "dinov2 or dinov2_with_registers")
            model = AutoModel.from_pretrained(name, dtype=torch.float32)
            proc = AutoImageProcessor.from_pretrained(name).to_dict()
    except OSError as e:
        raise EncoderError(f"--encoder {name}: cannot load ({e}); offline, pass a local "
                           "directory") from e
    for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
        if not proc.get(key, False):
            raise EncoderError(f"--encoder {name}: image processor has {key}=false; only the "
                               "DINOv2 resize + centre-crop pipeline is implemented")
    size, crop = proc.get("size") or {}, proc.get("crop_size") or {}
    if "shortest_edge" not in size or not {"height", "width"} <= set(crop):
        raise EncoderError(f"--encoder {name}: expected size.shortest_edge and crop_size "
                           f"height/width in the image processor, got {size} and {crop}")
    if size["shortest_edge"] < max(crop["height"], crop["width"]):
        raise EncoderError(f"--encoder {name}: shortest_edge {size['shortest_edge']} is smaller "
                           f"than the crop {crop}")
    resample = int(proc.get("resample", 3))
    if resample not in _RESAMPLE:
        raise EncoderError(f"--encoder {name}: resample={resample} not supported (2 bilinear, "
                           "3 bicubic)")
    preprocess = Preprocess(shortest_edge=int(size["shortest_edge"]),
                            crop_height=int(crop["height"]), crop_width=int(crop["width"]),
                            interpolation=_RESAMPLE[resample], max_pixels=max_pixels,
                            jpeg_draft=jpeg_draft)
    return ImageEncoder(model, preprocess, list(proc["image_mean"]), list(proc["image_std"]),
                        float(proc.get("rescale_factor", 1 / 255)), name, torch.device(device),
                        dtype)


def save_random_dinov2(directory: str | Path, hidden_size: int = 64, num_layers: int = 2,
                       num_heads: int = 4, patch_size: int = 14, image_size: int = 224,
                       seed: int = 0, initializer_range: float = 0.02) -> Path:
    """Save a randomly initialised ``Dinov2Model`` and a DINOv2 image processor (shortest edge
    256/224 of the crop, centre crop ``image_size``, ImageNet mean/std) as an HF directory.

    ``initializer_range`` is the std of the random weights: at DINOv2's 0.02 a random encoder's
    blocks are nearly linear and its pooled feature keeps little beyond the mean colour; the demo
    uses a larger value so the feature also says which colours are where (measured by a probe,
    ``babymerge/demo.py``)."""
    from transformers import Dinov2Config, Dinov2Model
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from transformers.models.bit import BitImageProcessorPil

    directory = Path(directory)
    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=hidden_size, num_hidden_layers=num_layers,
                          num_attention_heads=num_heads, patch_size=patch_size,
                          image_size=image_size, initializer_range=initializer_range)
    Dinov2Model(config).save_pretrained(directory)
    # The PIL processor saves as "BitImageProcessor", what facebook/dinov2-* ship.
    BitImageProcessorPil(size={"shortest_edge": round(image_size * 256 / 224)},
                         crop_size={"height": image_size, "width": image_size},
                         image_mean=list(IMAGENET_DEFAULT_MEAN),
                         image_std=list(IMAGENET_DEFAULT_STD),
                         resample=3).save_pretrained(directory)
    plain_modes(directory)
    return directory


# ---------------------------------------------------------------------------------------------
# Sharding


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError as e:
        raise ValueError(f"--shard must be i/n (e.g. 0/4), got {text!r}") from e
    if not 0 <= i < n:
        raise ValueError(f"--shard {text}: need 0 <= i < n")
    return i, n


def resolve_shard(shard: str | None) -> tuple[int, int]:
    """(rank, world) from ``--shard`` or torchrun's RANK/WORLD_SIZE; (0, 1) for a single run."""
    env = (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
    if shard is None:
        return env
    given = parse_shard(shard)
    if env[1] > 1 and env != given:
        raise InputError(f"--shard {shard} disagrees with RANK={env[0]} WORLD_SIZE={env[1]}")
    return given


def shard_path(out: Path, rank: int, world: int) -> Path:
    """Where rank ``rank`` of ``world`` writes: OUT itself for a single run."""
    if world == 1:
        return out
    return out.with_name(f"{out.stem}.shard-{rank:05d}-of-{world:05d}{out.suffix}")


# ---------------------------------------------------------------------------------------------
# Feature files


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_h5(path: Path) -> Iterator[h5py.File]:
    """An HDF5 file that appears at ``path`` whole or not at all (write, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")  # a fixed name: a killed writer leaves one stale tmp
    try:
        with h5py.File(tmp, "w") as f:
            yield f
        _fsync_path(tmp)
        os.replace(tmp, path)
        _fsync_path(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_strings(group: h5py.Group, name: str, values: list[str]) -> None:
    group.create_dataset(name, shape=(len(values),), dtype=STR_DTYPE,
                         data=np.array(values, dtype=object) if values else None)


def _write_failed(f: h5py.File, failed: dict[str, str]) -> None:
    g = f.create_group(FAILED)
    _write_strings(g, "ids", list(failed))
    _write_strings(g, "reasons", list(failed.values()))


def _read_failed(f: h5py.File) -> dict[str, str]:
    if FAILED not in f:
        return {}
    return dict(zip(decode_strings(f[FAILED]["ids"][:]), decode_strings(f[FAILED]["reasons"][:]),
                    strict=True))


def _check_identity(path: Path, attrs: dict, black: np.ndarray | None, what: str) -> None:
    """Refuse a file made with another encoder, layer, pooling, crop or dtype (or other weights
    behind the same encoder name, seen in ``/black``)."""
    try:
        handle = h5py.File(path, "r")
    except OSError as e:
        raise FeatureFileError(f"{path}: not a readable HDF5 file ({e}); move it away or use "
                               "another --out") from e
    with handle as f, reading(path):
        if FEATURES not in f or IDS not in f or BLACK not in f:
            raise FeatureFileError(f"{path}: not a babymerge feature file (no /{FEATURES}, "
                                   f"/{IDS} or /{BLACK})")
        for key in IDENTITY:
            theirs = f.attrs.get(key)
            theirs = theirs.item() if hasattr(theirs, "item") else theirs
            if theirs != attrs[key]:
                raise FeatureFileError(f"{path} was made with {key}={theirs!r}, {what} has "
                                       f"{key}={attrs[key]!r}; refusing to mix them (use another "
                                       "--out)")
        if black is not None:
            theirs = np.asarray(f[BLACK][:], dtype=np.float32)
            ours = black.astype(np.float32)
            err = np.linalg.norm(theirs - ours) / max(np.linalg.norm(ours), 1e-12)
            if theirs.shape != ours.shape or err > BLACK_RTOL:
                raise FeatureFileError(f"{path}: its /black differs from this encoder's "
                                       f"(relative error {err:.3g}): other weights behind "
                                       f"encoder={attrs['encoder']!r}? Use another --out")


def _merge_into(out: Path, sources: list[Path], attrs: dict, black: np.ndarray,
                duplicates: str) -> dict:
    """Write ``out`` (atomically) holding the rows of all ``sources`` in order.

    ``duplicates="skip"`` keeps the first row of a repeated id (a resumed run's parts may repeat
    rows already merged when a kill came between the merge and the clean-up); ``"error"`` refuses.
    A later ``/failed`` entry replaces an earlier one; an id with a feature is not failed.
    """
    seen: dict[str, Path] = {}
    keep: list[np.ndarray] = []
    ids: list[str] = []
    failed: dict[str, str] = {}
    for src in sources:
        with h5py.File(src, "r") as f, reading(src):
            n = int(f.attrs.get("count", f[IDS].shape[0]))
            src_ids = decode_strings(f[IDS][:n])
            mask = np.ones(n, dtype=bool)
            for i, image_id in enumerate(src_ids):
                if image_id in seen:
                    if duplicates == "error":
                        raise FeatureFileError(f"image id {image_id!r} is in both {seen[image_id]} "
                                               f"and {src}")
                    mask[i] = False
                else:
                    seen[image_id] = src
                    ids.append(image_id)
            keep.append(mask)
            failed.update(_read_failed(f))
    failed = {k: v for k, v in failed.items() if k not in seen}
    dim = black.shape[0]
    with _atomic_h5(out) as f:
        dset = f.create_dataset(FEATURES, shape=(len(ids), dim),
                                dtype=STORAGE_DTYPES[attrs["dtype"]])
        row = 0
        for src, mask in zip(sources, keep, strict=True):
            with h5py.File(src, "r") as g:
                for start in range(0, len(mask), _READ_BLOCK):
                    with reading(src):  # not the write below: a full disk is not damage
                        block = g[FEATURES][start:start + _READ_BLOCK]
                    block = block[mask[start:start + _READ_BLOCK]]
                    _check_finite_rows(block, src, start)
                    dset[row:row + len(block)] = block
                    row += len(block)
        _write_strings(f, IDS, ids)
        f.create_dataset(BLACK, data=black)
        _write_failed(f, failed)
        f.attrs.update({**attrs, "count": len(ids), "complete": True})
    return {"rows": len(ids), "failed": len(failed)}


def _check_finite_rows(block: np.ndarray, path: Path, first_row: int) -> None:
    bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
    if len(bad):
        raise FeatureFileError(f"{path}: {len(bad)} feature row(s) from row {first_row + bad[0]} "
                               "on hold NaN or infinite values; extract those images again")


def _write_table(path: Path, ids: list[str], features: np.ndarray, failed: dict[str, str],
                black: np.ndarray, attrs: dict) -> None:
    with _atomic_h5(path) as f:
        f.create_dataset(FEATURES, data=features)
        _write_strings(f, IDS, ids)
        f.create_dataset(BLACK, data=black)
        _write_failed(f, failed)
        f.attrs.update({**attrs, "count": len(ids), "complete": False})


# ---------------------------------------------------------------------------------------------
# The stage


def _versions() -> dict[str, str]:
    import transformers

    return {"babymerge": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "h5py": h5py.__version__}


def extract_features(cfg: ExtractConfig) -> dict:
    """Encode every image of ``cfg.source`` not yet in ``cfg.out`` (or this rank's shard of it).

    Returns a summary: ``out``, ``rows`` (features in the file), ``new``, ``failed`` (in /failed),
    ``new_failed``, ``seconds``, ``images_per_s``.
    """
    rank, world = resolve_shard(cfg.shard)
    out = shard_path(Path(cfg.out), rank, world)
    items = list_images(cfg.source, cfg.image_root, cfg.id_column, cfg.path_column)
    items = items[rank * len(items) // world:(rank + 1) * len(items) // world]

    device = resolve_device(cfg.device)
    precision = cfg.precision if cfg.precision != "auto" else (
        "bfloat16" if device.type == "cuda" else "float32")
    encoder = load_encoder(cfg.encoder, device, PRECISIONS[precision], cfg.max_pixels,
                           cfg.jpeg_draft)
    decode = resolve_decode(cfg.decode, device, num_decode_workers(cfg.num_workers))
    storage = STORAGE_DTYPES[cfg.dtype]
    black = encoder.encode([Image.new("RGB", BLACK_SIZE)])[0].numpy().astype(storage)
    # A local encoder directory is recorded by its absolute path: train copies this attr into the
    # model's config, and a saved VLM must find its encoder from any working directory.
    encoder_name = (str(Path(cfg.encoder).resolve()) if Path(cfg.encoder).is_dir()
                    else cfg.encoder)
    run_config = {**config_to_dict(cfg), "precision_resolved": precision,
                  "decode_resolved": decode, "shard_resolved": f"{rank}/{world}",
                  "versions": _versions()}  # with the sources it holds, once they are read
    if cfg.source.endswith(".tar"):  # which shards a pattern meant, by name (HDF5 attrs < 64 KB)
        names = [p.name for p in tar_shards(cfg.source)]
        run_config["shards"] = names if len(names) <= MAX_LISTED_SHARDS else {
            "count": len(names), "first": names[0], "last": names[-1]}
    attrs = {"encoder": encoder_name, "layer": LAYER, "pooling": POOLING,
             "image_size": encoder.image_size, "dtype": cfg.dtype,
             "babymerge_version": __version__}

    out.parent.mkdir(parents=True, exist_ok=True)
    parts_dir = out.with_name(out.name + ".partial")
    parts_dir.mkdir(exist_ok=True)
    start = time.perf_counter()
    with exclusive(parts_dir / "lock", "extract-features", FeatureFileError):
        try:
            done, failed_before, next_part, sources = _progress(out, parts_dir, attrs, black,
                                                                cfg.encoder)
        except BaseException:
            if not any(parts_dir.glob("part-*.h5")):  # nothing to resume: leave no litter
                shutil.rmtree(parts_dir)
            raise
        keys = _source_keys(cfg.source)
        if sources and not keys <= sources:
            _warn_foreign_ids(items, done | set(failed_before), cfg.source, out, sources)
        attrs["config"] = json.dumps({**run_config, "sources": sorted(sources | keys)})
        if not out.exists():
            _write_table(out, [], np.zeros((0, black.shape[0]), storage), {}, black, attrs)
        # An image that could not be read (a missing file, an I/O error, a shard cut short) says
        # nothing about the image: it is tried again, so a run after fixing --image-root or
        # finishing a download picks it up. Images that failed to decode need --retry-failed.
        skip = done if cfg.retry_failed else done | {
            i for i, reason in failed_before.items() if not reason.startswith(UNREADABLE)}
        todo = [item for item in items if item.id not in skip]
        new, new_failed = _encode_into_parts(todo, encoder, cfg, parts_dir, next_part, black,
                                             attrs, storage, desc=out.name,
                                             gpu_decode=decode == "gpu")
        parts = sorted(parts_dir.glob("part-*.h5"))
        with h5py.File(out, "r") as f:
            complete = bool(f.attrs.get("complete", False))
        # Unreadable images are tried on every run; when they all fail again as before, the
        # parts add nothing, and merging would rewrite the whole file (gigabytes at scale).
        if complete and _only_repeat_failures(parts, failed_before):
            parts = []
        if parts or not complete:
            _merge_into(out, [out] + parts, attrs, black, duplicates="skip")
        shutil.rmtree(parts_dir)
    with h5py.File(out, "r") as f:
        merged = {"rows": int(f.attrs["count"]), "failed": len(f[FAILED]["ids"])}
    seconds = time.perf_counter() - start
    summary = {"out": str(out), "rows": merged["rows"], "new": new, "failed": merged["failed"],
               "new_failed": new_failed, "skipped": len(items) - len(todo),
               "seconds": round(seconds, 3),
               "images_per_s": round((new + new_failed) / seconds, 2) if seconds > 0 else 0.0}
    print(json.dumps(summary))
    if merged["rows"] == 0 and new_failed:
        # every image of SOURCE failed (the raw CC3M TSV read as id<TAB>path, a wrong
        # --image-root): the file says why for each, but exit 0 would pass for a good run
        with h5py.File(out, "r") as f:
            first = next(iter(_read_failed(f).items()))
        raise SourceError(f"SOURCE {cfg.source}: all {new_failed} image(s) failed (e.g. "
                          f"{first[0]!r}: {first[1]}); each reason is in {out}'s /failed. Is "
                          "SOURCE laid out as expected (extract-features --help)?")
    return summary


def _progress(out: Path, parts_dir: Path, attrs: dict, black: np.ndarray,
              encoder: str) -> tuple[set[str], dict[str, str], int, set[str]]:
    """(ids with a feature, failed ids with their reasons, next part number, the SOURCEs they
    came from) from OUT and its parts, after checking that each was made the same way as this
    run."""
    done: set[str] = set()
    failed: dict[str, str] = {}
    sources: set[str] = set()
    parts = sorted(parts_dir.glob("part-*.h5"))  # a part killed mid-write is a *.h5.tmp: ignored
    for path in ([out] if out.exists() else []) + parts:
        _check_identity(path, attrs, black, f"this run (--encoder {encoder})")
        with h5py.File(path, "r") as f, reading(path):
            done.update(decode_strings(f[IDS][:int(f.attrs.get("count", f[IDS].shape[0]))]))
            failed.update(_read_failed(f))
            sources.update(_recorded_sources(f))
    next_part = int(parts[-1].stem.split("-")[1]) + 1 if parts else 0
    return done, failed, next_part, sources


def _only_repeat_failures(parts: list[Path], failed_before: dict[str, str]) -> bool:
    """True if ``parts`` hold no feature row and only /failed entries already recorded with the
    same reason."""
    for path in parts:
        with h5py.File(path, "r") as f, reading(path):
            if int(f.attrs.get("count", f[IDS].shape[0])) > 0:
                return False
            if any(failed_before.get(k) != v for k, v in _read_failed(f).items()):
                return False
    return True


def _source_keys(source: str) -> set[str]:
    """SOURCE as recorded in a feature file's config: absolute, so a resume from another working
    directory is the same source. ``.tar`` shards are recorded by the folders holding them, so a
    longer range, a glob or the folder of the same shards (the file extended as more of a
    download arrives) is the same source, and the record stays a few entries long (an HDF5
    attribute is limited to 64 KB; a shard list is not)."""
    path = Path(source)
    if source.endswith(".tar") and not path.is_dir():
        shards = tar_shards(source)
        if shards:
            return {str(p.absolute().parent.resolve()) for p in shards}
    return {str(path.resolve()) if path.exists() else os.path.abspath(source)}


def _recorded_sources(f: h5py.File) -> set[str]:
    """The SOURCEs a feature file holds images of (``sources`` of its config; the one ``source``
    in files written before that was recorded). Empty where unknown."""
    try:
        config = json.loads(f.attrs.get("config", "{}"))
    except (TypeError, ValueError):
        return set()
    if "sources" in config:
        return set(config["sources"])
    config = config.get("extract", config)  # joined before sources were recorded: its first shard
    return _source_keys(config["source"]) if isinstance(config.get("source"), str) else set()


def _warn_foreign_ids(items, stored: set[str], source: str, out: Path, sources: set[str]) -> None:
    """Extending OUT with a new SOURCE skips its ids already stored, as a resume does; there
    they came from another source, so they may name other images (two folders both holding
    1.jpg; COCO and Flickr30k numeric ids), whose captions would then get the wrong feature."""
    clash = [item.id for item in items if item.id in stored]
    if clash:
        shown = ", ".join(clash[:5]) + (" ..." if len(clash) > 5 else "")
        warnings.warn(f"{len(clash)} image id(s) of SOURCE {source} are already in {out} from "
                      f"another source ({', '.join(sorted(sources))}): {shown}; they keep the "
                      "stored features. If they are other images, give them distinct ids or "
                      "extract into another --out", stacklevel=3)


def resolve_decode(decode: str, device: torch.device, workers: int) -> str:
    """``--decode`` resolved to ``gpu`` or ``workers`` (``workers``: this rank's decode
    processes)."""
    if decode == "gpu" and (device.type != "cuda" or not gpu_jpeg_decoder_available()):
        raise InputError("--decode gpu needs --device cuda and torchvision with nvJPEG "
                         f"(device {device}); use --decode workers")
    if decode == "auto":
        return ("gpu" if device.type == "cuda" and workers < GPU_DECODE_BELOW_WORKERS
                and gpu_jpeg_decoder_available() else "workers")
    return decode


def num_decode_workers(requested: int) -> int:
    """``--num-workers`` resolved: -1 = the CPU cores of this rank (cores / local ranks) minus
    the main process."""
    if requested >= 0:
        return requested
    per_rank = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(per_rank - 1, 0)


def _encode_into_parts(todo, encoder: ImageEncoder, cfg: ExtractConfig, parts_dir: Path,
                       first_part: int, black: np.ndarray, attrs: dict, storage, desc: str,
                       gpu_decode: bool = False) -> tuple[int, int]:
    """Encode ``todo`` in order, writing a part file every ``flush_every`` images (whole batches,
    so a resumed run forms the same batches as an uninterrupted one). Returns (new, failed)."""
    if not todo:
        return 0, 0
    workers = num_decode_workers(cfg.num_workers)
    # nvJPEG decodes at full resolution; JPEGs left to the workers (progressive, CMYK) and the
    # decoder's PIL fallback then do too, so no image of a GPU-decoded file was drafted.
    preprocess = (replace(encoder.preprocess, defer_jpeg=True, jpeg_draft=False) if gpu_decode
                  else encoder.preprocess)
    gpu_decoder = GpuJpegDecoder(preprocess, encoder.device) if gpu_decode else None
    loader = torch.utils.data.DataLoader(
        ImageDataset(todo, preprocess), batch_size=cfg.batch_size, shuffle=False,
        num_workers=workers, collate_fn=collate, pin_memory=encoder.device.type == "cuda")
    # Default prefetch (2 batches per worker): batches pass through /dev/shm, small in many
    # containers, and 15 workers x 2 x 128 uint8 crops is already 580 MB of it.
    flush_rows = -(-cfg.flush_every // cfg.batch_size) * cfg.batch_size
    part = first_part
    ids: list[str] = []
    feats: list[torch.Tensor] = []  # kept on the device until a flush: no sync per batch
    failed: dict[str, str] = {}
    pending = new = new_failed = 0

    def flush() -> None:
        nonlocal part, ids, feats, failed, pending, new, new_failed
        rows = (torch.cat(feats).cpu().numpy().astype(storage) if feats
                else np.zeros((0, black.shape[0]), storage))
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():  # never stored: such a row would poison every score that reads it
            for i in np.flatnonzero(~finite):
                failed[ids[i]] = NON_FINITE_FEATURE
            ids = [image_id for image_id, ok in zip(ids, finite, strict=True) if ok]
            rows = rows[finite]
            new, new_failed = new - int((~finite).sum()), new_failed + int((~finite).sum())
        _write_table(parts_dir / f"part-{part:06d}.h5", ids, rows, failed, black, attrs)
        part, ids, feats, failed, pending = part + 1, [], [], {}, 0

    with tqdm(total=len(todo), desc=desc, unit="img", smoothing=0.1, dynamic_ncols=True,
              disable=not cfg.progress) as bar:
        for batch in loader:
            good, pixels, bad, reasons = batch.good, batch.pixels, batch.bad, batch.reasons
            if batch.jpegs:
                good, pixels, bad, reasons = _with_gpu_decoded(batch, gpu_decoder, encoder.device)
            if pixels is not None:
                feats.append(encoder.encode_pixels(pixels))
                ids.extend(todo[i].id for i in good)
            for i, reason in zip(bad, reasons, strict=True):
                failed[todo[i].id] = reason
            new += len(good)
            new_failed += len(bad)
            pending += len(good) + len(bad)
            bar.update(len(good) + len(bad))
            if bad:
                bar.set_postfix(failed=new_failed)
            if pending >= flush_rows:
                flush()
        if pending:
            flush()
    return new, new_failed


NON_FINITE_FEATURE = ("the encoder's feature is not finite (NaN or infinity; in float16 storage, a "
                      "value beyond 65504: --dtype float32 stores it)")


def _with_gpu_decoded(batch, decoder: GpuJpegDecoder, device: torch.device):
    """(good, pixels, bad, reasons) of a batch once its deferred JPEGs are decoded, rows in batch
    order as with worker decoding, so a feature file does not depend on where images ran."""
    decoded = decoder(batch.jpeg_bytes)
    crops = dict(zip(batch.good, batch.pixels.to(device, non_blocking=True)
                     if batch.pixels is not None else []))
    bad = dict(zip(batch.bad, batch.reasons))
    for i, result in zip(batch.jpegs, decoded, strict=True):
        if isinstance(result, str):
            bad[i] = result
        else:
            crops[i] = result
    good = sorted(crops)
    pixels = torch.stack([crops[i] for i in good]) if good else None
    return good, pixels, sorted(bad), [bad[i] for i in sorted(bad)]


def join_features(cfg: JoinConfig) -> dict:
    """Join complete feature files (e.g. one per rank) into ``cfg.out`` with the same layout;
    ids must be unique across them and encoder/layer/pooling/crop/dtype equal."""
    shards = [Path(p) for p in cfg.shards]
    sources: set[str] = set()
    for path in shards:
        if not path.is_file():
            raise FeatureFileError(f"shard not found: {path}")
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise FeatureFileError(f"{path}: not a readable HDF5 file ({e}): not a feature file, "
                                   "or cut short") from None
        with f, reading(path):
            if not bool(f.attrs.get("complete", False)):
                raise FeatureFileError(f"{path}: extraction did not finish (complete is not "
                                       "true); re-run its extract-features first")
            if not all(name in f for name in (FEATURES, IDS, BLACK)):
                raise FeatureFileError(f"{path}: no /{FEATURES}, /{IDS} and /{BLACK}: not a "
                                       "feature file extract-features wrote")
            sources.update(_recorded_sources(f))
    with h5py.File(shards[0], "r") as f, reading(shards[0]):
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
        black = np.asarray(f[BLACK][:])
    for path in shards[1:]:
        _check_identity(path, attrs, black, str(shards[0]))
    attrs["config"] = json.dumps({"join": config_to_dict(cfg),
                                  "extract": json.loads(attrs.get("config", "{}")),
                                  "sources": sorted(sources), "versions": _versions()})
    out = Path(cfg.out)
    _check_replaceable_feature_file(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if cfg.virtual:
        result = _join_virtual(out, shards, attrs, black)
    else:
        result = _merge_into(out, shards, attrs, black, duplicates="error")
    summary = {"out": str(out), **result, "shards": len(shards), "virtual": cfg.virtual}
    print(json.dumps(summary))
    return summary


def _check_replaceable_feature_file(out: Path) -> None:
    """join-features replaces --out whole: only a feature file (an earlier join) may be there; a
    file of the user's was overwritten without a word."""
    if not out.exists():
        return
    try:
        with h5py.File(out, "r") as f:
            ours = all(name in f for name in (FEATURES, IDS, BLACK))
    except OSError:
        ours = False
    if not ours:
        raise FeatureFileError(f"--out {out}: exists and is not a feature file; nothing replaced: "
                               "give another --out, or remove it first")


def _join_virtual(out: Path, shards: list[Path], attrs: dict, black: np.ndarray) -> dict:
    """/features as a virtual dataset over the shards' /features (paths stored relative to OUT's
    folder, so the set can move together); ids, black and failed are copied."""
    ids: list[str] = []
    owner: dict[str, Path] = {}
    failed: dict[str, str] = {}
    counts = []
    for path in shards:
        with h5py.File(path, "r") as f, reading(path):
            n = int(f.attrs["count"])
            for image_id in decode_strings(f[IDS][:n]):
                if image_id in owner:
                    raise FeatureFileError(f"image id {image_id!r} is in both {owner[image_id]} "
                                           f"and {path}")
                owner[image_id] = path
                ids.append(image_id)
            failed.update(_read_failed(f))
            counts.append(n)
            for start in range(0, n, _READ_BLOCK):  # a read, no copy: what the join refers to
                _check_finite_rows(f[FEATURES][start:min(n, start + _READ_BLOCK)], path, start)
    failed = {k: v for k, v in failed.items() if k not in owner}  # with a feature: not failed
    dim = black.shape[0]
    layout = h5py.VirtualLayout(shape=(len(ids), dim), dtype=STORAGE_DTYPES[attrs["dtype"]])
    row = 0
    for path, n in zip(shards, counts, strict=True):
        rel = os.path.relpath(path.resolve(), out.parent.resolve())
        layout[row:row + n] = h5py.VirtualSource(rel, FEATURES, shape=(n, dim))
        row += n
    with _atomic_h5(out) as f:
        f.create_virtual_dataset(FEATURES, layout)
        _write_strings(f, IDS, ids)
        f.create_dataset(BLACK, data=black)
        _write_failed(f, failed)
        f.attrs.update({**attrs, "count": len(ids), "complete": True})
    return {"rows": len(ids), "failed": len(failed)}
