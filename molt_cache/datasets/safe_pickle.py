"""Read a pickled `.npy` (MM-IMDB's `metadata.npy`) without letting the file run code.

`np.load(..., allow_pickle=True)` runs whatever callable the pickle names: a crafted
`metadata.npy` can execute commands during `molt datasets check`. Here the pickle stream is read
by an `Unpickler` whose `find_class` (the one door through which a pickle reaches any Python
callable; Python docs, "Restricting Globals") hands out only what an `np.save`d dict of plain data
needs: numpy's array and scalar reconstructors and `numpy.dtype`. Dicts, lists, tuples, str,
bytes, int, float, bool and None are pickle opcodes and need no callable. Anything else is refused
naming the module and class. After loading, every array must have a plain dtype (bool, integer,
float, complex, bytes, str; object only as a container of such values).

Python 2 pickles (the 2017 release was written by Python 2) are read with `encoding="bytes"`,
so their `str` objects arrive as bytes; `decode_strings` turns bytes keys and values into str
(UTF-8), naming the entry that is not UTF-8.
"""
from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np

from .base import DatasetError

# (module, name) -> object. Both numpy 1 ("numpy.core") and numpy 2 ("numpy._core") spellings.
_RECONSTRUCT = np.ndarray(0).__reduce__()[0]
_SCALAR = np.float64(0).__reduce__()[0]
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
PLAIN_KINDS = "biufcSU"


class UnsafePickleError(DatasetError):
    """The pickle asks for a callable outside the allowed list; nothing was run."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, *, source: str):
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self.source}: the pickle asks for {module}.{name}, which is not allowed; only dicts, "
                "lists, tuples, str, bytes, numbers and numpy arrays/scalars of plain dtypes are read "
                "(loading it with np.load(allow_pickle=True) could run code)") from None


def load_npy_restricted(path: str | os.PathLike) -> Any:
    """The object stored in an `.npy` file: a plain array read without pickle, or a pickled
    object (np.save of a dict) read by the restricted unpickler above.

    Raises `UnsafePickleError` for a disallowed callable, `DatasetError` naming the file for a
    file that is not an .npy, a truncated pickle or an array of a non-plain dtype.
    """
    source = str(path)
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:  # 3.0: a UTF-8 header; numpy has no public reader for it
                shape, fortran, dtype = np.lib.format._read_array_header(f, version)  # noqa: SLF001
        except ValueError as e:
            raise DatasetError(f"{source}: not an .npy file: {e}") from e
        if not dtype.hasobject:
            f.seek(0)
            return np.load(f, allow_pickle=False)
        try:
            obj = _RestrictedUnpickler(f, source=source).load()
        except UnsafePickleError:
            raise
        except Exception as e:  # noqa: BLE001 - a truncated or malformed stream, named
            raise DatasetError(f"{source}: cannot read the pickled object: {type(e).__name__}: {e}") from e
    _check_plain(obj, source, "object")
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.ndim == 0:
        obj = obj.item()
    return obj


def _check_plain(obj: Any, source: str, where: str, depth: int = 0) -> None:
    if depth > 64:
        raise DatasetError(f"{source}: {where} is nested more than 64 levels deep")
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            for k, v in enumerate(obj.ravel()):
                _check_plain(v, source, f"{where}[{k}]", depth + 1)
        elif obj.dtype.kind not in PLAIN_KINDS or obj.dtype.names is not None:
            raise DatasetError(f"{source}: {where} is an array of dtype {obj.dtype}; only plain dtypes are read")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, source, f"{where} key", depth + 1)
            _check_plain(v, source, f"{where}[{k!r}]", depth + 1)
    elif isinstance(obj, (list, tuple)):
        for k, v in enumerate(obj):
            _check_plain(v, source, f"{where}[{k}]", depth + 1)
    elif not isinstance(obj, (str, bytes, int, float, complex, bool, type(None), np.generic)):
        raise DatasetError(f"{source}: {where} is a {type(obj).__name__}; only plain data is read")


def decode_strings(obj: Any, source: str, where: str = "metadata") -> Any:
    """bytes → str (UTF-8) through dicts, lists and tuples (keys too); numpy bytes scalars too."""
    if isinstance(obj, bytes):
        try:
            return obj.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DatasetError(f"{source}: {where} holds bytes that are not UTF-8: {obj[:40]!r}") from e
    if isinstance(obj, dict):
        return {decode_strings(k, source, f"{where} key"): decode_strings(v, source, f"{where}[{k!r}]")
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_strings(v, source, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(decode_strings(v, source, f"{where}[{i}]") for i, v in enumerate(obj))
    return obj
