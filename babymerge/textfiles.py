"""Reading the line-based text files that every stage takes (corpora, caption files, image lists,
evaluation jsonl): one decoder, so each stage names a bad file and line the same way."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

# the point after a carriage return that no line feed follows
_AFTER_LONE_CR = re.compile(rb"(?<=\r)(?!\n)")


def numbered_lines(path: Path, error: type[Exception], universal_newlines: bool = False
                   ) -> Iterator[tuple[int, str]]:
    """(line number from 1, text) of every line of the UTF-8 file ``path``, line end included.

    A byte-order mark at the start of the file (Windows tools write one) is dropped: it is
    neither text to learn nor part of a first id or JSON object. A line that is not UTF-8 raises
    ``error`` naming the file, the line and the byte. The file is decoded line by line, so a
    bad line late in a large file is reported only when reached, after the lines before it.

    A line ends at a line feed (``\\n`` or ``\\r\\n``); with ``universal_newlines`` a lone carriage
    return ends one too (classic Mac files), as text-mode ``open()`` reads them (the image lists
    were read so). Otherwise a lone carriage return stays in its line: whitespace in a caption or
    a corpus line."""
    with open(path, "rb") as f:
        lineno = 0
        for chunk in f:
            pieces = (_AFTER_LONE_CR.split(chunk) if universal_newlines and b"\r" in chunk
                      else (chunk,))
            for raw in pieces:
                if not raw:  # after a carriage return that ends the file
                    continue
                lineno += 1
                try:
                    yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise error(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte "
                                f"{e.start})") from e
