"""Read a PyTorch state dict saved in the legacy (pre-zip, torch < 1.6) format, without torch.

The legacy ``torch.save`` file is a concatenation of:

1. a pickled magic number, 2. a pickled protocol version, 3. a pickled ``sys_info`` dict,
4. the pickled object, in which every storage is a persistent id
   ``("storage", <torch.XStorage>, key, location, numel, view_metadata)``,
5. a pickled list of the root storage keys,
6. for each of those keys, an int64 element count followed by the storage's raw bytes.

Pickle is code execution, so the object pickle is read by an Unpickler whose ``find_class`` hands
out only stand-ins for the few globals a state dict needs (``OrderedDict``, ``_rebuild_tensor_v2``
and the typed storage classes); any other global is refused before it is looked up.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np

from extract.errors import TransferKitError

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class TorchFileError(TransferKitError):
    """The file is not a legacy PyTorch state dict this reader understands."""


class UnsafePickleError(TorchFileError):
    """The pickle asks for a global outside the allow-list (it could run code)."""


# NamedTuples, not dataclasses: a pickle's BUILD opcode cannot change a tuple after it was checked.
class _StorageType(NamedTuple):
    dtype: np.dtype


class _StorageRef(NamedTuple):
    """A storage named in the pickle; its bytes come after the pickle."""

    root_key: str
    dtype: np.dtype
    offset: int  # in elements, non-zero only for storage views
    numel: int


class _PendingTensor(NamedTuple):
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None) -> _PendingTensor:
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: records the view, data is read later."""
    if not isinstance(storage, _StorageRef):
        raise TorchFileError("tensor built from something that is not a storage")
    shape, strides = tuple(size), tuple(stride)
    ints = (storage_offset, *shape, *strides)
    if len(shape) != len(strides) or not all(type(v) is int and v >= 0 for v in ints):
        raise TorchFileError(f"tensor with invalid size {size!r}, stride {stride!r} or offset {storage_offset!r}")
    return _PendingTensor(storage, storage_offset, shape, strides)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    }
    for name, dtype in STORAGE_DTYPES.items():
        allowed[("torch", name)] = _StorageType(dtype)
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], source: str):
        super().__init__(file)
        self._source = source
        self._allowed = _allowed_globals()
        self.roots: dict[str, tuple[np.dtype, int]] = {}  # root key -> (dtype, numel)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._source} asks to load {module}.{name}, which is not needed for a state dict of "
                f"tensors; refusing it (pickles can run code). Only load checkpoints you trust"
            ) from None

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise TorchFileError(f"{self._source}: unsupported persistent id {str(pid)[:80]!r} "
                                 "(only storages are allowed, not pickled modules)")
        _, storage_type, root_key, _location, numel, view = pid
        if not (isinstance(storage_type, _StorageType) and isinstance(root_key, str) and type(numel) is int
                and numel >= 0):
            raise TorchFileError(f"{self._source}: malformed storage reference {str(pid)[:80]!r}")
        known = self.roots.setdefault(root_key, (storage_type.dtype, numel))
        if known != (storage_type.dtype, numel):
            raise TorchFileError(f"{self._source}: storage {root_key} is declared twice with different types")
        if view is None:
            return _StorageRef(root_key, storage_type.dtype, 0, numel)
        _view_key, offset, view_numel = view
        if not (type(offset) is int and type(view_numel) is int and 0 <= offset and offset + view_numel <= numel):
            raise TorchFileError(f"{self._source}: storage view {view!r} lies outside storage {root_key}")
        return _StorageRef(root_key, storage_type.dtype, offset, view_numel)


def _read_storage(
    data: bytes, pos: int, dtype: np.dtype, byteorder: str, numel: int, key: str, source: str
) -> tuple[np.ndarray, int]:
    """The storage at ``pos``: an int64 element count then the elements, in the writer's byte order.

    Returns the elements (a view into ``data``) and the position after them.
    """
    if pos + 8 > len(data):
        raise TorchFileError(f"{source} is truncated (storage {key} is missing)")
    (count,) = struct.unpack_from(byteorder + "q", data, pos)
    if count != numel:
        raise TorchFileError(f"{source}: storage {key} holds {count} elements, the pickle says {numel}")
    end = pos + 8 + count * dtype.itemsize
    if end > len(data):
        raise TorchFileError(f"{source} is truncated (storage {key} is incomplete)")
    return np.frombuffer(data, dtype=dtype.newbyteorder(byteorder), count=count, offset=pos + 8), end


def _materialise(tensor: _PendingTensor, storages: dict[str, np.ndarray], name: str, source: str) -> np.ndarray:
    ref = tensor.storage
    flat = storages[ref.root_key][ref.offset : ref.offset + ref.numel]
    if 0 in tensor.shape:
        return np.empty(tensor.shape, dtype=flat.dtype)
    last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.strides))
    if last >= len(flat):  # as_strided does no bounds checks: never let a file read past its storage
        raise TorchFileError(f"{source}: tensor {name} reaches past the end of its storage")
    view = np.lib.stride_tricks.as_strided(
        flat[tensor.offset :], shape=tensor.shape, strides=[s * flat.itemsize for s in tensor.strides]
    )
    return np.array(view, dtype=flat.dtype.newbyteorder("="), order="C")


class _NoGlobals(pickle.Unpickler):
    """For the small pickles around the object (magic, version, sys_info, keys): no global at all."""

    def __init__(self, file: IO[bytes], source: str):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(f"{self._source}: header asks to load {module}.{name}; refusing it")


def load_legacy_state_dict(path: str | Path) -> collections.OrderedDict[str, np.ndarray]:
    """Tensors of a legacy-format ``torch.save(state_dict)`` file, as C-contiguous numpy arrays."""
    source = str(path)
    data = Path(path).read_bytes()
    if data[:4] == b"PK\x03\x04":
        raise TorchFileError(
            f"{source} is a zip-format checkpoint (torch >= 1.6); this reader handles the legacy format "
            "only: re-save it with torch.save(obj, path, _use_new_zipfile_serialization=False)"
        )
    fh = io.BytesIO(data)
    try:
        if _NoGlobals(fh, source).load() != MAGIC_NUMBER:
            raise TorchFileError(f"{source} is not a legacy PyTorch file (bad magic number)")
        version = _NoGlobals(fh, source).load()
        if version != PROTOCOL_VERSION:
            raise TorchFileError(f"{source}: unsupported PyTorch protocol version {version!r}")
        sys_info = _NoGlobals(fh, source).load()
        byteorder = "<" if not isinstance(sys_info, dict) or sys_info.get("little_endian", True) else ">"
        unpickler = _RestrictedUnpickler(fh, source)
        obj = unpickler.load()
        keys = _NoGlobals(fh, source).load()
    except TorchFileError:
        raise
    except Exception as exc:  # malformed pickles raise many types (UnpicklingError, EOFError, ValueError...)
        raise TorchFileError(f"{source} is not a readable legacy PyTorch file: {exc}") from None
    if not isinstance(keys, list) or set(keys) != set(unpickler.roots):
        raise TorchFileError(f"{source}: the storage key list does not match the pickled tensors")
    storages, pos = {}, fh.tell()
    for key in keys:
        dtype, numel = unpickler.roots[key]
        storages[key], pos = _read_storage(data, pos, dtype, byteorder, numel, key, source)
    if not isinstance(obj, dict):
        raise TorchFileError(f"{source} holds a {type(obj).__name__}, not a state dict")
    state = collections.OrderedDict()
    for name, value in dict.items(obj):  # dict.items: the pickle may have shadowed obj.items
        if not isinstance(name, str) or not isinstance(value, _PendingTensor):
            raise TorchFileError(f"{source}: entry {str(name)[:80]!r} is not a named tensor")
        state[name] = _materialise(value, storages, name, source)
    return state
