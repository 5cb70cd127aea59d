"""The PyTorch adapter: ``safeckpt.torch.save/load/save_model/load_model``.

torch is imported when one of these functions first runs, never by ``import safeckpt``. Tensors are
saved without an extra copy (a CPU tensor's own buffer is written; a GPU tensor is copied to host
one tensor at a time, as the writer reaches it) and loaded zero-copy from the file's mapping, or
to a GPU through pinned staging buffers (:func:`device_tensors`).
bfloat16 and float8 travel as their bits. Tied tensors are stored once and come back as one tensor.

Example:
    >>> import torch, safeckpt.torch as st                        # doctest: +SKIP
    >>> model = torch.nn.Linear(4, 2)                              # doctest: +SKIP
    >>> st.save_model(model, "model.sckpt")                        # doctest: +SKIP
    >>> report = st.load_model(model, "model.sckpt")               # doctest: +SKIP
"""

import collections

import numpy as np

from . import tree as _tree
from .dtypes import DTYPE_BY_CODE, DTYPES
from .errors import InvalidValueError, StateMismatchError, UnsupportedDtypeError
from .writer import LazyArray

LoadReport = collections.namedtuple("LoadReport", "missing unexpected mismatched")
LoadReport.__doc__ = """What :func:`load_model` found: lists of missing keys (in the model, not the
file), unexpected keys (in the file, not the model) and ``(key, file (shape, dtype),
model (shape, dtype))`` for tensors that do not fit."""

_TABLES = None  # built on first use: torch is imported lazily


def _torch():
    import torch
    return torch


def _tables():
    """``{torch dtype: (numpy dtype, torch dtype whose bits numpy reads or None)}`` and back."""
    global _TABLES
    if _TABLES is None:
        torch = _torch()
        pairs = [
            (torch.bool, "bool", None), (torch.int8, "int8", None), (torch.int16, "int16", None),
            (torch.int32, "int32", None), (torch.int64, "int64", None), (torch.uint8, "uint8", None),
            (torch.uint16, "uint16", None), (torch.uint32, "uint32", None),
            (torch.uint64, "uint64", None), (torch.float16, "float16", None),
            (torch.float32, "float32", None), (torch.float64, "float64", None),
            (torch.bfloat16, "bfloat16", torch.int16),
            (torch.float8_e4m3fn, "float8_e4m3fn", torch.uint8),
            (torch.float8_e5m2, "float8_e5m2", torch.uint8),
            (torch.complex64, "complex64", None), (torch.complex128, "complex128", None),
        ]
        by_name = {name: dtype for _, name, dtype in DTYPES}
        to_numpy = {t: (by_name[name], bits) for t, name, bits in pairs}
        to_torch = {np_dtype: (t, bits) for t, (np_dtype, bits) in to_numpy.items()}
        _TABLES = to_numpy, to_torch
    return _TABLES


def _numpy_view(tensor):
    """A numpy array that views a CPU tensor's memory (its strides kept)."""
    np_dtype, bits = _tables()[0][tensor.dtype]
    if bits is None:
        return tensor.numpy()
    return tensor.view(bits).numpy().view(np_dtype)


def export(tensor, where):
    """``(array, device, identity)`` for a torch tensor being saved.

    ``array`` views a CPU tensor's memory (no copy; the writer copies a non-contiguous one when
    it writes it) or is a :class:`safeckpt.writer.LazyArray` that copies a GPU tensor to host when
    the writer reaches it. ``device`` is ``None`` for CPU, else e.g. ``"cuda:0"``. ``identity`` says
    which tensors are the same memory (tied weights), or is ``None`` for an empty tensor.
    """
    torch = _torch()
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_meta:
        raise InvalidValueError(f"{where}: a {tensor.layout} {'quantized ' if tensor.is_quantized else ''}"
                                f"tensor on {tensor.device} cannot be saved; convert it to a dense "
                                "tensor (e.g. .to_dense() or .dequantize()) first")
    if tensor.dtype not in _tables()[0]:
        raise UnsupportedDtypeError(f"tensor {where!r}: torch dtype {tensor.dtype} cannot be stored; "
                                    f"supported: {', '.join(str(t) for t in _tables()[0])}")
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
        return _numpy_view(tensor), None, identity
    np_dtype = _tables()[0][tensor.dtype][0]
    return (LazyArray(np_dtype, tuple(tensor.shape), lambda: _numpy_view(tensor.cpu().contiguous())),
            str(tensor.device), identity)


def _target_device(saved, map_location):
    """Where a tensor saved from ``saved`` (a str or None for CPU) goes, as torch.load decides."""
    torch = _torch()
    saved = saved or "cpu"
    if map_location is None:
        return torch.device(saved)
    if isinstance(map_location, dict):
        return torch.device(map_location.get(saved, saved))
    if isinstance(map_location, (str, torch.device)):
        return torch.device(map_location)
    raise TypeError(f"map_location={map_location!r}: use a str, a torch.device or a dict of "
                    "saved device -> device")


def from_numpy(array, saved_device=None, map_location=None):
    """A torch tensor of ``array``: zero-copy for a writable CPU array, then moved if asked."""
    torch = _torch()
    tensor_dtype, bits = _tables()[1][array.dtype]
    if not array.flags.writeable:
        array = array.copy()  # torch would write to read-only memory (e.g. load from bytes)
    tensor = torch.from_numpy(array if bits is None else array.view(_tables()[0][bits][0]))
    if bits is not None:
        tensor = tensor.view(tensor_dtype)
    device = _target_device(saved_device, map_location)
    if device.type != "cpu":
        try:
            tensor = tensor.to(device)
        except (RuntimeError, AssertionError) as exc:
            raise RuntimeError(f"cannot put a tensor saved from {saved_device or 'cpu'} on {device}: "
                               f"{exc}; pass map_location='cpu' (or a dict) to load it elsewhere") from exc
    return tensor


_STAGING_BYTES = 64 << 20  # each of the two host buffers of a load to a GPU


def load_tensors(reader, saved_devices, map_location=None, verify=False):
    """``{index: tensor}`` for a load with ``framework="torch"``.

    ``saved_devices`` maps tensor indices to the device each was saved from (None: CPU). A tensor
    bound for a CUDA device is copied there by :func:`device_tensors`; any other views the file
    (zero-copy) and is moved as :func:`from_numpy` says.
    """
    targets = {i: _target_device(saved, map_location) for i, saved in saved_devices.items()}
    host = [i for i, device in targets.items() if device.type != "cuda"]
    arrays = _tree.load_checked(reader, host, verify)
    tensors = {i: from_numpy(arrays[i], saved_devices[i], map_location) for i in host}
    by_device = {}
    for i, device in targets.items():
        if device.type == "cuda":
            by_device.setdefault(device, []).append(i)
    for device, indices in by_device.items():
        tensors.update(device_tensors(reader, indices, device, verify=verify))
    return tensors


def device_tensors(reader, indices, device, *, verify=False, staging_bytes=_STAGING_BYTES):
    """``{index: tensor}`` on ``device`` for the tensors ``indices`` of an open reader.

    The bytes go through two host buffers of ``staging_bytes``: while the device copies out of
    one, the next bytes are read into the other. On CUDA the buffers are pinned and the copies
    asynchronous, so reading the file and copying to the GPU overlap; with ``mmap=False`` the
    file is read by parallel pread straight into the pinned buffers. Small tensors share a
    buffer, a large one crosses several. With ``verify`` each tensor's CRC32C is computed from the
    staged bytes, so the file is read once. Every copy has finished when this returns.

    Example:
        >>> state = safeckpt.torch.load("model.sckpt", map_location="cuda:0")  # doctest: +SKIP
    """
    torch = _torch()
    pinned = device.type == "cuda"
    if pinned and not torch.cuda.is_available():
        raise RuntimeError(f"cannot put tensors on {device}: CUDA is not available; pass "
                           "map_location='cpu' (or a dict) to load them elsewhere")
    sources = [reader._source(i) for i in indices]
    staging_bytes = max(1, min(staging_bytes, sum(source._nbytes[local]
                                                  for source, local in sources)))
    buffers = [torch.empty(staging_bytes, dtype=torch.uint8, pin_memory=pinned) for _ in range(2)]
    hosts = [buffer.numpy() for buffer in buffers]
    fences = [None, None]  # CUDA events: the device has copied everything out of that buffer
    tensors, crcs, pieces = {}, {}, []  # pieces: (source, offset, length, at, dst, dst_at, index)
    slot, used = 0, 0

    def flush():
        """Read the pieces into buffer ``slot``, checksum them, start their copies, swap."""
        nonlocal slot, used, pieces
        host, by_source = hosts[slot], {}
        for source, offset, length, at, *_ in pieces:
            by_source.setdefault(source, []).append((offset, length, host[at:at + length]))
        for source, reads in by_source.items():
            source._read_ranges(*map(list, zip(*reads)))
        for source, _, length, at, dst, dst_at, i in pieces:
            if verify:
                crcs[i] = source._be.crc32c(host[at:at + length], crcs.get(i, 0))
            dst[dst_at:dst_at + length].copy_(buffers[slot][at:at + length], non_blocking=pinned)
        if pinned:
            fences[slot] = torch.cuda.Event()
            fences[slot].record(torch.cuda.current_stream(device))
        slot, used, pieces = 1 - slot, 0, []
        if fences[slot] is not None:
            fences[slot].synchronize()  # the other buffer is free again

    for i, (source, local) in zip(indices, sources):
        if verify and source._crcs is None:
            source.verify([])  # raises: the file holds no checksums
        dtype = _tables()[1][DTYPE_BY_CODE[source._codes[local]]][0]
        nbytes, offset = source._nbytes[local], source._offsets[local]
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        tensors[i] = dst.view(dtype).reshape(source._shape(local))
        done = 0
        while done < nbytes:
            length = min(nbytes - done, staging_bytes - used)
            pieces.append((source, offset + done, length, used, dst, done, i))
            used += length
            done += length
            if used == staging_bytes:
                flush()
    if pieces:
        flush()
    for fence in fences:
        if fence is not None:
            fence.synchronize()
    if verify:
        for i, (source, local) in zip(indices, sources):
            source._check_crc(local, crcs.get(i, 0))  # zero-size: the CRC32C of no bytes is 0
    return tensors


def to_torch(obj, map_location=None):
    """Convert the numpy arrays of a loaded tree to torch tensors (zero-copy on CPU); an array
    that appears twice becomes one tensor."""
    done = {}

    def convert(array):
        if id(array) not in done:
            done[id(array)] = (array, from_numpy(array, None, map_location))
        return done[id(array)][1]
    return _map_arrays(obj, convert)


_CONTAINERS = (dict, collections.OrderedDict, list, tuple)
_END = object()


def _map_arrays(obj, convert):
    """A copy of a tree's containers with ``convert(array)`` for each numpy array, no recursion."""
    def leaf(value):
        return convert(value) if type(value) is np.ndarray else value

    def values(container):
        return iter(container.values() if isinstance(container, dict) else container)

    if type(obj) not in _CONTAINERS:
        return leaf(obj)
    stack = [[obj, values(obj), []]]  # frames: container, its values, the converted ones
    while True:
        frame = stack[-1]
        child = next(frame[1], _END)
        if child is not _END:
            if type(child) in _CONTAINERS:
                stack.append([child, values(child), []])
            else:
                frame[2].append(leaf(child))
            continue
        stack.pop()
        container, _, out = frame
        value = type(container)(zip(container.keys(), out) if isinstance(container, dict) else out)
        if not stack:
            return value
        stack[-1][2].append(value)


def save(obj, path, **options):
    """:func:`safeckpt.save` (torch tensors are saved by any save; this is for symmetry)."""
    _tree.save(obj, path, **options)


def load(path, *, prefix=None, map_location=None, device=None, mmap=True, verify=False,
         **limits):
    """:func:`safeckpt.load` with ``framework="torch"``: tensors view the file (zero-copy).

    ``map_location`` as ``torch.load`` takes it: ``"cpu"``, ``"cuda:0"``, a ``torch.device``, or a
    dict mapping saved devices to devices; by default each tensor goes back where it was saved.
    ``device`` puts every tensor on one device, as safetensors' ``device=`` does. Tensors bound
    for CUDA go through pinned staging buffers (:func:`device_tensors`).

    Example:
        >>> opt_state = safeckpt.torch.load("ckpt.sckpt", prefix="optimizer")  # doctest: +SKIP
    """
    return _tree.load(path, prefix=prefix, framework="torch", map_location=map_location,
                      device=device, mmap=mmap, verify=verify, **limits)


def save_model(model, path, **options):
    """Save ``model.state_dict()`` (tied weights stored once); options as for :func:`safeckpt.save`.

    Example:
        >>> safeckpt.torch.save_model(model, "model.sckpt")        # doctest: +SKIP
    """
    _tree.save(model.state_dict(), path, **options)


def check_state(model, state):
    """Compare a state dict with ``model``: a :class:`LoadReport`, touching nothing."""
    torch = _torch()
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = []
    for key, want in expected.items():
        if key not in state or not isinstance(want, torch.Tensor):
            continue
        got = state[key]
        if not isinstance(got, torch.Tensor):
            mismatched.append((key, type(got).__name__, (tuple(want.shape), want.dtype)))
        elif got.shape != want.shape or got.dtype != want.dtype:
            mismatched.append((key, (tuple(got.shape), got.dtype), (tuple(want.shape), want.dtype)))
    return LoadReport(missing, unexpected, mismatched)


def load_state(model, state, *, strict=True, where="state"):
    """Load a state dict of tensors into ``model`` after checking every key, shape and dtype.

    Raises:
        StateMismatchError: with ``strict``, listing all missing, unexpected and mismatched keys,
            before any parameter is touched.
    """
    if not isinstance(state, dict):
        raise StateMismatchError(f"{where}: holds a {type(state).__name__}, not a state dict")
    report = check_state(model, state)
    if strict and (report.missing or report.unexpected or report.mismatched):
        lines = [f"{where} does not fit {type(model).__name__}; nothing was loaded:"]
        if report.missing:
            lines.append(f"  missing keys ({len(report.missing)}): {', '.join(report.missing)}")
        if report.unexpected:
            lines.append(f"  unexpected keys ({len(report.unexpected)}): "
                         f"{', '.join(report.unexpected)}")
        for key, got, want in report.mismatched:
            lines.append(f"  {key}: file has {_fmt(got)}, model has {_fmt(want)}")
        lines.append("Pass strict=False to load the matching part and get this report.")
        raise StateMismatchError("\n".join(lines))
    skip = set(report.unexpected) | {key for key, _, _ in report.mismatched}
    model.load_state_dict({k: v for k, v in state.items() if k not in skip}, strict=False)
    return report


def _fmt(desc):
    if isinstance(desc, tuple):
        shape, dtype = desc
        return f"shape {shape} {str(dtype).replace('torch.', '')}"
    return f"a {desc}"


def load_model(model, path, *, strict=True, prefix=None, verify=False, **limits):
    """Load a file saved by :func:`save_model` (or the subtree at ``prefix``) into ``model``.

    Every key, shape and dtype is checked first: with ``strict`` (default) one
    :class:`~safeckpt.StateMismatchError` lists all missing keys, unexpected keys and mismatches,
    and no parameter is touched. With ``strict=False`` the matching tensors are loaded.
    Tensors are copied straight from the file's mapping to the parameters' devices.

    Returns:
        A :class:`LoadReport` ``(missing, unexpected, mismatched)``.

    Example:
        >>> report = safeckpt.torch.load_model(model, "model.sckpt", strict=False)  # doctest: +SKIP
    """
    state = _tree.load(path, prefix=prefix, framework="torch", map_location="cpu", verify=verify,
                       **limits)
    return load_state(model, state, strict=strict, where=f"{str(path)!r}"
                      + (f" at {prefix!r}" if prefix is not None else ""))
