"""Reading third-party pickles (CIFAR-10 batches, EDM snapshots) as data, never as code.

``pickle.load`` will call any global a file names; ``SafeUnpickler`` resolves only the globals in an
explicit table and refuses everything else with ``UnsafePickleError`` naming the global. The table
maps ``(module, name)`` to a Python object we trust (often a stand-in that records data).
"""

from __future__ import annotations

import codecs
import io
import pickle
from typing import Any, BinaryIO

import numpy as np


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside the allowed table."""


def _numpy_reconstruct(cls, shape, dtype):
    if cls is not np.ndarray:
        raise UnsafePickleError(f"numpy reconstruct of {cls!r} refused")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _numpy_scalar(dtype, data=None):
    return np.frombuffer(data, dtype=dtype)[0] if data is not None else dtype.type()


# numpy arrays and scalars as written by numpy 1.x ("numpy.core") and 2.x ("numpy._core").
NUMPY_GLOBALS: dict[tuple[str, str], Any] = {}
for _core in ("numpy.core.multiarray", "numpy._core.multiarray"):
    NUMPY_GLOBALS[(_core, "_reconstruct")] = _numpy_reconstruct
    NUMPY_GLOBALS[(_core, "scalar")] = _numpy_scalar
NUMPY_GLOBALS[("numpy", "ndarray")] = np.ndarray
NUMPY_GLOBALS[("numpy", "dtype")] = np.dtype
# Python 3 writes bytes at pickle protocol <= 2 as _codecs.encode(text, "latin1"): a pure conversion.
NUMPY_GLOBALS[("_codecs", "encode")] = codecs.encode


class SafeUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, allowed: dict[tuple[str, str], Any], source: str, **kwargs):
        super().__init__(file, **kwargs)
        self.allowed, self.source = allowed, source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"{self.source}: refusing to load global {module}.{name} (not plain data)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.source}: unexpected persistent id {pid!r}")


def load(data: bytes | BinaryIO, allowed: dict[tuple[str, str], Any], source: str, **kwargs) -> Any:
    """Unpickle with only ``allowed`` globals; ``source`` names the file in errors."""
    stream = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    return SafeUnpickler(stream, allowed, source, **kwargs).load()

