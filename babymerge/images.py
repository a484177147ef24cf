"""Image sources and decoding for stage 1: which images there are, and how one becomes pixels.

A SOURCE is listed into :class:`ImageItem` s (an id and where its bytes live) in the main process,
before any work, so duplicate ids and malformed lists fail fast with the file and line. Decoding
happens in DataLoader workers (:class:`ImageDataset`): bytes -> PIL (JPEG drafted down to the size
needed) -> RGB done right for every mode -> resized with torch's uint8 antialiased kernel (the same
bicubic as PIL, ~5x faster) -> centre crop, returned as uint8 so that pinned host->device copies
are 4x smaller than float. Rescale and normalise happen on the device (:mod:`babymerge.features`).

Why not ``datasets``' imagefolder / webdataset builders: they copy every image's bytes into an Arrow
cache first (a second copy of a 60 GB image set), decode in the main process, and stop at the first
bad file; reading by path or tar offset in workers needs none of that, and records bad files.
``datasets`` is used where it fits: a dataset already saved as Arrow (``save_to_disk``) is
memory-mapped and read in place, each worker mapping it once.
"""

from __future__ import annotations

import glob
import io
import json
import re
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from babymerge.config import InputError

# Extensions taken as images in folders and tar shards (lower case, without the dot).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "jfif", "ppm",
                    "pgm", "pbm")
# PIL's own decompression-bomb threshold (~89.5 M pixels): beyond it a single RGB decode is > 268 MB
# per worker.
DEFAULT_MAX_PIXELS = 89_478_485
# 16-bit grey PNG/TIFF modes; "I" is how older Pillow opened 16-bit PNGs.
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class SourceError(InputError):
    """A SOURCE that cannot be listed: the message names the file, line or flag."""


class BadImage(Exception):
    """One image that cannot be used; ``str(e)`` is the reason recorded in ``/failed``."""


@dataclass(frozen=True)
class ImageItem:
    """One image: its id and where its bytes are: a file; ``size`` bytes at ``offset`` in a tar;
    or row ``offset`` of column ``column`` in a ``datasets`` folder (``save_to_disk``).

    ``where`` says where the item was listed (``list.jsonl:12``) for error messages.
    """

    id: str
    path: str
    offset: int = -1
    size: int = -1
    where: str = ""
    column: str = ""

    def read_bytes(self) -> bytes:
        if self.column:
            record = _arrow_column(self.path, self.column)[self.offset]
            if record is None:
                raise FileNotFoundError(f"row {self.offset} of {self.path} has no image")
            if record.get("bytes"):
                return record["bytes"]
            return Path(record["path"]).read_bytes()
        with open(self.path, "rb") as f:
            if self.offset < 0:
                return f.read()
            f.seek(self.offset)
            return f.read(self.size)


_ARROW: dict[tuple[str, str], object] = {}  # per process: each DataLoader worker maps its own


def _arrow_column(folder: str, column: str):
    """The image column of a saved ``datasets`` folder, memory-mapped, as undecoded
    ``{"bytes", "path"}`` records (decoding is ours, so bad images are recorded, not raised)."""
    key = (folder, column)
    if key not in _ARROW:
        import datasets

        ds = datasets.load_from_disk(folder).select_columns([column])
        if isinstance(ds.features[column], datasets.Image):
            ds = ds.cast_column(column, datasets.Image(decode=False))
        _ARROW[key] = ds[column]
    return _ARROW[key]


# ---------------------------------------------------------------------------------------------
# Listing a SOURCE


def list_images(source: str, image_root: Path | None = None, id_column: str = "image_id",
                path_column: str = "path") -> list[ImageItem]:
    """All images of ``source`` in source order, ids unique (else :class:`SourceError`).

    ``source`` is a folder (recursive; id = relative path without extension), a ``.jsonl`` with
    ``id_column`` and ``path_column`` (a key, or a template such as ``{dataset_id}/{image_id}.jpg``
    filled from each line, for Localized Narratives files that carry no path; paths relative to
    ``image_root``, default the file's folder), a ``.tsv`` of ``id<TAB>path``, web-dataset
    ``.tar`` shards (one file, a glob, a brace range ``shard-{000..099}.tar``, or a folder holding
    only shards; id = the sample key),
    or a folder saved by ``datasets``' ``save_to_disk`` (memory-mapped Arrow, read in place).
    """
    path = Path(source)
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        raise SourceError(f"SOURCE {source} is a datasets DatasetDict: pass one split's folder, "
                          f"e.g. {path / 'train'}")
    if path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        items = _list_arrow(path, id_column, path_column)
    elif path.is_dir():
        items = _list_folder(path)
        if not items and sorted(path.glob("*.tar")):  # a folder of shards
            items = _list_tars(sorted(path.glob("*.tar")))
    elif path.suffix == ".jsonl" and path.is_file():
        items = _list_jsonl(path, image_root, id_column, path_column)
    elif path.suffix == ".tsv" and path.is_file():
        items = _list_tsv(path, image_root)
    elif source.endswith(".tar"):
        shards = [Path(p) for pattern in _expand_braces(source) for p in sorted(glob.glob(pattern))]
        if not shards:
            raise SourceError(f"SOURCE {source}: no .tar shard matches")
        items = _list_tars(shards)
    elif not path.exists():
        raise SourceError(f"SOURCE {source}: no such file or folder")
    else:
        raise SourceError(f"SOURCE {source}: expected a folder, a .jsonl, a .tsv or .tar shard(s)")
    if not items:
        raise SourceError(f"SOURCE {source}: no images in it (image extensions: "
                          f"{', '.join(IMAGE_EXTENSIONS)})")
    return _unique(items, source)


def _list_folder(folder: Path) -> list[ImageItem]:
    items = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue  # hidden files (.DS_Store, editor swap files) are never images
        if p.suffix[1:].lower() in IMAGE_EXTENSIONS:
            items.append(ImageItem(rel.with_suffix("").as_posix(), str(p), where=str(p)))
    return items


def _list_arrow(folder: Path, id_column: str, path_column: str) -> list[ImageItem]:
    """A folder written by ``datasets``' ``save_to_disk``: ids from ``id_column``, images from
    ``path_column`` if present, else from the one column typed ``datasets.Image``."""
    import datasets

    ds = datasets.load_from_disk(str(folder))
    columns = ", ".join(ds.column_names)
    if id_column not in ds.column_names:
        raise SourceError(f"{folder}: no {id_column!r} column (set --id-column); columns: "
                          f"{columns}")
    column = path_column
    if column not in ds.column_names:
        images = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
        if len(images) != 1:
            raise SourceError(f"{folder}: no {path_column!r} column and {len(images)} Image "
                              f"columns; set --path-column (columns: {columns})")
        column = images[0]
    return [ImageItem(str(image_id), str(folder), row, where=f"{folder}[row {row}]", column=column)
            for row, image_id in enumerate(ds[id_column])]


def _resolve(path: str, root: Path) -> str:
    p = Path(path)
    return str(p if p.is_absolute() else root / p)


def _list_jsonl(path: Path, image_root: Path | None, id_column: str,
                path_column: str) -> list[ImageItem]:
    root = image_root or path.parent
    items = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SourceError(f"{where}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise SourceError(f"{where}: expected a JSON object")
            template = "{" in path_column  # e.g. "{dataset_id}/{image_id}.jpg"
            for key, flag in ((id_column, "--id-column"),
                              *([] if template else [(path_column, "--path-column")])):
                if key not in row:
                    raise SourceError(f"{where}: no {key!r} key (set {flag}); keys: "
                                      f"{', '.join(sorted(row))}")
            try:
                image_path = path_column.format_map(row) if template else str(row[path_column])
            except (KeyError, IndexError, ValueError) as e:
                raise SourceError(f"{where}: --path-column template {path_column!r} cannot be "
                                  f"filled from this line ({type(e).__name__}: {e})") from e
            items.append(ImageItem(str(row[id_column]), _resolve(image_path, root), where=where))
    return items


def _list_tsv(path: Path, image_root: Path | None) -> list[ImageItem]:
    root = image_root or path.parent
    items = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip() or line.startswith("#"):
                continue
            fields = line.split("\t")
            if len(fields) != 2:
                raise SourceError(f"{path}:{line_no}: expected 'id<TAB>path', got {len(fields)} "
                                  "tab-separated field(s)")
            if line_no == 1 and fields[0] in ("id", "image_id") and fields[1] == "path":
                continue  # header row
            items.append(ImageItem(fields[0], _resolve(fields[1], root), where=f"{path}:{line_no}"))
    return items


def _expand_braces(pattern: str) -> list[str]:
    """``a{00..02}b`` -> ``a00b a01b a02b`` (webdataset's shard notation), zero padding kept."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") else 0
    return [e for i in range(int(lo), int(hi) + 1)
            for e in _expand_braces(pattern[:m.start()] + str(i).zfill(width) + pattern[m.end():])]


def _list_tars(shards: list[Path]) -> list[ImageItem]:
    """One item per web-dataset sample that has an image member; the key is the member path up to
    the first dot of its basename (webdataset's rule), so ``a/x.seg.png`` belongs to ``a/x``."""
    items = []
    rank = {ext: i for i, ext in enumerate(IMAGE_EXTENSIONS)}
    for shard in shards:
        try:
            tar = tarfile.open(shard, "r:")  # offsets are only meaningful in an uncompressed tar
        except (tarfile.TarError, OSError) as e:
            raise SourceError(f"{shard}: not an uncompressed .tar shard ({e})") from e
        chosen: dict[str, tuple[int, tarfile.TarInfo]] = {}  # key -> (extension rank, member)
        with tar:
            for member in tar:
                if not member.isfile():
                    continue
                dirname, _, base = member.name.rpartition("/")
                stem, _, ext = base.partition(".")
                ext = ext.lower()
                if ext not in rank:
                    continue
                key = f"{dirname}/{stem}" if dirname else stem
                if key not in chosen or rank[ext] < chosen[key][0]:
                    chosen[key] = (rank[ext], member)
        items += [ImageItem(key, str(shard), m.offset_data, m.size, where=f"{shard}:{m.name}")
                  for key, (_, m) in chosen.items()]
    return items


def _unique(items: list[ImageItem], source: str) -> list[ImageItem]:
    """Drop exact repeats (same id and bytes: Localized Narratives lists an image once per
    narrative); the same id for different images is an error naming both places."""
    seen: dict[str, ImageItem] = {}
    out = []
    for item in items:
        first = seen.get(item.id)
        if first is None:
            seen[item.id] = item
            out.append(item)
        elif (first.path, first.offset) != (item.path, item.offset):
            raise SourceError(f"SOURCE {source}: duplicate image id {item.id!r} for different "
                              f"images: {first.where} and {item.where}")
    return out


# ---------------------------------------------------------------------------------------------
# Decoding


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB image for any PIL mode, as the encoder's own processor sees it.

    Transparency is composited onto white (what transformers' ``convert_to_rgb`` does); 16-bit
    images are scaled to 8 bits (PIL's ``convert`` would clip everything above 255 to white); CMYK,
    palette, grayscale and 1-bit go through PIL's conversion. EXIF orientation is not applied,
    as the processor does not apply it either (features must match the paper's pipeline).
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


@dataclass(frozen=True)
class Preprocess:
    """The encoder processor's geometry: resize the shortest edge, centre crop. Picklable, so each
    DataLoader worker holds a copy."""

    shortest_edge: int
    crop_height: int
    crop_width: int
    interpolation: str = "bicubic"
    max_pixels: int = DEFAULT_MAX_PIXELS
    jpeg_draft: bool = True

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) after the shortest-edge resize, rounded as transformers does."""
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.shortest_edge * long / short)
        return (new_long, self.shortest_edge) if width <= height else (self.shortest_edge, new_long)

    def open(self, data: bytes) -> Image.Image:
        """Decode ``data`` to an RGB PIL image or raise :class:`BadImage` with the reason."""
        if not data:
            raise BadImage("empty file (0 bytes)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below
                image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise BadImage(f"too large (decompression-bomb guard): {e}") from e
        except Image.UnidentifiedImageError as e:
            raise BadImage("not an image (no decoder recognises the bytes)") from e
        width, height = image.size
        if width * height > self.max_pixels:
            raise BadImage(f"too large (decompression-bomb guard): {width}x{height} = "
                           f"{width * height} pixels > --max-pixels {self.max_pixels}")
        if width < 1 or height < 1:
            raise BadImage(f"empty image ({width}x{height})")
        new_h, new_w = self.resized_size(width, height)
        if new_h * new_w > self.max_pixels:
            raise BadImage(f"extreme aspect ratio: {width}x{height} would resize to "
                           f"{new_w}x{new_h}")
        if self.jpeg_draft and image.format == "JPEG":
            # DCT-domain downscaling by 1/2, 1/4 or 1/8 while decoding, never below the resize
            # target: halves decode time for large photos (the resize then does the rest).
            image.draft(None, (new_w, new_h))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image.load()
            return to_rgb(image)
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise BadImage(f"truncated or corrupt ({type(e).__name__}: {e})") from e

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """uint8 (3, crop_height, crop_width) of an RGB image: shortest-edge resize, centre crop."""
        width, height = image.size
        new_h, new_w = self.resized_size(width, height)
        # HWC memory viewed as NCHW is exactly channels_last, the layout torch's fast uint8
        # antialiased resize wants; it matches PIL's bicubic to within one grey level.
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0)
        if (new_h, new_w) != (height, width):
            x = F.interpolate(x, size=(new_h, new_w), mode=self.interpolation, antialias=True,
                              align_corners=False)
        top, left = (new_h - self.crop_height) // 2, (new_w - self.crop_width) // 2
        return x[0, :, top:top + self.crop_height, left:left + self.crop_width].contiguous()

    def __call__(self, data: bytes) -> torch.Tensor:
        return self.pixels(self.open(data))


class ImageDataset(torch.utils.data.Dataset):
    """``(index, pixels or None, reason)`` per item; a bad image never raises, it is reported."""

    def __init__(self, items: list[ImageItem], preprocess: Preprocess):
        self.items = items
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        item = self.items[index]
        try:
            data = item.read_bytes()
        except OSError as e:
            return index, None, f"unreadable ({type(e).__name__}: {e.strerror or e})"
        try:
            return index, self.preprocess(data), ""
        except BadImage as e:
            return index, None, str(e)
        except Exception as e:  # a decoder bug on one file must not stop a 600k-image run
            return index, None, f"decode error ({type(e).__name__}: {e})"


def collate(batch: list[tuple[int, torch.Tensor | None, str]]
            ) -> tuple[list[int], torch.Tensor | None, list[int], list[str]]:
    """(good indices, their stacked uint8 pixels, bad indices, reasons), order kept."""
    good = [(i, x) for i, x, _ in batch if x is not None]
    pixels = torch.stack([x for _, x in good]) if good else None
    bad = [(i, r) for i, x, r in batch if x is None]
    return [i for i, _ in good], pixels, [i for i, _ in bad], [r for _, r in bad]

