"""torch tensors to and from the format: the conversions that the layers above share.

The dtype tables (bfloat16 and float8 travel as their bits), :func:`export` of a tensor being
saved, :func:`from_numpy` of a loaded array, the checks of every device a load may use, and the
loads to a device through pinned staging buffers (:func:`load_tensors`, :func:`device_tensors`).
The public functions are in :mod:`safeckpt.torch`; this module is what ``safeckpt.tree``,
``safeckpt.dcp`` and ``safeckpt.checkpoint`` use.

torch is imported lazily, inside the functions that need it (:func:`_torch`), never by
``import safeckpt``; :func:`is_tensor` never imports it.

Readers are used through the reader protocol documented on :class:`safeckpt.reader.TensorMap`
(``names``, ``locate``, ``load_indices``; a single file's ``entry``, ``read_ranges``,
``check_crc``, ``has_checksums``, ``verifies``).

Example:
    >>> import torch, safeckpt.torch_convert as tc                 # doctest: +SKIP
    >>> tc.from_numpy(np.zeros(3, np.float32))                      # doctest: +SKIP
    tensor([0., 0., 0.])
"""

from __future__ import annotations

import collections
import sys
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _backend, dtypes, packing
from .errors import InvalidValueError, UnsupportedDtypeError
from .writer import LazyArray

if TYPE_CHECKING:  # torch is optional: its types are for the checker only
    from typing import Protocol

    import torch

    DeviceName = Union[str, int, torch.device]
    # torch.load's map_location function: (CPU storage, saved location tag) -> where it goes
    MapFunction = Callable[[torch.UntypedStorage, str], Any]
    MapLocation = Union[None, DeviceName, Dict[Union[str, torch.device], DeviceName], MapFunction]
    CheckedMapLocation = Union[None, torch.device, Dict[str, torch.device], MapFunction]

    class TensorSource(Protocol):
        """A single-file reader, as :func:`device_tensors` uses it."""

        @property
        def has_checksums(self) -> bool: ...
        def verifies(self, verify: Optional[bool] = None) -> bool: ...
        def entry(self, i: int) -> Any: ...
        def read_ranges(self, offsets: List[int], lengths: List[int],
                        dests: List[np.ndarray]) -> None: ...
        def check_crc(self, i: int, computed: int) -> None: ...

    class TensorReader(Protocol):
        """Any reader (one file or shards), as :func:`load_tensors` uses it."""

        @property
        def names(self) -> List[str]: ...
        def locate(self, i: int) -> Tuple[TensorSource, int]: ...
        def load_indices(self, indices: Sequence[int],
                         verify: Optional[bool] = None) -> List[np.ndarray]: ...

_TABLES: Optional[Tuple[Dict[Any, Any], Dict[Any, Any]]] = None  # built on first use
# torch's shell dtypes and their bits: one element in each byte, whose other bits are zero [T11]
_SHELL_BITS = {"int4": 4, "uint4": 4, "int2": 2, "uint2": 2, "int1": 1, "uint1": 1}
_FLOAT4_CODE = 26  # float4_e2m1fn: torch holds it as float4_e2m1fn_x2, two values a byte
_NUMPY = "load it with framework='numpy' (ml_dtypes' dtype)"

_ACCEPTED = ("use 'cpu', 'cuda', 'cuda:N', an int N (device N of the accelerator), a torch.device, "
             "or a dict {saved device: device}")
_FUNCTION = "; map_location may also be a function (storage, location), as torch.load takes it"
_ELSEWHERE = "pass map_location='cpu' (or a dict) to load it elsewhere"
_STAGING_BYTES = 64 << 20  # each of the two host buffers of a load to a GPU


def _torch() -> Any:
    import torch  # lazily: torch is optional, and `import safeckpt` must not import it
    return torch


def is_tensor(value: object) -> bool:
    """Whether ``value`` is a torch.Tensor; torch is never imported here (no torch loaded: no).

    Example:
        >>> is_tensor(np.zeros(2))
        False
    """
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def is_shell(dtype: Any) -> bool:
    """Whether ``dtype`` is one of torch's shell dtypes int4 .. uint1 (one element a byte, no
    arithmetic and no copy kernel in torch).

    Example:
        >>> is_shell(np.dtype("uint8"))
        False
    """
    torch = sys.modules.get("torch")
    return (torch is not None and isinstance(dtype, torch.dtype)
            and str(dtype).split(".")[-1] in _SHELL_BITS)


def _tables() -> Tuple[Dict[Any, Any], Dict[Any, Any]]:
    """``{torch dtype: (numpy dtype, torch dtype whose bits numpy reads or None)}`` and back.

    Only the dtypes that this torch has (``getattr``: float8_e8m0fnu is torch 2.7, the shell
    dtypes int1..uint4 2.6) and that this ml_dtypes has are in it. torch's
    ``float4_e2m1fn_x2`` (two values a byte) is not: it is :data:`_FLOAT4_X2` (section 4's
    float4_e2m1fn with the last dimension halved).
    """
    global _TABLES
    if _TABLES is None:
        torch = _torch()
        pairs = [
            ("bool", "bool", None), ("int8", "int8", None), ("int16", "int16", None),
            ("int32", "int32", None), ("int64", "int64", None), ("uint8", "uint8", None),
            ("uint16", "uint16", None), ("uint32", "uint32", None),
            ("uint64", "uint64", None), ("float16", "float16", None),
            ("float32", "float32", None), ("float64", "float64", None),
            ("bfloat16", "bfloat16", "int16"),
            ("float8_e4m3fn", "float8_e4m3fn", "uint8"),
            ("float8_e5m2", "float8_e5m2", "uint8"),
            ("float8_e4m3fnuz", "float8_e4m3fnuz", "uint8"),
            ("float8_e5m2fnuz", "float8_e5m2fnuz", "uint8"),
            ("float8_e8m0fnu", "float8_e8m0fnu", "uint8"),
            ("complex64", "complex64", None), ("complex128", "complex128", None),
            ("complex32", "complex32", "int32"),  # torch.chalf: two float16, as code 33
            # torch's shell dtypes: one element a byte, its value in the low bits ([T11])
            *((name, name, "uint8") for name in _SHELL_BITS),
        ]
        by_name = {name: dtype for code, name in enumerate(dtypes.NAME_BY_CODE)
                   if (dtype := _numpy_dtype_or_none(code)) is not None}
        to_numpy = {}
        for torch_name, name, bits in pairs:
            t = getattr(torch, torch_name, None)
            if t is not None and name in by_name:
                to_numpy[t] = (by_name[name], None if bits is None else getattr(torch, bits))
        to_torch = {np_dtype: (t, bits) for t, (np_dtype, bits) in to_numpy.items()}
        _TABLES = to_numpy, to_torch
    return _TABLES


def _numpy_dtype_or_none(code: int) -> Optional[np.dtype]:
    """The numpy dtype of ``code``, or None when the installed ml_dtypes lacks it."""
    try:
        return dtypes.DTYPE_BY_CODE[code]
    except UnsupportedDtypeError:
        return None


def _float4_x2() -> Any:
    """torch.float4_e2m1fn_x2 (torch 2.8+), or None."""
    return getattr(_torch(), "float4_e2m1fn_x2", None)


def _float4() -> Optional[np.dtype]:
    """ml_dtypes' float4_e2m1fn (code 26), or None when ml_dtypes lacks it."""
    return _numpy_dtype_or_none(_FLOAT4_CODE)


def dtype_by_name() -> Dict[str, torch.dtype]:
    """``{"float32": torch.float32, ...}``: the torch dtype of each dtype of FORMAT.md section 4
    that torch has with the same elements (float4_e2m1fn_x2, two values a byte, is not one).

    Example:
        >>> dtype_by_name()["bfloat16"]                             # doctest: +SKIP
        torch.bfloat16
    """
    return {str(dtype).split(".")[-1]: dtype for dtype in _tables()[0]}


def _torch_dtype(np_dtype: np.dtype, name: str) -> Tuple[Any, Any]:
    """The torch dtype of a loaded array's dtype and the dtype whose bits numpy reads (or None).

    Raises:
        UnsupportedDtypeError: torch has no such dtype; names the tensor, the dtype and the way
            out (``framework='numpy'``).
    """
    found = _tables()[1].get(np_dtype)
    if found is None:
        raise UnsupportedDtypeError(f"tensor {name!r}: dtype {np_dtype} has no torch dtype (this "
                                    f"torch {_torch().__version__}); {_NUMPY} [T1]")
    return found


# -- saving --------------------------------------------------------------------------------------

def export(tensor: torch.Tensor, where: str) -> Tuple[Union[np.ndarray, LazyArray], Optional[str],
                                                      Optional[tuple]]:
    """``(array, device, identity)`` for a torch tensor being saved.

    ``array`` views a CPU tensor's memory (no copy; the writer copies a non-contiguous one when
    it writes it) or is a :class:`safeckpt.writer.LazyArray` that copies a GPU tensor to host when
    the writer reaches it. ``device`` is ``None`` for CPU, else e.g. ``"cuda:0"``. ``identity`` says
    which tensors are the same memory (tied weights), or is ``None`` for an empty tensor.

    Raises:
        InvalidValueError: a tensor without plain dense memory (nested, sparse, quantized, on the
            meta device, a subclass with its own dispatch such as FakeTensor or DTensor), naming
            ``where`` and the fix.
        UnsupportedDtypeError: a dtype the format cannot store.

    Example:
        >>> array, device, identity = export(torch.ones(2), "obj['w']")  # doctest: +SKIP
    """
    torch = _torch()
    problem = _unsaveable(torch, tensor)
    if problem:
        raise InvalidValueError(f"{where}: {problem}")
    x2 = tensor.dtype == _float4_x2() and tensor.dtype is not None
    if not x2 and tensor.dtype not in _tables()[0]:
        supported = [*_tables()[0], *([_float4_x2()] if _float4() is not None else [])]
        raise UnsupportedDtypeError(f"tensor {where!r}: torch dtype {tensor.dtype} cannot be stored; "
                                    f"supported: {', '.join(str(t) for t in supported if t)}")
    if x2 and (_float4() is None or tensor.dim() == 0):
        raise UnsupportedDtypeError(
            f"tensor {where!r}: a {tensor.dtype} tensor " + (
                "of shape () holds two values and has no last dimension to store them along; "
                "reshape it to (1,) first" if _float4() is not None else
                f"needs ml_dtypes>={dtypes.ML_DTYPES_MIN} (float4_e2m1fn); pip install -U ml_dtypes"))
    tensor = tensor.detach()
    if tensor.is_conj():
        tensor = tensor.resolve_conj()
    if tensor.is_neg():
        tensor = tensor.resolve_neg()
    identity = None
    if tensor.numel():
        identity = ("torch", str(tensor.device), tensor.data_ptr(), tuple(tensor.shape),
                    tuple(tensor.stride()), tensor.dtype)
    if tensor.device.type == "cpu":
        return _host_array(tensor, where), None, identity
    np_dtype, shape = (_float4(), (*tensor.shape[:-1], 2 * tensor.shape[-1])) if x2 else (
        _tables()[0][tensor.dtype][0], tuple(tensor.shape))
    return (LazyArray(np_dtype, shape, lambda: _host_array(tensor, where), tensor),
            str(tensor.device), identity)


def _unsaveable(torch: Any, tensor: Any) -> Optional[str]:
    """Why ``tensor`` has no plain dense memory to save, with the fix; None if it has."""
    if tensor.is_nested:
        return ("a nested tensor cannot be saved; save its components (tensor.unbind()) or a "
                "padded tensor (tensor.to_padded_tensor(0)) instead")
    if type(tensor).__torch_dispatch__ is not torch.Tensor.__torch_dispatch__:
        return (f"a {type(tensor).__name__} (a tensor subclass with its own dispatch) has no plain "
                "memory to save; convert it to a plain tensor first (e.g. DTensor.full_tensor())")
    if tensor.layout != torch.strided:
        return (f"a {str(tensor.layout).replace('torch.', '')} tensor cannot be saved; convert it "
                "with tensor.to_dense() first")
    if tensor.is_quantized:
        return ("a quantized tensor cannot be saved; save tensor.dequantize(), or tensor.int_repr() "
                "with its scale and zero point")
    if tensor.is_meta:
        return ("a tensor on the meta device holds no data to save; materialise it first (e.g. "
                "model.to_empty(device='cpu'), then initialise or load its values)")
    return None


def _host_array(tensor: Any, where: str) -> np.ndarray:
    """A numpy array of a tensor's values: a view of a CPU tensor, a host copy of another one.

    A shell dtype (int4 .. uint1) is checked to hold its values as ml_dtypes does, in the low bits
    of each byte; a float4_e2m1fn_x2 tensor of shape ``(..., k)`` becomes a new float4_e2m1fn
    array of shape ``(..., 2k)``, element ``2i`` from the low nibble of byte ``i``.

    Raises:
        InvalidValueError: no plain memory, or a shell dtype's byte with bits set above its
            width, naming ``where``, the first such element and the fix.
    """
    try:
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()  # the same bytes (shell dtypes cannot be copied, nor .contiguous)
        if tensor.dtype == _float4_x2():
            return _unpair(tensor.view(_torch().uint8).numpy())
        np_dtype, bits = _tables()[0][tensor.dtype]
        if bits is None:
            return tensor.numpy()
        raw = tensor.view(bits).numpy()  # numpy reads bfloat16/float8/shell dtypes as bits
    except RuntimeError as exc:  # e.g. an efficient zero tensor, a functorch wrapper
        raise InvalidValueError(f"{where}: this tensor has no plain memory to save (torch says: "
                                f"{exc}); save a plain copy (tensor.clone()) instead") from exc
    width = _SHELL_BITS.get(str(tensor.dtype).split(".")[-1])
    if width is not None:
        _check_shell(raw, width, tensor.dtype, where)
    return raw.view(np_dtype)


def _check_shell(raw: np.ndarray, width: int, dtype: Any, where: str) -> None:
    """Refuse the bytes of a shell-dtype tensor whose bits above ``width`` are not all zero."""
    flat = raw.reshape(-1)
    bad: np.ndarray = np.flatnonzero(flat >> np.uint8(width))
    if bad.size:
        first = int(bad[0])
        index = np.unravel_index(first, raw.shape)
        signed = str(dtype).split(".")[-1].startswith("int")
        raise InvalidValueError(
            f"tensor {where!r}: {dtype} element {tuple(int(i) for i in index)} is the byte "
            f"{int(flat[first]):#04x} ({bad.size} such), which has bits set above the "
            f"low {width}; torch defines no values for {dtype}, and safeckpt stores each element as "
            f"ml_dtypes holds it: its {width}-bit {'two' + chr(39) + 's complement ' if signed else ''}"
            f"pattern in the low bits of its byte, the other bits zero (e.g. "
            f"(t.view(torch.uint8) & {(1 << width) - 1:#x}).view({dtype}))")


def staged_as_bytes(dtype: Any) -> bool:
    """Whether a device tensor of torch ``dtype`` is copied to the host as its bytes and made an
    array there by :func:`finish_staged`: float4_e2m1fn_x2 (its array has twice the last
    dimension) and the shell dtypes (checked, and torch cannot copy them)."""
    return is_shell(dtype) or (dtype is not None and dtype == _float4_x2())


def finish_staged(raw: np.ndarray, out: np.ndarray, dtype: Any, where: str) -> None:
    """Make ``out`` (the tensor's numpy array) from ``raw``, the bytes of a torch tensor of
    ``dtype`` copied to the host: unpaired for float4_e2m1fn_x2; for a shell dtype ``out`` is a
    view of ``raw``, whose bytes are checked as a save checks them.

    Raises:
        InvalidValueError: a shell dtype's byte with bits set above its width, naming ``where``.
    """
    if dtype == _float4_x2():
        _unpair(raw, out.view(np.uint8))
    else:
        _check_shell(raw, _SHELL_BITS[str(dtype).split(".")[-1]], dtype, where)


def _unpair(raw: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """float4_e2m1fn_x2 bytes ``(..., k)`` as a float4_e2m1fn array ``(..., 2k)`` (new, or
    written into the uint8 array ``out``): element ``2i`` is the low nibble of byte ``i``,
    ``2i + 1`` its high nibble (torch's order, FORMAT.md section 4)."""
    if out is None:
        out = np.empty((*raw.shape[:-1], 2 * raw.shape[-1]), np.uint8)
    np.bitwise_and(raw, np.uint8(0x0F), out=out[..., 0::2])
    np.right_shift(raw, np.uint8(4), out=out[..., 1::2])
    return out.view(dtypes.DTYPE_BY_CODE[_FLOAT4_CODE])


def _pair(array: np.ndarray, name: str) -> Any:
    """A float4_e2m1fn array ``(..., 2k)`` as a new torch.float4_e2m1fn_x2 tensor ``(..., k)``.

    Raises:
        UnsupportedDtypeError: this torch has no float4_e2m1fn_x2, or the array has no last
            dimension or an odd one (torch holds the values in pairs along it); names the tensor.
    """
    _check_pairs(array.shape, name)
    # the file's packing is torch's: element 2i in the low nibble of byte i (FORMAT.md section 4)
    pairs = packing.pack(array, _FLOAT4_CODE).reshape(*array.shape[:-1], array.shape[-1] // 2)
    return _torch().from_numpy(pairs).view(_float4_x2())


def _check_pairs(shape: Tuple[int, ...], name: str) -> None:
    """Refuse a float4_e2m1fn tensor of ``shape`` that torch cannot hold (see :func:`_pair`)."""
    if _float4_x2() is None:
        why = f"this torch {_torch().__version__} has no float4_e2m1fn_x2"
    elif not shape or shape[-1] % 2:
        why = (f"its shape {tuple(shape)} has {'an odd' if shape else 'no'} last dimension, and "
               "torch's float4_e2m1fn_x2 holds two values a byte along it")
    else:
        return
    raise UnsupportedDtypeError(f"tensor {name!r}: dtype float4_e2m1fn: {why}; {_NUMPY} [T1]")


def to_device(tensor: Any, device: Any) -> Any:
    """``tensor.to(device)``, for the shell dtypes too (torch cannot copy them: their bytes go).

    Example:
        >>> to_device(torch.zeros(2, dtype=torch.uint8).view(torch.int4), "cpu").dtype  # doctest: +SKIP
        torch.int4
    """
    bits = _bits_dtype(tensor.dtype)
    if bits is not None:
        return tensor.view(bits).to(device).view(tensor.dtype)
    return tensor.to(device)


def copy_into(target: Any, source: Any, non_blocking: bool = False) -> Any:
    """``target.copy_(source)``, for the shell dtypes too: torch has no copy kernel for int4 ..
    uint1, so a source of the target's dtype is copied as bytes; another dtype is cast.

    Example:
        >>> t = torch.zeros(2, dtype=torch.uint8).view(torch.int4)  # doctest: +SKIP
        >>> copy_into(t, torch.ones(2, dtype=torch.uint8).view(torch.int4))  # doctest: +SKIP
    """
    bits = _bits_dtype(source.dtype)
    if bits is not None and source.dtype == target.dtype:
        target.view(bits).copy_(source.view(bits), non_blocking=non_blocking)
        return target
    return target.copy_(source, non_blocking=non_blocking)


def clone(tensor: Any) -> Any:
    """``tensor.clone()``, for the shell dtypes too (cloned as bytes: torch cannot copy them).

    Example:
        >>> clone(torch.zeros(2, dtype=torch.uint8).view(torch.int4)).dtype  # doctest: +SKIP
        torch.int4
    """
    bits = _bits_dtype(tensor.dtype)
    if bits is not None:
        return tensor.view(bits).clone().view(tensor.dtype)
    return tensor.clone()


def _bits_dtype(dtype: Any) -> Any:
    """The torch dtype of the same size whose bits stand for ``dtype``'s (uint8 for a shell
    or float8 dtype, int16 for bfloat16), or None for a dtype torch copies as it is."""
    entry = _tables()[0].get(dtype)
    return None if entry is None else entry[1]


# -- devices -------------------------------------------------------------------------------------

def _device(value: Any, what: str, hint: str = _ACCEPTED) -> Any:
    """The torch.device that ``value`` (a str, torch.device or int) names, checked to exist here.

    The one check of every device a load may use: ``map_location``, ``device=``, and a tensor's
    saved device when it is not remapped; it runs before any tensor is read.

    Raises:
        InvalidValueError: ``"{what}: {problem}; {hint}"``. The meta device is refused: it would
            load shapes without data.
    """
    torch = _torch()
    if isinstance(value, torch.device):
        device = value
    elif type(value) is str:
        try:
            device = torch.device(value)
        except (RuntimeError, ValueError) as exc:
            raise InvalidValueError(f"{what}: not a device name torch knows; {hint}") from exc
    elif type(value) is int and value >= 0:
        accelerator = getattr(torch, "accelerator", torch.cuda)  # torch < 2.6: an int is CUDA's
        if not accelerator.is_available():
            raise InvalidValueError(f"{what}: an int is a device of the accelerator (0 means "
                                    f"cuda:0) and there is no accelerator here; {hint}")
        device = torch.device(value)
    else:
        raise InvalidValueError(f"{what}: not a device; {hint}")
    kind, index = device.type, device.index
    backend: Any = getattr(torch, kind, None)
    if kind == "meta":
        problem = ("the meta device holds no data, so nothing would be loaded "
                   "(safeckpt.open(path).info(name) gives shapes and dtypes without reading)")
    elif kind == "cuda" and not torch.cuda.is_available():
        problem = "CUDA is not available here"
    elif not callable(getattr(backend, "is_available", None)) or not backend.is_available():
        problem = f"no {kind} device is available here"
    elif index is not None and not 0 <= index < getattr(backend, "device_count", lambda: 1)():
        problem = f"there is no {kind} device {index} here"
    else:
        return device
    raise InvalidValueError(f"{what}: {problem}; {hint}")


def check_map_location(map_location: MapLocation,
                       name: str = "map_location") -> CheckedMapLocation:
    """``map_location`` (or ``device``, as ``name`` says) checked to name devices that exist here.

    A function (``map_location`` only, not ``device``) is returned as it is: what it returns is
    checked per tensor, when :func:`load_tensors` calls it.

    Returns:
        None, a torch.device, a dict of saved device str -> torch.device, or the function.

    Raises:
        InvalidValueError: naming ``name``, the bad value and what is accepted; the meta device
            is refused (it would load no data).

    Example:
        >>> check_map_location("cpu")                               # doctest: +SKIP
        device(type='cpu')
    """
    torch = _torch()
    if map_location is None:
        return None
    if callable(map_location):
        if name != "map_location":
            raise InvalidValueError(f"{name}={map_location!r}: a function is not a device; pass "
                                    f"it as map_location=, or {_ACCEPTED}")
        return map_location
    if not isinstance(map_location, dict):
        return _device(map_location, f"{name}={map_location!r}",
                       _ACCEPTED + (_FUNCTION if name == "map_location" else ""))
    checked = {}
    for saved, device in map_location.items():
        if not isinstance(saved, (str, torch.device)):
            raise InvalidValueError(f"{name}: key {saved!r} is not a device str; {_ACCEPTED}")
        checked[str(saved)] = _device(device, f"{name}[{saved!r}]={device!r}")
    return checked


def _targets(saved_devices: Dict[int, Optional[str]], map_location: CheckedMapLocation,
             names: Sequence[str]) -> Dict[int, Any]:
    """``{index: torch.device}``: where each tensor goes, as torch.load decides from the device it
    was saved from (``saved_devices[i]``: a str from the file [R3], or None for the CPU) and a
    checked ``map_location``. Each saved device is checked once, naming its first tensor."""
    torch = _torch()
    by_saved: Dict[Optional[str], Any] = {}
    targets = {}
    for i, saved in saved_devices.items():
        if saved not in by_saved:
            if isinstance(map_location, torch.device):
                by_saved[saved] = map_location
            elif isinstance(map_location, dict) and (saved or "cpu") in map_location:
                by_saved[saved] = map_location[saved or "cpu"]
            elif saved is None:
                by_saved[saved] = torch.device("cpu")
            else:
                by_saved[saved] = _device(saved, f"tensor {names[i]!r} was saved from {saved!r}",
                                          _ELSEWHERE)
        targets[i] = by_saved[saved]
    return targets


# -- loading -------------------------------------------------------------------------------------

def from_numpy(array: np.ndarray, name: str = "tensor") -> torch.Tensor:
    """A CPU torch tensor of ``array``: zero-copy for a writable array.

    float4_e2m1fn (code 26) becomes torch's float4_e2m1fn_x2 with the last dimension halved (new
    memory: two values a byte, element ``2i`` in the low nibble); the shell dtypes int4 .. uint1
    keep ml_dtypes' bytes (one element a byte).

    Raises:
        UnsupportedDtypeError: a dtype torch does not have, or float4_e2m1fn with no last
            dimension or an odd one, naming tensor ``name`` and ``framework='numpy'``.

    Example:
        >>> from_numpy(np.arange(3, dtype=np.int64))                 # doctest: +SKIP
        tensor([0, 1, 2])
    """
    torch = _torch()
    if array.dtype == _float4() and _float4() is not None:
        return _pair(array, name)
    tensor_dtype, bits = _torch_dtype(array.dtype, name)
    if not array.dtype.isnative:  # a file's '<' arrays on a big-endian host: torch takes native only
        array = array.astype(array.dtype.newbyteorder("="))
    elif not array.flags.writeable:
        array = array.copy()  # torch would write to read-only memory (e.g. load from bytes)
    tensor = torch.from_numpy(array if bits is None else array.view(_tables()[0][bits][0]))
    return tensor if bits is None else tensor.view(tensor_dtype)


def _mapped(tensor: Any, function: MapFunction, location: str, saved: Optional[str],
            name: str) -> Any:
    """``tensor`` (on the CPU) where ``function(storage, location)`` puts it, as torch.load
    does: a storage (the tensor's own: it stays; another: the tensor is rebuilt on it), a tensor
    of the same shape and dtype, or None (the default: where it was saved, ``saved``).

    Raises:
        InvalidValueError: anything else returned, or a storage of another size, naming the
            tensor; with None, a saved device that torch cannot use here.
    """
    torch = _torch()
    own = tensor.untyped_storage()
    result = function(own, location)
    what = f"map_location({location!r}) for tensor {name!r}"
    if result is None:
        device = _targets({0: saved}, None, [name])[0]
        return tensor if device.type == "cpu" else to_device(tensor, device)
    if isinstance(result, torch.Tensor):
        if result.shape != tensor.shape or result.dtype != tensor.dtype:
            raise InvalidValueError(
                f"{what} returned a tensor of shape {tuple(result.shape)} {result.dtype}; the "
                f"tensor is shape {tuple(tensor.shape)} {tensor.dtype}: return the storage it "
                "was given (moved), a tensor like it, or None")
        return result
    if isinstance(result, torch.TypedStorage):
        result = result.untyped()
    if not isinstance(result, torch.UntypedStorage):
        raise InvalidValueError(f"{what} returned {type(result).__name__}, not a storage, a "
                                "tensor or None, as torch.load takes them")
    if result.nbytes() != own.nbytes() or result.device.type == "meta":
        raise InvalidValueError(
            f"{what} returned a storage of {result.nbytes()} bytes on {result.device}; the "
            f"tensor needs its {own.nbytes()} bytes with their data (e.g. storage.cuda())")
    if result.device == own.device and result.data_ptr() == own.data_ptr():
        return tensor
    return torch.empty(0, dtype=tensor.dtype, device=result.device).set_(
        result, tensor.storage_offset(), tensor.shape, tensor.stride())


def load_tensors(reader: TensorReader, saved_devices: Dict[int, Optional[str]],
                 map_location: MapLocation = None,
                 verify: Optional[bool] = None) -> Dict[int, torch.Tensor]:
    """``{index: tensor}`` for a load with ``framework="torch"``.

    ``saved_devices`` maps tensor indices to the device each was saved from (None: CPU). A tensor
    bound for the CPU views the file (zero-copy, or the fresh memory of an ``mmap=False`` read);
    one bound for any other device is copied there by :func:`device_tensors`. ``verify`` as
    :func:`safeckpt.load` takes it.

    A function ``map_location`` is called as torch.load calls it, once per stored tensor (a tied
    tensor once): ``map_location(storage, location)`` with the tensor's CPU storage (a view of the
    file) and the location it was saved from (``"cpu"``, ``"cuda:0"``); it returns the storage
    (the tensor stays a view), another storage of the same size (``storage.cuda(1)``: the
    tensor is rebuilt on it), a tensor of the same shape and dtype, or None (where it was saved).

    Raises:
        InvalidValueError: a ``map_location`` that torch cannot use here, or a tensor saved from
            such a device and not remapped; checked before any tensor is read (a function's
            results: when it returns them).

    Example:
        >>> load_tensors(reader, {0: None, 1: "cuda:0"}, "cpu")      # doctest: +SKIP
        >>> load_tensors(reader, {0: None}, lambda storage, location: storage)  # doctest: +SKIP
    """
    names = reader.names
    checked = check_map_location(map_location)
    if callable(checked):
        indices = list(saved_devices)
        arrays = reader.load_indices(indices, verify)
        return {i: _mapped(from_numpy(array, names[i]), checked, saved_devices[i] or "cpu",
                           saved_devices[i], names[i]) for i, array in zip(indices, arrays)}
    targets = _targets(saved_devices, checked, names)
    host = [i for i, device in targets.items() if device.type == "cpu"]
    arrays = reader.load_indices(host, verify)
    tensors = {i: from_numpy(array, names[i]) for i, array in zip(host, arrays)}
    by_device: Dict[Any, List[int]] = {}
    for i, device in targets.items():
        if device.type != "cpu":
            by_device.setdefault(device, []).append(i)
    for device, indices in by_device.items():
        tensors.update(device_tensors(reader, indices, device, verify=verify))
    return tensors


class _Staging:
    """The two host buffers of a load to a device, and the pieces of tensors bound for them.

    Bytes are read into one buffer while the device copies out of the other; on CUDA the buffers
    are pinned, the copies asynchronous, and an event per buffer says when it is free again.
    """

    def __init__(self, torch: Any, device: Any, size: int, checked: set) -> None:
        self.torch, self.device, self.size = torch, device, size
        self.pinned = device.type == "cuda"
        self.buffers = [torch.empty(size, dtype=torch.uint8, pin_memory=self.pinned)
                        for _ in range(2)]
        self.hosts = [buffer.numpy() for buffer in self.buffers]
        self.fences: List[Any] = [None, None]  # events: the device copied all out of that buffer
        self.checked = checked  # the tensors whose CRC32C is computed
        self.crcs: Dict[int, int] = {}
        self.slot, self.used = 0, 0
        self.pieces: List[tuple] = []  # (source, offset, length, at, dst, dst_at, index)

    def add(self, source: TensorSource, offset: int, nbytes: int, dst: Any, i: int) -> None:
        """Stage ``nbytes`` of the file at ``offset`` for ``dst``, flushing each full buffer."""
        done = 0
        while done < nbytes:
            length = min(nbytes - done, self.size - self.used)
            self.pieces.append((source, offset + done, length, self.used, dst, done, i))
            self.used += length
            done += length
            if self.used == self.size:
                self.flush()

    def flush(self) -> None:
        """Read the pieces into the current buffer, checksum them, start their copies, swap."""
        host = self.hosts[self.slot]
        by_source: Dict[Any, List[tuple]] = {}
        for source, offset, length, at, *_ in self.pieces:
            by_source.setdefault(source, []).append((offset, length, host[at:at + length]))
        for source, reads in by_source.items():
            source.read_ranges(*map(list, zip(*reads)))
        crc32c = _backend.backend.crc32c
        for source, _, length, at, dst, dst_at, i in self.pieces:
            if i in self.checked:
                self.crcs[i] = crc32c(host[at:at + length], self.crcs.get(i, 0))
            dst[dst_at:dst_at + length].copy_(self.buffers[self.slot][at:at + length],
                                              non_blocking=self.pinned)
        if self.pinned:
            fence = self.fences[self.slot] = self.torch.cuda.Event()
            fence.record(self.torch.cuda.current_stream(self.device))
        self.slot, self.used, self.pieces = 1 - self.slot, 0, []
        if self.fences[self.slot] is not None:
            self.fences[self.slot].synchronize()  # the other buffer is free again

    def finish(self) -> None:
        """Flush what is left and wait until every copy has finished."""
        if self.pieces:
            self.flush()
        for fence in self.fences:
            if fence is not None:
                fence.synchronize()


def device_tensors(reader: TensorReader, indices: Sequence[int], device: torch.device, *,
                   verify: Optional[bool] = None,
                   staging_bytes: int = _STAGING_BYTES) -> Dict[int, torch.Tensor]:
    """``{index: tensor}`` on ``device`` for the tensors ``indices`` of an open reader.

    The bytes go through two host buffers of ``staging_bytes``: while the device copies out of
    one, the next bytes are read into the other. On CUDA the buffers are pinned and the copies
    asynchronous, so reading the file and copying to the GPU overlap; with ``mmap=False`` the
    file is read by parallel pread straight into the pinned buffers. Small tensors share a
    buffer, a large one crosses several. Each tensor's CRC32C is computed from the staged bytes,
    so the file is read once: always with ``verify=True``, never with ``False``, and with
    ``None`` (the default: every byte is copied anyway) for each file that holds checksums.
    Every copy has finished when this returns.

    Raises:
        ChecksumError: a tensor whose bytes do not match its CRC32C, or ``verify=True`` on a file
            without checksums.
        RuntimeError: ``device`` is a CUDA device and CUDA is not available, or the host is
            big-endian (the file's little-endian bytes would be staged to the device unswapped).

    Example:
        >>> state = safeckpt.torch.load("model.sckpt", map_location="cuda:0")  # doctest: +SKIP
    """
    torch = _torch()
    if dtypes.BIG_ENDIAN_HOST:
        raise RuntimeError(f"cannot stage tensors to {device} on a big-endian host: their bytes "
                           "are little-endian; load them with map_location='cpu' (swapped into "
                           "host order) and move them")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"cannot put tensors on {device}: CUDA is not available; pass "
                           "map_location='cpu' (or a dict) to load them elsewhere")
    names = reader.names
    located = [reader.locate(i) for i in indices]
    entries = [source.entry(local) for source, local in located]
    # each tensor's (torch dtype, shape), or None: packed in the file, unpacked on the host [T11]
    kinds = [_staged_kind(entry, names[i]) for i, entry in zip(indices, entries)]
    staged = [(i, where, entry, kind) for i, where, entry, kind
              in zip(indices, located, entries, kinds) if kind is not None]
    checked: set = set()
    staging = _Staging(torch, device,
                       max(1, min(staging_bytes, sum(e.nbytes for _, _, e, _ in staged))), checked)
    tensors = {}
    for i, (source, _), entry, (dtype, shape) in staged:
        # None: each file that has checksums; verifies(True) raises for a file without them
        if (source.has_checksums if verify is None else source.verifies(verify)):
            checked.add(i)
        dst = torch.empty(entry.nbytes, dtype=torch.uint8, device=device)
        tensors[i] = dst.view(dtype).reshape(shape)
        staging.add(source, entry.offset, entry.nbytes, dst, i)
    staging.finish()
    for i, (source, local), _, _ in staged:
        if i in checked:
            source.check_crc(local, staging.crcs.get(i, 0))  # zero-size: the CRC32C of no bytes is 0
    unpacked = [i for i, kind in zip(indices, kinds) if kind is None]
    for i, array in zip(unpacked, reader.load_indices(unpacked, verify)):
        tensors[i] = to_device(from_numpy(array, names[i]), device)
    return tensors


def _staged_kind(entry: Any, name: str) -> Optional[Tuple[Any, Tuple[int, ...]]]:
    """``(torch dtype, shape)`` of a tensor whose file bytes are its torch bytes; None for one
    packed in the file that torch holds a byte an element (int4 .. uint1: unpacked on the host).

    float4_e2m1fn with an even last dimension is staged as it is: its packed bytes are those of
    torch.float4_e2m1fn_x2 (element 0 in the low nibble), the last dimension halved.

    Raises:
        UnsupportedDtypeError: torch has no dtype for it, naming the tensor.
    """
    code = dtypes.code_of(entry.dtype, name)
    if code == _FLOAT4_CODE:
        shape = tuple(entry.shape)
        _check_pairs(shape, name)
        return _float4_x2(), (*shape[:-1], shape[-1] // 2)
    dtype = _torch_dtype(entry.dtype, name)[0]
    return None if code in dtypes.PACKED_CODES else (dtype, tuple(entry.shape))


def to_torch(obj: Any, map_location: MapLocation = None) -> Any:
    """Convert the numpy arrays of a loaded tree to torch tensors (zero-copy on CPU), moved as
    ``map_location`` says (the arrays count as saved from the CPU: a function is called with
    location ``"cpu"``, see :func:`load_tensors`); an array that appears twice becomes one tensor.

    Messages name each tensor by its dotted path below ``obj`` (``"state.0.exp_avg"``).

    Raises:
        InvalidValueError: a ``map_location`` that torch cannot use here, or a function's result
            that torch.load would not take, naming the tensor.
        UnsupportedDtypeError: an array of a dtype torch does not have.

    Example:
        >>> to_torch({"w": np.ones(2, np.float32)})                  # doctest: +SKIP
        {'w': tensor([1., 1.])}
    """
    checked = check_map_location(map_location)
    device = None if callable(checked) else _targets({0: None}, checked, ["tensor"])[0]
    done: Dict[int, Tuple[np.ndarray, Any]] = {}

    def convert(array: np.ndarray, path: Sequence[Any]) -> Any:
        if id(array) not in done:  # the array is kept in ``done``, so its id stays its own
            where = ".".join(map(str, path)) or "tensor"
            tensor = from_numpy(array, where)
            if callable(checked):
                tensor = _mapped(tensor, checked, "cpu", None, where)
            elif device is not None and device.type != "cpu":
                tensor = to_device(tensor, device)
            done[id(array)] = (array, tensor)
        return done[id(array)][1]
    return _map_arrays(obj, convert)


_CONTAINERS = (dict, collections.OrderedDict, list, tuple)
_END = object()


def _map_arrays(obj: Any, convert: Callable[[np.ndarray, Sequence[Any]], Any]) -> Any:
    """A copy of a tree's containers with ``convert(array, path)`` for each numpy array (``path``:
    the keys and indices that reach it), without recursion."""
    def leaf(value: Any, path: Tuple[Any, ...], key: Any) -> Any:  # the path built for arrays only
        return convert(value, (*path, key)) if type(value) is np.ndarray else value

    def items(container: Any) -> Any:
        return iter(container.items() if isinstance(container, dict) else enumerate(container))

    if type(obj) not in _CONTAINERS:
        return convert(obj, ()) if type(obj) is np.ndarray else obj
    # frames: container, its (key, value) pairs, the converted values, the path to it
    stack: List[List[Any]] = [[obj, items(obj), [], ()]]
    while True:
        frame = stack[-1]
        pair: Any = next(frame[1], _END)
        if pair is not _END:
            key, child = pair
            if type(child) in _CONTAINERS:
                stack.append([child, items(child), [], (*frame[3], key)])
            else:
                frame[2].append(leaf(child, frame[3], key))
            continue
        stack.pop()
        container, _, out, _ = frame
        value = type(container)(zip(container.keys(), out) if isinstance(container, dict) else out)
        if not stack:
            return value
        stack[-1][2].append(value)
