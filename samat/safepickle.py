"""CIFAR's pickles, read without running anyone's code.

CIFAR-10/100's python distribution is a pickle, and a pickle can name any callable: a crafted
`data_batch_1` in a shared data.root would run its author's code under every account that
trains on it. This unpickler builds only what the real files hold (dicts, lists, bytes, str,
ints and numpy arrays) and refuses any other global by name.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any


class NotACifarBatch(ValueError):
    """The file is not a CIFAR batch: its text says what it refers to."""


def _allowed() -> dict[tuple[str, str], Any]:
    import numpy as np

    empty = np.zeros(1)
    reconstruct = empty.__reduce__()[0]  # numpy(._core).multiarray._reconstruct
    frombuffer = empty.__reduce_ex__(5)[0]  # numpy(._core).numeric._frombuffer (protocol 5)
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray}
    allowed[("numpy", "dtype")] = np.dtype
    for package in ("numpy.core", "numpy._core"):  # the real files say numpy.core (numpy 1)
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = frombuffer
    # Python 3's protocol-2 pickles spell bytes as _codecs.encode(text, "latin1")
    allowed[("_codecs", "encode")] = _latin1
    return allowed


def _latin1(text: str, encoding: str = "utf-8") -> bytes:
    import codecs

    if encoding not in ("latin1", "latin-1"):
        raise NotACifarBatch(f"encodes bytes as {encoding!r}, which no CIFAR batch does")
    return codecs.encode(text, "latin1")


class _CifarUnpickler(pickle.Unpickler):
    def __init__(self, file: Any) -> None:
        super().__init__(file, encoding="bytes")
        self._globals = _allowed()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._globals[(module, name)]
        except KeyError:
            raise NotACifarBatch(f"refers to {module}.{name}, which no CIFAR batch holds") from None


def load_cifar_batch(path: Path) -> Any:
    """The object one CIFAR pickle holds; NotACifarBatch for a file that names anything but
    numpy's arrays, pickle.UnpicklingError (or EOFError, ...) for a damaged one."""
    with Path(path).open("rb") as f:
        return _CifarUnpickler(f).load()
