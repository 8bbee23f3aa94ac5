"""Reading the pickle files a publisher ships (CIFAR's python batches) without letting them run code.

`pickle.load` calls whatever callable a file names (`os.system`, `builtins.eval`, …), so a tampered or
substituted file runs its payload the moment it is read — whatever checksum it was meant to have, and with
`data.verify_checksums=false` nothing is checked first. `load_restricted` admits only the globals that arrays
of images need: numpy's ndarray reconstruction and dtype, and byte strings (which Python 3 pickles at
protocol 2 as `_codecs.encode(text, "latin1")`). Any other global is refused with UnsafePickleError naming the
file and the global, before anything is called. Containers (dict, list, tuple), str, bytes, int, float, bool
and None are pickle opcodes, not globals: they need no admission and call nothing.

This is the only place in the library that unpickles (weights are safetensors / `.npz` without pickles, and
checkpoints are read with `torch.load(weights_only=True)`).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sa2vp.data.errors import DataError, MissingDataError, UnsafePickleError


def _array_reconstructor() -> Callable[..., np.ndarray]:
    """numpy's `_reconstruct` (in numpy._core.multiarray, numpy.core in 1.x): what an array reduces to."""
    reduced = np.zeros(1).__reduce__()
    assert isinstance(reduced, tuple)  # an ndarray reduces to (reconstruct, args, state), never to a global's name
    return reduced[0]


_RECONSTRUCT = _array_reconstructor()


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it for bytes, and nothing more (no other codec)."""
    if not isinstance(text, str) or encoding.lower() not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not a byte string")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    """`bytes()` as protocol-2 pickles use it for b"" (bytes(n) would allocate n bytes: not admitted)."""
    if args:
        raise pickle.UnpicklingError("bytes(…) with arguments is not an empty byte string")
    return b""


def _ndarray_only(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"array of type {subtype!r}")
    return _RECONSTRUCT(subtype, shape, dtype)


# (module, name) → what it resolves to. numpy's module is `numpy.core.multiarray` in pickles written by numpy 1.x
# (and by Python 2, as the published CIFAR batches were), `numpy._core.multiarray` by numpy 2.
ARRAY_GLOBALS: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("numpy.core.multiarray", "_reconstruct"): _ndarray_only,
    ("numpy._core.multiarray", "_reconstruct"): _ndarray_only,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
}


class _Restricted(pickle.Unpickler):
    def __init__(self, file: Any, path: Path, allowed: dict[tuple[str, str], Any]) -> None:
        # latin1: Python 2 pickles (CIFAR's) hold byte strings as str; numpy and torchvision read them so too.
        super().__init__(file, encoding="latin1")
        self._path = path
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._path}: the pickle asks for {module}.{name}, which data of this kind never holds (a file "
                f"that names it can run code when loaded); refusing it — replace the file with the publisher's"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._path}: the pickle holds a persistent reference; refusing it")


def load_restricted(path: Path, allowed: dict[tuple[str, str], Any] | None = None) -> Any:
    """The object pickled in `path`, admitting only `allowed` globals (default: ARRAY_GLOBALS).

    UnsafePickleError for any other global; DataError for a file that is not a readable pickle.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            return _Restricted(handle, path, ARRAY_GLOBALS if allowed is None else allowed).load()
    except FileNotFoundError:
        raise MissingDataError(f"{path}: file not found") from None
    except DataError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        MemoryError,
        OverflowError,
        UnicodeError,
    ) as exc:
        raise DataError(
            f"{path}: not a readable pickle ({type(exc).__name__}: {exc}); replace it with the publisher's file"
        ) from None
