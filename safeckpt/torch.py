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
from .shard import open_any
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
            (torch.float8_e4m3fnuz, "float8_e4m3fnuz", torch.uint8),
            (torch.float8_e5m2fnuz, "float8_e5m2fnuz", torch.uint8),
            (torch.complex64, "complex64", None), (torch.complex128, "complex128", None),
        ]
        by_name = {name: dtype for _, name, dtype in DTYPES}
        to_numpy = {t: (by_name[name], bits) for t, name, bits in pairs if name in by_name}
        to_torch = {np_dtype: (t, bits) for t, (np_dtype, bits) in to_numpy.items()}
        _TABLES = to_numpy, to_torch
    return _TABLES


def _torch_dtype(np_dtype, name):
    """The torch dtype of a loaded array's dtype and the dtype whose bits numpy reads (or None)."""
    found = _tables()[1].get(np_dtype)
    if found is None:
        raise UnsupportedDtypeError(f"tensor {name!r}: dtype {np_dtype} has no torch dtype; load it "
                                    "with framework='numpy' [T1]")
    return found


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

    Raises:
        InvalidValueError: a tensor without plain dense memory (nested, sparse, quantized, on the
            meta device, a subclass with its own dispatch such as FakeTensor or DTensor), naming
            ``where`` and the fix.
        UnsupportedDtypeError: a dtype the format cannot store.
    """
    torch = _torch()
    problem = _unsaveable(torch, tensor)
    if problem:
        raise InvalidValueError(f"{where}: {problem}")
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
        return _host_array(tensor, where), None, identity
    np_dtype = _tables()[0][tensor.dtype][0]
    return (LazyArray(np_dtype, tuple(tensor.shape), lambda: _host_array(tensor, where)),
            str(tensor.device), identity)


def _unsaveable(torch, tensor):
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


def _host_array(tensor, where):
    """A numpy array of a tensor's values: a view of a CPU tensor, a host copy of another one."""
    try:
        if tensor.device.type != "cpu":
            tensor = tensor.cpu().contiguous()
        return _numpy_view(tensor)
    except RuntimeError as exc:  # e.g. an efficient zero tensor, a functorch wrapper
        raise InvalidValueError(f"{where}: this tensor has no plain memory to save (torch says: "
                                f"{exc}); save a plain copy (tensor.clone()) instead") from exc


_ACCEPTED = ("use 'cpu', 'cuda', 'cuda:N', an int N (device N of the accelerator), a torch.device, "
             "or a dict {saved device: device}")
_ELSEWHERE = "pass map_location='cpu' (or a dict) to load it elsewhere"


def _device(value, what, hint=_ACCEPTED):
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
    backend = getattr(torch, kind, None)
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


def _map_location(map_location, name="map_location"):
    """``map_location`` (or ``device``, as ``name`` says) checked: None, a torch.device, or a dict
    of saved device str -> torch.device."""
    torch = _torch()
    if map_location is None:
        return None
    if not isinstance(map_location, dict):
        return _device(map_location, f"{name}={map_location!r}")
    checked = {}
    for saved, device in map_location.items():
        if not isinstance(saved, (str, torch.device)):
            raise InvalidValueError(f"{name}: key {saved!r} is not a device str; {_ACCEPTED}")
        checked[str(saved)] = _device(device, f"{name}[{saved!r}]={device!r}")
    return checked


def _targets(saved_devices, map_location, names):
    """``{index: torch.device}``: where each tensor goes, as torch.load decides from the device it
    was saved from (``saved_devices[i]``: a str from the file [R3], or None for the CPU) and a
    checked ``map_location``. Each saved device is checked once, naming its first tensor."""
    torch = _torch()
    by_saved, targets = {}, {}
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


def from_numpy(array, name="tensor"):
    """A CPU torch tensor of ``array``: zero-copy for a writable array."""
    torch = _torch()
    tensor_dtype, bits = _torch_dtype(array.dtype, name)
    if not array.flags.writeable:
        array = array.copy()  # torch would write to read-only memory (e.g. load from bytes)
    tensor = torch.from_numpy(array if bits is None else array.view(_tables()[0][bits][0]))
    return tensor if bits is None else tensor.view(tensor_dtype)


_STAGING_BYTES = 64 << 20  # each of the two host buffers of a load to a GPU


def load_tensors(reader, saved_devices, map_location=None, verify=None):
    """``{index: tensor}`` for a load with ``framework="torch"``.

    ``saved_devices`` maps tensor indices to the device each was saved from (None: CPU). A tensor
    bound for the CPU views the file (zero-copy, or the fresh memory of an ``mmap=False`` read);
    one bound for any other device is copied there by :func:`device_tensors`. ``verify`` as
    :func:`load` takes it.
    """
    targets = _targets(saved_devices, _map_location(map_location), reader._names)
    host = [i for i, device in targets.items() if device.type == "cpu"]
    arrays = _tree.load_checked(reader, host, verify)
    tensors = {i: from_numpy(arrays[i], reader._names[i]) for i in host}
    by_device = {}
    for i, device in targets.items():
        if device.type != "cpu":
            by_device.setdefault(device, []).append(i)
    for device, indices in by_device.items():
        tensors.update(device_tensors(reader, indices, device, verify=verify))
    return tensors


def device_tensors(reader, indices, device, *, verify=None, staging_bytes=_STAGING_BYTES):
    """``{index: tensor}`` on ``device`` for the tensors ``indices`` of an open reader.

    The bytes go through two host buffers of ``staging_bytes``: while the device copies out of
    one, the next bytes are read into the other. On CUDA the buffers are pinned and the copies
    asynchronous, so reading the file and copying to the GPU overlap; with ``mmap=False`` the
    file is read by parallel pread straight into the pinned buffers. Small tensors share a
    buffer, a large one crosses several. Each tensor's CRC32C is computed from the staged bytes,
    so the file is read once: always with ``verify=True``, never with ``False``, and with
    ``None`` (the default: every byte is copied anyway) for each file that holds checksums.
    Every copy has finished when this returns.

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
    checked = set()  # the tensors whose CRC32C is computed
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
            if i in checked:
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
        if verify or (verify is None and source._crcs is not None):
            checked.add(i)
        dtype = _torch_dtype(DTYPE_BY_CODE[source._codes[local]], reader._names[i])[0]
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
    for i, (source, local) in zip(indices, sources):
        if i in checked:
            source._check_crc(local, crcs.get(i, 0))  # zero-size: the CRC32C of no bytes is 0
    return tensors


def to_torch(obj, map_location=None):
    """Convert the numpy arrays of a loaded tree to torch tensors (zero-copy on CPU), moved as
    ``map_location`` says (the arrays count as saved from the CPU); an array that appears twice
    becomes one tensor."""
    device = _targets({0: None}, _map_location(map_location), ["tensor"])[0]
    done = {}

    def convert(array):
        if id(array) not in done:
            tensor = from_numpy(array)
            done[id(array)] = (array, tensor if device.type == "cpu" else tensor.to(device))
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


def load(path, *, prefix=None, map_location=None, device=None, mmap=True, verify=None,
         **limits):
    """:func:`safeckpt.load` with ``framework="torch"``: tensors view the file (zero-copy).

    ``map_location`` as ``torch.load`` takes it: ``"cpu"``, ``"cuda:0"``, a ``torch.device``, or a
    dict mapping saved devices to devices; by default each tensor goes back where it was saved.
    ``device`` puts every tensor on one device, as safetensors' ``device=`` does (an int is a
    device of the accelerator: ``0`` is ``cuda:0``). Both are checked before the file is read;
    the meta device is refused (it would load no data). Tensors bound for a GPU go through
    pinned staging buffers (:func:`device_tensors`).

    ``verify``: ``None`` (default) checks the CRC32C of every tensor whose bytes are copied
    anyway (``mmap=False``, or to a GPU), where it costs little next to the read, and leaves a
    zero-copy mapped load lazy; ``True`` always checks, ``False`` never.

    Raises:
        InvalidValueError: a ``map_location`` or ``device`` that torch cannot use here, or a
            tensor saved from such a device and not remapped.

    Example:
        >>> opt_state = safeckpt.torch.load("ckpt.sckpt", prefix="optimizer")  # doctest: +SKIP
    """
    _map_location(device if device is not None else map_location,
                  "device" if device is not None else "map_location")
    return _tree.load(path, prefix=prefix, framework="torch", map_location=map_location,
                      device=device, mmap=mmap, verify=verify, **limits)


def save_model(model, path, **options):
    """Save ``model.state_dict()`` (tied weights stored once); options as for :func:`safeckpt.save`.

    Example:
        >>> safeckpt.torch.save_model(model, "model.sckpt")        # doctest: +SKIP
    """
    _tree.save(model.state_dict(), path, **options)


def _ties(expected):
    """``{key: group}`` for a model's ``state_dict(keep_vars=True)``: keys whose tensors are the
    same memory (tied weights) share a group. A meta or empty tensor has no memory: only the same
    object ties."""
    torch = _torch()
    groups = {}
    for key, value in expected.items():
        if not isinstance(value, torch.Tensor) or value.is_meta or not value.numel():
            groups[key] = ("object", id(value))
        else:
            groups[key] = (str(value.device), value.data_ptr(), tuple(value.shape),
                           tuple(value.stride()), value.dtype)
    return groups


def check_state(model, state):
    """Compare a state dict with ``model``: a :class:`LoadReport`, touching nothing.

    A key missing from ``state`` is not reported when it is tied to a key that ``state`` holds
    (it shares that tensor's memory in the model, so it is loaded with it), as safetensors'
    ``save_model`` drops such keys.
    """
    torch = _torch()
    expected = model.state_dict(keep_vars=True)
    ties = _ties(expected)
    present = {ties[key] for key in expected if key in state}
    missing = [key for key in expected if key not in state and ties[key] not in present]
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

    With ``strict=False`` what fits is loaded and the rest is in the returned
    :class:`LoadReport`. Parameters and buffers on the meta device (a model built under
    ``torch.device("meta")``) take the state's tensors themselves, as torch's ``assign=True``
    does; tied ones stay tied. (Buffers outside the state dict, ``persistent=False``, are left
    as the model has them.)

    Raises:
        StateMismatchError: before anything is touched: with ``strict``, listing all missing,
            unexpected and mismatched keys; even without it, when nothing at all would be
            loaded, or when a meta tensor of the model would be left without data.
    """
    if not isinstance(state, dict):
        raise StateMismatchError(f"{where}: holds a {type(state).__name__}, not a state dict")
    report = check_state(model, state)
    skip = set(report.unexpected) | {key for key, _, _ in report.mismatched}
    loadable = {k: v for k, v in state.items() if k not in skip}
    expected = model.state_dict(keep_vars=True)
    ties = _ties(expected)
    loaded = {ties[key] for key in loadable}
    empty = [key for key, value in expected.items()
             if getattr(value, "is_meta", False) and ties[key] not in loaded]
    if strict and (report.missing or report.unexpected or report.mismatched):
        problem = "strict"
    elif not loadable and (expected or state):
        problem = "nothing fits"
    elif empty:
        problem = "meta"
    else:
        _assign(model, loadable, expected, ties)
        return report
    lines = [f"{where} does not fit {type(model).__name__}; nothing was loaded:"]
    if report.missing:
        lines.append(f"  missing keys ({len(report.missing)}): {_keys(report.missing)}")
    if report.unexpected:
        lines.append(f"  unexpected keys ({len(report.unexpected)}): {_keys(report.unexpected)}")
    for key, got, want in report.mismatched:
        lines.append(f"  {_keys([key])}: file has {_fmt(got)}, model has {_fmt(want)}")
    if problem == "meta":
        lines.append(f"  {_keys(empty)} would stay on the meta device, without data; pass a "
                     "state that holds them")
    elif problem == "strict":
        lines.append("Pass strict=False to load the matching part and get this report.")
    raise StateMismatchError("\n".join(lines))


def _assign(model, loadable, expected, ties):
    """Load checked tensors: copied into the model's memory or, for its meta tensors, put in their
    place (a state tensor bound for two untied places is copied for the second, never aliased),
    then tied again wherever the model held one meta tensor in several places."""
    meta = {key for key in loadable if getattr(expected[key], "is_meta", False)}
    model.load_state_dict({k: v for k, v in loadable.items() if k not in meta}, strict=False)
    if not meta:
        return
    placed, assigned = {}, {}
    for key in meta:
        value = loadable[key]
        assigned[key] = value if placed.setdefault(id(value), ties[key]) == ties[key] else value.clone()
    slots = [(table, name, table[name]) for module in model.modules()
             for table in (module._parameters, module._buffers) for name in table]
    model.load_state_dict(assigned, strict=False, assign=True)
    new = {}  # id of a meta tensor -> the tensor that took its place
    for table, name, old in slots:
        if table[name] is not old:
            new.setdefault(id(old), table[name])
    for table, name, old in slots:
        if id(old) in new:
            table[name] = new[id(old)]


def _keys(keys):
    """Keys for a message: str keys as they are, others (an int from the file) as repr."""
    return ", ".join(key if type(key) is str else repr(key) for key in keys)


def _fmt(desc):
    if isinstance(desc, tuple):
        shape, dtype = desc
        return f"shape {shape} {str(dtype).replace('torch.', '')}"
    return f"a {desc}"


def load_model(model, path, *, strict=True, prefix=None, verify=None, **limits):
    """Load a file saved by :func:`save_model` (or the subtree at ``prefix``) into ``model``.

    Every key, shape and dtype is checked first: with ``strict`` (default) one
    :class:`~safeckpt.StateMismatchError` lists all missing keys, unexpected keys and mismatches,
    and no parameter is touched. With ``strict=False`` the matching tensors are loaded and the
    rest is reported; a load that would load nothing raises. A key missing from the file but tied
    in the model to one that is there (safetensors' ``save_model`` drops those) is loaded with
    it. Tensors are copied straight from the file's mapping to the parameters' devices; a model
    on the meta device takes the file's tensors (views of the mapping) instead.
    ``verify=None`` (default) checks every CRC32C when the file has them, since a load into a
    model reads every byte anyway; ``True`` requires them, ``False`` skips them.

    Returns:
        A :class:`LoadReport` ``(missing, unexpected, mismatched)``.

    Example:
        >>> report = safeckpt.torch.load_model(model, "model.sckpt", strict=False)  # doctest: +SKIP
    """
    with open_any(path, **limits) as reader:
        state = reader.load(prefix, framework="torch", map_location="cpu",
                            verify=reader.has_checksums if verify is None else verify)
    return load_state(model, state, strict=strict, where=f"{str(path)!r}"
                      + (f" at {prefix!r}" if prefix is not None else ""))
