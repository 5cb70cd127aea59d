"""Training checkpoints: ``save_checkpoint``/``load_checkpoint``, and the file rules and helpers
that :class:`safeckpt.manager.CheckpointManager` builds on.

A checkpoint is one ordinary nested .sckpt file (FORMAT.md section 8) holding the model's and the
optimizer's state, counters and the random number generators' state, so that training resumes
bit-exactly. Saves are atomic (temporary file, fsync, rename), so a crash leaves the previous
checkpoint or the new one. Works with torch objects (anything with ``state_dict()`` and
``load_state_dict()``) and with plain dicts of numpy arrays alike.

What a checkpoint file holds (a reader refuses anything else with a ``HeaderError`` that names
the key and the rule):

- **[C1]** Its metadata is ``{"format": "safeckpt.checkpoint/1", "step": S, "metrics": M}``:
  ``S`` is None or an int >= 0, ``M`` a map of str to int or float.
- **[C2]** A file of :func:`save_checkpoint` holds a dict with the keys ``model``, ``optimizer``,
  ``scheduler``, ``step``, ``epoch``, ``rng``, ``extra`` and ``metrics`` (``step`` as in [C1],
  ``epoch`` likewise, ``metrics`` equal in kind). A file of :class:`CheckpointManager` holds a
  dict with the keys ``state``, ``step``, ``metrics`` and ``rng``; its ``step`` is an int equal to
  the metadata's and to the number in its name, ``step-<step, 10 to 20 digits>.sckpt``. Each kind
  is refused by the other's functions, with a message naming the right one.
- **[C3]** ``rng`` is None or a map with any of: ``python``, ``(3, words, gauss)`` where ``words``
  is 624 ints below 2**32 and a position 0..624, ``gauss`` None or a float; ``numpy``,
  ``("MT19937", uint32[624], position 0..624, has_gauss 0 or 1, cached gaussian float)``;
  ``torch``, a uint8 vector that torch's CPU generator accepts; ``cuda``, a list of uint8 vectors
  (one per GPU). Other keys are ignored.

Example:
    >>> manager = safeckpt.CheckpointManager("ckpts", keep_last=3)          # doctest: +SKIP
    >>> state = {"model": model, "optimizer": optimizer}                     # doctest: +SKIP
    >>> info = manager.restore(state)         # the newest complete checkpoint, or None
    >>> start = info.step + 1 if info else 0
    >>> for step in range(start, steps):
    ...     train_one_step()
    ...     manager.save(step, state, metrics={"loss": loss})
"""

from __future__ import annotations

import collections
import functools
import os
import random
import sys
import types
import warnings
from typing import (Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple,
                    Union)

import numpy as np

from . import api, torch_convert
from . import jax as _sck_jax
from . import torch as _sck_torch
from . import tree as _tree
from . import writer as _writer
from .errors import HeaderError, InvalidValueError, StateMismatchError
from .reader import TensorMap
from .remote import RemotePath
from .tree import Subtree

FORMAT = "safeckpt.checkpoint/1"  # metadata["format"] of every checkpoint file

Metrics = Dict[str, Union[int, float]]  # {"loss": 0.1}: a checkpoint's metrics [C1]
PathLike = Union[str, "os.PathLike[str]"]
_Path = Tuple[Any, ...]  # the keys from the top of a restore down to a value


class CheckpointInfo(NamedTuple):
    """What a checkpoint held: its ``path``, ``step``, ``epoch``, ``metrics`` and ``extra``, and
    ``state``, the whole loaded tree (numpy arrays, or torch tensors where they were restored
    into torch objects)."""

    path: str
    step: Optional[int]
    epoch: Optional[int]
    metrics: Metrics
    extra: Any
    state: Any


# -- random number generators ----------------------------------------------------------------------

def capture_rng() -> dict[str, Any]:
    """The state of Python's ``random``, numpy's global generator and, when torch is imported,
    torch's CPU generator and every initialised CUDA generator."""
    state: dict[str, Any] = {"python": random.getstate(),
                             "numpy": np.random.get_state(legacy=True)}
    torch = sys.modules.get("torch")
    if torch is not None:
        state["torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any] | None) -> None:
    """Set the generators captured by :func:`capture_rng` (missing entries are left alone).

    Every entry is checked first ([C3] in this module's docstring), so a bad one changes none.
    A torch state while torch is not installed is skipped with a warning.

    Raises:
        HeaderError: an entry that is not what :func:`capture_rng` returns, naming it.
    """
    torch = check_rng(state)
    if state is None:
        return
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        np.random.set_state(tuple(_as_numpy(v) for v in state["numpy"]))
    if torch is None:
        if "torch" in state or "cuda" in state:
            warnings.warn("the random state of torch was not restored: torch is not installed",
                          RuntimeWarning, stacklevel=2)
        return
    if "torch" in state:
        torch.set_rng_state(_as_byte_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        generators = [_as_byte_tensor(s) for s in state["cuda"]]
        torch.cuda.set_rng_state_all(generators[:torch.cuda.device_count()])


_MT_WORDS = 624  # 32-bit words of a Mersenne Twister's state (Python's random, numpy's legacy)


def _shown(value: Any) -> str:
    """``value!r`` for a short number or str, else its kind (``a list``): cheap for any value."""
    kind = type(value)
    if ((kind in (str, bytes) and len(value) <= 40) or (kind is int and value.bit_length() <= 64)
            or kind in (float, bool, type(None))):
        return repr(value)
    return _kind(value)


def _is_int(value: object, low: int, high: int) -> bool:
    """Whether ``value`` is an int (not a bool) in ``low..high``."""
    return type(value) is int and low <= value <= high


def _byte_vector(value: object, where: str) -> np.ndarray:
    """``value`` as a uint8 vector (a torch tensor's numpy view); anything else is refused [C3]."""
    value = _as_numpy(value)
    if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.ndim != 1:
        raise HeaderError(f"{where}: {_shown(value)} is not a uint8 vector [C3]")
    return value


def _import_torch() -> types.ModuleType | None:
    """torch if it is installed (it is optional: imported only to check a torch state)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def check_rng(state: object, where: str = "rng") -> types.ModuleType | None:
    """Check random generators' state as :func:`capture_rng` makes it [C3], setting nothing.

    Returns torch when the state holds a torch entry and torch imports, else None.

    Raises:
        HeaderError: the first entry that is wrong, named (``rng['numpy'][1]``).
    """
    torch: types.ModuleType | None = None
    if state is None:
        return torch
    if not isinstance(state, dict):
        raise HeaderError(f"{where}: {_shown(state)} is not a map of generator states [C3]")
    if "python" in state:
        value, at = state["python"], f"{where}['python']"
        if not isinstance(value, (tuple, list)) or len(value) != 3:
            raise HeaderError(f"{at}: {_shown(value)} is not (version, words, gauss) [C3]")
        version, words, gauss = value
        if not _is_int(version, 3, 3):
            raise HeaderError(f"{at}[0]: version {_shown(version)} is not 3 [C3]")
        if (not isinstance(words, (tuple, list)) or len(words) != _MT_WORDS + 1
                or not all(_is_int(w, 0, 0xFFFFFFFF) for w in words[:_MT_WORDS])
                or not _is_int(words[_MT_WORDS], 0, _MT_WORDS)):
            raise HeaderError(f"{at}[1]: is not {_MT_WORDS} ints below 2**32 and a position "
                              f"0..{_MT_WORDS} [C3]")
        if gauss is not None and type(gauss) is not float:
            raise HeaderError(f"{at}[2]: gauss {_shown(gauss)} is not None or a float [C3]")
    if "numpy" in state:
        value, at = state["numpy"], f"{where}['numpy']"
        if not isinstance(value, (tuple, list)) or len(value) != 5:
            raise HeaderError(f"{at}: {_shown(value)} is not ('MT19937', key, pos, has_gauss, "
                              "cached_gaussian) [C3]")
        name, key, pos, has_gauss, cached = value
        key = _as_numpy(key)
        if type(name) is not str or name != "MT19937":
            raise HeaderError(f"{at}[0]: generator {_shown(name)} is not 'MT19937' [C3]")
        if not isinstance(key, np.ndarray) or key.dtype != np.uint32 or key.shape != (_MT_WORDS,):
            raise HeaderError(f"{at}[1]: {_shown(key)} is not shape ({_MT_WORDS},) uint32 [C3]")
        if not _is_int(pos, 0, _MT_WORDS):
            raise HeaderError(f"{at}[2]: position {_shown(pos)} is not in 0..{_MT_WORDS} [C3]")
        if not _is_int(has_gauss, 0, 1):
            raise HeaderError(f"{at}[3]: has_gauss {_shown(has_gauss)} is not 0 or 1 [C3]")
        if type(cached) not in (int, float):
            raise HeaderError(f"{at}[4]: cached gaussian {_shown(cached)} is not a float [C3]")
    if "torch" in state or "cuda" in state:
        torch = sys.modules.get("torch") or _import_torch()
    if "torch" in state:
        value = _byte_vector(state["torch"], f"{where}['torch']")
        if torch is not None:
            try:  # a spare generator checks the state: the global one is left alone
                torch.Generator().set_state(torch.from_numpy(value.copy()))
            except RuntimeError as exc:
                raise HeaderError(f"{where}['torch']: not a state that torch's CPU generator "
                                  f"accepts ({exc}) [C3]") from exc
    if "cuda" in state:
        value = state["cuda"]
        if not isinstance(value, (list, tuple)):
            raise HeaderError(f"{where}['cuda']: {_shown(value)} is not a list of states [C3]")
        vectors = [_byte_vector(v, f"{where}['cuda'][{i}]") for i, v in enumerate(value)]
        if torch is not None and torch.cuda.is_available():
            for i, vector in enumerate(vectors[:torch.cuda.device_count()]):
                try:
                    torch.Generator(device=f"cuda:{i}").set_state(torch.from_numpy(vector.copy()))
                except RuntimeError as exc:
                    raise HeaderError(f"{where}['cuda'][{i}]: not a state that the generator of "
                                      f"cuda:{i} accepts ({exc}) [C3]") from exc
    return torch


def _as_numpy(value: Any) -> Any:
    """A torch tensor as a numpy array; anything else as it is."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return value.cpu().numpy()
    return value


def _as_byte_tensor(value: Any) -> Any:
    """A checked generator state (uint8 vector or tensor) as the CPU tensor torch takes."""
    import torch  # optional: only a torch state reaches here
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone().contiguous()
    return torch.from_numpy(np.array(value, np.uint8))


# -- state in and out ------------------------------------------------------------------------------

def state_of(obj: Any, depth: int = 0) -> Any:
    """``obj`` with every object that has ``state_dict()`` replaced by its state, and every JAX
    pytree (an optax state, a flax TrainState, an ``nnx.State``) by its plain containers
    (:func:`safeckpt.jax.to_state`), through dicts."""
    if callable(getattr(obj, "state_dict", None)) and not isinstance(obj, dict):
        return obj.state_dict()
    if type(obj) in (dict, collections.OrderedDict) and depth < 64:
        return type(obj)((k, state_of(v, depth + 1)) for k, v in obj.items())
    if _sck_jax.is_jax_tree(obj):  # never imports jax: False unless it is imported
        return _sck_jax.to_state(obj)
    return obj


def _torch_of(obj: object) -> types.ModuleType | None:
    """The torch module if ``obj`` is a torch.Tensor (torch is never imported here)."""
    torch = sys.modules.get("torch")
    return torch if torch is not None and isinstance(obj, torch.Tensor) else None


def _is_torch_module(obj: object) -> bool:
    """Whether ``obj`` is a torch.nn.Module (torch is never imported here)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def _has_load_state_dict(obj: object) -> bool:
    """Whether ``obj`` restores itself: it has ``load_state_dict()`` and is not a dict."""
    return callable(getattr(obj, "load_state_dict", None)) and not isinstance(obj, dict)


def _is_plain(value: object) -> bool:
    """A value that a restore replaces rather than writes into: None, a number, a str, bytes, a
    numpy scalar, or a tuple of these."""
    if isinstance(value, tuple):
        return all(_is_plain(item) for item in value)
    return value is None or isinstance(value, (bool, int, float, complex, str, bytes, np.generic))


def _kind(value: Any) -> str:
    """``shape (2, 3) float32`` for an array or tensor, else ``a list``, ``an int``."""
    if isinstance(value, (np.ndarray, np.generic)) or _torch_of(value) is not None:
        return f"shape {tuple(value.shape)} {str(value.dtype).replace('torch.', '')}"
    return _article(type(value).__name__)


def _article(name: str) -> str:
    """``name`` with "a" or "an" before it."""
    return ("an " if name[:1].lower() in "aeiou" else "a ") + name


_LISTED = 20  # problems listed per kind in a StateMismatchError; the rest are counted


class _Restore:
    """One restore: walk the targets and the loaded state, gather every problem and every write,
    and write nothing until all were checked."""

    def __init__(self, where: str, strict: bool, map_location: Any) -> None:
        self.where, self.strict, self.map_location = where, strict, map_location
        self.missing: List[_Path] = []
        self.unexpected: List[_Path] = []
        self.mismatched: List[Tuple[_Path, str]] = []  # (path, what differs)
        # Writes run in this order: objects whose own load_state_dict() may still refuse, then
        # checked torch modules, then arrays and tensors, which cannot fail.
        self.calls: List[Callable[[], object]] = []
        self.modules: List[Callable[[], object]] = []
        self.writes: List[Callable[[], object]] = []
        # A torch state_dict() is built anew on each call: below one, only tensors and arrays
        # are written (in place); ``copy`` is the one being walked (its path and _COPIES' words),
        # ``futile`` each (copy, entry) that a restore would have to rebind or fill.
        self.copy: Optional[Tuple[_Path, Tuple[str, str, str]]] = None
        self.futile: List[Tuple[_Path, Tuple[str, str, str], _Path]] = []

    def name(self, path: _Path) -> str:
        """``['model']['w']``: the path as it reads after the file's name in a message."""
        return "".join(f"[{key!r}]" for key in path)

    def top(self, target: Any, state: Any, path: _Path) -> None:
        """Walk one target given by the caller, which must change in place."""
        if not _is_plain(target):
            if self.walk(target, state, path) is target:
                return
        raise InvalidValueError(
            f"{self.where}{self.name(path)}: cannot restore into {_kind(target)}: it "
            "cannot be changed in place; pass a dict (or a list, a numpy array, a torch tensor, "
            "an object with load_state_dict()) that holds it, e.g. {'step': 0}")

    def walk(self, target: Any, value: Any, path: _Path) -> Any:
        """Plan the restore of ``value`` into ``target``; return what the parent then holds."""
        if _has_load_state_dict(target):
            self.stateful(target, value, path)
        elif isinstance(target, np.ndarray):
            self.array(target, value, path)
        elif (torch := _torch_of(target)) is not None:
            self.tensor(torch, target, value, path)
        elif isinstance(target, dict):
            self.dict(target, value, path)
        elif isinstance(target, list) or (isinstance(target, tuple) and not _is_plain(target)):
            return self.sequence(target, value, path)
        elif _is_plain(target):
            return value
        else:
            self.mismatched.append((path, f"{_kind(target)} cannot be restored into: it is not "
                                    "an array, a container or an object with load_state_dict() "
                                    "(for jax arrays use safeckpt.jax.load(..., target=...))"))
        return target

    def rebind(self, path: _Path, current: Any, new: Any, write: Callable[[], object]) -> None:
        """Plan ``write``, which puts ``new`` where ``current`` is (or fills the empty
        container ``current`` with ``new``'s items); below a torch state_dict() it would change
        that copy only: a problem, unless nothing changes."""
        if self.copy is None:
            self.writes.append(write)
        elif not _tree.same(new, current):
            self.futile.append((*self.copy, path))

    def dict(self, target: Dict[Any, Any], value: Any, path: _Path) -> None:
        """Plan a dict's restore, key by key (an empty one takes the file's whole)."""
        if not isinstance(value, dict):
            self.mismatched.append((path, f"file has {_kind(value)}, target has a dict"))
            return
        outer, made = self.copy, _made_by(target)
        if outer is None and made is not None:
            self.copy = (path, made)
        if not target:  # an empty dict receives whatever the file holds there
            if value:
                self.rebind(path, target, value, lambda: target.update(value))
        else:
            for key, current in target.items():
                if key not in value:
                    self.missing.append(path + (key,))
                    continue
                new = self.walk(current, value[key], path + (key,))
                if new is not current:
                    self.rebind(path + (key,), current, new,
                                functools.partial(target.__setitem__, key, new))
            self.unexpected.extend(path + (key,) for key in value if key not in target)
        self.copy = outer

    def sequence(self, target: Union[List[Any], Tuple[Any, ...]], value: Any, path: _Path
                 ) -> Any:
        """Plan a list's restore in place, or return the new tuple (a tuple cannot change)."""
        if not isinstance(value, (list, tuple)):
            self.mismatched.append((path, f"file has {_kind(value)}, target has {_kind(target)}"))
            return target
        if not target and isinstance(target, list):  # an empty list receives the file's items
            if value:
                self.rebind(path, target, value, lambda: target.extend(value))
            return target
        if len(value) != len(target):
            self.mismatched.append((path, f"file has {len(value)} items, target has {len(target)}"))
            return target
        new = [self.walk(current, item, path + (i,))
               for i, (current, item) in enumerate(zip(target, value))]
        if all(a is b for a, b in zip(new, target)):
            return target
        if isinstance(target, list):
            for i, item in enumerate(new):
                if item is not target[i]:
                    self.rebind(path + (i,), target[i], item,
                                functools.partial(target.__setitem__, i, item))
            return target
        return target._make(new) if hasattr(target, "_make") else type(target)(new)

    def array(self, target: np.ndarray, value: Any, path: _Path) -> None:
        """Plan ``np.copyto`` into a numpy array of the same shape and dtype."""
        if not isinstance(value, (np.ndarray, np.generic)):
            self.mismatched.append((path, f"file has {_kind(value)}, target has {_kind(target)}"))
        elif value.shape != target.shape or value.dtype != target.dtype:
            self.mismatched.append((path, f"file has {_kind(value)}, target has {_kind(target)}"))
        elif not target.flags.writeable:
            self.mismatched.append((path, "the target array is read-only"))
        else:
            self.writes.append(lambda: np.copyto(target, value))

    def tensor(self, torch: types.ModuleType, target: Any, value: Any, path: _Path) -> None:
        """Plan ``Tensor.copy_`` into a torch tensor of the same shape and dtype."""
        if target.is_meta:
            self.mismatched.append((path, "the target tensor is on the meta device and has no "
                                    "memory to restore into; materialise it first (e.g. "
                                    "module.to_empty(device='cpu'))"))
            return
        if not isinstance(value, (np.ndarray, np.generic)):
            self.mismatched.append((path, f"file has {_kind(value)}, target has {_kind(target)}"))
            return
        try:
            source = torch_convert.from_numpy(np.asarray(value))  # a view of the file: no copy yet
        except KeyError:
            self.mismatched.append((path, f"file has dtype {value.dtype}, which torch lacks"))
            return
        if tuple(source.shape) != tuple(target.shape) or source.dtype != target.dtype:
            self.mismatched.append((path, f"file has {_kind(source)}, target has {_kind(target)}"))
            return

        def write() -> None:
            with torch.no_grad():
                torch_convert.copy_into(target, source)  # the shell dtypes too
        self.writes.append(write)

    def stateful(self, target: Any, value: Any, path: _Path) -> None:
        """Plan the restore of an object with ``load_state_dict()`` (a torch module checked key
        by key; another object's own method may still refuse, which is run first)."""
        if not isinstance(value, dict):
            self.mismatched.append((path, f"file has {_kind(value)}, not the state dict of "
                                    f"{_article(type(target).__name__)}"))
            return
        if _is_torch_module(target):
            state = self.torch_state(value, path)
            report = _sck_torch.check_state(target, state)
            self.missing.extend(path + (key,) for key in report.missing)
            self.unexpected.extend(path + (key,) for key in report.unexpected)
            for key, got, want in report.mismatched:
                got = f"shape {got[0]} {got[1]}" if isinstance(got, tuple) else _article(got)
                want = f"shape {want[0]} {want[1]}"
                self.mismatched.append((path + (key,), f"file has {got}, target has "
                                        f"{want}".replace("torch.", "")))
            where = self.where + self.name(path)
            self.modules.append(lambda: _sck_torch.load_state(target, state, strict=False,
                                                              where=where))
            return
        # A key that the object's own state_dict() lacks is not passed on: a scheduler's
        # load_state_dict() sets every key as an attribute (its optimizer, its methods).
        own = target.state_dict() if callable(getattr(target, "state_dict", None)) else None
        if isinstance(own, dict):
            unexpected = [key for key in value if key not in own]
            self.unexpected.extend(path + (key,) for key in unexpected)
            value = {key: item for key, item in value.items() if key not in unexpected}
        if "torch" in sys.modules:
            value = self.torch_state(value, path)

        torch = sys.modules.get("torch")
        out_of_memory = getattr(torch, "OutOfMemoryError", ()) if torch is not None else ()

        def call() -> None:
            try:
                target.load_state_dict(value)
            except out_of_memory:
                raise
            except (KeyError, IndexError, TypeError, ValueError, AttributeError,
                    RuntimeError) as exc:  # torch's checks raise RuntimeError too
                raise StateMismatchError(
                    f"{self.where}{self.name(path)}: {type(target).__name__}.load_state_dict() "
                    f"refused the saved state: {type(exc).__name__}: {exc}") from exc
        self.calls.append(call)

    def torch_state(self, value: Any, path: _Path) -> Any:
        """``value`` with torch tensors for its arrays, moved as ``map_location`` says; an error
        names the target and the tensor below it (``['optimizer']: ... 'state.0.exp_avg'``)."""
        try:
            return torch_convert.to_torch(value, self.map_location)
        except InvalidValueError as exc:
            raise InvalidValueError(f"{self.where}{self.name(path)}: {exc}") from exc

    def finish(self) -> None:
        """Raise (strict) or warn about every problem found, then make the writes."""
        if self.futile:
            self.refuse_copies()
        lines = []
        for words, paths in (("in the target, not in the file", self.missing),
                             ("in the file, not in the target", self.unexpected)):
            if paths:
                shown = ", ".join(self.name(p) for p in paths[:_LISTED])
                more = f" and {len(paths) - _LISTED} more" if len(paths) > _LISTED else ""
                lines.append(f"  {words} ({len(paths)}): {shown}{more}")
        lines += [f"  {self.name(p)}: {words}" for p, words in self.mismatched[:_LISTED]]
        if len(self.mismatched) > _LISTED:
            lines.append(f"  and {len(self.mismatched) - _LISTED} more mismatches")
        if lines and self.strict:
            raise StateMismatchError("\n".join(
                [f"{self.where} does not fit the target; nothing was restored:", *lines,
                 "Pass strict=False to restore the matching part."]))
        if lines:
            warnings.warn("\n".join([f"{self.where} was restored in part; not restored:", *lines]),
                          RuntimeWarning, stacklevel=3)
        for write in self.calls + self.modules + self.writes:
            write()

    def refuse_copies(self) -> None:
        """Raise for the torch state_dict() copies that a restore would change beyond their
        tensors, naming the entries."""
        by_copy: Dict[_Path, List[_Path]] = {}
        words: Dict[_Path, Tuple[str, str, str]] = {}
        for root, said, path in self.futile:
            by_copy.setdefault(root, []).append(path)
            words[root] = said
        lines = [f"{self.where} cannot be restored into the target; nothing was restored:"]
        for root, paths in by_copy.items():
            made, owner, example = words[root]
            shown = ", ".join(self.name(p) for p in paths[:_LISTED])
            more = f" and {len(paths) - _LISTED} more" if len(paths) > _LISTED else ""
            lines.append(
                f"  {self.name(root) or 'the target'} is {made}, a dict that torch builds anew "
                f"on each call: only its tensors can be restored in place, and {shown}{more} "
                f"would change in that dict only, not in the {owner}; pass the {owner} itself "
                f"({example}), whose load_state_dict() takes the state")
        raise InvalidValueError("\n".join(lines))


# The torch state_dict() copies that a restore refuses to change beyond their tensors, told by
# their marks: what made it, its owner, how to pass the owner instead.
_COPIES = (
    (lambda d: isinstance(d, collections.OrderedDict) and hasattr(d, "_metadata"),
     ("a module's state_dict()", "module", "model=model, or {'model': model}")),
    (lambda d: "state" in d and "param_groups" in d,
     ("an optimizer's state_dict()", "optimizer", "optimizer=opt, or {'optimizer': opt}")),
    (lambda d: "last_epoch" in d and "_last_lr" in d,
     ("an LR scheduler's state_dict()", "scheduler", "scheduler=sched, or {'scheduler': sched}")),
)


def _made_by(target: Dict[Any, Any]) -> Optional[Tuple[str, str, str]]:
    """The words of _COPIES for a dict that a torch ``state_dict()`` made, else None."""
    return next((words for is_copy, words in _COPIES if is_copy(target)), None)


def restore_into(target: Any, state: Any, *, strict: bool = True, where: str = "state",
                 map_location: Any = None) -> Any:
    """Put a loaded ``state`` into ``target`` in place; return ``target``.

    ``target`` describes what to restore, and every part of it is checked against ``state``
    before anything is written:

    - numpy arrays and torch tensors are overwritten in place (``np.copyto``, ``Tensor.copy_``),
      so references to them stay valid; the file's must have the same shape and dtype. A
      ``model.state_dict()`` given as a dict is restored this way: the module's own tensors
      receive the values (``data_ptr()`` unchanged), and no entry holding a tensor is ever
      replaced; a tensor on the meta device is refused (no memory);
    - a dict made by a torch ``state_dict()`` (a module's: an OrderedDict with ``_metadata``; an
      optimizer's: ``state`` and ``param_groups``; an LR scheduler's: ``last_epoch`` and
      ``_last_lr``) is a copy built anew on each call: below it only tensors and arrays are
      written. A restore that would change any other value there (an optimizer's ``lr``, the
      ``state`` of an optimizer that never stepped) is refused before anything is written, with
      an ``InvalidValueError`` that says to pass the module, optimizer or scheduler itself;
    - an object with ``load_state_dict()`` gets its state (a torch module is checked key by key,
      see :func:`safeckpt.torch.load_state`); its own refusals raise ``StateMismatchError``;
    - dicts and lists are walked key by key: a key of the target missing from the file, or of
      the file missing from the target, is a problem; an *empty* dict or list receives whatever
      the file holds there (e.g. the velocity of a numpy optimizer before its first step);
    - plain values (numbers, str, None, tuples of them) are replaced by the file's.

    ``map_location`` moves what is given to objects with ``load_state_dict()`` (an optimizer's
    state), as ``torch.load`` takes it: a device, a dict, or a function ``(storage, location)``
    (see :func:`safeckpt.torch.load`).

    Raises:
        StateMismatchError: with ``strict``, one error listing every missing and unexpected key
            and every shape, dtype or kind that differs; nothing is written. Without ``strict``
            the matching part is restored and a ``RuntimeWarning`` lists the rest.
        InvalidValueError: ``target`` cannot change in place (a number, a str, None, a tuple),
            or a torch ``state_dict()`` in it would change beyond its tensors; nothing is
            written.

    Example:
        >>> sd = model.state_dict()                                          # doctest: +SKIP
        >>> restore_into({"model": sd}, safeckpt.load(path, prefix="state"))  # doctest: +SKIP
    """
    restore = _Restore(where, strict, map_location)
    restore.top(target, state, ())
    restore.finish()
    return target


def plain_metrics(metrics: object) -> Metrics:
    """Metrics as a dict of str -> int/float (numpy and 0-d torch values converted)."""
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise InvalidValueError(f"metrics must be a dict of str -> number, not {type(metrics).__name__}")
    out: Metrics = {}
    for key, value in metrics.items():
        if type(key) is not str:
            raise InvalidValueError(f"metrics: key {key!r} is not a str")
        if hasattr(value, "item") and not isinstance(value, (int, float)):
            value = value.item()
        if type(value) is bool or not isinstance(value, (int, float)):
            raise InvalidValueError(f"metrics[{key!r}]: {value!r} is not a number")
        out[key] = value if type(value) is int else float(value)
    return out


def _check_count(name: str, value: object) -> None:
    """Refuse a counter (``step``, ``epoch``) that is not None or an int >= 0."""
    if value is not None and (type(value) is not int or value < 0):
        raise InvalidValueError(f"{name}={value!r} must be a non-negative int or None")


def save_checkpoint(path: PathLike, *, model: Any = None, optimizer: Any = None,
                    scheduler: Any = None, step: int | None = None, epoch: int | None = None,
                    rng: bool = True, extra: Any = None, metrics: Metrics | None = None,
                    checksum: bool = True, atomic: bool = True) -> None:
    """Save a training checkpoint atomically.

    Parameters:
        path: the file.
        model, optimizer, scheduler: objects with ``state_dict()`` (torch), or plain state dicts
            (numpy users).
        step, epoch: counters (non-negative ints or None).
        rng: capture Python's, numpy's and torch's (CPU, CUDA) random state, for exact resume.
        extra: anything else :func:`safeckpt.save` stores (the config, the data loader position).
        metrics: numbers (``{"loss": 0.1}``), also readable from the header's metadata.

    Raises:
        InvalidValueError: something in the state cannot be saved; the message names its path,
            e.g. ``checkpoint['extra']['sampler']``.

    Example:
        >>> safeckpt.save_checkpoint("ckpt.sckpt", model=model, optimizer=opt, step=100)  # doctest: +SKIP
    """
    _check_count("step", step)
    _check_count("epoch", epoch)
    metrics = plain_metrics(metrics)
    state = {"model": state_of(model), "optimizer": state_of(optimizer),
             "scheduler": state_of(scheduler), "step": step, "epoch": epoch,
             "rng": capture_rng() if rng else None, "extra": state_of(extra), "metrics": metrics}
    _save(state, path, step, metrics, checksum, atomic, root="checkpoint")


def metadata_of(step: int | None, metrics: Metrics) -> dict[str, Any]:
    """The [C1] metadata of a checkpoint of ``step`` with ``metrics``."""
    return {"format": FORMAT, "step": step, "metrics": metrics}


def _save(state: dict[str, Any], path: PathLike, step: int | None, metrics: Metrics,
          checksum: bool, atomic: bool, root: str) -> None:
    """Write a checkpoint's tree with its [C1] metadata."""
    meta = metadata_of(step, metrics)
    tree, names, arrays = _tree.flatten(state, root=root)
    plan = _writer.Plan(dict(zip(names, arrays)), meta, 64, checksum, tree=tree)
    api.save_plan(plan, path, atomic=atomic)


def load_checkpoint(path: PathLike, *, model: Any = None, optimizer: Any = None,
                    scheduler: Any = None, map_location: Any = None, rng: bool = True,
                    strict: bool = True, verify: bool | None = None, **limits: Any
                    ) -> CheckpointInfo:
    """Load a checkpoint of :func:`save_checkpoint` and restore it into the objects given; return
    a :class:`CheckpointInfo`.

    The model, the optimizer and the scheduler are all checked before any is written (every
    key, shape and dtype; see :func:`restore_into`: objects with ``load_state_dict()``, and
    dicts of numpy arrays or torch tensors, overwritten in place), then written, then, with
    ``rng``, the random generators are set. ``verify``: check every tensor's CRC32C; ``None``
    (default) does when the file has checksums (a restore reads every byte anyway), ``True``
    always (raises on a file saved with ``checksum=False``), ``False`` never. ``map_location``
    moves tensors restored into torch objects, as ``torch.load`` takes it (a device, a dict,
    or a function ``(storage, location)``; see :func:`safeckpt.torch.load`). A target given as
    a plain state dict (``model=model.state_dict()``) is written in place, never rebound; an
    optimizer's or scheduler's ``state_dict()`` (a copy whose ``lr`` and other values would
    change in the copy only) is refused: pass the object itself.

    Raises:
        HeaderError: not a file of :func:`save_checkpoint` (a plain file, a file of
            :class:`CheckpointManager`: the message says what to use), or one that breaks [C1-C3].
        StateMismatchError: the file does not fit a target; nothing was written.
        InvalidValueError: a target that cannot be restored in place (see
            :func:`restore_into`); nothing was written.

    Example:
        >>> info = safeckpt.load_checkpoint("ckpt.sckpt", model=model, optimizer=opt)  # doctest: +SKIP
        >>> start_step = info.step + 1                                                  # doctest: +SKIP
    """
    fresh = ("optimizer",) if optimizer is not None and not isinstance(optimizer, dict) else ()
    state = load_checkpoint_file(path, _SAVED, fresh, verify, limits)
    where = repr(os.fspath(path))
    restore = _Restore(where, strict, map_location)
    for key, target in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler)):
        if target is not None:
            if state[key] is None:
                raise StateMismatchError(f"{where} holds no {key} state; nothing was restored")
            restore.top(target, state[key], (key,))
    restore.finish()
    for key, target in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler)):
        if target is not None:
            state[key] = target
    if rng:
        restore_rng(state["rng"])
    return CheckpointInfo(os.fspath(path), state["step"], state["epoch"], state["metrics"],
                          state["extra"], state)


_SAVED = ("model", "optimizer", "scheduler", "step", "epoch", "rng", "extra", "metrics")  # [C2]
MANAGED = ("state", "step", "metrics", "rng")  # [C2]


def _check_counter(value: object, where: str, rule: str) -> None:
    """A file's counter: None or an int >= 0 (below 2**64) [C1, C2]."""
    if value is not None and not _is_int(value, 0, (1 << 64) - 1):
        raise HeaderError(f"{where}: {_shown(value)} is not None or an int >= 0 [{rule}]")


def check_metrics(metrics: object, where: str, rule: str) -> None:
    """A file's metrics: a map of str to int or float [C1, C2]."""
    if not isinstance(metrics, dict):
        raise HeaderError(f"{where}: {_shown(metrics)} is not a map of str to numbers [{rule}]")
    for key, value in metrics.items():
        if type(key) is not str or type(value) not in (int, float):
            raise HeaderError(f"{where}: {_shown(key)}: {_shown(value)} is not a str and a number "
                              f"[{rule}]")


def check_metadata(meta: dict[str, Any], where: str, step: int | None = None) -> None:
    """[C1]: raise HeaderError unless ``meta`` is a checkpoint's (of ``step``, if given)."""
    if meta.get("format") != FORMAT:
        raise HeaderError(f"{where} is not a checkpoint: its metadata has no format {FORMAT!r}; "
                          "load it with safeckpt.load [C1]")
    _check_counter(meta.get("step"), f"{where}: metadata['step']", "C1")
    check_metrics(meta.get("metrics", {}), f"{where}: metadata['metrics']", "C1")
    if step is not None and meta.get("step") != step:
        raise HeaderError(f"{where}: metadata['step'] is {_shown(meta.get('step'))}, but the file "
                          f"is named for step {step} [C2]")


def _check_layout(keys: Iterable[Any], where: str, layout: Tuple[str, ...]) -> None:
    """[C2]: the top-level keys of a checkpoint of ``layout`` (_SAVED or MANAGED)."""
    keys = set(keys)
    if layout is _SAVED and "state" in keys and "model" not in keys:
        raise HeaderError(f"{where} was written by CheckpointManager.save, not save_checkpoint; "
                          "restore it with CheckpointManager(directory).restore(state, step=...) "
                          "[C2]")
    if layout is MANAGED and "model" in keys and "state" not in keys:
        raise HeaderError(f"{where} was written by save_checkpoint, not CheckpointManager.save; "
                          "load it with safeckpt.load_checkpoint(path, model=..., optimizer=...) "
                          "[C2]")
    missing = [key for key in layout if key not in keys]
    if missing:
        writer = "save_checkpoint" if layout is _SAVED else "CheckpointManager.save"
        raise HeaderError(f"{where} is not a checkpoint of {writer}: it has no "
                          f"{', '.join(map(repr, missing))} [C2]")


def load_checkpoint_file(path: Union[PathLike, RemotePath], layout: Tuple[str, ...],
                         fresh_keys: Sequence[str], verify: bool | None, limits: dict[str, Any],
                         step: int | None = None,
                         check: Optional[Callable[[TensorMap], None]] = None,
                         jax_keys: Sequence[str] = ()) -> dict[str, Any]:
    """The checked content of a checkpoint file of ``layout`` [C1-C3] (of ``step``, if given).
    ``path`` may be a :class:`~safeckpt.remote.RemotePath`. ``check``, if given, is called with
    the opened file before anything of it is loaded, and raises to refuse it. Top-level entries
    named in ``jax_keys`` hold :class:`~safeckpt.jax_convert.JaxLeaf` values in place of arrays
    (nothing put on a device yet: :func:`safeckpt.jax.restore_tree` places them).

    Top-level entries named in ``fresh_keys`` are read into fresh memory. An optimizer keeps the
    tensors it is given and overwrites them at its next step. Views of the file's private
    mapping would then copy each page on its first write, which costs several times more than
    reading the same bytes once with pread (benchmarks/bench_checkpoint.py), so its state is read
    into ordinary memory; the rest stays zero-copy (a model copies it anyway).
    """
    where = repr(path.url if isinstance(path, RemotePath) else os.fspath(path))
    with api.open(path, **limits) as mapped:  # one file, shards, or a file with references
        if check is not None:
            check(mapped)
        meta = mapped.metadata
        check_metadata(meta, where, step)
        top = mapped.tree
        if not isinstance(top, Subtree) or top.kind not in (dict, collections.OrderedDict):
            kind = f"a {top.kind.__name__}" if isinstance(top, Subtree) else _kind(top)
            raise HeaderError(f"{where} is not a checkpoint: it holds {kind}, not a dict [C2]")
        _check_layout(top.keys(), where, layout)
        if verify is None:
            verify = mapped.has_checksums
        if not fresh_keys and not jax_keys:
            state = mapped.load(verify=verify)
        elif not fresh_keys:
            state = {key: _load_entry(mapped, key, verify, key in jax_keys) for key in top.keys()}
        else:
            with api.open(path, mmap=False, **limits) as unmapped:
                state = {key: _load_entry(unmapped if key in fresh_keys else mapped, key, verify,
                                          key in jax_keys) for key in top.keys()}
    _check_counter(state["step"], f"{where}['step']", "C2")
    if layout is _SAVED:
        _check_counter(state["epoch"], f"{where}['epoch']", "C2")
    elif state["step"] is None:
        raise HeaderError(f"{where}['step']: a checkpoint of CheckpointManager needs a step [C2]")
    if state["step"] != meta.get("step"):
        raise HeaderError(f"{where}['step'] is {state['step']}, but its metadata says "
                          f"{meta.get('step')} [C2]")
    check_metrics(state["metrics"], f"{where}['metrics']", "C2")
    check_rng(state["rng"], f"{where}['rng']")
    return state


def _load_entry(reader: TensorMap, key: Any, verify: bool, jax_leaves: bool) -> Any:
    """Top-level entry ``key`` of an open checkpoint: numpy arrays, or JaxLeaf values."""
    if jax_leaves:
        return _tree.materialize(reader, _tree.find(reader, (key,)), framework="jax",
                                 verify=verify, jax_leaves=True)
    return reader.load((key,), verify=verify)
