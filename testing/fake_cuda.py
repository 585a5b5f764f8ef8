"""A CUDA device simulated on the CPU: tensors that say they are on ``cuda:0`` while their data stays on the CPU (or
the meta device), with the device checks and the memory counts of a real card.

For testing code that decides where modules live (``models/placement.py``, ComfyUI's ``comfy.model_management``)
without a GPU. :class:`FakeCuda` is a ``TorchFunctionMode``:

* every tensor moved to ``cuda`` (``.to``, ``.cuda()``, ``Module.to``, a ``device=`` argument of a factory function,
  ``param.data = …``) becomes a new tensor on its real device, recorded as being on the card; ``.device`` and
  ``.is_cuda`` answer as a CUDA tensor's would; moving it back to the CPU copies it and forgets it;
* an op's outputs are on the card when one of its inputs is; an op that mixes card tensors and CPU tensors (other
  than CPU scalars, as CUDA allows) raises the error CUDA raises, and ``.numpy()`` of a card tensor too — so a module
  left on the CPU while its stage runs on the card fails exactly where it would on a GPU;
* :meth:`FakeCuda.used` is the bytes of the distinct storages on the card, :meth:`FakeCuda.install` patches
  ``torch.cuda`` (``current_device``, ``mem_get_info``, ``memory_stats``, device properties) so that a memory
  manager reads the card's total and free memory from it; an allocation beyond the total raises
  ``torch.OutOfMemoryError``.

``torch.cuda.is_available()`` stays False: code that would use streams or ``torch.cuda`` kernels keeps its CPU path.
"""

from __future__ import annotations

import types
import weakref

import torch
from torch.overrides import TorchFunctionMode

# (method wrappers: a new object per lookup, equal to each other: compare with ==, not is)
_DEVICE_GET = torch._C.TensorBase.device.__get__
_IS_CUDA_GET = torch._C.TensorBase.is_cuda.__get__
_DATA_GET = torch._C.TensorBase.data.__get__
_DATA_SET = torch._C.TensorBase.data.__set__
_TO = (torch.Tensor.to, torch._C.TensorBase.to)
_CUDA = (torch.Tensor.cuda, torch._C.TensorBase.cuda)
_CPU = (torch.Tensor.cpu, torch._C.TensorBase.cpu)
_NUMPY = (torch.Tensor.numpy, torch._C.TensorBase.numpy)
# ops that may take tensors of two devices on a real GPU: copies between devices, indexing with CPU indices
_MIXING = {torch.Tensor.copy_, torch._C.TensorBase.copy_, torch.Tensor.__getitem__, torch._C.TensorBase.__getitem__,
           torch.Tensor.__setitem__, torch._C.TensorBase.__setitem__, torch.Tensor.__repr__, torch.Tensor.__format__,
           torch._has_compatible_shallow_copy_type}
_PROPERTIES = {getattr(torch._C.TensorBase, name).__get__ for name in ("shape", "dtype", "requires_grad", "is_meta",
                                                                       "layout", "grad_fn", "is_leaf", "ndim")}


def _tensors(x, out: list) -> list:
    """The tensors in ``x`` (nested lists, tuples, dicts), appended to ``out``."""
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, (list, tuple)) or type(x).__name__ == "dict_values":
        for y in x:
            _tensors(y, out)
    elif isinstance(x, dict):
        for y in x.values():
            _tensors(y, out)
    return out


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True  # torch.device(0) is cuda:0
    return torch.device(device).type == "cuda"


class FakeCuda(TorchFunctionMode):
    """A simulated ``cuda:0`` of ``total`` bytes (see the module doc). Use as a context manager, after
    :meth:`install` has patched ``torch.cuda``."""

    def __init__(self, total: int, index: int = 0):
        super().__init__()
        self.device = torch.device("cuda", index)
        self.total = total
        self.peak = 0
        self._on: dict[int, tuple] = {}  # id(tensor) -> (weak reference, its storage's key)
        self._storages: dict[int, list] = {}  # storage key -> [bytes, card tensors using it]
        self._used = 0

    # ------------------------------------------------------------------ bookkeeping
    def on(self, t) -> bool:
        """Whether tensor ``t`` is on the card."""
        entry = self._on.get(id(t))
        return entry is not None and entry[0]() is t

    def _mark(self, t: torch.Tensor) -> None:
        self._unmark(t)
        key, storage = id(t), t.untyped_storage()
        cdata = storage._cdata
        count = self._storages.get(cdata)
        if count is None:
            self._storages[cdata] = [storage.nbytes(), 1]
            self._used += storage.nbytes()
        else:
            count[1] += 1
        self._on[key] = (weakref.ref(t, lambda _, key=key: self._forget(key)), cdata)

    def _forget(self, key: int) -> None:
        entry = self._on.pop(key, None)
        if entry is not None:
            count = self._storages[entry[1]]
            count[1] -= 1
            if not count[1]:
                del self._storages[entry[1]]
                self._used -= count[0]

    def _unmark(self, t: torch.Tensor) -> None:
        if id(t) in self._on:
            self._forget(id(t))

    def used(self) -> int:
        """Bytes on the card: each storage of a live card tensor once."""
        return self._used

    def _allocated(self) -> None:
        self.peak = max(self.peak, self._used)
        if self._used > self.total:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated): {self._used / 2**20:.1f} MiB in use on a "
                                         f"{self.total / 2**20:.1f} MiB card")

    # ------------------------------------------------------------------ torch.cuda
    def install(self, name: str = "NVIDIA simulated GPU", major: int = 9):
        """Patch ``torch.cuda`` so that memory managers see this card (returns a function undoing it)."""
        cuda = torch.cuda
        saved = {k: getattr(cuda, k) for k in ("current_device", "mem_get_info", "memory_stats", "get_device_name",
                                               "get_device_properties", "is_bf16_supported", "get_allocator_backend",
                                               "device_count")}
        saved_version = torch.version.cuda
        props = types.SimpleNamespace(name=name, major=major, minor=0, total_memory=self.total,
                                      multi_processor_count=132, gcnArchName="")
        # the device itself, not its index: torch.device(0) needs a real accelerator; torch.device(device) does not
        cuda.current_device = lambda: self.device
        cuda.device_count = lambda: 1
        cuda.mem_get_info = lambda device=None: (self.total - self.used(), self.total)
        cuda.memory_stats = lambda device=None: {"reserved_bytes.all.current": self.used(),
                                                 "active_bytes.all.current": self.used()}
        cuda.get_device_name = lambda device=None: name
        cuda.get_device_properties = lambda device=None: props
        cuda.is_bf16_supported = lambda *a, **k: True
        cuda.get_allocator_backend = lambda: "native"
        torch.version.cuda = "12.8"  # an NVIDIA card for code that asks

        def undo():
            for k, v in saved.items():
                setattr(cuda, k, v)
            torch.version.cuda = saved_version

        return undo

    # ------------------------------------------------------------------ the mode
    def __enter__(self):
        fake = self
        self._parameter_new = torch.nn.Parameter.__new__

        def parameter_new(cls, data=None, requires_grad=True):
            p = fake._parameter_new(cls, data, requires_grad)
            if data is not None and fake.on(data):
                fake._mark(p)
            return p

        torch.nn.Parameter.__new__ = parameter_new
        return super().__enter__()

    def __exit__(self, *exc):
        torch.nn.Parameter.__new__ = self._parameter_new
        return super().__exit__(*exc)

    def _move(self, t: torch.Tensor, to_card: bool | None, dtype, non_blocking=False, copy=False, **kwargs):
        """``t`` converted to ``dtype`` and moved to the card (True), off it (False) or left where it is (None)."""
        here = self.on(t)
        if dtype is not None:
            kwargs["dtype"] = dtype
        if to_card is None or to_card == here:
            out = t.to(non_blocking=non_blocking, copy=copy, **kwargs) if kwargs or copy else t
            if here and out is not t:
                self._mark(out)
                self._allocated()
            return out
        out = t.to(copy=True, **kwargs)  # a new tensor on the same real device
        if to_card:
            self._mark(out)
            self._allocated()
        return out

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _PROPERTIES:
            return func(*args, **kwargs)
        if func == _DEVICE_GET:
            return self.device if self.on(args[0]) else func(*args)
        if func == _IS_CUDA_GET:
            return self.on(args[0])
        if func == _DATA_GET:
            out = func(*args)
            if self.on(args[0]):
                self._mark(out)
            return out
        if func == _DATA_SET:
            func(*args)
            (self._mark if self.on(args[1]) else self._unmark)(args[0])
            return None
        if func in _TO:
            t, rest = args[0], args[1:]
            if rest and isinstance(rest[0], torch.Tensor):  # .to(other): other's device and dtype
                other = rest[0]
                return self._move(t, self.on(other), other.dtype, *rest[1:], **kwargs)
            device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*rest, **kwargs)
            extra = {} if memory_format is None else {"memory_format": memory_format}
            to_card = None if device is None else _is_cuda(device)
            return self._move(t, to_card, dtype, non_blocking, kwargs.get("copy", False), **extra)
        if func in _CUDA:
            return self._move(args[0], True, None)
        if func in _CPU:
            return self._move(args[0], False, None)
        if func in _NUMPY and self.on(args[0]):
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                            "to host memory first.")
        to_card = False
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
            to_card = True
        tensors = _tensors(args, [])
        if kwargs:
            _tensors(kwargs.values(), tensors)
        on_card = [self.on(t) for t in tensors]
        if any(on_card) and func not in _MIXING:
            for t, here in zip(tensors, on_card):
                if not here and t.dim() > 0:
                    raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two "
                                       f"devices, cuda:0 and {t.device}! (in {getattr(func, '__name__', func)}, "
                                       f"simulated)")
        out = func(*args, **kwargs)
        inplace = getattr(func, "__name__", "").endswith("_") and not getattr(func, "__name__", "").startswith("__")
        if (to_card or any(on_card)) and not inplace:
            marked = False
            for t in (out,) if isinstance(out, torch.Tensor) else _tensors(out, []):
                if not self.on(t) and not any(t is s for s in tensors):
                    self._mark(t)
                    marked = True
            if marked:
                self._allocated()
        return out
