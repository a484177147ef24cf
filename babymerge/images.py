"""Image sources and decoding for stage 1: which images there are, and how one becomes pixels.

A SOURCE is listed into :class:`ImageItem` s (an id and where its bytes live) in the main process,
before any work, so duplicate ids and malformed lists fail fast with the file and line. Decoding
happens in DataLoader workers (:class:`ImageDataset`): bytes -> PIL (exact; with ``--jpeg-draft``
JPEGs are drafted down to the size needed) -> RGB done right for every mode -> resized with torch's
uint8 antialiased kernel (the same bicubic as PIL, ~5x faster) -> centre crop, returned as uint8 so
that pinned host->device copies are 4x smaller than float. Rescale and normalise happen on the
device (:mod:`babymerge.features`). With ``--decode gpu`` (which ``auto`` picks on CUDA with
torchvision and few decode workers), ordinary JPEGs skip the worker decode: workers check the header
and pass the bytes on, and :class:`GpuJpegDecoder` decodes them with nvJPEG and resizes on the
device.

Why not ``datasets``' imagefolder / webdataset builders: they copy every image's bytes into an Arrow
cache first (a second copy of a 60 GB image set), decode in the main process, and stop at the first
bad file; reading by path or tar offset in workers needs none of that, and records bad files.
``datasets`` is used where it fits: a dataset already saved as Arrow (``save_to_disk``) is
memory-mapped and read in place, each worker mapping it once."""

from __future__ import annotations

import collections
import functools
import glob
import io
import json
import os
import re
import string
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps

from babymerge.config import InputError
from babymerge.textfiles import numbered_lines

# Extensions taken as images in folders and tar shards (lower case, without the dot).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "jfif", "ppm",
                    "pgm", "pbm", "mpo", "apng")
# Files beside the images that are not images (web-dataset samples' captions and metadata): left
# out without a word. Any other file left out is counted and named (list_images).
SIDECAR_EXTENSIONS = ("txt", "json", "cls", "caption", "md5", "csv", "tsv", "jsonl", "parquet",
                      "npy", "xml", "url")
# PIL's own decompression-bomb threshold (~89.5 M pixels): beyond it a single RGB decode is > 268 MB
# per worker.
DEFAULT_MAX_PIXELS = 89_478_485
# How a /failed reason starts when the bytes could not be read at all (not a bad image): a later
# run tries such images again.
UNREADABLE = "unreadable"
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
            data = f.read(self.size)
        if len(data) < self.size:  # a member of a tar shard cut short
            raise OSError(f"tar member cut short: {len(data)} of {self.size} bytes")
        return data


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
        shards = tar_shards(source)
        if not shards:
            raise SourceError(f"SOURCE {source}: no .tar shard matches")
        missing = missing_shards(source)
        if missing:
            # a brace range names each shard: one absent (a download not finished, a typo in
            # the range) would lose its ~10k images without a word
            shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise SourceError(f"SOURCE {source}: {len(missing)} of the "
                              f"{len(missing) + len(shards)} shards it names are missing "
                              f"({shown}); finish the download, or take what is there with a "
                              "glob ('*.tar'): a range promises every shard")
        items = _list_tars(shards)
    elif not path.exists():
        raise SourceError(f"SOURCE {source}: no such file or folder")
    else:
        raise SourceError(f"SOURCE {source}: expected a folder, a .jsonl, a .tsv or .tar shard(s)")
    if not items:
        raise SourceError(f"SOURCE {source}: no images in it (image extensions: "
                          f"{', '.join(IMAGE_EXTENSIONS)})")
    return _unique(items, source)


def _walk_files(folder: Path) -> Iterator[tuple[Path, bool]]:
    """(path, is a file) of everything under ``folder`` but folders and hidden names, following
    symbolic links to folders (``data/images/coco -> /datasets/coco/train2017`` is how image sets
    are usually laid out; ``Path.rglob`` skips such links silently). A folder reached twice (a
    link loop, two links to one folder) is walked once, the first time in sorted order. Whether
    an entry is a file comes from the directory listing (``os.scandir``), so only symbolic links
    cost a ``stat``: a million-image folder on a network file system is listed without a million
    round trips."""
    seen: set[str] = set()

    def walk(root: str) -> Iterator[tuple[Path, bool]]:
        real = os.path.realpath(root)
        if real in seen:
            return
        seen.add(real)
        try:
            with os.scandir(root) as it:
                entries = list(it)
        except OSError:  # unreadable folder: skipped, as os.walk does
            return
        dirs = []
        for entry in entries:
            if entry.name.startswith("."):  # .DS_Store, editor swap files are never images
                continue
            try:
                if entry.is_dir():  # follows links
                    dirs.append(entry.name)
                    continue
                is_file = entry.is_file()
            except OSError:
                is_file = False
            yield Path(root) / entry.name, is_file
        for name in sorted(dirs):
            yield from walk(os.path.join(root, name))

    yield from walk(str(folder))


def _list_folder(folder: Path) -> list[ImageItem]:
    items = []
    broken, skipped = [], []
    for p, is_file in sorted(_walk_files(folder), key=lambda x: x[0]):
        if p.suffix[1:].lower() in IMAGE_EXTENSIONS and is_file:
            rel = p.relative_to(folder)
            items.append(ImageItem(rel.with_suffix("").as_posix(), str(p), where=str(p)))
        elif not is_file and p.is_symlink() and not p.exists():
            broken.append(str(p))
        elif is_file and p.suffix[1:].lower() not in SIDECAR_EXTENSIONS:
            skipped.append(p.name)
    # a folder of web-dataset shards is read as such (list_images): its .tar files are not skipped
    if items or any(not n.endswith(".tar") for n in skipped):
        _say_skipped(folder, len(items), skipped)
    if broken:
        # A link to an image set that is not mounted (yet) loses all of its images: say so.
        shown = ", ".join(broken[:5]) + (" ..." if len(broken) > 5 else "")
        warnings.warn(f"{folder}: {len(broken)} broken symbolic link(s) skipped (their target "
                      f"does not exist): {shown}", stacklevel=3)
    return items


def _list_arrow(folder: Path, id_column: str, path_column: str) -> list[ImageItem]:
    """A folder written by ``datasets``' ``save_to_disk``: ids from ``id_column``, images from
    ``path_column`` if present, else from the one column typed ``datasets.Image``."""
    import datasets

    ds = datasets.load_from_disk(str(folder))
    columns = ", ".join(ds.column_names)
    if "{" in id_column:  # a template over columns and {row}, e.g. 'vqav2_{row}'
        fields = [f for f in _template_fields(id_column) if f != "row"]
        missing = [f for f in fields if f not in ds.column_names]
        if missing:
            raise SourceError(f"{folder}: --id-column template {id_column!r} names "
                              f"{', '.join(map(repr, missing))}, not a column; columns: {columns}")
        values = {f: ds[f] for f in fields}
        ids = [id_column.format_map({**{f: v[row] for f, v in values.items()}, "row": row})
               for row in range(len(ds))]
    elif id_column in ds.column_names:
        ids = ds[id_column]
    else:
        raise SourceError(f"{folder}: no {id_column!r} column (set --id-column, a column or a "
                          f"template such as 'vqav2_{{row}}'); columns: {columns}")
    column = path_column
    if column not in ds.column_names:
        images = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
        if len(images) != 1:
            raise SourceError(f"{folder}: no {path_column!r} column and {len(images)} Image "
                              f"columns; set --path-column (columns: {columns})")
        column = images[0]
    return [ImageItem(str(image_id), str(folder), row, where=f"{folder}[row {row}]", column=column)
            for row, image_id in enumerate(ids)]


def _template_fields(template: str) -> list[str]:
    """The field names a str.format template uses ('{a}/{b:0>12}' -> ['a', 'b'])."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def _resolve(path: str, root: Path) -> str:
    p = Path(path)
    return str(p if p.is_absolute() else root / p)


def _list_jsonl(path: Path, image_root: Path | None, id_column: str,
                path_column: str) -> list[ImageItem]:
    root = image_root or path.parent
    items = []
    for line_no, line in numbered_lines(path, SourceError, universal_newlines=True):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SourceError(f"{where}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise SourceError(f"{where}: expected a JSON object")
        # templates, e.g. "{dataset_id}/{image_id}.jpg": Localized Narratives' COCO and
        # Flickr30k ids are both bare numbers, so '{dataset_id}_{image_id}' keeps them apart
        path_template, id_template = "{" in path_column, "{" in id_column
        keys = ([] if id_template else [(id_column, "--id-column")]) + \
            ([] if path_template else [(path_column, "--path-column")])
        for key, flag in keys:
            if key not in row:
                raise SourceError(f"{where}: no {key!r} key (set {flag}); keys: "
                                  f"{', '.join(sorted(row))}")
        image_path = (_fill(path_column, row, where, "--path-column") if path_template
                      else str(row[path_column]))
        image_id = _fill(id_column, row, where, "--id-column") if id_template else row[id_column]
        # str() would make a null id the image "None" (and a list its repr): refuse instead.
        if isinstance(image_id, bool) or not isinstance(image_id, (str, int)) or image_id == "":
            raise SourceError(f"{where}: {id_column!r} is {json.dumps(image_id)}; an image id "
                              "must be a non-empty string or an integer")
        items.append(ImageItem(str(image_id), _resolve(image_path, root), where=where))
    return items


def _fill(template: str, row: dict, where: str, flag: str) -> str:
    try:
        return template.format_map(row)
    except (KeyError, IndexError, ValueError) as e:
        raise SourceError(f"{where}: {flag} template {template!r} cannot be filled from this "
                          f"line ({type(e).__name__}: {e})") from e


def _list_tsv(path: Path, image_root: Path | None) -> list[ImageItem]:
    root = image_root or path.parent
    items = []
    for line_no, line in numbered_lines(path, SourceError, universal_newlines=True):
        line = line.rstrip("\n").rstrip("\r")
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise SourceError(f"{path}:{line_no}: expected 'id<TAB>path', got {len(fields)} "
                              "tab-separated field(s)")
        if line_no == 1 and fields[0] in ("id", "image_id") and fields[1] == "path":
            continue  # header row
        if fields[1].startswith(("http://", "https://")):
            raise SourceError(f"{path}:{line_no}: the path is a URL: a TSV SOURCE is "
                              "'id<TAB>path' of files on disk (Google's CC3M file, "
                              "'caption<TAB>url', is not: download the images, e.g. with "
                              "img2dataset, and give its .tar shards)")
        items.append(ImageItem(fields[0], _resolve(fields[1], root), where=f"{path}:{line_no}"))
    return items


def tar_shards(source: str) -> list[Path]:
    """The ``.tar`` shards a SOURCE pattern names (one file, a glob, a brace range), sorted within
    each pattern; empty when none matches."""
    return [Path(p) for pattern in _expand_braces(source) for p in sorted(glob.glob(pattern))]


def missing_shards(source: str) -> list[str]:
    """The shards a brace range names one by one (no glob character in them) that do not exist."""
    return [p for p in _expand_braces(source) if not glob.has_magic(p) and not Path(p).exists()]


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
            if isinstance(e, tarfile.ReadError) and shard.stat().st_size < tarfile.BLOCKSIZE:
                # killed before its first header was written out (a 0-byte file): cut short,
                # like the shards below, not a wrong file; the other shards go on
                warnings.warn(f"{shard}: tar shard cut short before its first header "
                              f"({shard.stat().st_size} bytes); it is skipped", stacklevel=2)
                continue
            raise SourceError(f"{shard}: not an uncompressed .tar shard ({e})") from e
        chosen: dict[str, tuple[int, tarfile.TarInfo]] = {}  # key -> (extension rank, member)
        skipped: list[tuple[str, str]] = []  # (sample key, member name)
        with tar:
            try:
                for member in tar:
                    if not member.isfile():
                        continue
                    dirname, _, base = member.name.rpartition("/")
                    stem, _, ext = base.partition(".")
                    ext = ext.lower()
                    key = f"{dirname}/{stem}" if dirname else stem
                    if ext not in rank:
                        if ext.rpartition(".")[2] not in SIDECAR_EXTENSIONS:
                            skipped.append((key, base))
                        continue
                    if key not in chosen or rank[ext] < chosen[key][0]:
                        chosen[key] = (rank[ext], member)
                # tarfile ends its iteration silently at the end of the file or at a header cut
                # short or unreadable after the first one; only the end-of-archive marker (a zero
                # block, which every tar writer puts there) is a proper end.
                tar.fileobj.seek(tar.offset)
                block = tar.fileobj.read(tarfile.BLOCKSIZE)
                if len(block) < tarfile.BLOCKSIZE or block.strip(b"\0"):
                    raise tarfile.ReadError(f"no end-of-archive marker, or an unreadable member "
                                            f"header, at byte {tar.offset}")
            except (tarfile.TarError, EOFError) as e:
                # A shard cut short (a download or img2dataset run killed mid-write) ends in a
                # partial header or member. One such shard must not stop a run over hundreds: the
                # samples before the cut are kept (a member whose bytes are cut is recorded in
                # /failed when read), the loss is said here, naming the shard.
                warnings.warn(f"{shard}: tar shard cut short or corrupt after {len(chosen)} "
                              f"image sample(s) ({type(e).__name__}: {e}); the rest of it is "
                              "skipped", stacklevel=2)
        items += [ImageItem(key, str(shard), m.offset_data, m.size, where=f"{shard}:{m.name}")
                  for key, (_, m) in chosen.items()]
        # a sample's other members (x.seg.png beside x.jpg) are not images left out
        _say_skipped(shard, len(chosen), [base for key, base in skipped if key not in chosen])
    return items


def _say_skipped(where: Path, taken: int, skipped: list[str]) -> None:
    """A file with image content but an extension not read (an .mpo from a camera, an .apng)
    vanished without a word: every file left out that is not a known sidecar is counted."""
    if skipped:
        by_ext = collections.Counter(Path(n).suffix.lower() or "(none)" for n in skipped)
        kinds = ", ".join(f"{ext} x{n}" for ext, n in by_ext.most_common(5))
        warnings.warn(f"{where}: {taken} image(s) taken, {len(skipped)} file(s) skipped for their "
                      f"extension ({kinds}; e.g. {', '.join(skipped[:3])}); read are: "
                      f"{', '.join(IMAGE_EXTENSIONS)}", stacklevel=3)


def _unique(items: list[ImageItem], source: str) -> list[ImageItem]:
    """Drop exact repeats (same id and bytes: Localized Narratives lists an image once per
    narrative); the same id for different images is an error naming every clash (a count and
    the first few, with both places), not only the first one a run meets."""
    seen: dict[str, ImageItem] = {}
    out, clashes = [], []
    for item in items:
        first = seen.get(item.id)
        if first is None:
            seen[item.id] = item
            out.append(item)
        elif (first.path, first.offset) != (item.path, item.offset):
            clashes.append(f"{item.id!r} ({first.where} and {item.where})")
    if clashes:
        shown = "; ".join(clashes[:3]) + ("; ..." if len(clashes) > 3 else "")
        raise SourceError(f"SOURCE {source}: {len(clashes)} duplicate image id(s) for different "
                          f"images: {shown}")
    return out


# ---------------------------------------------------------------------------------------------
# Decoding


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB image for any PIL mode, as the encoder's own processor sees it.

    Transparency is composited onto white (what transformers' ``convert_to_rgb`` does); 16-bit
    images are scaled to 8 bits (PIL's ``convert`` would clip everything above 255 to white); CMYK,
    palette, grayscale and 1-bit go through PIL's conversion. EXIF orientation is not applied
    here: the callers apply :func:`upright` first, to decoded bytes (:meth:`Preprocess.open`) as
    to PIL images given to :meth:`babymerge.features.ImageEncoder.encode`, as the loaders the
    images come from do.
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose)
_EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                   4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                   6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                   8: Image.Transpose.ROTATE_90}
# where PIL finds an orientation again (getexif reads these)
_EXIF_INFO_KEYS = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1 = upright as stored); 1 when the EXIF block cannot be parsed, so a
    broken tag costs the rotation, not the image."""
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # malformed EXIF raises anything from SyntaxError to struct.error
        return 1


def upright(image: Image.Image) -> Image.Image:
    """``image`` as it is displayed: its EXIF orientation applied (and removed, so applying it
    twice is harmless), as ``datasets``' Image feature (how the BabyLM evaluation pipeline loads
    its images) and transformers' ``load_image`` decode it. A photo stored sideways with an EXIF
    rotation must not give another feature than the upright image the captions describe."""
    orientation = _orientation(image)
    if orientation == 1:
        return image
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        # exif_transpose writes the EXIF block back without the tag, and Pillow's writer has
        # raised TypeError, ZeroDivisionError, IndexError on real camera files (python-pillow
        # 4238, 7839, 8605): the picture is turned all the same, its metadata left behind so
        # that it is not turned twice.
        method = _EXIF_TRANSPOSE.get(orientation)
        if method is None:
            return image
        turned = image.transpose(method)
        turned.info = {k: v for k, v in turned.info.items() if k not in _EXIF_INFO_KEYS}
        return turned


@dataclass(frozen=True)
class Preprocess:
    """The encoder processor's geometry: resize the shortest edge, centre crop. Picklable, so each
    DataLoader worker holds a copy."""

    shortest_edge: int
    crop_height: int
    crop_width: int
    interpolation: str = "bicubic"
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Off by default: drafting changes the features (ExtractConfig.jpeg_draft says by how much).
    jpeg_draft: bool = False
    # Workers pass the JPEGs that :meth:`gpu_decodable` accepts on undecoded, for nvJPEG.
    defer_jpeg: bool = False

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) after the shortest-edge resize, rounded as transformers does."""
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.shortest_edge * long / short)
        return (new_long, self.shortest_edge) if width <= height else (self.shortest_edge, new_long)

    def _header(self, data: bytes) -> Image.Image:
        """The lazily opened image (header parsed, pixels not decoded) after the checks that need
        no decoding: empty, not an image, decompression bomb, extreme aspect ratio."""
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
        except (OSError, ValueError, SyntaxError, EOFError) as e:  # cut inside the header
            raise BadImage(f"truncated or corrupt ({type(e).__name__}: {e})") from e
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
        return image

    def open(self, data: bytes) -> Image.Image:
        """Decode ``data`` to an RGB PIL image or raise :class:`BadImage` with the reason."""
        image = self._header(data)
        if self.jpeg_draft and image.format == "JPEG":
            # DCT-domain downscaling by 1/2, 1/4 or 1/8 while decoding, never below the resize
            # target: halves decode time for large photos (the resize then does the rest).
            new_h, new_w = self.resized_size(*image.size)
            image.draft(None, (new_w, new_h))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image.load()
            return to_rgb(upright(image))
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise BadImage(f"truncated or corrupt ({type(e).__name__}: {e})") from e

    def gpu_decodable(self, data: bytes) -> tuple[int, int] | None:
        """(width, height) if ``data`` is a JPEG that nvJPEG decodes to the same picture as libjpeg,
        else None; :class:`BadImage` for what fails the header checks. Deferred: sequential (not
        progressive) YCbCr or grey JPEGs that end in the EOI marker and carry no EXIF rotation.
        Everything else stays on PIL in the worker: CMYK and Adobe-RGB JPEGs need PIL's colour
        handling, nvJPEG ignores EXIF orientation, and a file cut short
        must meet PIL's truncation check (nvJPEG may fill the missing rows with grey instead of
        failing). "The same picture" is not "the same bytes": nvJPEG's IDCT rounds differently
        and it upsamples 4:2:0 chroma by repetition where libjpeg interpolates ("fancy
        upsampling"), a mean of about one grey level, more at sharp colour edges."""
        image = self._header(data)
        if (image.format == "JPEG" and image.mode in ("RGB", "L")
                and not image.info.get("progressive") and image.info.get("adobe_transform") != 0
                and data[-64:].rstrip(b"\x00")[-2:] == b"\xff\xd9" and _orientation(image) == 1):
            return image.size
        return None

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """uint8 (3, crop_height, crop_width) of an RGB image: shortest-edge resize, centre crop."""
        # HWC memory viewed as NCHW is exactly channels_last, the layout torch's fast uint8
        # antialiased resize wants; it matches PIL's bicubic to within one grey level.
        return self.resize_crop(torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1))

    def resize_crop(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (3, H, W) on any device -> uint8 (3, crop_height, crop_width); a batch of images
        of one size (N, 3, H, W) -> (N, 3, crop_height, crop_width), each row exactly as if
        resized alone (the kernels compute every output pixel from its own image only)."""
        height, width = x.shape[-2:]
        new_h, new_w = self.resized_size(width, height)
        batched = x.dim() == 4
        if not batched:
            x = x.unsqueeze(0)
        if (new_h, new_w) != (height, width):
            if x.is_cuda:  # CUDA's antialiased resize takes floats only; round as the uint8 one
                x = F.interpolate(x.float(), size=(new_h, new_w), mode=self.interpolation,
                                  antialias=True, align_corners=False)
                x = x.round_().clamp_(0, 255).to(torch.uint8)
            else:
                x = F.interpolate(x, size=(new_h, new_w), mode=self.interpolation,
                                  antialias=True, align_corners=False)
        top, left = (new_h - self.crop_height) // 2, (new_w - self.crop_width) // 2
        x = x[:, :, top:top + self.crop_height, left:left + self.crop_width].contiguous()
        return x if batched else x[0]

    def __call__(self, data: bytes) -> torch.Tensor:
        return self.pixels(self.open(data))


class ImageDataset(torch.utils.data.Dataset):
    """``(index, payload or None, reason)`` per item, payload = uint8 crop (3, H, W) or, for a
    deferred JPEG, its :class:`JpegBytes`; a bad image never raises, it is reported."""

    def __init__(self, items: list[ImageItem], preprocess: Preprocess):
        self.items = items
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | JpegBytes | None, str]:
        item = self.items[index]
        try:
            data = item.read_bytes()
        except OSError as e:
            return index, None, f"{UNREADABLE} ({type(e).__name__}: {e.strerror or e})"
        try:
            if self.preprocess.defer_jpeg:
                size = self.preprocess.gpu_decodable(data)
                if size is not None:
                    return index, JpegBytes(data, *size), ""
            return index, self.preprocess(data), ""
        except BadImage as e:
            return index, None, str(e)
        except Exception as e:  # a decoder bug on one file must not stop a 600k-image run
            return index, None, f"decode error ({type(e).__name__}: {e})"


@dataclass(frozen=True)
class JpegBytes:
    """An undecoded JPEG and its size from the header. Plain bytes, not a tensor: a worker's batch
    travels pickled through its pipe, where every tensor would be a shared-memory file descriptor
    of its own (15 workers x 2 batches x 256 images in flight)."""

    data: bytes
    width: int
    height: int

    def tensor(self) -> torch.Tensor:
        """The bytes as the uint8 tensor ``decode_jpeg`` takes."""
        return torch.frombuffer(bytearray(self.data), dtype=torch.uint8)


@dataclass
class Batch:
    """What the loader yields: ``good`` indices with their ``pixels`` (stacked uint8 crops),
    ``jpegs`` indices with their undecoded bytes (``jpeg_bytes``), ``bad`` indices with
    ``reasons``. Batch order is kept within each list."""

    good: list[int]
    pixels: torch.Tensor | None
    jpegs: list[int]
    jpeg_bytes: list[JpegBytes]
    bad: list[int]
    reasons: list[str]

    def pin_memory(self) -> Batch:  # DataLoader(pin_memory=True) calls this on custom batches
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


def collate(batch: list[tuple[int, torch.Tensor | JpegBytes | None, str]]) -> Batch:
    good = [(i, x) for i, x, _ in batch if isinstance(x, torch.Tensor)]
    jpegs = [(i, x) for i, x, _ in batch if isinstance(x, JpegBytes)]
    bad = [(i, r) for i, x, r in batch if x is None]
    return Batch(good=[i for i, _ in good],
                 pixels=torch.stack([x for _, x in good]) if good else None,
                 jpegs=[i for i, _ in jpegs], jpeg_bytes=[x for _, x in jpegs],
                 bad=[i for i, _ in bad], reasons=[r for _, r in bad])


@functools.cache
def gpu_jpeg_decoder_available() -> bool:
    """torchvision with nvJPEG and a CUDA device (torchvision is optional: its wheels are tied to
    one torch build, and the CPU machines here cannot install one beside torch 2.13). Checked by
    decoding a tiny JPEG on the device once: a torchvision built without nvJPEG, or whose image
    extension fails to load, imports fine and then fails every decode, which would send every
    image through the slow one-by-one fallback."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return False
    if not torch.cuda.is_available():
        return False
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 60)).save(buf, "JPEG")
    try:
        decode_jpeg([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)],
                    mode=ImageReadMode.RGB, device="cuda")
    except (RuntimeError, OSError):
        return False
    return True


class GpuJpegDecoder:
    """Deferred JPEGs -> uint8 crops on the device: nvJPEG (``torchvision.io.decode_jpeg``) in
    batches, then the same resize and crop as the workers (:meth:`Preprocess.resize_crop`).

    Full-resolution decodes of a batch are resident at once, so a batch is split to keep them
    under ``max_batch_pixels`` (64 M pixels = 192 MB); the images of one size are then stacked
    and, on CUDA, resized in float32, so the peak is about 6x that (1.2 GB) for a chunk of one
    size. A batch that nvJPEG refuses is retried one image at a time, and an image it refuses
    goes through PIL on the CPU, which decodes it or gives the reason for ``/failed``. A JPEG whose
    data is corrupt but whole may still decode to garbage here where PIL would refuse it (the
    workers' check for truncation is kept: cut files are never deferred). Pixels differ from the
    workers' by the decoders' rounding (:meth:`Preprocess.gpu_decodable`); a feature file records
    which decoder made it (``decode_resolved`` in its ``config`` attribute).
    ``decode`` is injectable (signature of torchvision's) so the batching logic is testable
    without torchvision.
    """

    def __init__(self, preprocess: Preprocess, device: torch.device, decode=None,
                 max_batch_pixels: int = 64 * 2**20):
        if decode is None:
            from torchvision.io import ImageReadMode, decode_jpeg

            def decode(data, device):
                return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        self.preprocess = preprocess
        self.device = device
        self.decode = decode
        self.max_batch_pixels = max_batch_pixels

    def __call__(self, jpegs: list[JpegBytes]) -> list[torch.Tensor | str]:
        """One uint8 crop (3, H, W) on the device, or a failure reason, per JPEG, in order."""
        out: list[torch.Tensor | str] = []
        chunk: list[JpegBytes] = []
        pixels = 0
        for jpeg in jpegs:
            if chunk and pixels + jpeg.width * jpeg.height > self.max_batch_pixels:
                out += self._decode_chunk(chunk)
                chunk, pixels = [], 0
            chunk.append(jpeg)
            pixels += jpeg.width * jpeg.height
        if chunk:
            out += self._decode_chunk(chunk)
        return out

    def _decode_chunk(self, chunk: list[JpegBytes]) -> list[torch.Tensor | str]:
        try:
            images = self.decode([j.tensor() for j in chunk], device=self.device)
        except RuntimeError:
            return [self._decode_one(j) for j in chunk]
        out: list[torch.Tensor | str | None] = [None] * len(chunk)
        by_size: dict[tuple[int, int], list[int]] = {}
        for k, (image, jpeg) in enumerate(zip(images, chunk, strict=True)):
            try:
                self._check_shape(image, jpeg)
                by_size.setdefault((jpeg.height, jpeg.width), []).append(k)
            except BadImage:
                out[k] = self._on_cpu(jpeg)
        # Images of one size are resized and cropped as one batch: a handful of kernel launches
        # per size instead of ~6 per image, all issued from the main process. Shards often hold
        # one size (img2dataset resizes CC3M to 256x256), photo sets a few.
        for positions in by_size.values():
            group = [images[k] for k in positions]
            crops = self.preprocess.resize_crop(torch.stack(group) if len(group) > 1
                                                else group[0].unsqueeze(0))
            for k, crop in zip(positions, crops.unbind(0), strict=True):
                out[k] = crop
        return out

    def _decode_one(self, jpeg: JpegBytes) -> torch.Tensor | str:
        try:
            image = self.decode([jpeg.tensor()], device=self.device)[0]
            self._check_shape(image, jpeg)
        except (RuntimeError, BadImage):
            return self._on_cpu(jpeg)
        return self.preprocess.resize_crop(image)

    def _on_cpu(self, jpeg: JpegBytes) -> torch.Tensor | str:
        try:
            return self.preprocess(jpeg.data).to(self.device)
        except BadImage as e:
            return str(e)
        except Exception as e:  # as in the workers: one file never stops the run
            return f"decode error ({type(e).__name__}: {e})"

    @staticmethod
    def _check_shape(image: torch.Tensor, jpeg: JpegBytes) -> None:
        if tuple(image.shape) != (3, jpeg.height, jpeg.width):
            raise BadImage(f"decoder gave {tuple(image.shape)} for a {jpeg.width}x{jpeg.height} "
                           "JPEG")
