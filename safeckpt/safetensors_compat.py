"""``safeckpt.safe_open``: the reader of ``safetensors.safe_open``, on every file safeckpt opens.

Replacing ``from safetensors import safe_open`` with ``from safeckpt import safe_open`` is the
only edit: the same call ``safe_open(path, framework, device="cpu")``, used as a context manager
or not, with ``keys()`` (sorted), ``offset_keys()`` (in storage order), ``metadata()`` (a dict, or
None when the file has none), ``get_tensor(name)``, ``get_tensors()`` and ``get_slice(name)``,
whose :class:`SafeSlice` has ``get_shape()``, ``get_dtype()`` (safetensors' names: ``"F32"``,
``"BF16"``, ``"F8_E4M3"`` ...) and ``[...]``. The file is opened by :func:`safeckpt.open`, so it may
be a .safetensors file, a .sckpt file, a sharded checkpoint (its index or its directory) or any
other checkpoint that :func:`safeckpt.open` reads, and every rule of docs/FORMAT.md is checked
before a tensor is handed out.

Frameworks: ``"pt"`` (also ``"torch"``, ``"pytorch"``) gives torch tensors, ``"np"``
(``"numpy"``) numpy arrays, ``"jax"`` (``"flax"``) jax arrays. TensorFlow, MLX and Paddle are
refused by name (safeckpt has no adapter for them). ``device``: for ``"pt"`` a str (``"cpu"``,
``"cuda"``, ``"cuda:1"``, ``"mps"``), an int (device N of the accelerator, as torch takes it) or
a ``torch.device``, checked to exist when the file is opened; ``"cpu"`` only for the others.

Where it differs from safetensors 0.8 (on purpose):

- A missing tensor raises ``KeyError`` (safetensors: ``SafetensorError``); a closed reader
  raises :class:`safeckpt.ReaderClosedError`; a bad framework or device raises
  :class:`safeckpt.InvalidValueError` when the file is opened, not at the first tensor.
- ``"np"`` slices take numpy's indexing (steps, negative starts, lists), and ``"np"`` reads
  bfloat16 and float8 (as ml_dtypes' dtypes), which safetensors' numpy path cannot.
- ``"jax"`` refuses 64-bit tensors while ``jax_enable_x64`` is off (safetensors makes them
  32-bit silently): a load is bit-exact or refused.
- ``metadata()`` of a .sckpt file may hold values other than str (what it was saved with); a
  safetensors header with an empty ``__metadata__`` reads as None (safetensors: ``{}``).
- ``get_dtype()`` of a complex128 tensor (which .sckpt files hold and safetensors does not) is
  ``"C128"``, and of the other dtypes safetensors has no name for, their name in FORMAT.md section
  4 (``"int4"``, ``"float8_e4m3"``, ``"complex32"`` ...).
- F4 (float4_e2m1fn) with ``"pt"`` is torch's float4_e2m1fn_x2 with the last dimension halved,
  as safetensors gives it (``get_shape()`` and slices count float4 values, as there); a last
  dimension that is odd is refused by name. int4 .. uint1 are torch's shell dtypes, one element
  a byte; ``"np"`` gives every one of them as ml_dtypes' dtype.

Example:
    >>> import numpy as np, safeckpt, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> safeckpt.save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, path)
    >>> with safeckpt.safe_open(path, framework="np") as f:
    ...     s = f.get_slice("w")
    ...     f.keys(), s.get_shape(), s.get_dtype(), s[:, 1:].tolist()
    (['w'], [2, 3], 'F32', [[1.0, 2.0], [4.0, 5.0]])
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np

from . import api, jax_convert, torch_convert
from .dtypes import NAME_BY_CODE, PACKED_CODES, code_of
from .errors import InvalidValueError, quote
from .filekind import PathLike
from .reader import TensorMap, TensorSlice
from .safetensors_format import DTYPE_NAMES as _ST_NAMES

__all__ = ["BACKENDS", "DTYPE_NAMES", "FRAMEWORKS", "SafeSlice", "safe_open"]

# The framework names safetensors accepts and what each gives here.
FRAMEWORKS = {"pt": "pt", "torch": "pt", "pytorch": "pt", "np": "np", "numpy": "np",
              "jax": "jax", "flax": "jax"}
# Names safetensors also accepts, refused here by name: safeckpt has no adapter for them.
_NO_ADAPTER = {"tf": "TensorFlow", "tensorflow": "TensorFlow", "mlx": "MLX", "paddle": "Paddle"}
# backend=, as safetensors 0.8 takes it: map the file, or read tensors with pread.
BACKENDS = {"mmap": True, "pread": False}
# safetensors' dtype string of each dtype code; for the codes it has no name for, complex128 is
# "C128" here and the others are their names in FORMAT.md section 4 ("int4", "float8_e4m3", ...).
DTYPE_NAMES = {**{code: name for code, name in enumerate(NAME_BY_CODE)}, **_ST_NAMES, 16: "C128"}

_Self = TypeVar("_Self", bound="safe_open")


def _framework(framework: Any) -> str:
    """``"pt"``, ``"np"`` or ``"jax"`` for a framework name safetensors accepts; else raise."""
    if type(framework) is str and framework in FRAMEWORKS:
        return FRAMEWORKS[framework]
    known = ", ".join(repr(name) for name in FRAMEWORKS)
    if type(framework) is str and framework in _NO_ADAPTER:
        raise InvalidValueError(f"framework={framework!r}: safeckpt has no {_NO_ADAPTER[framework]} "
                                f"adapter; use one of {known}, e.g. framework='np' and convert "
                                "the numpy arrays")
    raise InvalidValueError(f"framework={quote(framework)} is not a framework; use one of {known}")


def _device(framework: str, device: Any) -> Any:
    """The torch.device for ``"pt"`` (checked to exist here), None for the CPU-only frameworks."""
    if framework != "pt":
        if device is None or (type(device) is str and device == "cpu"):
            return None
        raise InvalidValueError(f"device={quote(device)}: framework {framework!r} loads to the CPU "
                                "only (as safetensors does); pass device='cpu', or framework='pt' "
                                "for a torch device")
    if isinstance(device, dict):
        raise InvalidValueError("device= is one device (a str, an int or a torch.device), not a "
                                "dict; to map saved devices, use safeckpt.torch.load(path, "
                                "map_location={...})")
    return torch_convert.check_map_location("cpu" if device is None else device, "device")


class safe_open:  # noqa: N801 - the name of safetensors' class, so that only the import changes
    """Open a checkpoint lazily, as ``safetensors.safe_open`` does; tensors are read when asked for.

    Parameters:
        filename: a str or path-like: a .safetensors or .sckpt file, a shard index, or a
            directory holding one checkpoint (see :func:`safeckpt.open`).
        framework: ``"pt"``/``"torch"``/``"pytorch"``, ``"np"``/``"numpy"`` or ``"jax"``/``"flax"``.
        device: for ``"pt"``, where tensors go: ``"cpu"`` (default), ``"cuda"``, ``"cuda:N"``, an
            int (device N of the accelerator), a ``torch.device``; ``"cpu"`` for the others.
        backend: ``"mmap"`` (default: tensors view a private mapping of the file, zero-copy) or
            ``"pread"`` (read into fresh memory, a .sckpt tensor's CRC32C checked as it is read;
            ``get_slice(...)[a:b]`` reads only those rows). A URL is always read by ranged
            requests into fresh memory (FORMAT.md section 12).
        storage_options, fs: for a URL (``s3://bucket/model.safetensors``) or a path inside an
            fsspec filesystem, as :func:`safeckpt.open` takes them.
        limits: ``max_header_size``, ``max_tensors``, ``max_ndim``, ``max_depth``; raise them only
            for files you trust.

    Raises:
        InvalidValueError: a framework or device that cannot be used here.
        SafeckptError: a subclass naming the problem in the file; OSError for I/O.

    Example:
        >>> with safeckpt.safe_open("model.safetensors", framework="pt", device=0) as f:  # doctest: +SKIP
        ...     state = {name: f.get_tensor(name) for name in f.keys()}
    """

    def __init__(self, filename: PathLike, framework: str, device: Any = "cpu", *,
                 backend: str = "mmap", storage_options: Optional[Dict[str, Any]] = None,
                 fs: Any = None, **limits: int) -> None:
        self._framework = _framework(framework)
        self._device = _device(self._framework, device)
        if type(backend) is not str or backend not in BACKENDS:
            raise InvalidValueError(f"backend={quote(backend)}: use 'mmap' or 'pread'")
        self._mmap = BACKENDS[backend]
        self._positions: Optional[Dict[str, int]] = None
        self._reader: TensorMap = api.open(filename, mmap=self._mmap,
                                            storage_options=storage_options, fs=fs, **limits)

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the file; tensors already handed out stay valid."""
        self._reader.close()

    def _open(self) -> TensorMap:
        """The reader; raises ReaderClosedError after close()."""
        self._reader.check_open()
        return self._reader

    def _position(self, name: str) -> int:
        """The index of tensor ``name`` in the reader; KeyError naming it if there is none."""
        reader = self._open()
        if self._positions is None:
            self._positions = {key: i for i, key in enumerate(reader.names)}
        try:
            return self._positions[name]
        except (KeyError, TypeError):
            raise KeyError(f"{reader.where} has no tensor {quote(name)}") from None

    def keys(self) -> List[str]:
        """The tensor names, sorted (as safetensors returns them)."""
        return sorted(self._open().names)

    def offset_keys(self) -> List[str]:
        """The tensor names in storage order: by file (shards in name order), then by offset."""
        reader = self._open()
        return sorted(reader.names, key=lambda name: (reader.shard_of(name) or "",
                                                      reader.info(name).offset))

    def metadata(self) -> Optional[Dict[str, Any]]:
        """The file's metadata as a new dict, or None when it has none (as safetensors)."""
        metadata = self._open().metadata
        return dict(metadata) if metadata else None

    def get_tensor(self, name: str) -> Any:
        """Tensor ``name`` in the framework and on the device of this reader.

        Raises:
            KeyError: no tensor of that name.
            ChecksumError: its bytes do not match their CRC32C (a .sckpt file holds one per
                tensor; checked when they are copied: ``backend="pread"``, or to a device other
                than the CPU).
        """
        return self._tensors([self._position(name)])[0]

    def get_tensors(self) -> Dict[str, Any]:
        """Every tensor, as ``{name: tensor}`` in storage order, read in one pass."""
        names = self.offset_keys()
        return dict(zip(names, self._tensors([self._position(name) for name in names])))

    def _tensors(self, indices: Sequence[int]) -> List[Any]:
        reader = self._open()
        if self._device is not None and self._device.type != "cpu":
            on_device = torch_convert.device_tensors(reader, indices, self._device)
            return [on_device[i] for i in indices]
        names = reader.names
        return [_convert(array, self._framework, names[i])
                for i, array in zip(indices, reader.load_indices(indices))]

    def get_slice(self, name: str) -> SafeSlice:
        """A lazy handle on tensor ``name``: ``get_shape()``, ``get_dtype()``, and ``[...]``, which
        reads only what it needs (the touched pages; with ``backend="pread"``, the rows).

        Raises:
            KeyError: no tensor of that name.
        """
        i = self._position(name)
        reader = self._reader
        info = reader.info(name)
        # mapped: a view of the tensor (nothing read until indexed), valid after close() as
        # safetensors' slices are; pread: a TensorSlice, which reads the rows an index needs
        source = reader.load_indices([i])[0] if self._mmap else reader.get_slice(name)
        return SafeSlice(source, name, info.shape, DTYPE_NAMES[code_of(info.dtype)],
                         self._framework, self._device)

    def __repr__(self) -> str:
        device = "" if self._device is None else f", device={str(self._device)!r}"
        return (f"<safeckpt.safe_open {self._reader.where} framework={self._framework!r}{device}"
                f"{' (closed)' if self._reader.closed else ''}>")


def _convert(array: np.ndarray, framework: str, name: str) -> Any:
    """A CPU array of tensor ``name`` as ``framework`` wants it (zero-copy for torch)."""
    if framework == "pt":
        return torch_convert.from_numpy(array, name)
    if framework == "jax":
        return jax_convert.from_numpy(array, name)
    return array


class SafeSlice:
    """One tensor, indexed lazily; made by :meth:`safe_open.get_slice` (safetensors' PySafeSlice).

    ``[...]`` takes torch's indexing for ``"pt"`` (what safetensors applies too) and numpy's for
    the others; a slice is never checked against the tensor's CRC32C (a part has no checksum of
    its own: ``get_tensor`` checks a whole tensor when it copies it).

    Example:
        >>> with safeckpt.safe_open("model.safetensors", "pt") as f:   # doctest: +SKIP
        ...     s = f.get_slice("embed")
        ...     rows = s[: s.get_shape()[0] // 2]
    """

    def __init__(self, source: Union[np.ndarray, TensorSlice], name: str, shape: Tuple[int, ...],
                 dtype: str, framework: str, device: Any) -> None:
        self._source, self._name, self._shape, self._dtype = source, name, shape, dtype
        self._framework, self._device = framework, device

    def get_shape(self) -> List[int]:
        """The shape of the whole tensor, as a list."""
        return list(self._shape)

    def get_dtype(self) -> str:
        """The dtype of the tensor as safetensors names it: ``"F32"``, ``"BF16"``, ``"I64"`` ..."""
        return self._dtype

    def __getitem__(self, key: Any) -> Any:
        source = self._source
        if self._framework != "pt":
            return _convert(np.asarray(source[key]), self._framework, self._name)
        if code_of(source.dtype) in PACKED_CODES:  # indexed as numpy holds it (a value a byte)
            tensor = torch_convert.from_numpy(np.ascontiguousarray(source[key]), self._name)
            return torch_convert.to_device(tensor, self._device)
        rows = None if isinstance(source, np.ndarray) or not self._shape else _rows_first(key)
        if rows is None:  # all of it: a view of the mapping, or a read of the whole tensor
            whole = source if isinstance(source, np.ndarray) else source[...]
            tensor = torch_convert.from_numpy(whole, self._name)[key]
        else:  # pread, and an index that starts with rows: read only those
            first, rest = rows
            tensor = torch_convert.from_numpy(np.asarray(source[first]), self._name)
            tensor = tensor[(slice(None),) + rest if isinstance(first, slice) else rest]
        return tensor if self._device.type == "cpu" else torch_convert.to_device(tensor,
                                                                                 self._device)

    def __repr__(self) -> str:
        return f"<safeckpt.SafeSlice {self._name!r} shape={self.get_shape()} dtype={self._dtype}>"


def _rows_first(key: Any) -> Optional[Tuple[Union[int, slice], Tuple[Any, ...]]]:
    """``(first, rest)`` when ``key`` indexes the first axis with an int or a slice of positive
    step and the others with basic indices only (ints, slices, None, Ellipsis): then
    ``t[key]`` is ``t[first][rest]`` (an int) or ``t[first][:, *rest]`` (a slice), in numpy
    and in torch alike. None for any other key (read the whole tensor and index it)."""
    parts = key if type(key) is tuple else (key,)
    if not parts or not all(_basic(part) for part in parts):
        return None
    first = parts[0]
    if first is None or first is Ellipsis:
        return None
    if isinstance(first, slice) and first.step is not None and first.step <= 0:
        return None  # torch refuses it: let torch say so
    return first, parts[1:]


def _basic(part: Any) -> bool:
    """Whether ``part`` is a basic index: an int (not a bool), a slice of ints or None, None or
    Ellipsis."""
    if part is None or part is Ellipsis:
        return True
    if isinstance(part, slice):
        return all(end is None or _int(end) for end in (part.start, part.stop, part.step))
    return _int(part)


def _int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
