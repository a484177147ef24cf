"""Stage 2a: the BPE tokenizer (BERT pre-tokenizer, ``<image>`` token), saved as a Llama tokenizer.

Training splits text the way BERT's pre-tokenizer does (on whitespace, and every punctuation
character on its own), with a ``▁`` marking each space as in Llama/SentencePiece so that decoding
restores the text. Merges therefore never cross a word or punctuation boundary, and the result is
saved as transformers' Llama tokenizer (BPE + ``▁`` spaces, no byte-level), which
``AutoTokenizer.from_pretrained(dir)`` rebuilds from the vocabulary and merges alone. Because no
merge spans a BERT boundary, that rebuilt tokenizer segments text exactly as the trained pipeline
does (a test checks it on a corpus).

Conventions the rest of babymerge relies on:

- ``tokenizer(text)`` prepends BOS (Llama's ``add_bos_token``), so the evaluation pipeline's
  ``"<image> " + sentence`` encodes as ``[BOS, <image>] + ids(sentence)``, the training layout.
- ``normalize_text`` is applied to every training line: runs of whitespace become one space, since
  the Llama tokenizer has no token for a newline or tab.
- A token starting with ``▁`` starts a whitespace-separated word: word counts (BabyLM's budget and
  checkpoint schedule) are counted from token ids with :func:`word_start_mask`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from babymerge.config import InputError, arg, atomic_write_text, opt, output_folder, save_config
from babymerge.model import IMAGE_TOKEN
from babymerge.textfiles import numbered_lines

log = logging.getLogger(__name__)

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, IMAGE_TOKEN]  # ids 0..4, in this order
# Llama's byte fallback: a character outside the learned alphabet is spelled in UTF-8 bytes, so no
# text ever becomes <unk> and decoding restores it (ids 5..260).
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]
SPACE = "▁"  # U+2581, Llama's space marker; not whitespace or punctuation, so BERT keeps it


class TokenizerError(InputError):
    """A corpus or tokenizer directory babymerge cannot use; the message names it."""


@dataclass
class TokenizerConfig:
    """``babymerge tokenizer CORPUS... --out DIR``."""

    corpus: list[Path] = arg([], help="plain text files, one document per line (BabyLM style)")
    out: Path = opt(Path("run/tokenizer"), help="output directory (HF tokenizer files)")
    vocab_size: int = opt(30_000, help="vocabulary size, special tokens included (paper: 30,000)")
    min_frequency: int = opt(2, help="a merge must occur at least this often")
    limit_alphabet: int = opt(1000, help="keep at most this many initial characters")
    ratio_lines: int = opt(200_000, help="lines read to measure the word-to-subword ratio")
    progress: bool = opt(True, help="show the trainer's progress bar")

    def __post_init__(self) -> None:
        if not self.corpus:
            raise ValueError("CORPUS: give at least one text file")
        for path in self.corpus:
            if not Path(path).is_file():
                raise ValueError(f"CORPUS: not a file: {path}")
        reserved = len(SPECIAL_TOKENS) + len(BYTE_TOKENS)
        if self.vocab_size <= reserved:
            raise ValueError(f"--vocab-size must exceed {reserved} (special and byte tokens)")


def normalize_text(line: str) -> str:
    """One space between words, none at the ends (the form every training line is fed in)."""
    return " ".join(line.split())


def iter_lines(paths: Iterable[Path], error: type[Exception] = TokenizerError) -> Iterator[str]:
    """Non-empty normalised lines of the text files, in order; a line that is not UTF-8 raises
    ``error`` naming the file and line (the training data reader passes its own error type)."""
    for path in paths:
        for _, line in numbered_lines(path, error):
            text = normalize_text(line)
            if text:
                yield text


def bert_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Spaces become ``▁`` (kept on the word they precede), then BERT's split: whitespace and
    each punctuation character. The BPE merges are learned within these pieces."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=True),
        pre_tokenizers.BertPreTokenizer(),
    ])


def _pipeline(vocab_size: int, min_frequency: int, limit_alphabet: int, progress: bool
              ) -> tuple[Tokenizer, trainers.BpeTrainer]:
    # byte_fallback/fuse_unk as in transformers' LlamaTokenizer, which rebuilds this model.
    tok = Tokenizer(models.BPE(unk_token=UNK, fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = bert_pre_tokenizer()
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=SPECIAL_TOKENS + BYTE_TOKENS,
                                  limit_alphabet=limit_alphabet,
                                  show_progress=progress)
    return tok, trainer


def train_tokenizer(cfg: TokenizerConfig) -> dict:
    """Train on ``cfg.corpus``, save to ``cfg.out``; returns vocabulary size and the ratio."""
    from transformers import LlamaTokenizer

    output_folder(cfg.out)  # before the training: a bad --out fails at once
    tok, trainer = _pipeline(cfg.vocab_size, cfg.min_frequency, cfg.limit_alphabet,
                             cfg.progress)
    lines = iter_lines(cfg.corpus)
    first = next(lines, None)
    if first is None:
        raise TokenizerError("corpus is empty (no non-blank line): "
                             f"{', '.join(map(str, cfg.corpus))}")
    tok.train_from_iterator(_chain(first, lines), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    # <image> as a NAMED special token (tok.image_token, tok.image_token_id, as Llava processors
    # expect it), and written as such below.
    llama = LlamaTokenizer(vocab=model["vocab"], merges=[tuple(m) if isinstance(m, list)
                                                         else tuple(m.split(" "))
                                                         for m in model["merges"]],
                           unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                           extra_special_tokens={"image_token": IMAGE_TOKEN}, add_bos_token=True,
                           add_eos_token=False, padding_side="right")
    llama.save_pretrained(cfg.out)
    # transformers 5 writes `extra_special_tokens` as a list (here an empty one); transformers
    # 4.50-4.57 (the BabyLM evaluation pipeline pins 4.51.3) call .keys() on it and cannot load
    # the tokenizer. The dict form loads in both, and re-saves by transformers 5 (every
    # checkpoint) drop the key for `image_token`, which both load too.
    config_path = cfg.out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["extra_special_tokens"] = {"image_token": IMAGE_TOKEN}
    atomic_write_text(config_path, json.dumps(config, indent=2) + "\n")
    # The training pipeline itself, kept for reference and for the equivalence test.
    tok.save(str(cfg.out / "bpe_bert_pretokenizer.json"))
    words, subwords = subword_ratio(load_tokenizer(cfg.out), cfg.corpus, cfg.ratio_lines)
    stats = {"out": str(cfg.out), "vocab_size": tok.get_vocab_size(), "words": words,
             "subwords": subwords, "subwords_per_word": round(subwords / max(words, 1), 4)}
    save_config(cfg, cfg.out / "babymerge_tokenizer.json", stats=stats)
    print(json.dumps(stats))
    return stats


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def subword_ratio(tokenizer, paths: list[Path], max_lines: int) -> tuple[int, int]:
    """(whitespace words, subword tokens) over the first ``max_lines`` lines (paper: 1.36)."""
    words = subwords = 0
    batch: list[str] = []
    for i, line in enumerate(iter_lines(paths)):
        if i >= max_lines:
            break
        batch.append(line)
    for enc in tokenizer.backend_tokenizer.encode_batch_fast(batch, add_special_tokens=False):
        subwords += len(enc.ids)
    words = sum(len(line.split()) for line in batch)
    return words, subwords


def load_tokenizer(path: str | Path):
    """The tokenizer saved in ``path`` (a tokenizer or model directory), checked for our tokens."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise TokenizerError(f"{path}: no tokenizer.json; make one with `babymerge tokenizer`")
    tok = AutoTokenizer.from_pretrained(str(path))
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id is None or image_id == tok.unk_token_id:
        raise TokenizerError(f"{path}: tokenizer has no {IMAGE_TOKEN} token; "
                             "not a babymerge tokenizer")
    if tok.bos_token_id is None or tok.eos_token_id is None or tok.pad_token_id is None:
        raise TokenizerError(f"{path}: tokenizer lacks a BOS, EOS or PAD token")
    return tok


def save_image_prefixed_tokenizer(tokenizer, directory: Path) -> None:
    """Write a copy of ``tokenizer`` into ``directory`` whose ``tokenizer(text)`` is
    ``[BOS, <image>] + ids(text)``, the layout every text is trained and scored in, for tools that
    add only a tokenizer's default special tokens (the BabyLM pipeline's text-only tasks never add
    an image token). Offsets stay those of the text; the two special tokens get (0, 0).

    Saved as plain ``PreTrainedTokenizerFast``, which transformers 4.x (the pipeline pins 4.51.3)
    and 5.x both load with this template: 4.x's ``LlamaTokenizerFast`` rebuilds its template from
    ``add_bos_token`` and drops ``<image>``."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    specials = [(tokenizer.bos_token, tokenizer.bos_token_id),
                (IMAGE_TOKEN, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{tokenizer.bos_token} {IMAGE_TOKEN} $A",
        pair=f"{tokenizer.bos_token} {IMAGE_TOKEN} $A $B", special_tokens=specials)
    prefixed = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=tokenizer.bos_token,
                                       eos_token=tokenizer.eos_token, unk_token=tokenizer.unk_token,
                                       pad_token=tokenizer.pad_token, padding_side="right")
    prefixed.save_pretrained(directory)
    # transformers 5 names the class TokenizersBackend, which 4.x does not know
    config_path = Path(directory) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    atomic_write_text(config_path, json.dumps(config, indent=2) + "\n")


def word_start_mask(tokenizer) -> np.ndarray:
    """Boolean per token id: True where the token begins a whitespace-separated word."""
    mask = np.zeros(len(tokenizer), dtype=bool)
    for token, i in tokenizer.get_vocab().items():
        if token.startswith(SPACE):
            mask[i] = True
    return mask
