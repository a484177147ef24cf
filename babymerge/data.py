"""Stage 2b: training data. Corpora tokenised once into a memory-mapped cache, packed into
fixed-length sequences; captions joined to feature rows; the epoch plan that orders batches.

Every training sequence is ``[BOS, <image>] + tokens``: packed text carries the ``/black`` feature,
a caption ``[BOS, <image>] + caption + [EOS]`` its image's feature. A batch is all text or all
captions (captions are short; padding them to a packed text length would waste most of the step).

The plan is a pure function of (seed, epoch), so a resumed run rebuilds the same batches from its
saved position, and every rank of a DDP run sees the same global order and takes its share of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from babymerge.config import InputError, atomic_write_text
from babymerge.featurefile import FeatureTable
from babymerge.model import image_prefix_ids
from babymerge.textfiles import numbered_lines
from babymerge.tokenizer import iter_lines, normalize_text, word_start_mask

# 2: files read anew (a byte-order mark is no part of the first id or text line; null
# captions are errors), so entries cached by the old reader are not reused
CACHE_FORMAT = 2
ENCODE_CHUNK_LINES = 20_000
ORDERS = ("mixed", "multimodal-first", "text-first")
TEXT, CAPTIONS = 0, 1  # batch sources
IGNORE_INDEX = -100


class DataError(InputError):
    """Unusable training data; the message names the file (and line) at fault."""


# ---------------------------------------------------------------------------------------------
# Tokenised-file cache
# ---------------------------------------------------------------------------------------------

@dataclass
class TokenizedFile:
    """One source file tokenised: ``tokens[offsets[i]:offsets[i+1]]`` is document ``i``.

    Text documents (lines) end with EOS, so the token array is the packing stream itself;
    captions have no EOS and carry their image ``ids``. Arrays are memory-mapped from the cache.
    """

    path: Path
    tokens: np.ndarray
    offsets: np.ndarray
    ids: list[str] | None
    meta: dict


# Text whose ids show how a tokenizer normalises and splits, beyond its vocabulary and merges
# (transformers rebuilds our Llama tokenizers from those two, and tokenizer_config.json's
# add_prefix_space, legacy or another transformers release change the rest): a first word
# (prefixed with "▁" or not), runs of spaces, a tab, punctuation, case, digits, composed and
# decomposed accents, and characters outside any small vocabulary (byte fallback or <unk>).
_FINGERPRINT_PROBE = 'Hello world,  the CAT\'s 3.5 dogs\tran-away! "Naïve" cafe\u0301 日本 🙂'


def _encoder(tokenizer):
    """A copy of the tokenizer's backend as the token cache encodes with: "<image>" in text is
    plain characters (a corpus line must never produce a second image token: the model takes
    exactly one per sequence), no padding or truncation (transformers leaves either set on the
    backend after a call that asked for it)."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.encode_special_tokens = True
    backend.no_padding()
    backend.no_truncation()
    return backend


def tokenizer_fingerprint(tokenizer, encoder=None) -> str:
    """A hash of what the token cache and a resumed run's batches depend on: the vocabulary, the
    merges, the added and special tokens, and the ids of a probe text (how the normaliser and
    pre-tokenizer split it). Not the whole serialised tokenizer: it carries runtime state
    (truncation and padding) and fields that tokenizers releases add, and a resumed run or a
    token cache must not be refused or redone for either. ``encoder``: :func:`_encoder`'s copy,
    when the caller has one."""
    if encoder is None:
        encoder = _encoder(tokenizer)
    spec = json.loads(encoder.to_str())
    content = {"vocab": spec["model"].get("vocab"),  # a dict (BPE, WordPiece) or a list (Unigram)
               "merges": spec["model"].get("merges", []),
               "added": sorted((t["id"], t["content"]) for t in spec.get("added_tokens", [])),
               "special": [tokenizer.bos_token_id, tokenizer.eos_token_id,
                           tokenizer.pad_token_id, tokenizer.unk_token_id],
               "probe": encoder.encode(_FINGERPRINT_PROBE, add_special_tokens=False).ids}
    return hashlib.sha256(json.dumps(content, ensure_ascii=False, sort_keys=True).encode()
                          ).hexdigest()[:16]


def _cache_key(path: Path, kind: str, fingerprint: str) -> str:
    st = path.stat()
    key = json.dumps([CACHE_FORMAT, str(path.resolve()), st.st_size, st.st_mtime_ns, kind,
                      fingerprint])
    return f"{path.stem}-{kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _text_documents(path: Path):
    """(None, text) of the non-blank lines (text documents have no image id)."""
    for text in iter_lines([path], DataError):
        yield None, text


def _caption_documents(path: Path, skipped: Counter):
    """(image id, caption) from jsonl (``image_id``, ``caption``) or TSV
    (``id<TAB>caption``); the format is chosen by the suffix (.jsonl/.json, else TSV)."""
    is_json = path.suffix in (".jsonl", ".json")
    for lineno, line in numbered_lines(path, DataError):
        line = line.rstrip("\r\n")
        # only the line end is cut: stripping the line would take the tab of an empty
        # TSV caption ("id<TAB>") with it and stop the run on a malformed-line error
        if not line.strip():
            continue
        if is_json:
            try:
                rec = json.loads(line)
                image_id, caption = str(rec["image_id"]), rec["caption"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{lineno}: expected a JSON object with image_id and "
                                f"caption ({e!r})") from e
            # str() would turn a null or a list into text ("None") and train on it
            if not isinstance(caption, str):
                raise DataError(f"{path}:{lineno}: caption must be a string, got "
                                f"{json.dumps(caption)[:80]}")
        else:
            if "\t" not in line:
                raise DataError(f"{path}:{lineno}: expected 'id<TAB>caption'")
            image_id, caption = line.split("\t", 1)
        caption = normalize_text(caption)  # a str: checked above (jsonl), split (TSV)
        if not caption:
            skipped["empty caption"] += 1
            continue
        yield image_id.strip(), caption


def tokenize_file(path: str | Path, tokenizer, cache_dir: str | Path, kind: str = "text",
                  progress: bool = True) -> TokenizedFile:
    """Tokenise ``path`` once (``kind`` text or captions) and memory-map it from ``cache_dir``.

    The cache key covers the file's path, size and mtime and the tokenizer, so an edited file or
    another tokenizer gets a fresh entry. The meta JSON is written last: an entry without it is an
    interrupted write and is redone.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{kind} file not found: {path}")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    encoder = _encoder(tokenizer)
    fingerprint = tokenizer_fingerprint(tokenizer, encoder)
    key = _cache_key(path, kind, fingerprint)
    meta_path = cache_dir / f"{key}.json"
    if not meta_path.is_file():
        _write_cache(path, tokenizer, encoder, fingerprint, cache_dir, key, kind, progress)
    meta = json.loads(meta_path.read_text())
    ids = json.loads((cache_dir / f"{key}.ids.json").read_text()) if kind == "captions" else None
    return TokenizedFile(path=path, tokens=np.load(cache_dir / f"{key}.tokens.npy", mmap_mode="r"),
                         offsets=np.load(cache_dir / f"{key}.offsets.npy", mmap_mode="r"),
                         ids=ids, meta=meta)


def _write_cache(path: Path, tokenizer, backend, fingerprint: str, cache_dir: Path, key: str,
                 kind: str, progress: bool) -> None:
    """Tokenise ``path`` with ``backend`` (:func:`_encoder`) into the cache entry ``key``."""
    eos = tokenizer.eos_token_id
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    skipped: Counter = Counter()
    docs = (_text_documents(path) if kind == "text" else _caption_documents(path, skipped))
    chunks, lengths, ids = [], [], []
    batch: list[str] = []

    def flush() -> None:
        # encode_batch_fast skips character offsets: twice as fast, and ids are all we keep
        for enc in backend.encode_batch_fast(batch, add_special_tokens=False):
            toks = enc.ids + [eos] if kind == "text" else enc.ids
            chunks.append(np.asarray(toks, dtype=dtype))
            lengths.append(len(toks))
        batch.clear()

    bar = tqdm(total=path.stat().st_size, unit="B", unit_scale=True, disable=not progress,
               desc=f"tokenise {path.name}")
    done = 0
    for image_id, text in docs:
        batch.append(text)
        if image_id is not None:
            ids.append(image_id)
        done += len(text) + 1
        if len(batch) >= ENCODE_CHUNK_LINES:
            flush()
            bar.update(done - bar.n)
    flush()
    bar.update(bar.total - bar.n)
    bar.close()
    if not lengths:
        raise DataError(f"{path}: no {'text' if kind == 'text' else 'captions'} in it "
                        "(every line is blank)")
    tokens = np.concatenate(chunks)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    _atomic_save_npy(cache_dir / f"{key}.tokens.npy", tokens)
    _atomic_save_npy(cache_dir / f"{key}.offsets.npy", offsets)
    if kind == "captions":
        atomic_write_text(cache_dir / f"{key}.ids.json", json.dumps(ids))
    meta = {"source": str(path.resolve()), "kind": kind, "documents": len(lengths),
            "tokens": int(tokens.size), "skipped": dict(skipped),
            "tokenizer": fingerprint, "format": CACHE_FORMAT}
    atomic_write_text(cache_dir / f"{key}.json", json.dumps(meta, indent=1))


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Datasets: packed text and captions joined to features
# ---------------------------------------------------------------------------------------------

class PackedText:
    """Text files as one stream cut into sequences of ``seq_len``: ``[BOS, <image>]`` + the next
    ``seq_len - 2`` stream tokens (documents end with EOS; a trailing partial chunk is dropped)."""

    def __init__(self, files: list[TokenizedFile], tokenizer, seq_len: int):
        if seq_len < 4:
            raise DataError(f"--seq-len {seq_len} is too short (the prefix alone takes 2 tokens)")
        self.files = files
        self.prefix = image_prefix_ids(tokenizer)
        self.chunk = seq_len - len(self.prefix)
        self.seq_len = seq_len
        self.starts = np.cumsum([0] + [f.tokens.size for f in files])  # file boundaries
        self.n = int(self.starts[-1] // self.chunk)
        self.words = self._count_words(word_start_mask(tokenizer))
        self.lengths = np.full(self.n, seq_len, dtype=np.int64)

    def __len__(self) -> int:
        return self.n

    def _stream(self, start: int, stop: int) -> np.ndarray:
        """Stream tokens ``[start, stop)`` across file boundaries."""
        parts = []
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            f_end = int(self.starts[i + 1])
            take = min(stop, f_end) - start
            local = start - int(self.starts[i])
            parts.append(self.files[i].tokens[local:local + take])
            start += take
            i += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _count_words(self, is_word: np.ndarray, block: int = 1 << 16) -> np.ndarray:
        words = np.empty(self.n, dtype=np.int64)
        for b in range(0, self.n, block):
            e = min(self.n, b + block)
            toks = self._stream(b * self.chunk, e * self.chunk).reshape(e - b, self.chunk)
            words[b:e] = is_word[toks].sum(axis=1)
        return words

    def batch(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        out = np.empty((len(index), self.seq_len), dtype=np.int64)
        out[:, :len(self.prefix)] = self.prefix
        for row, i in enumerate(index):
            out[row, len(self.prefix):] = self._stream(int(i) * self.chunk,
                                                       (int(i) + 1) * self.chunk)
        input_ids = torch.from_numpy(out)
        labels = input_ids.clone()
        labels[:, :len(self.prefix)] = IGNORE_INDEX  # BOS and <image> are given, never predicted
        return {"input_ids": input_ids, "labels": labels}


class CaptionSet:
    """Captions whose image is in the feature table; the rest are counted and skipped.

    ``skipped`` counts, by reason, the captions left out (image not in the file, image in
    ``/failed``, empty caption); a warning reports them, and no usable caption is an error.
    Sample ``i`` is ``[BOS, <image>] + caption + [EOS]`` (cut to ``seq_len``) with feature row
    ``rows[i]``; ``truncated`` counts the captions cut and their tokens dropped (warned too), and
    ``words`` counts only the words kept.
    """

    def __init__(self, files: list[TokenizedFile], tokenizer, seq_len: int, table: FeatureTable):
        self.files = files
        self.prefix = image_prefix_ids(tokenizer)
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id
        self.seq_len = seq_len
        self.table = table
        is_word = word_start_mask(tokenizer)
        self.skipped: Counter = Counter()
        keep_file, keep_doc, rows, absent = [], [], [], []
        for k, tf in enumerate(files):
            self.skipped.update(tf.meta.get("skipped", {}))
            for j, image_id in enumerate(tf.ids):
                row = table.row.get(image_id)
                if row is None:
                    failed = image_id in table.failed
                    if not failed and len(absent) < 3:
                        absent.append(image_id)
                    reason = ("image failed in feature extraction" if failed
                              else "image id not in feature file")
                    self.skipped[reason] += 1
                    continue
                keep_file.append(k)
                keep_doc.append(j)
                rows.append(row)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.file = np.asarray(keep_file, dtype=np.int64)
        self.doc = np.asarray(keep_doc, dtype=np.int64)
        names = ", ".join(str(f.path) for f in files)
        # Examples of both sides, so an id format mismatch (zero padding, a dataset prefix, a
        # file extension) shows at once rather than as a count of skipped captions.
        examples = ("" if not absent else
                    f" (e.g. caption ids {', '.join(map(repr, absent))}; the feature file's ids "
                    f"look like {', '.join(map(repr, table.ids[:3]))})")
        if self.skipped:
            detail = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
            warnings.warn(f"captions skipped ({names}): {detail}; {len(self.rows)} kept"
                          f"{examples}", stacklevel=2)
        if len(self.rows) == 0:
            raise DataError(f"no usable caption in {names}: none of their image ids is in the "
                            f"feature file {table.path} ({dict(self.skipped)}){examples}")
        self.words = np.zeros(len(self.rows), dtype=np.int64)
        self.sizes = np.zeros(len(self.rows), dtype=np.int64)  # caption tokens
        for k, tf in enumerate(files):
            sel = self.file == k
            docs = self.doc[sel]
            # words per caption: word-start tokens summed per document (reduceat needs non-empty
            # segments, which captions are: empty ones were skipped when tokenising)
            per_doc = np.add.reduceat(is_word[tf.tokens], tf.offsets[:-1])
            self.words[sel] = per_doc[docs]
            self.sizes[sel] = (tf.offsets[1:] - tf.offsets[:-1])[docs]
        # prefix + caption + EOS, cut to seq_len
        self.lengths = np.minimum(self.sizes + len(self.prefix) + 1, seq_len)
        # A cut caption's dropped words are never trained on: they must not count towards the
        # word budget and checkpoint schedule. Cut captions are few, so a loop over them is cheap.
        room = seq_len - len(self.prefix)
        cut = np.flatnonzero(self.sizes > room)
        for i in cut:
            tf = self.files[int(self.file[i])]
            start = int(tf.offsets[self.doc[i]])
            self.words[i] = int(is_word[tf.tokens[start:start + room]].sum())
        self.truncated = {"captions": int(cut.size),
                          "tokens": int((self.sizes[cut] - room).sum())}
        if cut.size:
            warnings.warn(f"{cut.size} caption{'s' if cut.size != 1 else ''} longer than "
                          f"--seq-len {seq_len} cut ({names}): {self.truncated['tokens']} tokens "
                          f"dropped, the longest has {int(self.sizes.max())} tokens",
                          stacklevel=2)

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``/``labels`` and the images' ``features`` (B, D).

        Vectorised gathers from the memory-mapped tokens (no per-caption Python loop), so the
        loader stays far below the step time at the paper's batch sizes.
        """
        index = np.asarray(index)
        p = len(self.prefix)
        lengths = self.lengths[index]
        width = int(lengths.max())
        kept = np.minimum(self.sizes[index], self.seq_len - p)  # caption tokens that fit
        cols = np.arange(width - p)
        body = np.full((len(index), width - p), self.pad, dtype=np.int64)
        files, docs = self.file[index], self.doc[index]
        for k in np.unique(files):
            sel = files == k
            tf = self.files[int(k)]
            starts = tf.offsets[docs[sel]]
            gather = starts[:, None] + np.minimum(cols[None, :], kept[sel, None] - 1)
            body[sel] = np.where(cols[None, :] < kept[sel, None], tf.tokens[gather], self.pad)
        has_eos = self.sizes[index] + p + 1 <= self.seq_len
        body[np.flatnonzero(has_eos), kept[has_eos]] = self.eos
        out = np.concatenate([np.broadcast_to(np.asarray(self.prefix, dtype=np.int64),
                                              (len(index), p)), body], axis=1)
        labels = np.where(np.arange(width)[None, :] < lengths[:, None], out, IGNORE_INDEX)
        labels[:, :p] = IGNORE_INDEX  # BOS and <image> are given, never predicted
        rows = torch.from_numpy(self.rows[index])
        return {"input_ids": torch.from_numpy(out), "labels": torch.from_numpy(labels),
                "features": self.table.gather(rows)}


def load_text(paths: list[Path], tokenizer, cache_dir: Path, seq_len: int,
              progress: bool = True) -> PackedText:
    files = [tokenize_file(p, tokenizer, cache_dir, "text", progress) for p in paths]
    packed = PackedText(files, tokenizer, seq_len)
    if len(packed) == 0:
        total = int(packed.starts[-1])
        raise DataError(f"text corpus too small: {total} tokens in {', '.join(map(str, paths))} "
                        f"make no sequence of --seq-len {seq_len}")
    return packed


def load_captions(paths: list[Path], tokenizer, cache_dir: Path, seq_len: int,
                  table: FeatureTable, progress: bool = True) -> CaptionSet:
    files = [tokenize_file(p, tokenizer, cache_dir, "captions", progress) for p in paths]
    return CaptionSet(files, tokenizer, seq_len, table)


# ---------------------------------------------------------------------------------------------
# The plan: which batches, in which order, for every epoch
# ---------------------------------------------------------------------------------------------

class EpochPlan:
    """Batches of every epoch, a pure function of (seed, epoch).

    ``order`` decides the VLM's curriculum over the whole run: ``mixed`` shuffles text and caption
    batches together in every epoch; ``multimodal-first`` runs all caption epochs, then all text
    epochs; ``text-first`` the reverse. A step consumes ``per_step = grad_accum * world_size``
    batches; the tail of an epoch that fills no step is dropped.
    """

    def __init__(self, sources: dict[int, PackedText | CaptionSet], batch_size: int, epochs: int,
                 order: str, per_step: int, seed: int):
        if order not in ORDERS:
            raise DataError(f"--order must be one of {', '.join(ORDERS)}, got {order!r}")
        self.sources = sources
        self.batch_size = batch_size
        self.per_step = per_step
        self.seed = seed
        present = sorted(sources)
        if order == "mixed" or len(present) == 1:
            self.phases = [tuple(present)] * epochs
        else:
            first, second = ((CAPTIONS, TEXT) if order == "multimodal-first" else (TEXT, CAPTIONS))
            self.phases = [(first,)] * epochs + [(second,)] * epochs
        for src, ds in sources.items():
            if len(ds) < batch_size:
                name = "text sequences" if src == TEXT else "captions"
                raise DataError(f"only {len(ds)} {name} for --batch-size {batch_size}")
        self.steps = [self._n_batches(p) // per_step for p in self.phases]
        if sum(self.steps) == 0:
            raise DataError(f"an epoch holds fewer batches than one optimizer step needs "
                            f"({per_step} = grad accumulation x world size); lower --batch-size "
                            "or --grad-accum, or add data")

    def _n_batches(self, phase: tuple[int, ...]) -> int:
        return sum(len(self.sources[s]) // self.batch_size for s in phase)

    @property
    def epochs(self) -> int:
        return len(self.phases)

    @property
    def total_steps(self) -> int:
        return sum(self.steps)

    def batches(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """The global batch list of ``epoch`` (every rank computes the same one)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        out: list[tuple[int, np.ndarray]] = []
        for src in self.phases[epoch]:
            n = len(self.sources[src]) // self.batch_size * self.batch_size
            perm = torch.randperm(len(self.sources[src]), generator=g).numpy()[:n]
            out += [(src, b) for b in perm.reshape(-1, self.batch_size)]
        if len(self.phases[epoch]) > 1:
            out = [out[i] for i in torch.randperm(len(out), generator=g).tolist()]
        return out[:self.steps[epoch] * self.per_step]

    def step_batches(self, batches: list, step: int, rank: int, world: int, accum: int) -> list:
        """The micro-batches ``rank`` runs in ``step`` of an epoch's batch list."""
        base = step * self.per_step
        return [batches[base + a * world + rank] for a in range(accum)]

    def step_counts(self, batches: list) -> tuple[np.ndarray, np.ndarray]:
        """(words, tokens) consumed by each step of an epoch, summed over all ranks."""
        words = np.array([int(self.sources[s].words[i].sum()) for s, i in batches], dtype=np.int64)
        tokens = np.array([int(self.sources[s].lengths[i].sum()) for s, i in batches],
                          dtype=np.int64)
        return (words.reshape(-1, self.per_step).sum(1), tokens.reshape(-1, self.per_step).sum(1))
