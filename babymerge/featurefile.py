"""The feature file contract (``../shared/DESIGN.md``): names and the read side used by train/eval.

The writer lives in :mod:`babymerge.features`; everything that reads features goes through
:class:`FeatureTable`, so the layout is known in one place.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import torch

from babymerge.config import InputError

FEATURES = "features"
IDS = "ids"
BLACK = "black"
FAILED = "failed"  # group: ids (str), reasons (str)
LAYER = -2
POOLING = "mean_patch"
STR_DTYPE = h5py.string_dtype("utf-8")


class FeatureFileError(InputError):
    """A feature file that is missing, incomplete, or does not match what the caller needs."""


@contextmanager
def reading(path: str | Path) -> Iterator[None]:
    """Reads of the feature file ``path`` inside: an error HDF5 raises there means damaged bytes.

    Which error depends on the structure the damage hits (512 random bytes at 1%, 80% and 95% of
    a file gave RuntimeError, OSError and KeyError), and none names the file; no rerun repairs
    it, so the message says what will. Only errors raised inside h5py are turned, so a failed
    allocation stays itself; writes to another file must stay outside (a full disk is not damage).
    """
    try:
        yield
    except (OSError, KeyError, RuntimeError) as e:
        if not _raised_in_h5py(e):
            raise
        raise FeatureFileError(f"{path}: damaged, HDF5 cannot read it ({e}); its bytes changed "
                               "after it was written (a copy cut short, a bad disk) and no rerun "
                               "repairs it: copy it again from where it was made, or extract the "
                               "images again into a new --out") from e


def _raised_in_h5py(e: BaseException) -> bool:
    tb = e.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return "h5py" in Path(tb.tb_frame.f_code.co_filename).parts


def decode_strings(values) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


class FeatureTable:
    """The features of one file (fp16 by default), looked up by image id or row.

    At the paper's scale (~600k images x 1024 x 2 bytes = 1.2 GB) they fit in RAM, and in-memory
    gathers keep the training loader far ahead of the GPU (HDF5 random batch reads are 2-90 ms).
    A file larger than ``max_memory_bytes`` is read out of core instead: the file stays open
    and :meth:`gather` reads each batch's rows from it, sorted, in one read.
    """

    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float16,
                 require_complete: bool = True, load_features: bool = True,
                 max_memory_bytes: int | None = None):
        """``load_features=False`` reads only ``/black`` and the attrs (a text-only LM needs no
        image rows; the table is then empty). ``max_memory_bytes``: rows needing more (in
        ``dtype``) stay in the file (``features`` is then None; use :meth:`gather`); None: always
        in memory."""
        path = Path(path)
        if not path.is_file():
            raise FeatureFileError(f"feature file not found: {path}")
        self._file = None
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise FeatureFileError(f"{path}: not a readable HDF5 file ({e})") from e
        try:
            with reading(path):
                for name in (FEATURES, IDS, BLACK):
                    if name not in f:
                        raise FeatureFileError(f"{path}: missing /{name}; not a babymerge "
                                               "feature file")
                if require_complete and not bool(f.attrs.get("complete", False)):
                    raise FeatureFileError(f"{path}: extraction did not finish (attr complete is "
                                           "not true); re-run `babymerge extract-features` to "
                                           "complete it")
                n = int(f.attrs.get("count", f[IDS].shape[0])) if load_features else 0
                self.ids: list[str] = decode_strings(f[IDS][:n])
                self.black = torch.from_numpy(np.asarray(f[BLACK][:])).to(dtype)
                need = n * int(np.prod(f[FEATURES].shape[1:])) * self.black.element_size()
                self.in_memory = max_memory_bytes is None or need <= max_memory_bytes
                if not self.in_memory:
                    self.features = None
                    self._file, self._rows = f, f[FEATURES]
                else:
                    self.features = (torch.from_numpy(np.asarray(f[FEATURES][:n])).to(dtype)
                                     if load_features
                                     else self.black.new_empty((0, self.black.shape[0])))
                self.failed: dict[str, str] = {}
                if FAILED in f:
                    g = f[FAILED]
                    self.failed = dict(zip(decode_strings(g["ids"][:]),
                                           decode_strings(g["reasons"][:])))
                self.attrs = {k: (v.item() if hasattr(v, "item") else v)
                              for k, v in f.attrs.items()}
        finally:
            if self._file is None:
                f.close()
        self.path = path
        self.dtype = dtype
        self.row = {image_id: i for i, image_id in enumerate(self.ids)}
        self.dim = (int(self._rows.shape[1]) if self.features is None
                    else int(self.features.shape[1]) if self.features.ndim == 2
                    else int(self.black.shape[0]))
        try:
            self._validate()
        except FeatureFileError:
            self.close()
            raise

    def _validate(self) -> None:
        """Unique ids, and finite values in /black and (held in memory) /features."""
        path = self.path
        if len(self.row) != len(self.ids):
            # a caption's image would be whichever row came last: refuse instead of guessing
            seen: set[str] = set()
            dupes = sorted({i for i in self.ids if i in seen or seen.add(i)})
            raise FeatureFileError(f"{path}: {len(dupes)} image id(s) stored twice in /{IDS} "
                                   f"({', '.join(map(repr, dupes[:5]))}); not a file "
                                   "extract-features or join-features wrote")
        if not torch.isfinite(self.black).all():
            raise FeatureFileError(f"{path}: /{BLACK} holds NaN or infinite values")
        if self.features is not None:
            self._check_finite(torch.arange(len(self.features)), self.features)

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.row

    def rows(self, image_ids: list[str]) -> torch.Tensor:
        """Row indices of ``image_ids``; unknown ids are one error listing how many and which."""
        missing = [i for i in image_ids if i not in self.row]
        if missing:
            shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise FeatureFileError(f"{len(missing)} image id(s) not in {self.path}: {shown}")
        return torch.tensor([self.row[i] for i in image_ids], dtype=torch.long)

    def lookup(self, image_ids: list[str]) -> torch.Tensor:
        """Features of ``image_ids``, shape (len, D)."""
        return self.gather(self.rows(image_ids))

    def gather(self, rows: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Features of the 1-D row indices ``rows``, in their order, shape (len, D), ``dtype``.

        Out of core: the unique rows are read in increasing order (each HDF5 chunk is visited
        once), then put back in order; the result equals the in-memory gather.
        """
        if self.features is not None:
            return self.features[torch.as_tensor(rows, dtype=torch.long)]
        unique, inverse = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
        with reading(self.path):
            if len(unique) == 0:
                block = np.empty((0, self.dim), dtype=self._rows.dtype)
            elif self._rows.chunks is None:
                # Contiguous or virtual (what extract-features writes): one fancy read is
                # fastest, 0.4 ms for 32 random rows of a 20k x 1024 fp16 file in the page cache.
                block = self._rows[unique]
            else:
                # HDF5's selection code is slow on chunked data (32 rows: 2.0 ms as one fancy
                # read, 0.24 ms row by row); rows sharing a chunk come in a row, so the chunk
                # cache serves them from one chunk read.
                block = np.stack([self._rows[int(r)] for r in unique])
        rows = torch.from_numpy(block).to(self.dtype)
        self._check_finite(torch.from_numpy(unique), rows)
        return rows[torch.from_numpy(inverse.reshape(-1))]

    def _check_finite(self, rows: torch.Tensor, features: torch.Tensor) -> None:
        """Refuse feature rows holding NaN or infinity, naming their ids: one such row silently
        changes a score, one such column made a whole trained model NaN."""
        bad = rows[~torch.isfinite(features).all(dim=1)].tolist() if len(features) else []
        if bad:
            shown = ", ".join(repr(self.ids[r]) for r in bad[:5]) + (" ..." if len(bad) > 5
                                                                       else "")
            raise FeatureFileError(f"{self.path}: {len(bad)} feature row(s) hold NaN or infinite "
                                   f"values (ids {shown}); extract those images again")

    def close(self) -> None:
        """Close the file held open out of core (no-op in memory)."""
        if self._file is not None:
            self._file.close()
            self._file = None


def feature_statistics(path: str | Path, chunk_rows: int = 65536
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std (fp32, float64 sums) of ``/features``, read in row chunks so a
    file larger than memory costs one sequential pass."""
    with h5py.File(path, "r") as f, reading(path):
        n = int(f.attrs.get("count", f[IDS].shape[0]))
        if n == 0:
            raise FeatureFileError(f"{path}: no feature rows to take statistics of")
        dim = f[FEATURES].shape[1]
        total = np.zeros(dim, np.float64)
        squares = np.zeros(dim, np.float64)
        for start in range(0, n, chunk_rows):
            block = np.asarray(f[FEATURES][start:min(start + chunk_rows, n)], dtype=np.float64)
            total += block.sum(0)
            squares += np.square(block).sum(0)
    mean = total / n
    var = np.maximum(squares / n - np.square(mean), 0.0)
    return torch.from_numpy(mean).float(), torch.from_numpy(np.sqrt(var)).float()
