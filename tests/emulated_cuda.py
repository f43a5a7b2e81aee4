"""An emulated CUDA device for a CPU-only torch: the engine's GPU path runs here, device placement and all.

Tensors "on cuda:0" are wrappers (DeviceTensor) whose data stays in CPU memory; every torch call that
takes one runs on that data and places its tensor results on the device again. As on CUDA, a call
that mixes device tensors with CPU tensors of one or more dimensions is refused (copies, and CPU index
tensors, excepted), ``numpy()`` of a device tensor fails, and ``cpu()`` copies. Pinned host memory is
ordinary memory, events are immediate, and the device's peak memory is the largest total of the storages
that device tensors held at once. The ledger also counts the calls on the device: on a GPU each is a kernel
launch (microseconds), the cost that chunking's GPU_CHUNK keeps down. What this cannot show: CUDA kernels'
own results, speed, asynchronous races. Only the thread that enters ``emulated_cuda`` has the device (torch's modes are per thread): the
engine's reader and writer threads handle host memory only, as they must on a real GPU.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterator

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda", 0)
Tensor = torch.Tensor

INDEXING = (Tensor.__getitem__, Tensor.__setitem__, Tensor.index_put_)  # (self, indices[, values])


def may_mix(func: Callable[..., Any], args: tuple) -> bool:
    """Whether a real GPU takes CPU tensors (of one or more dimensions) beside device tensors in this call:
    copies between the two (an assignment to ints and slices is one), and a device tensor indexed by CPU
    indices (its values on the device)."""
    if func in (Tensor.copy_, Tensor.to):
        return True
    if func is Tensor.__setitem__ and not any(isinstance(i, Tensor) for i in tree_flatten(args[1])[0]):
        return True
    if func in INDEXING and isinstance(args[0], DeviceTensor):
        values = args[2] if len(args) > 2 else None
        return not (isinstance(values, Tensor) and not isinstance(values, DeviceTensor) and values.dim() > 0)
    return False


class DeviceTensor(Tensor):
    """A tensor that reports cuda:0 and holds its values in ``data_on_host``."""

    data_on_host: Tensor

    @staticmethod
    def __new__(cls, data: Tensor) -> "DeviceTensor":
        return Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, data.shape, strides=data.stride(), storage_offset=data.storage_offset(), dtype=data.dtype,
            device=CUDA, requires_grad=False)

    def __init__(self, data: Tensor) -> None:
        self.data_on_host = data

    def __repr__(self) -> str:  # type: ignore[override]
        return f"DeviceTensor({self.data_on_host!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        raise RuntimeError(f"{func}: a device tensor used outside emulated_cuda (on another thread?)")


class DeviceLedger:
    """What the device held and did: bytes of the storages that device tensors hold (counted once per storage
    while any holder lives; their peak), and the torch calls that took or made a device tensor (each a kernel
    launch or more on a GPU)."""

    def __init__(self) -> None:
        self.holders: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0
        self.calls = 0

    def hold(self, tensor: DeviceTensor) -> None:
        storage = tensor.data_on_host.untyped_storage()
        key = storage.data_ptr()
        if key not in self.holders:
            self.holders[key], self.sizes[key] = 0, storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self.holders[key] += 1
        weakref.finalize(tensor, self.release, key)

    def release(self, key: int) -> None:
        self.holders[key] -= 1
        if not self.holders[key]:
            del self.holders[key]
            self.live -= self.sizes.pop(key)

    def reset_peak(self) -> None:
        self.peak = self.live


def _host(x: Any) -> Any:
    return x.data_on_host if isinstance(x, DeviceTensor) else x


def _is_cuda(device: Any) -> bool | None:
    return None if device is None else torch.device(device).type == "cuda"


class EmulatedCuda(TorchFunctionMode):
    """Runs every torch call on the host data and places its results as CUDA would."""

    def __init__(self, ledger: DeviceLedger) -> None:
        super().__init__()
        self.ledger = ledger

    def place(self, data: Any) -> Any:
        if not isinstance(data, Tensor) or isinstance(data, DeviceTensor):
            return data
        tensor = DeviceTensor(data)
        self.ledger.hold(tensor)
        return tensor

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = dict(kwargs or {})
        tensors = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, Tensor)]
        on_device = any(isinstance(x, DeviceTensor) for x in tensors)
        if getattr(func, "__name__", "") == "__get__":  # an attribute: where it is, the wrapper's; else the data's
            if getattr(func.__self__, "__name__", "") in ("device", "is_cuda", "is_cpu", "get_device"):
                return func(*args, **kwargs)
            got = func(*tree_map(_host, args))
            return self.place(got) if on_device else got
        if func is torch._has_compatible_shallow_copy_type:  # a device tensor's is not a CPU tensor's
            return type(args[0]) is type(args[1]) and func(*tree_map(_host, args))
        if on_device and any(not isinstance(x, DeviceTensor) and x.dim() > 0 for x in tensors) and \
                not may_mix(func, args):
            raise RuntimeError(f"{getattr(func, '__name__', func)}: expected all tensors on the same device, "
                               "got cuda:0 and cpu")
        if func is Tensor.numpy and on_device:
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first.")
        if func is Tensor.copy_:
            kwargs.pop("non_blocking", None)  # the emulated copies are immediate
            func(_host(args[0]), _host(args[1]), **kwargs)
            self.ledger.calls += on_device
            return args[0]
        if func in (Tensor.to, Tensor.cpu, Tensor.cuda):
            return self.move(func, args, kwargs)
        wanted = _is_cuda(kwargs.get("device"))
        if wanted:
            kwargs["device"] = torch.device("cpu")
        kwargs.pop("pin_memory", None)
        out = func(*tree_map(_host, args), **tree_map(_host, kwargs))
        placed = wanted or (wanted is None and on_device)
        self.ledger.calls += bool(placed or on_device)
        return tree_map(self.place, out) if placed else out

    def move(self, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """to / cpu / cuda: a copy where it changes side (as on a GPU), the tensor itself (or its cast) where not."""
        source = args[0]
        here, host = isinstance(source, DeviceTensor), _host(source)
        result, target = host, func is Tensor.cuda
        if func is Tensor.to:
            device, dtype, _, memory_format = torch._C._nn._parse_to(*args[1:], **kwargs)
            target = _is_cuda(device)
            result = host.to(dtype=dtype or host.dtype, memory_format=memory_format or torch.preserve_format)
        self.ledger.calls += bool(here or target)
        if target is None or target == here:
            return self.place(result) if here else result
        result = result.clone() if result is host else result
        return self.place(result) if target else result


class ImmediateEvent:
    """torch.cuda.Event on a device whose work is done when it is asked for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.recorded = False

    def record(self, stream: Any = None) -> None:
        self.recorded = True

    def synchronize(self) -> None:
        assert self.recorded, "an event waited on before it was recorded"

    def query(self) -> bool:
        return self.recorded


@contextlib.contextmanager
def emulated_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[DeviceLedger]:
    """Within: ``torch.cuda`` reports one device, and tensors placed on it are DeviceTensors."""
    ledger = DeviceLedger()
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "device_count", lambda: 1)
    monkeypatch.setattr(cuda, "current_device", lambda: 0)
    monkeypatch.setattr(cuda, "set_device", lambda device: None)
    monkeypatch.setattr(cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(cuda, "get_device_name", lambda device=None: "emulated CUDA device")
    monkeypatch.setattr(cuda, "Event", ImmediateEvent)
    monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda device=None: ledger.reset_peak())
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda device=None: ledger.peak)
    # pinned host memory needs a CUDA build; here it is ordinary memory (also on the reader thread, which the
    # mode does not reach)
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: empty(*a, **k))
    monkeypatch.setattr(Tensor, "pin_memory", lambda self, device=None: self.clone())
    with EmulatedCuda(ledger):
        yield ledger
