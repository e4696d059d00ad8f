"""How every reader opens the release's own text files (CSV, JSONL, JSON): UTF-8, optional BOM.

- A byte-order mark (Excel's "CSV UTF-8", Notepad) is dropped (`utf-8-sig`): left in, it becomes
  part of the first file name or hides the first header column.
- Bytes that are not UTF-8 do not abort the whole read with a message naming no file: the file is
  read with `errors="surrogateescape"`, so each bad byte survives as one lone surrogate in its own
  line, and `undecodable(text)` turns that into a bad-row reason the reader reports as
  `file:line` (counted and listed under `--on-bad skip`, like any other bad row).
- File names are compared after Unicode normalization (NFC) by `find_file`, so a name typed on
  macOS (NFD) matches the one in the CSV (NFC), and a name that differs only so is said to.
"""
from __future__ import annotations

import json
import os
import unicodedata
from pathlib import Path
from typing import Any, TextIO

from .base import DatasetError

ENCODING = "utf-8-sig"


UTF16_BOMS = {b"\xff\xfe": "UTF-16 LE", b"\xfe\xff": "UTF-16 BE"}


def _refuse_utf16(path: str | os.PathLike, head: bytes) -> None:
    """A UTF-16 file (Excel's "Unicode text", PowerShell's default) is not a file of bad lines:
    name what it is once, instead of flagging every line."""
    for bom, name in UTF16_BOMS.items():
        if head.startswith(bom):
            raise DatasetError(f"{path}: the file is {name} (byte-order mark {bom.hex(' ')}); molt-cache reads "
                               "UTF-8 (with or without BOM): re-save it as UTF-8")


def open_text(path: str | os.PathLike, *, newline: str | None = None) -> TextIO:
    """Open a release text file for reading: UTF-8, a leading BOM dropped, bad bytes kept as
    lone surrogates (see `undecodable`). A UTF-16 file is refused naming its encoding."""
    with open(path, "rb") as f:
        _refuse_utf16(path, f.read(2))
    return open(path, encoding=ENCODING, errors="surrogateescape", newline=newline)


def undecodable(*texts: Any) -> str | None:
    """A bad-row reason if any of `texts` (strings, or lists / dicts of them) holds bytes that were
    not UTF-8 (read through `open_text`), else None. Names the first bad byte and its column."""
    for t in texts:
        if isinstance(t, dict):
            found = undecodable(*t.keys(), *t.values())
        elif isinstance(t, (list, tuple)):
            found = undecodable(*t)
        elif isinstance(t, str):
            found = next((f"not valid UTF-8: byte 0x{ord(c) - 0xDC00:02x} at column {i + 1}"
                          for i, c in enumerate(t) if 0xDC80 <= ord(c) <= 0xDCFF), None)
        else:
            found = None
        if found:
            return found
    return None


def read_json(path: str | os.PathLike) -> Any:
    """A whole JSON file (split.json, labels.json, class_idx.json): UTF-8 with optional BOM.
    Raises DatasetError naming the file (and line, column) on bad bytes or bad JSON."""
    data = Path(path).read_bytes()
    _refuse_utf16(path, data[:2])
    try:
        text = data.decode(ENCODING)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DatasetError(f"{path}:{line}: not valid UTF-8: byte 0x{data[e.start]:02x}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from e


def find_file(path: Path) -> tuple[Path | None, str]:
    """(the existing file, "") or (None, why). A file (or a folder on its way) whose name differs
    from the listed one only by Unicode normalization (NFC vs NFD, e.g. "crème" typed two ways)
    is found and returned: both spellings name the same text."""
    path = Path(path)
    if path.is_file():
        return path, ""
    found = _resolve_normalized(path)
    if found is not None and found.is_file():
        return found, ""
    return None, f"image file {path} not found"


def _resolve_normalized(path: Path) -> Path | None:
    if path.exists():
        return path
    if path.parent == path:
        return None
    parent = _resolve_normalized(path.parent)
    if parent is None or not parent.is_dir():
        return None
    if (parent / path.name).exists():  # only a folder on the way was spelled differently
        return parent / path.name
    want = unicodedata.normalize("NFC", path.name)
    if want == path.name and path.name.isascii():
        return None  # an ASCII name has one normal form: nothing else can match
    try:
        for entry in os.scandir(parent):
            if unicodedata.normalize("NFC", entry.name) == want:
                return Path(entry.path)
    except OSError:
        return None
    return None
