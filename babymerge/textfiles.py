"""Reading the line-based text files that every stage takes (corpora, caption files, image lists,
evaluation jsonl): one decoder, so each stage names a bad file and line the same way."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path


def numbered_lines(path: Path, error: type[Exception]) -> Iterator[tuple[int, str]]:
    """(line number from 1, text) of every line of the UTF-8 file ``path``, line end included.

    A byte-order mark at the start of the file (Windows tools write one) is dropped: it is
    neither text to learn nor part of a first id or JSON object. A line that is not UTF-8 raises
    ``error`` naming the file, the line and the byte. The file is decoded line by line, so a
    bad line late in a large file is reported only when reached, after the lines before it."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise error(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte "
                            f"{e.start})") from e
