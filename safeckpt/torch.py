"""The PyTorch adapter: ``safeckpt.torch.save/load/save_model/load_model``.

torch is imported by the caller, never by ``import safeckpt``. Tensors are saved without an extra
copy (a CPU tensor's own buffer is written; a GPU tensor is copied to host one tensor at a time,
as the writer reaches it) and loaded zero-copy from the file's mapping, or to a GPU through pinned
staging buffers (:func:`safeckpt.torch_convert.device_tensors`, where the conversions live).
bfloat16 and float8 travel as their bits. Tied tensors are stored once and come back as one tensor.

Loading into a model takes torch's habits, each explicit and reported: ``strip_prefix``/
``add_prefix`` for the keys of ``torch.compile`` (``_orig_mod.``) and DDP (``module.``),
``cast=True`` for a file of another dtype, ``assign=True`` (and meta-device models) to take the
file's tensors instead of copying them; a load that does not fit says which of these would fix it.

Example:
    >>> import torch, safeckpt.torch as st                        # doctest: +SKIP
    >>> model = torch.nn.Linear(4, 2)                              # doctest: +SKIP
    >>> st.save_model(model, "model.sckpt")                        # doctest: +SKIP
    >>> report = st.load_model(model, "model.sckpt")               # doctest: +SKIP
"""

from __future__ import annotations

import collections
import math
import warnings
from typing import (TYPE_CHECKING, Any, Dict, Iterable, List, NamedTuple, Optional, Sequence,
                    Tuple, Union)

from . import api, torch_convert
from . import tree as _tree
from .api import Prefix
from .errors import InvalidValueError, StateMismatchError, plural, quote
from .filekind import PathLike
# The conversions, public here too: code written against safeckpt.torch keeps working.
from .torch_convert import device_tensors, export, from_numpy, load_tensors, to_torch

__all__ = ["LoadReport", "check_state", "device_tensors", "export", "from_numpy", "load",
           "load_model", "load_state", "load_tensors", "save", "save_model", "to_torch"]

if TYPE_CHECKING:  # names for annotations, which are never evaluated; torch is optional
    import torch

    # What a load writes into: a module, or a plain state dict whose tensors are copied into
    Target = Union[torch.nn.Module, Dict[Any, torch.Tensor]]

_LISTED = 20  # keys listed per kind in a StateMismatchError; the rest are counted
# The search for a subtree of a nested state that fits the model (a hint, on a load that does
# not fit) looks at no more dicts than this, no deeper than this, and takes candidate prefixes
# from no more keys per dict than this: a hint costs little, whatever the file holds.
_HINT_DICTS, _HINT_DEPTH, _HINT_KEYS = 256, 8, 10_000
_MISSING = object()
_CAST = "pass cast=True to cast it"  # the note on a tensor that differs only in dtype


class _Lists(NamedTuple):
    missing: List[Any]
    unexpected: List[Any]
    mismatched: List[Tuple[Any, Any, Any]]


class LoadReport(_Lists):
    """What a load found: the tuple ``(missing, unexpected, mismatched)``, with ``cast`` and
    ``hint`` as attributes (so ``missing, unexpected, mismatched = report`` keeps working, and
    ``report == ([], [], [])`` when everything fits).

    - ``missing``: keys of the model the file lacks; ``unexpected``: keys of the file the model
      lacks; ``mismatched``: ``(key, file (shape, dtype), model (shape, dtype))`` for tensors
      that do not fit (the file's side is a type name for a value that is not a tensor). Keys as
      the model names them, after ``strip_prefix``/``add_prefix``.
    - ``cast``: ``(key, file dtype, model dtype)`` for each tensor cast (``cast=True``).
    - ``hint``: the options that would make the file fit, e.g. ``"pass strip_prefix='module.':
      ..."``, or ``""``.
    """

    cast: List[Tuple[Any, Any, Any]]
    hint: str

    def __new__(cls, missing: List[Any], unexpected: List[Any],
                mismatched: List[Tuple[Any, Any, Any]], cast: Iterable[Tuple[Any, Any, Any]] = (),
                hint: str = "") -> LoadReport:
        report = super().__new__(cls, missing, unexpected, mismatched)
        report.cast, report.hint = list(cast), hint
        return report

    def __repr__(self) -> str:
        return (f"LoadReport(missing={self.missing!r}, unexpected={self.unexpected!r}, "
                f"mismatched={self.mismatched!r}, cast={self.cast!r}, hint={self.hint!r})")


def save(obj: Any, path: PathLike, **options: Any) -> None:
    """:func:`safeckpt.save` (torch tensors are saved by any save; this is for symmetry).

    Example:
        >>> safeckpt.torch.save({"model": model.state_dict()}, "ckpt.sckpt")  # doctest: +SKIP
    """
    api.save(obj, path, **options)


def load(path: PathLike, *, prefix: Prefix = None, map_location: torch_convert.MapLocation = None,
         device: Optional[torch_convert.DeviceName] = None, mmap: bool = True,
         verify: Optional[bool] = None, storage_options: Optional[Dict[str, Any]] = None,
         fs: Any = None, **limits: int) -> Any:
    """:func:`safeckpt.load` with ``framework="torch"``: tensors view the file (zero-copy).

    ``map_location`` as ``torch.load`` takes it: ``"cpu"``, ``"cuda:0"``, a ``torch.device``, a
    dict mapping saved devices to devices, or a function ``f(storage, location)`` called once per
    tensor with its CPU storage (a view of the file) and the device it was saved from
    (``"cpu"``, ``"cuda:0"``), returning a storage (``lambda storage, loc: storage`` keeps
    every tensor on the CPU), a tensor, or None (where it was saved); by default each tensor goes
    back where it was saved. ``device`` puts every tensor on one device, as safetensors'
    ``device=`` does. An int, for either, is a device of the accelerator (``0`` is ``cuda:0``, as
    safetensors takes it; ``torch.load`` itself raises TypeError on an int). Devices are checked
    before the file is read; the meta device is refused (it would load no data). Tensors bound
    for a GPU go through pinned staging buffers (:func:`safeckpt.torch_convert.device_tensors`).

    ``verify``: ``None`` (default) checks the CRC32C of every tensor whose bytes are copied
    anyway (``mmap=False``, or to a GPU), where it costs little next to the read, and leaves a
    zero-copy mapped load lazy; ``True`` always checks, ``False`` never.

    ``storage_options``, ``fs``: for a URL (``s3://bucket/ckpt.sckpt``) or a path inside an
    fsspec filesystem, as :func:`safeckpt.open` takes them; a remote file is read by ranged
    requests into fresh memory (FORMAT.md section 12).

    Raises:
        InvalidValueError: a ``map_location`` or ``device`` that torch cannot use here (an int
            where there is no accelerator), a tensor saved from such a device and not remapped,
            or a ``map_location`` function that returns something torch.load would not take.

    Example:
        >>> opt_state = safeckpt.torch.load("ckpt.sckpt", prefix="optimizer")  # doctest: +SKIP
        >>> cpu = safeckpt.torch.load("ckpt.sckpt", map_location=lambda storage, loc: storage)  # doctest: +SKIP
    """
    torch_convert.check_map_location(device if device is not None else map_location,
                                     "device" if device is not None else "map_location")
    return api.load(path, prefix=prefix, framework="torch", map_location=map_location,
                    device=device, mmap=mmap, verify=verify, storage_options=storage_options,
                    fs=fs, **limits)


def save_model(model: torch.nn.Module, path: PathLike, **options: Any) -> None:
    """Save ``model.state_dict()`` (tied weights stored once); options as for :func:`safeckpt.save`.

    Example:
        >>> safeckpt.torch.save_model(model, "model.sckpt")        # doctest: +SKIP
    """
    api.save(model.state_dict(), path, **options)


# -- checking a state against a model ----------------------------------------------------------

def _expected(model: Target) -> Dict[Any, Any]:
    """The tensors a load writes: ``model.state_dict(keep_vars=True)``, or the dict itself."""
    if isinstance(model, dict):
        return model
    if not callable(getattr(model, "state_dict", None)):
        raise InvalidValueError(f"cannot load into {type(model).__name__}: pass a torch module "
                                "or a dict of tensors (its state_dict())")
    return model.state_dict(keep_vars=True)


def _ties(expected: Dict[Any, Any]) -> Dict[Any, tuple]:
    """``{key: group}`` for a model's ``state_dict(keep_vars=True)``: keys whose tensors are the
    same memory (tied weights) share a group. A meta or empty tensor has no memory: only the same
    object ties."""
    groups: Dict[Any, tuple] = {}
    for key, value in expected.items():
        if not torch_convert.is_tensor(value) or value.is_meta or not value.numel():
            groups[key] = ("object", id(value))
        else:
            groups[key] = (str(value.device), value.data_ptr(), tuple(value.shape),
                           tuple(value.stride()), value.dtype)
    return groups


def _check_affix(name: str, value: Optional[str]) -> None:
    """``strip_prefix``/``add_prefix``: None or a non-empty str."""
    if value is not None and (type(value) is not str or not value):
        raise InvalidValueError(f"{name}={value!r}: pass a non-empty str such as 'module.', "
                                "or None")


def _renamed(state: Dict[Any, Any], strip: Optional[str], add: Optional[str],
             where: str) -> Dict[Any, Any]:
    """``state`` with ``strip`` taken off the str keys that start with it (others kept as they
    are) and ``add`` put in front of every str key; the order is kept.

    Raises:
        StateMismatchError: two keys that become one, naming both.
    """
    if strip is None and add is None:
        return state
    out: Dict[Any, Any] = collections.OrderedDict()
    origin: Dict[Any, Any] = {}
    for key, value in state.items():
        new = key
        if type(key) is str:
            if strip is not None and key.startswith(strip):
                new = key[len(strip):]
            if add is not None:
                new = add + new
        if new in out:
            raise StateMismatchError(
                f"{where}: keys {quote(origin[new])} and {quote(key)} both become {quote(new)} "
                f"with strip_prefix={strip!r}, add_prefix={add!r}; nothing was loaded")
        out[new], origin[new] = value, key
    return out


def _key_fit(expected: Dict[Any, Any], ties: Dict[Any, tuple], keys: Any
             ) -> Tuple[List[Any], List[Any]]:
    """``(missing, unexpected)`` of a state's ``keys`` (a dict or set) against the model's. A
    missing key tied to a present one is not missing: it shares that tensor's memory."""
    present = {ties[key] for key in expected if key in keys}
    missing = [key for key in expected if key not in keys and ties[key] not in present]
    return missing, [key for key in keys if key not in expected]


def _desc(value: Any) -> Any:
    """``(shape, dtype)`` of a tensor, else the type's name: a side of a mismatch."""
    if torch_convert.is_tensor(value):
        return (tuple(value.shape), value.dtype)
    return type(value).__name__


def _cast_problem(got: Any, dtype: Any, values: bool) -> Optional[str]:
    """Why ``cast=True`` does not cast tensor ``got`` to ``dtype``; None if it does.

    A cast stays within a kind or goes up (bool < int < float < complex: torch's ``can_cast``,
    numpy's ``same_kind``): float to int (the fraction), complex to real (the imaginary part) and
    int to bool are refused. With ``values`` the tensor's values are checked too, so that no
    value changes but by rounding a float: narrowing ints must fit (they would wrap), ints
    going to a float must be exact there (int64 2**53+1 is not, in float64), and a float (or
    complex) narrowed must not overflow (float64 1e10 would be inf in float16). Floats narrowed
    round, as torch's ``copy_`` rounds them (float32 to bfloat16, the reason to cast).
    """
    import torch  # only a load into a torch model reaches here: torch is imported already
    shell = [d for d in (got.dtype, dtype) if torch_convert.is_shell(d)]
    if shell:  # torch.can_cast and torch.iinfo refuse them with a TypeError
        return (f"torch has no casts for {_dtype(shell[0])} (a dtype without arithmetic); "
                "convert it yourself, e.g. from the numpy (ml_dtypes) values of "
                "safeckpt.load(path, framework='numpy')")
    if not torch.can_cast(got.dtype, dtype):
        return (f"{_dtype(got.dtype)} to {_dtype(dtype)} goes down the kinds bool < int < float < "
                "complex and would change values; convert it yourself if that is meant")
    if not values or not got.numel() or got.dtype == torch.bool:
        return None
    if got.dtype.is_floating_point or got.dtype.is_complex:
        return _overflow(torch, got, dtype)
    if dtype.is_floating_point or dtype.is_complex:
        return _inexact(torch, got, dtype)
    wide, narrow = torch.iinfo(got.dtype), torch.iinfo(dtype)
    if narrow.min <= wide.min and wide.max <= narrow.max:
        return None
    array = got.detach().cpu().numpy()  # torch lacks min() for some unsigned dtypes
    low, high = int(array.min()), int(array.max())
    if narrow.min <= low and high <= narrow.max:
        return None
    return f"its values {low}..{high} do not fit {_dtype(dtype)}"


def _overflow(torch: Any, got: Any, dtype: Any) -> Optional[str]:
    """Why float (or complex) ``got`` cast to the float (or complex) ``dtype`` would lose a
    finite value: one at or beyond the largest finite value plus half a step, which becomes inf
    (or nan, or the largest value: float8 dtypes without inf, by torch version); None if none
    is. Values are compared in float64, which holds every value of the narrower floats."""
    info = torch.finfo(dtype)
    largest = info.max
    if largest >= torch.finfo(got.dtype).max:
        return None
    digits = round(1 - math.log2(info.eps))  # 24 for float32
    limit = largest + 2.0 ** (math.floor(math.log2(largest)) - digits)  # rounds up past largest
    source = torch.view_as_real(got.detach()) if got.dtype.is_complex else got.detach()
    if source.element_size() > 1:  # aminmax (one pass, no copy) lacks float8
        low, high = (float(x) for x in torch.aminmax(source))
        if math.isfinite(low) and math.isfinite(high) and max(-low, high) < limit:
            return None
    wide = source.reshape(-1).double()
    bad = torch.isfinite(wide) & (wide.abs() >= limit)
    count = int(bad.sum())
    if not count:
        return None  # inf or nan in the tensor, which stay inf or nan
    more = f" (and {plural(count - 1, 'more value')})" if count > 1 else ""
    return (f"its value {float(wide[int(bad.nonzero()[0])])!r}{more} overflows "
            f"{_dtype(dtype)}, whose largest finite value is {largest:g}")


def _inexact(torch: Any, got: Any, dtype: Any) -> Optional[str]:
    """Why int ``got`` cast to the float (or complex) ``dtype`` would change a value (a float
    holds every int up to 2**digits, then fewer, then none); None if none would change."""
    info, ints = torch.finfo(dtype), torch.iinfo(got.dtype)
    exact_up_to = 2 ** round(1 - math.log2(info.eps))  # 2**24 for float32
    if max(-ints.min, ints.max) <= exact_up_to:
        return None
    array = got.detach().cpu().numpy().reshape(-1)  # numpy: torch lacks ops for some uints
    if max(-int(array.min()), int(array.max())) <= exact_up_to:
        return None
    cast = got.detach().reshape(-1).to(dtype)
    if dtype.is_complex:
        cast = cast.real
    wide = cast.cpu().double()  # exact: float64 holds every value of a narrower float
    # inf, nan (float8) or rounded up past the int's largest value: no way back to the int
    bad = ~torch.isfinite(wide) | (wide >= float(ints.max) + 1)
    back = torch.where(bad, torch.zeros_like(wide), wide).to(got.dtype).numpy()
    wrong = bad.numpy() | (back != array)
    count = int(wrong.sum())
    if not count:
        return None
    first = int(wrong.argmax())
    more = f" (and {plural(count - 1, 'more value')})" if count > 1 else ""
    return (f"its value {int(array[first])}{more} would become {float(wide[first])!r} in "
            f"{_dtype(dtype)}, which holds every int up to {exact_up_to} exactly and only some "
            "beyond")


def _dtype(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


class _Plan(NamedTuple):
    """A checked load: the model's tensors and ties, the state as the model names it, the
    report, and for each mismatched key what would fix it (or why it cannot be)."""

    expected: Dict[Any, Any]
    ties: Dict[Any, tuple]
    state: Dict[Any, Any]
    report: LoadReport
    notes: Dict[Any, str]


def _plan(model: Target, state: Any, base: Prefix, strip: Optional[str], add: Optional[str],
          cast: bool, where: str) -> _Plan:
    """Check ``state`` (found at ``base``) against ``model`` with the load's options."""
    _check_affix("strip_prefix", strip)
    _check_affix("add_prefix", add)
    if not isinstance(state, dict):
        raise StateMismatchError(f"{where}: holds a {type(state).__name__}, not a state dict")
    expected = _expected(model)
    in_place = isinstance(model, dict)
    ties = _ties(expected)
    renamed = _renamed(state, strip, add, where)
    missing, unexpected = _key_fit(expected, ties, renamed)
    mismatched: List[Tuple[Any, Any, Any]] = []
    casts: List[Tuple[Any, Any, Any]] = []
    notes: Dict[Any, str] = {}
    for key, want in expected.items():
        if key not in renamed:
            continue
        got = renamed[key]
        note = None
        if not torch_convert.is_tensor(want):
            if not in_place:
                continue  # a module's extra state: its load_state_dict() takes it
            note = "a dict's values are copied into, and this one is not a tensor"
        elif not torch_convert.is_tensor(got) or got.shape != want.shape:
            pass
        elif in_place and want.is_meta:
            note = ("the dict's tensor is on the meta device, without memory to copy into; load "
                    "into the module instead, which takes the file's tensors")
        elif got.dtype == want.dtype:
            continue
        else:
            problem = _cast_problem(got, want.dtype, values=cast)
            if cast and problem is None:
                casts.append((key, got.dtype, want.dtype))
                continue
            note = _CAST if problem is None else f"not cast: {problem}"
        mismatched.append((key, _desc(got), _desc(want)))
        if note:
            notes[key] = note
    for keys in _torn_ties(expected, ties, renamed, {key for key, _, _ in mismatched}):
        for key in keys:
            mismatched.append((key, _desc(renamed[key]), _desc(expected[key])))
            notes[key] = (f"tied in the model to {_keys([k for k in keys if k != key])}, whose "
                          "values here differ: one tensor cannot hold both; load into an "
                          "untied model, or leave all but one of them out")
    hint = ""
    if missing or unexpected or mismatched:
        hint = _hint(expected, ties, state, (base, strip, add, cast), len(renamed) - len(unexpected))
    return _Plan(expected, ties, renamed, LoadReport(missing, unexpected, mismatched, casts, hint),
                 notes)


def _torn_ties(expected: Dict[Any, Any], ties: Dict[Any, tuple], state: Dict[Any, Any],
               mismatched: set) -> List[List[Any]]:
    """The keys of each tie group of the model (one tensor in several places) to which ``state``
    gives tensors of different values (a file of an untied model): loading one would drop the
    other, whichever way (copy or assign). Keys already ``mismatched`` are left out."""
    groups: Dict[tuple, List[Any]] = {}
    for key, want in expected.items():
        if (key in state and key not in mismatched and torch_convert.is_tensor(want)
                and torch_convert.is_tensor(state[key])):
            groups.setdefault(ties[key], []).append(key)
    return [keys for keys in groups.values()
            if any(not _same_values(state[keys[0]], state[key]) for key in keys[1:])]


def _same_values(a: Any, b: Any) -> bool:
    """Whether tensors ``a`` and ``b`` hold the same bits (equal shapes and dtypes)."""
    import torch  # only a load into a torch model reaches here: torch is imported already
    if a is b:
        return True
    if a.shape != b.shape or a.dtype != b.dtype or a.is_meta or b.is_meta:
        return False  # a meta tensor has no values to compare
    if a.device == b.device and a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True
    bits = [t.detach().reshape(-1).view(torch.uint8)
            for t in (a, torch_convert.to_device(b, a.device))]
    return torch.equal(*bits)


# -- hints: which options would make a state fit -----------------------------------------------

def _affixes(expected: Dict[Any, Any], keys: List[Any], missing: List[Any]
             ) -> List[Tuple[Optional[str], Optional[str]]]:
    """Candidate ``(strip_prefix, add_prefix)``: the prefixes (up to a dot) that most often part
    a key of the state from a key of the model, each way."""
    have = set(keys)
    strips: collections.Counter = collections.Counter()
    adds: collections.Counter = collections.Counter()
    for counter, names, other in ((strips, keys, expected), (adds, missing, have)):
        for key in names[:_HINT_KEYS]:
            if type(key) is not str or (counter is strips and key in expected):
                continue
            at = key.find(".")
            while at != -1:
                if key[at + 1:] in other:
                    counter[key[:at + 1]] += 1
                    break
                at = key.find(".", at + 1)
    return ([(strip, None) for strip, _ in strips.most_common(2)]
            + [(None, add) for add, _ in adds.most_common(2)])


def _join(base: Prefix, path: Tuple[Any, ...]) -> Any:
    """The prefix of the dict at ``path`` below ``base``, dotted where that is exact; _MISSING
    if it cannot be written (a key with a dot below a dotted ``base``)."""
    if not path:
        return base
    dotted = all((type(key) is str and key and "." not in key and not key.isdigit())
                 or (type(key) is int and key >= 0) for key in path)
    if base is None:
        return ".".join(map(str, path)) if dotted else tuple(path)
    if isinstance(base, str):
        if dotted:
            return ".".join([base, *map(str, path)])
        return (base, *path) if "." not in base else _MISSING
    return (*base, *path)


def _hint(expected: Dict[Any, Any], ties: Dict[Any, tuple], state: Dict[Any, Any],
          options: Tuple[Prefix, Optional[str], Optional[str], bool], matched: int) -> str:
    """The options (``prefix``, ``strip_prefix``, ``add_prefix``, ``cast``) that would make more
    of ``state`` fit than the ``matched`` keys that do, so that none is missing or none is
    unexpected; ``""`` if there are none. Nested dicts are searched breadth first (a checkpoint's
    ``state.model``), within _HINT_DICTS and _HINT_DEPTH."""
    base, strip, add, cast = options
    best: Optional[Tuple[int, Tuple[Any, ...], Optional[str], Optional[str], Dict[Any, Any]]] = None
    queue: collections.deque = collections.deque([((), state)])
    seen = 0
    while queue and seen < _HINT_DICTS and (best is None or best[0]):
        path, node = queue.popleft()
        seen += 1
        keys = list(node)
        missing, _ = _key_fit(expected, ties, node)
        for new_strip, new_add in [(None, None), *_affixes(expected, keys, missing)]:
            try:
                renamed = _renamed(node, new_strip, new_add, "")
            except StateMismatchError:
                continue
            missing, unexpected = _key_fit(expected, ties, renamed)
            score = len(missing) + len(unexpected)
            if ((not missing or not unexpected) and len(renamed) - len(unexpected) > matched
                    and (best is None or score < best[0])):
                best = (score, path, new_strip, new_add, renamed)
        if len(path) < _HINT_DEPTH:
            queue.extend((path + (key,), child) for key, child in node.items()
                         if isinstance(child, dict))
    parts, reasons = [], []
    fitted = state
    if best is not None and _join(base, best[1]) is not _MISSING:
        _, path, new_strip, new_add, fitted = best
        if path:
            parts.append(f"prefix={_join(base, path)!r}")
            reasons.append(f"the model's state is at {_join(base, path)!r}")
        if new_strip != strip:
            parts.append(f"strip_prefix={new_strip!r}")
            if new_strip is not None:
                reasons.append(f"its keys are the model's with {new_strip!r} in front")
        if new_add != add:
            parts.append(f"add_prefix={new_add!r}")
            if new_add is not None:
                reasons.append(f"the model's keys are its keys with {new_add!r} in front")
    else:
        fitted = _renamed(state, strip, add, "")
    if not cast:
        castable = [(key, fitted[key].dtype, want.dtype) for key, want in expected.items()
                    if key in fitted and torch_convert.is_tensor(want)
                    and torch_convert.is_tensor(fitted[key]) and fitted[key].shape == want.shape
                    and fitted[key].dtype != want.dtype
                    and _cast_problem(fitted[key], want.dtype, values=False) is None]
        if castable:
            key, got, want = castable[0]
            parts.append("cast=True")
            reasons.append(f"{plural(len(castable), 'tensor')} differ only in dtype (e.g. "
                           f"{_keys([key])}: {_dtype(got)} in the file, {_dtype(want)} in the "
                           "model)")
    return f"pass {', '.join(parts)}: {'; '.join(reasons)}" if parts else ""


def check_state(model: Target, state: Dict[Any, Any], *, prefix: Prefix = None,
                strip_prefix: Optional[str] = None, add_prefix: Optional[str] = None,
                cast: bool = False) -> LoadReport:
    """Compare a state dict with ``model`` (options as :func:`load_state` takes them): a
    :class:`LoadReport`, touching nothing.

    A key missing from ``state`` is not reported when it is tied to a key that ``state`` holds
    (it shares that tensor's memory in the model, so it is loaded with it), as safetensors'
    ``save_model`` drops such keys.

    Example:
        >>> safeckpt.torch.check_state(model, {"weight": w}).missing  # doctest: +SKIP
        ['bias']
    """
    return _plan(model, _tree.find_in(state, prefix, where="state"), prefix, strip_prefix,
                 add_prefix, cast, "state").report


# -- loading -----------------------------------------------------------------------------------

def load_state(model: Target, state: Dict[Any, Any], *, strict: bool = True,
               prefix: Prefix = None, strip_prefix: Optional[str] = None,
               add_prefix: Optional[str] = None, cast: bool = False, assign: bool = False,
               where: str = "state") -> LoadReport:
    """Load a state dict of tensors into ``model`` after checking every key, shape and dtype.

    Parameters:
        model: a torch module, or a plain state dict (``model.state_dict()``) whose tensors are
            copied into in place (``data_ptr()`` unchanged; an entry is never replaced).
        state: a dict of tensors, or a nested one with the model's part at ``prefix``.
        strict: with ``False`` what fits is loaded and the rest is in the returned
            :class:`LoadReport`; a load that would load nothing still raises, and tensors left
            out only for their dtype (torch's ``load_state_dict`` would cast them) are named in
            a ``RuntimeWarning`` that says ``cast=True``.
        prefix: the part of a nested ``state`` to load, found as :func:`safeckpt.load` finds it
            in a file: ``"state.model"`` (``"runs.-1"``: the int key -1) or a tuple of keys.
        strip_prefix: taken off the state's keys that start with it (``"_orig_mod."`` of
            ``torch.compile``, ``"module."`` of DDP); other keys stay as they are.
        add_prefix: put in front of every key of the state (after ``strip_prefix``).
        cast: cast tensors whose dtype differs from the model's to the model's, as torch's
            ``load_state_dict`` does, each listed in ``report.cast``. Allowed: within a kind or
            up (bool < int < float < complex), where no value changes but a float's rounding
            (float32 to bfloat16 rounds, as torch does). Refused, naming the key and a value:
            float to int, complex to real, int to bool; ints narrowed to a dtype that their
            values do not fit; ints to a float that does not hold them exactly (int64 2**53+1
            to float64); floats (or complex) narrowed where a finite value overflows (float64
            1e10 would be inf in float16; a float8 without inf gives nan or its largest value).
            Without ``cast`` such a tensor is a mismatch (the message says to pass
            ``cast=True``).
        assign: put the state's tensors in the module in place of its own, as torch's
            ``load_state_dict(assign=True)`` does (no copy: a load from a file keeps views of
            its mapping), on the device of the tensor replaced, ``requires_grad`` kept, tied
            weights kept tied. Parameters and buffers on the meta device (a model built under
            ``torch.device("meta")``) are always taken this way. (Buffers outside the state
            dict, ``persistent=False``, are left as the model has them.)

    Returns:
        A :class:`LoadReport`: ``(missing, unexpected, mismatched)``, ``.cast``, ``.hint``.

    Raises:
        StateMismatchError: before anything is touched: with ``strict``, listing missing,
            unexpected and mismatched keys, with the options that would fit (``prefix=``,
            ``strip_prefix=``, ``cast=True``) when there are such; even without it, when nothing
            at all would be loaded, or when a meta tensor of the model would be left without data.
            Keys tied in the model (one tensor) to which ``state`` gives different values are
            mismatches, whether copied or assigned (neither would keep both).
        InvalidValueError: ``assign=True`` with a dict (its entries are copied into, never
            replaced), or a ``strip_prefix``/``add_prefix`` that is not a non-empty str.
        KeyError: nothing at ``prefix``.

    Example:
        >>> report = safeckpt.torch.load_state(model, state, strict=False)  # doctest: +SKIP
        >>> safeckpt.torch.load_state(model, ddp_state, strip_prefix="module.")  # doctest: +SKIP
    """
    at = where + (f" at {prefix!r}" if prefix is not None else "")
    return _load(model, _tree.find_in(state, prefix, where=where), prefix, strict, strip_prefix,
                 add_prefix, cast, assign, at)


def _load(model: Target, state: Any, base: Prefix, strict: bool, strip: Optional[str],
          add: Optional[str], cast: bool, assign: bool, where: str) -> LoadReport:
    """Check ``state`` against ``model``, then load it, or raise having touched nothing."""
    if assign and isinstance(model, dict):
        raise InvalidValueError("assign=True replaces a module's tensors; a dict's tensors are "
                                "copied into in place and its entries never replaced: drop "
                                "assign=True, or take the file's tensors with "
                                "safeckpt.torch.load(path)")
    plan = _plan(model, state, base, strip, add, cast, where)
    report, expected, ties = plan.report, plan.expected, plan.ties
    skip = set(report.unexpected) | {key for key, _, _ in report.mismatched}
    loadable = {k: v for k, v in plan.state.items() if k not in skip}
    loaded = {ties[key] for key in loadable}
    empty = [key for key, value in expected.items()
             if getattr(value, "is_meta", False) and ties[key] not in loaded]
    if strict and (report.missing or report.unexpected or report.mismatched):
        problem = "strict"
    elif not loadable and (expected or state):
        problem = "nothing fits"
    elif empty and not isinstance(model, dict):
        problem = "meta"
    else:
        _write(model, loadable, expected, ties, assign)
        uncast = [key for key, note in plan.notes.items() if note == _CAST]
        if uncast:  # strict=False skipped them; torch would have cast them: never in silence
            warnings.warn(f"{where}: {plural(len(uncast), 'tensor')} not loaded, as they differ "
                          f"from the model's only in dtype ({_keys(uncast[:_LISTED])}); pass "
                          "cast=True to cast them", RuntimeWarning, stacklevel=3)
        return report
    kind = "the dict" if isinstance(model, dict) else type(model).__name__
    lines = [f"{where} does not fit {kind}; nothing was loaded:"]
    if report.hint:
        lines.append(f"  hint: {report.hint}")
    # Beside a prefix= hint, the keys of the file's top level would only say that it is nested.
    nested = report.hint.startswith("pass prefix=")
    for words, keys in (("missing keys", report.missing), ("unexpected keys", report.unexpected)):
        if keys and not nested:
            more = f" and {len(keys) - _LISTED} more" if len(keys) > _LISTED else ""
            lines.append(f"  {words} ({len(keys)}): {_keys(keys[:_LISTED])}{more}")
    for key, got, want in report.mismatched[:_LISTED]:
        note = f"; {plan.notes[key]}" if key in plan.notes else ""
        lines.append(f"  {_keys([key])}: file has {_fmt(got)}, model has {_fmt(want)}{note}")
    if len(report.mismatched) > _LISTED:
        lines.append(f"  and {len(report.mismatched) - _LISTED} more mismatches")
    if problem == "meta":
        lines.append(f"  {_keys(empty)} would stay on the meta device, without data; pass a "
                     "state that holds them")
    elif problem == "strict" and not nested:
        lines.append("Pass strict=False to load the matching part and get this report.")
    raise StateMismatchError("\n".join(lines))


def _write(model: Target, loadable: Dict[Any, Any], expected: Dict[Any, Any],
           ties: Dict[Any, tuple], assign: bool) -> None:
    """Load checked tensors: copied into the model's memory (a dict's tensors: always) or, with
    ``assign`` and for meta tensors, put in their place (on the replaced tensor's device and
    dtype; a state tensor bound for two untied places is copied for the second, never aliased),
    then tied again wherever the model held one tensor in several places."""
    import torch  # only a load into a torch model reaches here: torch is imported already
    if isinstance(model, dict):
        with torch.no_grad():
            for key, value in loadable.items():  # casts, as load_state_dict does
                torch_convert.copy_into(expected[key], value)
        return
    replace = {key for key in loadable if torch_convert.is_tensor(expected[key])
               and (assign or expected[key].is_meta)}
    # torch's copy_ has no kernel for the shell dtypes (int4 .. uint1): their bytes are copied
    shells = {key for key in loadable if key not in replace
              and torch_convert.is_tensor(expected[key]) and torch_convert.is_tensor(loadable[key])
              and torch_convert.is_shell(expected[key].dtype)}
    model.load_state_dict({k: v for k, v in loadable.items() if k not in replace | shells},
                          strict=False)
    with torch.no_grad():
        for key in shells:
            torch_convert.copy_into(expected[key], loadable[key])
    if not replace:
        return
    placed: Dict[int, tuple] = {}
    assigned: Dict[Any, Any] = {}
    for key in replace:
        value, want = loadable[key], expected[key]
        device = value.device if want.is_meta else want.device
        if value.dtype != want.dtype:
            moved = value.to(device=device, dtype=want.dtype)
        else:  # to_device: the shell dtypes too
            moved = value if value.device == device else torch_convert.to_device(value, device)
        if moved is value and placed.setdefault(id(value), ties[key]) != ties[key]:
            moved = torch_convert.clone(value)
        assigned[key] = moved
    slots = [(table, name, table[name]) for module in model.modules()
             for table in (module._parameters, module._buffers) for name in table]
    model.load_state_dict(assigned, strict=False, assign=True)
    new: Dict[int, Any] = {}  # id of a replaced tensor -> the tensor that took its place
    for table, name, old in slots:
        if table[name] is not old:
            new.setdefault(id(old), table[name])
    for table, name, old in slots:
        if id(old) in new:
            table[name] = new[id(old)]


def _keys(keys: Sequence[Any]) -> str:
    """Keys for a message: str keys as they are, others (an int from the file) as repr."""
    return ", ".join(key if type(key) is str else repr(key) for key in keys)


def _fmt(desc: Any) -> str:
    if isinstance(desc, tuple):
        shape, dtype = desc
        return f"shape {shape} {_dtype(dtype)}"
    return f"a {desc}"


def load_model(model: Target, path: PathLike, *, strict: bool = True, prefix: Prefix = None,
               strip_prefix: Optional[str] = None, add_prefix: Optional[str] = None,
               cast: bool = False, assign: bool = False, verify: Optional[bool] = None,
               storage_options: Optional[Dict[str, Any]] = None, fs: Any = None,
               **limits: Any) -> LoadReport:
    """Load a file saved by :func:`save_model` (or the subtree at ``prefix``) into ``model``.

    Every key, shape and dtype is checked first: with ``strict`` (default) one
    :class:`~safeckpt.StateMismatchError` lists all missing keys, unexpected keys and mismatches,
    and says which options would make the file fit (``prefix='state.model'`` for a checkpoint
    of :class:`~safeckpt.CheckpointManager`, ``strip_prefix='module.'``, ``cast=True``); no
    parameter is touched. With ``strict=False`` the matching tensors are loaded and the rest is
    reported; a load that would load nothing raises. A key missing from the file but tied in the
    model to one that is there (safetensors' ``save_model`` drops those) is loaded with it.
    Tensors are copied straight from the file's mapping to the parameters' devices; a model on
    the meta device, or any model with ``assign=True``, takes the file's tensors (views of the
    mapping) instead. ``model`` may also be a plain state dict, whose tensors are copied into.
    ``prefix``, ``strip_prefix``, ``add_prefix``, ``cast`` and ``assign`` as
    :func:`load_state` takes them. ``verify=None`` (default) checks every CRC32C when the file
    has them, since a load into a model reads every byte anyway; ``True`` requires them,
    ``False`` skips them. ``storage_options`` and ``fs``: for a URL, as :func:`safeckpt.open`.

    Returns:
        A :class:`LoadReport` ``(missing, unexpected, mismatched)``, with ``.cast`` and ``.hint``.

    Example:
        >>> report = safeckpt.torch.load_model(model, "model.sckpt", strict=False)  # doctest: +SKIP
        >>> safeckpt.torch.load_model(model, "ddp.sckpt", strip_prefix="module.")  # doctest: +SKIP
        >>> safeckpt.torch.load_model(model, "ckpts/step-0000000100.sckpt", prefix="state.model")  # doctest: +SKIP
    """
    _check_affix("strip_prefix", strip_prefix)  # before the file is read
    _check_affix("add_prefix", add_prefix)
    with api.open(path, storage_options=storage_options, fs=fs, **limits) as reader:
        state = reader.load(prefix, framework="torch", map_location="cpu",
                            verify=reader.has_checksums if verify is None else verify)
    return _load(model, state, prefix, strict, strip_prefix, add_prefix, cast, assign,
                 f"{str(path)!r}" + (f" at {prefix!r}" if prefix is not None else ""))
