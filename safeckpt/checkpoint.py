"""Training checkpoints: ``save_checkpoint``/``load_checkpoint`` and ``CheckpointManager``.

A checkpoint is one ordinary nested .sckpt file (FORMAT.md section 8) holding the model's and the
optimizer's state, counters and the random number generators' state, so that training resumes
bit-exactly. Saves are atomic (temporary file, fsync, rename), so a crash leaves the previous
checkpoint or the new one. Works with torch objects (anything with ``state_dict()`` and
``load_state_dict()``) and with plain dicts of numpy arrays alike.

Example:
    >>> manager = safeckpt.CheckpointManager("ckpts", keep_last=3)          # doctest: +SKIP
    >>> state = {"model": model, "optimizer": optimizer}                     # doctest: +SKIP
    >>> info = manager.restore(state)         # the newest complete checkpoint, or None
    >>> start = info.step + 1 if info else 0
    >>> for step in range(start, steps):
    ...     train_one_step()
    ...     manager.save(step, state, metrics={"loss": loss})
"""

import collections
import math
import os
import random
import re
import sys
import warnings

import numpy as np

from . import tree as _tree
from . import writer as _writer
from .errors import InvalidValueError, SafeckptError
from .reader import Reader

FORMAT = "safeckpt.checkpoint/1"  # metadata["format"] of every checkpoint file
_NAME = re.compile(r"^step-(\d{10,20})\.sckpt$")  # CheckpointManager's file names
_TEMP = re.compile(r"^\.step-\d{10,20}\.sckpt\.[0-9a-f]+\.tmp$")  # the writer's temporary files

CheckpointInfo = collections.namedtuple("CheckpointInfo", "path step epoch metrics extra state")
CheckpointInfo.__doc__ = """What a checkpoint held: its ``path``, ``step``, ``epoch``, ``metrics``
and ``extra``, and ``state``, the whole loaded tree (numpy arrays, or torch tensors where they
were restored into torch objects)."""

Checkpoint = collections.namedtuple("Checkpoint", "step path metrics")
Checkpoint.__doc__ = "A complete checkpoint in a :class:`CheckpointManager`'s directory."


# -- random number generators ----------------------------------------------------------------------

def capture_rng():
    """The state of Python's ``random``, numpy's global generator and, when torch is imported,
    torch's CPU generator and every initialised CUDA generator."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(legacy=True)}
    torch = sys.modules.get("torch")
    if torch is not None:
        state["torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state):
    """Set the generators captured by :func:`capture_rng` (missing entries are left alone)."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        np.random.set_state(tuple(_as_numpy(v) for v in state["numpy"]))
    torch = sys.modules.get("torch")
    if torch is None and ("torch" in state or "cuda" in state):
        import torch
    if "torch" in state:
        torch.set_rng_state(_as_byte_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        generators = [_as_byte_tensor(s) for s in state["cuda"]]
        torch.cuda.set_rng_state_all(generators[:torch.cuda.device_count()])


def _as_numpy(value):
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return value.cpu().numpy()
    return value


def _as_byte_tensor(value):
    import torch
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone().contiguous()
    return torch.from_numpy(np.array(value, np.uint8))


# -- state in and out ------------------------------------------------------------------------------

def _state_of(obj, depth=0):
    """``obj`` with every object that has ``state_dict()`` replaced by its state (through dicts)."""
    if callable(getattr(obj, "state_dict", None)) and not isinstance(obj, dict):
        return obj.state_dict()
    if type(obj) in (dict, collections.OrderedDict) and depth < 64:
        return type(obj)((k, _state_of(v, depth + 1)) for k, v in obj.items())
    return obj


def _is_torch_module(obj):
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def restore_into(target, state, *, strict=True, where="state", map_location=None):
    """Put a loaded ``state`` into ``target`` in place; return what ``target`` now holds.

    ``target`` may be an object with ``load_state_dict`` (a torch module is checked key by key
    first, see :func:`safeckpt.torch.load_state`; tensors become torch tensors zero-copy), or a
    dict: numpy arrays of the same shape and dtype are overwritten in place (so references to them
    stay valid), nested dicts and stateful objects are restored recursively, and other entries are
    replaced.
    """
    if callable(getattr(target, "load_state_dict", None)) and not isinstance(target, dict):
        from . import torch as _sck_torch
        state = _sck_torch.to_torch(state, map_location)
        if _is_torch_module(target):
            _sck_torch.load_state(target, state, strict=strict, where=where)
        else:
            target.load_state_dict(state)
        return target
    if isinstance(target, dict) and isinstance(state, dict):
        for key, value in state.items():
            current = target.get(key)
            if (isinstance(current, np.ndarray) and isinstance(value, np.ndarray)
                    and current.shape == value.shape and current.dtype == value.dtype
                    and current.flags.writeable):
                np.copyto(current, value)
            elif (callable(getattr(current, "load_state_dict", None))
                  or (isinstance(current, dict) and isinstance(value, dict))):
                restore_into(current, value, strict=strict, where=f"{where}[{key!r}]",
                             map_location=map_location)
            else:
                target[key] = value
        return target
    raise InvalidValueError(f"{where}: cannot restore a {type(state).__name__} into a "
                            f"{type(target).__name__}; pass a dict or an object with load_state_dict()")


def _plain_metrics(metrics):
    """Metrics as a dict of str -> int/float (numpy and 0-d torch values converted)."""
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise InvalidValueError(f"metrics must be a dict of str -> number, not {type(metrics).__name__}")
    out = {}
    for key, value in metrics.items():
        if type(key) is not str:
            raise InvalidValueError(f"metrics: key {key!r} is not a str")
        if hasattr(value, "item") and not isinstance(value, (int, float)):
            value = value.item()
        if type(value) is bool or not isinstance(value, (int, float)):
            raise InvalidValueError(f"metrics[{key!r}]: {value!r} is not a number")
        out[key] = value if type(value) is int else float(value)
    return out


def _check_count(name, value):
    if value is not None and (type(value) is not int or value < 0):
        raise InvalidValueError(f"{name}={value!r} must be a non-negative int or None")


def save_checkpoint(path, *, model=None, optimizer=None, scheduler=None, step=None, epoch=None,
                    rng=True, extra=None, metrics=None, checksum=True, atomic=True):
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
    metrics = _plain_metrics(metrics)
    state = {"model": _state_of(model), "optimizer": _state_of(optimizer),
             "scheduler": _state_of(scheduler), "step": step, "epoch": epoch,
             "rng": capture_rng() if rng else None, "extra": _state_of(extra), "metrics": metrics}
    _save(state, path, step, metrics, checksum, atomic, root="checkpoint")


def _save(state, path, step, metrics, checksum, atomic, root):
    meta = {"format": FORMAT, "step": step, "metrics": metrics}
    tree, names, arrays = _tree.flatten(state, root=root)
    plan = _writer._Plan(dict(zip(names, arrays)), meta, 64, checksum, tree=tree)
    _writer._save_plan(plan, path, atomic)


def load_checkpoint(path, *, model=None, optimizer=None, scheduler=None, map_location=None,
                    rng=True, strict=True, verify=True, **limits):
    """Load a checkpoint and restore it into the objects given; return a :class:`CheckpointInfo`.

    The model is restored first (every key, shape and dtype checked before any parameter is
    touched; see :func:`safeckpt.torch.load_model`), then the optimizer, the scheduler and, with
    ``rng``, the random generators. Plain dicts are restored in place (see :func:`restore_into`).
    ``verify`` checks every tensor's CRC32C first. ``map_location`` moves tensors restored into
    torch objects, as ``torch.load`` does.

    Example:
        >>> info = safeckpt.load_checkpoint("ckpt.sckpt", model=model, optimizer=opt)  # doctest: +SKIP
        >>> start_step = info.step + 1                                                  # doctest: +SKIP
    """
    fresh = ("optimizer",) if optimizer is not None and not isinstance(optimizer, dict) else ()
    state = _load_state(path, fresh, verify, limits)
    if not isinstance(state, dict) or "rng" not in state:
        raise SafeckptError(f"{str(path)!r} is not a checkpoint written by save_checkpoint")
    where = repr(str(path))
    for key, target in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler)):
        if target is not None:
            state[key] = restore_into(target, state[key], strict=strict, map_location=map_location,
                                      where=f"{where}[{key!r}]") if state[key] is not None else None
            if state[key] is None:
                raise SafeckptError(f"{where} holds no {key} state")
    if rng and state.get("rng"):
        restore_rng(state["rng"])
    return CheckpointInfo(os.fspath(path), state.get("step"), state.get("epoch"),
                          state.get("metrics", {}), state.get("extra"), state)


def _load_state(path, fresh_keys, verify, limits):
    """The saved object; top-level entries named in ``fresh_keys`` are read into fresh memory.

    An optimizer keeps the tensors it is given and overwrites them at its next step. Views of the
    file's private mapping would then copy each page on its first write, which costs several
    times more than reading the same bytes once with pread (benchmarks/bench_checkpoint.py), so
    its state is read into ordinary memory; the rest stays zero-copy (a model copies it anyway).
    """
    with Reader(path, **limits) as mapped:
        top = mapped.tree
        if not fresh_keys or top.kind is not dict:
            return mapped.load(verify=verify)
        with Reader(path, mmap=False, **limits) as unmapped:
            return {key: (unmapped if key in fresh_keys else mapped).load((key,), verify=verify)
                    for key in top.keys()}


# -- the manager -----------------------------------------------------------------------------------

class CheckpointManager:
    """Numbered, atomic checkpoints in a directory, with retention and crash recovery.

    Files are named ``step-<step, 10+ digits>.sckpt``. Each save is atomic; the writer's temporary
    files (``.step-….sckpt.<hex>.tmp``) left by a crashed save are removed when the manager is
    created and never taken for checkpoints. A file that does not open (damaged) is skipped, and
    never deleted by retention. Use one manager per directory at a time.

    Parameters:
        directory: created if missing.
        keep_last: keep this many newest checkpoints (at least 1).
        keep_best: also keep this many best by ``metric`` (``mode`` ``"min"`` or ``"max"``).
        rng: save and restore the random generators' state with every checkpoint.

    Example:
        >>> manager = CheckpointManager("ckpts", keep_last=2, keep_best=1, metric="val_loss")  # doctest: +SKIP
        >>> manager.save(10, {"model": model, "optimizer": opt}, metrics={"val_loss": 0.3})   # doctest: +SKIP
        >>> manager.restore({"model": model, "optimizer": opt})                               # doctest: +SKIP
    """

    def __init__(self, directory, *, keep_last=3, keep_best=0, metric=None, mode="min", rng=True,
                 checksum=True):
        if type(keep_last) is not int or keep_last < 1:
            raise ValueError(f"keep_last={keep_last!r} must be an int >= 1 (the newest is always kept)")
        if type(keep_best) is not int or keep_best < 0:
            raise ValueError(f"keep_best={keep_best!r} must be an int >= 0")
        if keep_best and not isinstance(metric, str):
            raise ValueError(f"keep_best={keep_best} needs metric='name of a metric', not {metric!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode={mode!r} must be 'min' or 'max'")
        self.directory = os.fspath(directory)
        self.keep_last, self.keep_best, self.metric, self.mode = keep_last, keep_best, metric, mode
        self.rng, self.checksum = rng, checksum
        self._cache = {}  # file name -> ((size, mtime_ns), Checkpoint or None)
        os.makedirs(self.directory, exist_ok=True)
        self.cleanup()

    def path(self, step):
        """The file of checkpoint ``step``."""
        _check_count("step", step)
        if step is None:
            raise InvalidValueError("step must be a non-negative int")
        return os.path.join(self.directory, f"step-{step:010d}.sckpt")

    def cleanup(self):
        """Remove temporary files left by crashed saves; return their names."""
        removed = []
        for name in os.listdir(self.directory):
            if _TEMP.match(name):
                try:
                    os.unlink(os.path.join(self.directory, name))
                    removed.append(name)
                except FileNotFoundError:
                    pass
        return removed

    def save(self, step, state, metrics=None):
        """Save ``state`` (a dict of arrays, values and objects with ``state_dict()``, or such an
        object) as checkpoint ``step``, then apply retention; return its :class:`Checkpoint`."""
        path = self.path(step)
        metrics = _plain_metrics(metrics)
        tree = {"state": _state_of(state), "step": step, "metrics": metrics,
                "rng": capture_rng() if self.rng else None}
        _save(tree, path, step, metrics, self.checksum, True, root="checkpoint")
        self._retain()
        return Checkpoint(step, path, metrics)

    def _record(self, name):
        """The Checkpoint of a file name, from its header (cached); None if it does not open."""
        match = _NAME.match(name)
        if not match:
            return None
        path = os.path.join(self.directory, name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        key = (st.st_size, st.st_mtime_ns)
        cached = self._cache.get(name)
        if cached and cached[0] == key:
            return cached[1]
        record = None
        try:
            with Reader(path) as reader:
                meta = reader.metadata
            if meta.get("format") == FORMAT and meta.get("step") == int(match.group(1)):
                record = Checkpoint(meta["step"], path, meta.get("metrics") or {})
        except (SafeckptError, OSError):
            record = None
        self._cache[name] = (key, record)
        return record

    def all(self):
        """Every complete checkpoint, oldest first."""
        records = (self._record(name) for name in os.listdir(self.directory))
        return sorted((r for r in records if r is not None), key=lambda r: r.step)

    def latest(self):
        """The newest complete checkpoint, or None."""
        records = self.all()
        return records[-1] if records else None

    def _ranked(self, records):
        scored = [r for r in records if isinstance(r.metrics.get(self.metric), (int, float))
                  and not math.isnan(r.metrics[self.metric])]
        sign = 1 if self.mode == "min" else -1
        return sorted(scored, key=lambda r: (sign * r.metrics[self.metric], -r.step))

    def best(self):
        """The checkpoint with the best ``metric`` (newest on a tie), or None."""
        if self.metric is None:
            raise ValueError("best() needs CheckpointManager(..., metric='name')")
        ranked = self._ranked(self.all())
        return ranked[0] if ranked else None

    def _retain(self):
        records = self.all()
        keep = {r.step for r in records[-self.keep_last:]}
        if self.keep_best:
            keep |= {r.step for r in self._ranked(records)[:self.keep_best]}
        for record in records:
            if record.step not in keep:
                try:
                    os.unlink(record.path)
                except FileNotFoundError:
                    pass
                self._cache.pop(os.path.basename(record.path), None)

    def load(self, step=None, *, verify=True):
        """Load checkpoint ``step`` (default: the newest that loads and verifies) without
        restoring anything; return a :class:`CheckpointInfo`, or None when there is none."""
        return self._load(None, step, verify, True, None)

    def restore(self, state_or_model, step=None, *, verify=True, strict=True, map_location=None):
        """Resume in one call: load checkpoint ``step`` (default: the newest complete one) into
        ``state_or_model`` and restore the random generators.

        A newest checkpoint that fails to load or verify is skipped, with a warning, for the one
        before it. Returns a :class:`CheckpointInfo`, or None when there is no checkpoint (start
        fresh).

        Example:
            >>> info = manager.restore({"model": model, "optimizer": opt})     # doctest: +SKIP
            >>> start = info.step + 1 if info else 0                            # doctest: +SKIP
        """
        return self._load(state_or_model, step, verify, strict, map_location)

    def _load(self, target, step, verify, strict, map_location):
        if step is not None:
            candidates = [self.path(step)]
        else:
            candidates = [r.path for r in reversed(self.all())]
        for path in candidates:
            try:
                tree = _tree.load(path, verify=verify)
            except (SafeckptError, OSError) as exc:
                if step is not None:
                    raise
                warnings.warn(f"skipping checkpoint {path!r}: {exc}", RuntimeWarning, stacklevel=3)
                continue
            state = tree["state"]
            if target is not None:
                state = restore_into(target, state, strict=strict, map_location=map_location,
                                     where=f"{path!r}['state']")
                if self.rng and tree.get("rng"):
                    restore_rng(tree["rng"])
            return CheckpointInfo(path, tree["step"], None, tree.get("metrics", {}), None, state)
        return None
