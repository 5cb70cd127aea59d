"""Consistent snapshots of a state into reused host buffers, for saves that write in the background.

A :class:`Snapshotter` flattens a state (:func:`safeckpt.tree.flatten`) and copies every tensor
into a host buffer it keeps: the next snapshot of a tensor with the same name, dtype and shape
reuses that buffer, so a training loop that saves the same state again and again allocates no
tensor memory after its first save. The copy is taken before :meth:`Snapshotter.take` returns, so the training
loop may update its tensors in place at once; what is written is the state as it was.

CUDA tensors go to pinned (page-locked) buffers by ``copy_(non_blocking=True)`` on the current
stream of their device, and one CUDA event per device is recorded after the last copy:
:meth:`Snapshot.wait` waits for those events and must be called before the buffers are read (work
queued later on that stream runs after the copies; other streams must wait for it, as torch
requires for any tensor shared between streams). Tensors on other non-CPU devices are copied
synchronously. numpy arrays, torch CPU tensors and jax arrays of 64 KiB or more are copied in
one call for them all (:func:`safeckpt._backend.copy_many`: memcpy with the GIL released, shared
by the C core's threads); smaller and strided ones are copied by numpy, and a big-endian one is
stored little-endian in its buffer.

Example:
    >>> import numpy as np
    >>> snapshotter = Snapshotter()
    >>> w = np.zeros(3, np.float32)
    >>> snap = snapshotter.take({"w": w, "step": 1})
    >>> w += 1                              # training goes on; the snapshot keeps the old values
    >>> snap.wait()
    >>> snap.names, snap.arrays[0].tolist()
    (['w'], [0.0, 0.0, 0.0])
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from . import _backend
from . import format as fmt
from . import torch_convert
from . import tree as _tree
from . import writer as _writer
from .dtypes import is_little_endian


# Host arrays from this size are copied by one _backend.copy_many call for them all (threads
# share the bytes); smaller ones by numpy.copyto, which costs less per array (about 0.5 us) than
# passing a pair of buffers to C (about 1 us): 10,000 arrays of 256 bytes take 4 ms by numpy and
# 15 ms through copy_many; a 1.5 GB state of 592 arrays (GPT-2 + Adam) takes 1.4-1.5x longer by
# numpy (one thread) than through copy_many (2 threads on a 2-CPU machine).
_BATCH_MIN = 64 << 10


class _Buffer(NamedTuple):
    """A host buffer: ``key`` = (dtype, shape, kind) it was made for, ``array`` its numpy view,
    ``tensor`` a torch view of the same memory (torch sources only)."""

    key: Tuple[np.dtype, Tuple[int, ...], str]
    array: np.ndarray
    tensor: Any
    raw: Optional[np.ndarray] = None  # a staged source's bytes (torch_convert.staged_as_bytes)


class Snapshot:
    """A consistent copy of a state: ``tree``, ``names`` and ``arrays`` as
    :func:`safeckpt.tree.flatten` gives them, the arrays being host buffers that the
    :class:`Snapshotter` reuses at its next :meth:`~Snapshotter.take`.

    Call :meth:`wait` before reading ``arrays`` (device copies may still be running); then
    :meth:`plan` makes the write plan of the snapshot.

    Example:
        >>> snap = Snapshotter().take({"w": np.ones(2)})
        >>> snap.wait(); snap.plan(metadata={"step": 3}).names
        ['w']
    """

    def __init__(self, tree: Any, names: List[str], arrays: List[np.ndarray],
                 events: List[Any], sources: List[Any],
                 staged: Optional[List[tuple]] = None) -> None:
        self.tree, self.names, self.arrays = tree, names, arrays
        self._events, self._sources = events, sources
        self._staged = staged or []  # (raw, array, torch dtype, name): made after the copies

    @property
    def nbytes(self) -> int:
        """The bytes of the snapshot's tensors."""
        return sum(array.nbytes for array in self.arrays)

    def wait(self) -> None:
        """Wait until the device-to-host copies are done (at once when there are none)."""
        for event in self._events:
            event.synchronize()
        self._events, self._sources = [], []  # the device tensors are no longer read
        staged, self._staged = self._staged, []
        _finish(staged)

    def plan(self, *, metadata: Optional[Dict[str, Any]] = None, align: int = fmt.ALIGN_DEFAULT,
             checksum: bool = True, **options: Any) -> _writer.Plan:
        """The write plan of the snapshot (:class:`safeckpt.writer.Plan`; ``options`` are passed
        on to it). Only dtypes and shapes are read, so it may be made before :meth:`wait`.

        Raises:
            InvalidValueError, LimitError: as :func:`safeckpt.save` raises them.
        """
        return _writer.Plan(dict(zip(self.names, self.arrays)), metadata, align, checksum,
                            tree=self.tree, **options)


class Snapshotter:
    """Takes :class:`Snapshot` s of states into host buffers that it keeps and reuses.

    A buffer is kept per tensor name and reused while the name's dtype and shape stay the same;
    buffers of names that a snapshot no longer has are dropped, so the memory held is one copy of
    the last state saved. A snapshot's arrays are overwritten by the next :meth:`take`: finish with
    one (write it) before taking the next, or use one Snapshotter per snapshot in flight
    (:class:`safeckpt.async_save.AsyncSaver` keeps a pool of them).

    Example:
        >>> snapshotter = Snapshotter()
        >>> a = snapshotter.take({"w": np.ones(4)}).arrays[0]
        >>> snapshotter.take({"w": np.zeros(4)}).arrays[0] is a     # the same buffer, refilled
        True
    """

    def __init__(self) -> None:
        self._buffers: Dict[str, _Buffer] = {}
        self._events: Dict[Any, Any] = {}  # CUDA device -> its reused event

    @property
    def nbytes(self) -> int:
        """The bytes of host memory held in buffers."""
        return sum(buffer.array.nbytes for buffer in self._buffers.values())

    def take(self, obj: Any, *, root: str = "obj") -> Snapshot:
        """Copy ``obj`` (anything :func:`safeckpt.save` stores) into the buffers.

        Parameters:
            obj: the state; it may change as soon as this returns.
            root: how messages name ``obj`` (``state['model']``).

        Returns:
            A :class:`Snapshot`; call its :meth:`~Snapshot.wait` before reading its arrays.

        Raises:
            InvalidValueError, UnsupportedDtypeError, LimitError: what :func:`safeckpt.save`
                refuses, naming where it is in ``obj``; nothing is copied then.
        """
        tree, names, arrays = _tree.flatten(obj, root=root)
        old, self._buffers = self._buffers, {}
        copies: List[np.ndarray] = []
        devices: Dict[Any, Any] = {}  # CUDA device -> torch: an event is recorded after its copies
        sources: List[Any] = []
        dsts: List[np.ndarray] = []  # large host arrays, copied byte for byte in one call
        srcs: List[np.ndarray] = []
        staged: List[tuple] = []  # pinned copies of staged sources, finished by Snapshot.wait
        for name, array in zip(names, arrays):
            source = array.source if type(array) is _writer.LazyArray else None
            kind = ("host" if source is None
                    else "pinned" if source.device.type == "cuda" else "torch")
            dtype = array.dtype if is_little_endian(array.dtype) else array.dtype.newbyteorder("<")
            key = (dtype, tuple(array.shape), kind)
            buffer = old.get(name)
            if buffer is None or buffer.key != key:
                buffer = _new_buffer(key, source)
            self._buffers[name] = buffer
            copies.append(buffer.array)
            if source is None:
                if (array.nbytes >= _BATCH_MIN and isinstance(array, np.ndarray)
                        and dtype is array.dtype and array.flags.c_contiguous):
                    dsts.append(buffer.array)
                    srcs.append(array)
                else:  # small (cheaper by numpy), strided, or big-endian bytes to swap
                    np.copyto(buffer.array, array, casting="equiv")
            elif buffer.array.nbytes:
                # a staged source's bytes: torch cannot copy a shell dtype
                buffer.tensor.copy_(source if buffer.raw is None else source.view(
                    buffer.tensor.dtype), non_blocking=kind == "pinned")
                if kind == "pinned":
                    devices[source.device] = sys.modules["torch"]
                    sources.append(source)
                if buffer.raw is not None:
                    item = (buffer.raw, buffer.array, source.dtype, name)
                    if kind == "pinned":
                        staged.append(item)
                    else:  # copied already: refused here, before anything is written
                        _finish([item])
        _backend.copy_many(dsts, srcs)
        events = []
        for device, torch in devices.items():
            event = self._events.get(device)
            if event is None:
                event = self._events[device] = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            events.append(event)
        return Snapshot(tree, names, copies, events, sources, staged)


def _finish(staged: List[tuple]) -> None:
    """Make the arrays of staged sources from their copied bytes (float4_e2m1fn_x2 unpaired,
    shell dtypes checked: InvalidValueError naming the tensor)."""
    for raw, array, dtype, name in staged:
        torch_convert.finish_staged(raw, array, dtype, name)


def _new_buffer(key: Tuple[np.dtype, Tuple[int, ...], str], source: Any) -> _Buffer:
    """A host buffer for ``key``: numpy memory for a host array, torch memory (pinned for a CUDA
    source) viewed as numpy for a torch tensor on a device."""
    dtype, shape, kind = key
    if kind == "host":
        return _Buffer(key, np.empty(shape, dtype), None)
    torch = sys.modules["torch"]  # a device tensor was given, so torch is imported
    if torch_convert.staged_as_bytes(source.dtype):  # one byte an element of the source
        raw = torch.empty(source.shape, dtype=torch.uint8, pin_memory=kind == "pinned")
        host = raw.numpy()
        array = (np.empty(shape, dtype) if host.shape != shape  # float4_e2m1fn_x2: unpaired
                 else host.view(dtype))  # a shell dtype: its bytes, checked
        return _Buffer(key, array, raw, host)
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    raw = torch.empty(nbytes, dtype=torch.uint8, pin_memory=kind == "pinned")
    array = raw.numpy().view(dtype).reshape(shape)
    return _Buffer(key, array, raw.view(source.dtype).view(source.shape))
