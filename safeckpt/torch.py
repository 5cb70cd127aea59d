"""The PyTorch adapter: ``safeckpt.torch.save/load/save_model/load_model``.

torch is imported by the caller, never by ``import safeckpt``. Tensors are saved without an extra
copy (a CPU tensor's own buffer is written; a GPU tensor is copied to host one tensor at a time,
as the writer reaches it) and loaded zero-copy from the file's mapping, or to a GPU through pinned
staging buffers (:func:`safeckpt.torch_convert.device_tensors`, where the conversions live).
bfloat16 and float8 travel as their bits. Tied tensors are stored once and come back as one tensor.

Example:
    >>> import torch, safeckpt.torch as st                        # doctest: +SKIP
    >>> model = torch.nn.Linear(4, 2)                              # doctest: +SKIP
    >>> st.save_model(model, "model.sckpt")                        # doctest: +SKIP
    >>> report = st.load_model(model, "model.sckpt")               # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, NamedTuple, Optional, Tuple

from . import api, torch_convert
from .api import Prefix
from .errors import StateMismatchError
from .filekind import PathLike
# The conversions, public here too: code written against safeckpt.torch keeps working.
from .torch_convert import device_tensors, export, from_numpy, load_tensors, to_torch

__all__ = ["LoadReport", "check_state", "device_tensors", "export", "from_numpy", "load",
           "load_model", "load_state", "load_tensors", "save", "save_model", "to_torch"]

if TYPE_CHECKING:  # names for annotations, which are never evaluated; torch is optional
    import torch


class LoadReport(NamedTuple):
    """What :func:`load_model` found: lists of missing keys (in the model, not the file),
    unexpected keys (in the file, not the model) and ``(key, file (shape, dtype), model (shape,
    dtype))`` for tensors that do not fit."""

    missing: List[str]
    unexpected: List[Any]
    mismatched: List[Tuple[str, Any, Any]]


def save(obj: Any, path: PathLike, **options: Any) -> None:
    """:func:`safeckpt.save` (torch tensors are saved by any save; this is for symmetry).

    Example:
        >>> safeckpt.torch.save({"model": model.state_dict()}, "ckpt.sckpt")  # doctest: +SKIP
    """
    api.save(obj, path, **options)


def load(path: PathLike, *, prefix: Prefix = None, map_location: torch_convert.MapLocation = None,
         device: Optional[torch_convert.DeviceName] = None, mmap: bool = True,
         verify: Optional[bool] = None, **limits: int) -> Any:
    """:func:`safeckpt.load` with ``framework="torch"``: tensors view the file (zero-copy).

    ``map_location`` as ``torch.load`` takes it: ``"cpu"``, ``"cuda:0"``, a ``torch.device``, or a
    dict mapping saved devices to devices; by default each tensor goes back where it was saved.
    ``device`` puts every tensor on one device, as safetensors' ``device=`` does (an int is a
    device of the accelerator: ``0`` is ``cuda:0``). Both are checked before the file is read;
    the meta device is refused (it would load no data). Tensors bound for a GPU go through
    pinned staging buffers (:func:`safeckpt.torch_convert.device_tensors`).

    ``verify``: ``None`` (default) checks the CRC32C of every tensor whose bytes are copied
    anyway (``mmap=False``, or to a GPU), where it costs little next to the read, and leaves a
    zero-copy mapped load lazy; ``True`` always checks, ``False`` never.

    Raises:
        InvalidValueError: a ``map_location`` or ``device`` that torch cannot use here, or a
            tensor saved from such a device and not remapped.

    Example:
        >>> opt_state = safeckpt.torch.load("ckpt.sckpt", prefix="optimizer")  # doctest: +SKIP
    """
    torch_convert.check_map_location(device if device is not None else map_location,
                                     "device" if device is not None else "map_location")
    return api.load(path, prefix=prefix, framework="torch", map_location=map_location,
                    device=device, mmap=mmap, verify=verify, **limits)


def save_model(model: torch.nn.Module, path: PathLike, **options: Any) -> None:
    """Save ``model.state_dict()`` (tied weights stored once); options as for :func:`safeckpt.save`.

    Example:
        >>> safeckpt.torch.save_model(model, "model.sckpt")        # doctest: +SKIP
    """
    api.save(model.state_dict(), path, **options)


def _ties(expected: Dict[str, Any]) -> Dict[str, tuple]:
    """``{key: group}`` for a model's ``state_dict(keep_vars=True)``: keys whose tensors are the
    same memory (tied weights) share a group. A meta or empty tensor has no memory: only the same
    object ties."""
    groups: Dict[str, tuple] = {}
    for key, value in expected.items():
        if not torch_convert.is_tensor(value) or value.is_meta or not value.numel():
            groups[key] = ("object", id(value))
        else:
            groups[key] = (str(value.device), value.data_ptr(), tuple(value.shape),
                           tuple(value.stride()), value.dtype)
    return groups


def check_state(model: torch.nn.Module, state: Dict[Any, Any]) -> LoadReport:
    """Compare a state dict with ``model``: a :class:`LoadReport`, touching nothing.

    A key missing from ``state`` is not reported when it is tied to a key that ``state`` holds
    (it shares that tensor's memory in the model, so it is loaded with it), as safetensors'
    ``save_model`` drops such keys.

    Example:
        >>> safeckpt.torch.check_state(model, {"weight": w}).missing  # doctest: +SKIP
        ['bias']
    """
    expected = model.state_dict(keep_vars=True)
    ties = _ties(expected)
    present = {ties[key] for key in expected if key in state}
    missing = [key for key in expected if key not in state and ties[key] not in present]
    unexpected = [key for key in state if key not in expected]
    mismatched: List[Tuple[str, Any, Any]] = []
    for key, want in expected.items():
        if key not in state or not torch_convert.is_tensor(want):
            continue
        got = state[key]
        if not torch_convert.is_tensor(got):
            mismatched.append((key, type(got).__name__, (tuple(want.shape), want.dtype)))
        elif got.shape != want.shape or got.dtype != want.dtype:
            mismatched.append((key, (tuple(got.shape), got.dtype), (tuple(want.shape), want.dtype)))
    return LoadReport(missing, unexpected, mismatched)


def load_state(model: torch.nn.Module, state: Dict[Any, Any], *, strict: bool = True,
               where: str = "state") -> LoadReport:
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

    Example:
        >>> report = safeckpt.torch.load_state(model, state, strict=False)  # doctest: +SKIP
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


def _assign(model: Any, loadable: Dict[str, Any], expected: Dict[str, Any],
            ties: Dict[str, tuple]) -> None:
    """Load checked tensors: copied into the model's memory or, for its meta tensors, put in their
    place (a state tensor bound for two untied places is copied for the second, never aliased),
    then tied again wherever the model held one meta tensor in several places."""
    meta = {key for key in loadable if getattr(expected[key], "is_meta", False)}
    model.load_state_dict({k: v for k, v in loadable.items() if k not in meta}, strict=False)
    if not meta:
        return
    placed: Dict[int, tuple] = {}
    assigned: Dict[str, Any] = {}
    for key in meta:
        value = loadable[key]
        assigned[key] = value if placed.setdefault(id(value), ties[key]) == ties[key] else value.clone()
    slots = [(table, name, table[name]) for module in model.modules()
             for table in (module._parameters, module._buffers) for name in table]
    model.load_state_dict(assigned, strict=False, assign=True)
    new: Dict[int, Any] = {}  # id of a meta tensor -> the tensor that took its place
    for table, name, old in slots:
        if table[name] is not old:
            new.setdefault(id(old), table[name])
    for table, name, old in slots:
        if id(old) in new:
            table[name] = new[id(old)]


def _keys(keys: List[Any]) -> str:
    """Keys for a message: str keys as they are, others (an int from the file) as repr."""
    return ", ".join(key if type(key) is str else repr(key) for key in keys)


def _fmt(desc: Any) -> str:
    if isinstance(desc, tuple):
        shape, dtype = desc
        return f"shape {shape} {str(dtype).replace('torch.', '')}"
    return f"a {desc}"


def load_model(model: torch.nn.Module, path: PathLike, *, strict: bool = True, prefix: Prefix = None,
               verify: Optional[bool] = None, **limits: Any) -> LoadReport:
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
    with api.open(path, **limits) as reader:
        state = reader.load(prefix, framework="torch", map_location="cpu",
                            verify=reader.has_checksums if verify is None else verify)
    return load_state(model, state, strict=strict, where=f"{str(path)!r}"
                      + (f" at {prefix!r}" if prefix is not None else ""))
