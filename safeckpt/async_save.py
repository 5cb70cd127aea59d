"""Saves that return at once: :class:`AsyncSaver` snapshots a state and writes it in the background.

``save`` copies the state into reused host buffers (:mod:`safeckpt.snapshot`) and returns; one
background thread writes the snapshots in the order they were taken, each atomically (a temporary
file renamed into place [W2], so a crash leaves the previous file whole). At most ``max_in_flight``
snapshots exist at a time (one by default): a save waits until an earlier one is written. An error
in the background is raised by the next ``save``, ``wait`` or ``close`` (each error once, oldest
first), or by the handle's ``result()``; it is never lost. Saves still pending when the interpreter
exits are written first (the thread is not a daemon); an error nobody was told about by then is
printed to stderr.

Example:
    >>> import numpy as np, os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> state = {"w": np.zeros(3, np.float32), "step": 0}
    >>> with AsyncSaver() as saver:
    ...     for step in range(3):
    ...         state["w"] += 1; state["step"] = step
    ...         handle = saver.save(state, os.path.join(d, f"step{step}.sckpt"))
    >>> safeckpt.load(os.path.join(d, "step2.sckpt"))["w"].tolist()   # doctest: +SKIP
    [3.0, 3.0, 3.0]
"""

from __future__ import annotations

import atexit
import collections
import sys
import threading
import traceback
import weakref
from typing import Any, Callable, Deque, List, Optional, Tuple, Union, cast

from . import api as _api
from . import format as fmt
from . import shard as _shard
from .filekind import PathLike, output_format
from .snapshot import Snapshot, Snapshotter

Job = Callable[[Snapshot], Any]


class SaveHandle:
    """One background save (or :meth:`AsyncSaver.submit` job): ``done()``, ``result()``.

    Example:
        >>> handle = saver.save(state, "ckpt.sckpt")          # doctest: +SKIP
        >>> handle.result()                                  # waits; raises the save's error
    """

    __slots__ = ("what", "_done", "_value", "_error", "_reported", "_lock")

    def __init__(self, what: str, lock: threading.Condition) -> None:
        self.what = what  # e.g. the path, for messages
        self._done = threading.Event()
        self._value: Any = None
        self._error: Optional[BaseException] = None
        self._reported = False
        self._lock = lock

    def done(self) -> bool:
        """Whether the save has finished (written, or failed)."""
        return self._done.is_set()

    def result(self, timeout: Optional[float] = None) -> Any:
        """Wait for the save; return what its job returned (None for :meth:`AsyncSaver.save`).

        Raises:
            TimeoutError: not finished within ``timeout`` seconds.
            Exception: the save's own error; the saver then no longer raises it.
        """
        if not self._done.wait(timeout):
            raise TimeoutError(f"{self.what}: not finished within {timeout} s")
        with self._lock:
            if self._error is not None:
                self._reported = True
                raise self._error
        return self._value

    def __repr__(self) -> str:
        state = ("pending" if not self.done()
                 else "failed" if self._error is not None else "done")
        return f"<SaveHandle {self.what} {state}>"


class AsyncSaver:
    """Writes saves in a background thread from consistent snapshots; use it as a context manager.

    Parameters:
        max_in_flight: how many snapshots may wait to be written or be writing; each holds one
            copy of the state in host memory, so memory is about ``max_in_flight`` copies. A save
            beyond it waits until an earlier one is written.

    Example:
        >>> with safeckpt.AsyncSaver() as saver:               # doctest: +SKIP
        ...     for step in range(steps):
        ...         train_step()
        ...         if step % 1000 == 0:
        ...             saver.save({"model": model.state_dict(), "step": step}, f"{step}.sckpt")
    """

    def __init__(self, *, max_in_flight: int = 1) -> None:
        if type(max_in_flight) is not int or max_in_flight < 1:
            raise ValueError(f"max_in_flight={max_in_flight!r} must be an int >= 1")
        self.max_in_flight = max_in_flight
        self._cond = threading.Condition()
        self._submitting = threading.Lock()  # one snapshot is taken at a time
        self._queue: Deque[Tuple[SaveHandle, Snapshot, Job, Snapshotter]] = collections.deque()
        self._pool: List[Snapshotter] = []  # at most max_in_flight buffer sets are ever made
        self._free: List[Snapshotter] = []  # those of the pool not holding a snapshot in flight
        self._in_flight = 0  # snapshots taken and not yet written
        self._failed: Deque[SaveHandle] = collections.deque()
        self._worker: Optional[threading.Thread] = None
        self._closed = False
        _LIVE.add(self)

    @property
    def in_flight(self) -> int:
        """Saves snapshotted and not yet finished."""
        with self._cond:
            return self._in_flight

    @property
    def buffer_bytes(self) -> int:
        """Host memory held in snapshot buffers (about one copy of the state per buffer set)."""
        with self._cond:
            return sum(snapshotter.nbytes for snapshotter in self._pool)

    def save(self, obj: Any, path: PathLike, *, metadata: Optional[Any] = None,
             align: int = fmt.ALIGN_DEFAULT, checksum: bool = True, atomic: bool = True,
             max_shard_size: Union[None, int, str] = None) -> SaveHandle:
        """Snapshot ``obj`` and return; it is written to ``path`` in the background, as
        :func:`safeckpt.save` writes it (same options).

        ``obj`` may change as soon as this returns. Everything that can be checked before writing
        (the values, the metadata, the name) is checked here.

        Returns:
            A :class:`SaveHandle`.

        Raises:
            Exception: the error of an earlier background save not yet reported (this save is
                then not taken); ValueError if the saver is closed; what :func:`safeckpt.save`
                raises for ``obj``, ``metadata`` or ``path``.

        Example:
            >>> saver.save(state, "ckpt.sckpt", metadata={"step": 10})   # doctest: +SKIP
        """
        text, _ = output_format(path, sharded=max_shard_size is not None)
        shard_size = None if max_shard_size is None else _shard.parse_size(max_shard_size)
        plans = []

        def check(snapshot: Snapshot) -> None:
            plans.append(snapshot.plan(metadata=metadata, align=align, checksum=checksum))

        def write(snapshot: Snapshot) -> None:
            if shard_size is None:
                _api.save_plan(plans[0], text, atomic=atomic)
            else:
                _api.save_sharded(snapshot.tree, snapshot.names, snapshot.arrays, text,
                                  metadata=metadata, align=align, checksum=checksum,
                                  atomic=atomic, max_shard_size=shard_size)

        return self.submit(obj, write, check=check, what=repr(text))

    def submit(self, obj: Any, job: Job, *, check: Optional[Job] = None, root: str = "obj",
               what: str = "a background save") -> SaveHandle:
        """Snapshot ``obj``, then run ``job(snapshot)`` in the background thread (in the order
        submitted); the hook under :meth:`save`, for callers with their own work to do on a
        snapshot (a manager's comparison with its previous checkpoint, write and retention).

        Parameters:
            obj: the state, copied before this returns.
            job: called with the :class:`safeckpt.snapshot.Snapshot` (its copies done) in the
                background thread; its return value is the handle's ``result()``, its exception
                is reported as a save's. It must not keep the snapshot's arrays: their buffers
                are reused by a later save once it returns.
            check: called with the snapshot in the caller's thread before ``job`` is queued (its
                copies may still be running: read dtypes and shapes, not values); an exception
                drops the snapshot and propagates.
            root: how messages name ``obj``.
            what: how handles and messages name the job (e.g. a path).

        Returns:
            A :class:`SaveHandle`.

        Raises:
            As :meth:`save`.
        """
        if threading.current_thread() is self._worker:
            raise RuntimeError("a job of this AsyncSaver cannot submit to it: it would wait for "
                               "itself; do the work in the job")
        with self._submitting:
            snapshotter = self._reserve()
            try:
                snapshot = snapshotter.take(obj, root=root)
                if check is not None:
                    check(snapshot)
            except BaseException:
                self._release(snapshotter)
                raise
            handle = SaveHandle(what, self._cond)
            with self._cond:
                self._queue.append((handle, snapshot, job, snapshotter))
                if self._worker is None:
                    self._worker = threading.Thread(target=self._work, daemon=False,
                                                    name="safeckpt-async-save")
                    self._worker.start()
            return handle

    def wait(self) -> None:
        """Wait until every save submitted is written.

        Raises:
            Exception: the oldest error of a background save not yet reported (each is raised once).
        """
        if threading.current_thread() is self._worker:
            raise RuntimeError("AsyncSaver.wait() called from one of its own jobs would never "
                               "return")
        with self._cond:
            while self._in_flight:
                self._cond.wait()
            self._raise_failed()

    def close(self) -> None:
        """Refuse further saves, wait for the pending ones and raise an unreported error (as
        :meth:`wait`); calling it again raises the next one, if any."""
        with self._cond:
            self._closed = True
        self.wait()

    def __enter__(self) -> AsyncSaver:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        with self._cond:
            state = "closed" if self._closed else "open"
            return (f"<AsyncSaver {state}, {self._in_flight} in flight of at most "
                    f"{self.max_in_flight}, {len(self._failed)} unreported errors>")

    # -- internals ------------------------------------------------------------------------------

    def _reserve(self) -> Snapshotter:
        """A free buffer set, once fewer than ``max_in_flight`` saves are in flight; raises an
        unreported background error first."""
        with self._cond:
            while True:
                if self._closed:
                    raise ValueError("this AsyncSaver is closed; make a new one to save again")
                self._raise_failed()
                if self._in_flight < self.max_in_flight:
                    break
                self._cond.wait()
            self._in_flight += 1
            if not self._free:
                self._pool.append(Snapshotter())
                self._free.append(self._pool[-1])
            return self._free.pop()

    def _release(self, snapshotter: Snapshotter) -> None:
        with self._cond:
            self._free.append(snapshotter)
            self._in_flight -= 1
            self._cond.notify_all()

    def _raise_failed(self) -> None:
        """Raise the oldest error no one was told about (the caller holds ``_cond``)."""
        while self._failed:
            handle = self._failed.popleft()
            if not handle._reported:
                handle._reported = True
                raise cast(BaseException, handle._error)

    def _work(self) -> None:
        """The background thread: run queued jobs in order, then end (a later save starts a new
        one, so an idle saver holds no thread and never delays the interpreter's exit)."""
        while True:
            with self._cond:
                if not self._queue:
                    self._worker = None
                    return
                handle, snapshot, job, snapshotter = self._queue.popleft()
            value, error = None, None
            try:
                snapshot.wait()
                value = job(snapshot)
            except BaseException as exc:  # reported at the next save, wait or close
                error = exc
                if hasattr(exc, "add_note"):  # Python 3.11+
                    exc.add_note(f"(raised in the background by {handle.what})")
            del snapshot
            with self._cond:
                handle._value, handle._error = value, error
                if error is not None:
                    self._failed.append(handle)
                handle._done.set()
            self._release(snapshotter)

    def _report_at_exit(self) -> None:
        """Print the errors that no one was told about (the interpreter is exiting)."""
        with self._cond:
            failed = [handle for handle in self._failed if not handle._reported]
            self._failed.clear()
        for handle in failed:
            error = cast(BaseException, handle._error)
            print(f"safeckpt: a background save failed and nothing reported it ({handle.what}):",
                  file=sys.stderr)
            traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)


_LIVE: "weakref.WeakSet[AsyncSaver]" = weakref.WeakSet()


@atexit.register
def _at_exit() -> None:
    """Runs after the interpreter has joined the (non-daemon) writer threads, so every pending
    save is written by now; report the errors no ``wait``/``close`` raised."""
    for saver in list(_LIVE):
        saver._report_at_exit()
