"""``CheckpointManager``: numbered, atomic checkpoints in a directory, with retention and crash
recovery.

Each checkpoint is a file of :mod:`safeckpt.checkpoint` ([C1]-[C3]) named
``step-<step, 10 to 20 digits>.sckpt`` (with ``max_shard_size``, a shard index of that name and its
shards ``step-…-0000j-of-0000k.sckpt``, FORMAT.md section 9). Saves are atomic, so a crash leaves
the previous checkpoint or the new one; retention runs after the new file is renamed into place.

The directory may be remote (an fsspec URL or filesystem, FORMAT.md section 12). Object stores
have no rename: there a checkpoint is complete once its commit object ``step-….sckpt.commit``,
written after its data, is there [RS8]. Where checkpoints live is one small object, a
:class:`_LocalDir` or a :class:`_RemoteDir`; the manager above it is the same for both.

Example:
    >>> manager = safeckpt.CheckpointManager("ckpts", keep_last=3)          # doctest: +SKIP
    >>> state = {"model": model, "optimizer": optimizer}                     # doctest: +SKIP
    >>> info = manager.restore(state)         # the newest that loads; None: no checkpoint yet
    >>> start = info.step + 1 if info else 0
    >>> for step in range(start, steps):
    ...     train_one_step()
    ...     manager.save(step, state, metrics={"loss": loss})
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import re
import threading
import warnings
from typing import Any, Dict, List, NamedTuple, Optional, Tuple, Union

import numpy as np

from . import _backend, _fs, api
from . import jax as _sck_jax
from . import refs as _refs
from . import format as fmt
from . import async_save as _async
from . import remote as _remote
from . import shard as _shard
from . import tree as _tree
from . import writer as _writer
from .checkpoint import (MANAGED, CheckpointInfo, Metrics, PathLike, capture_rng, check_metadata,
                         check_metrics, load_checkpoint_file, metadata_of, plain_metrics,
                         restore_into, restore_rng, state_of)
from .dtypes import little_endian
from .errors import CommitError, HeaderError, InvalidValueError, LimitError, SafeckptError, quote
from .reader import Reader
from .safetensors_format import unique_object
from .snapshot import Snapshot

NAME = re.compile(r"\Astep-(\d{10,20})\.sckpt\Z")  # a checkpoint (or a sharded one's index)
SHARD = re.compile(r"\A(step-\d{10,20})-\d{5}-of-\d{5}\.sckpt\Z")  # a sharded checkpoint's shard
COMMIT = re.compile(r"\Astep-(\d{10,20})\.sckpt\.commit\Z")  # a remote checkpoint's commit [RS8]
COMMIT_SUFFIX = ".commit"  # the commit object of "step-….sckpt" is "step-….sckpt.commit" [RS8]
COMMIT_VERSION = 1  # its "safeckpt_commit"
COMMIT_KEYS = frozenset(("safeckpt_commit", "step", "metrics", "files"))
MAX_COMMIT_SIZE = 64 << 10  # [RS8]: ~900 files' names, sizes and CRCs; refused unread above it
_MAX_STEP = 10 ** 20 - 1  # the most digits a name holds (and below 2**64 - 1, [C1])
_ALIGN = 64
_SHOWN = 10  # the failed files a "no checkpoint loads" error lists
_JAX_KEYS = ("state",)  # restored into a JAX template: loaded as JaxLeaf values (lazy)


class Checkpoint(NamedTuple):
    """A complete checkpoint in a :class:`CheckpointManager`'s directory."""

    step: int
    path: str
    metrics: Metrics


Identity = Tuple[int, Optional[int], Optional[bytes]]  # a file's size, header_crc, save_id [X5]


class _Entry(NamedTuple):
    """What the manager reads from a checkpoint's header (cached by size, mtime and inode)."""

    checkpoint: Checkpoint
    shards: Tuple[str, ...]  # its shards' file names (a sharded checkpoint), else ()
    refs: Tuple[str, ...]  # the files it refers to (FORMAT.md section 11), else ()
    ref_ids: Tuple[Identity, ...]  # the Identity of each of those it was saved against
    identity: Identity  # its own
    nbytes: int  # the bytes of the tensors it stores itself


Stamp = Tuple[int, int, int, int]  # a file's st_dev, st_ino, st_size, st_mtime_ns


def _stamp(path: str) -> Stamp:
    """What says that ``path`` is still the file it was: device, inode, size, mtime."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class _Held(NamedTuple):
    """The open reader of the newest file this manager wrote (incremental), kept for the next
    save to compare with, and the :func:`_stamp` of every file it reads (the referenced files,
    then the file itself), taken when it was opened."""

    path: str
    reader: Any  # a Reader, or a LinkedReader over a file with references
    stamps: Tuple[Tuple[str, Stamp], ...]


def as_step(value: Any) -> int:
    """A step as an int: an int, a numpy integer, or a 0-d integer numpy array or torch tensor.

    Raises:
        InvalidValueError: a bool, a float, a negative number or anything else; the message
            names the value.

    Example:
        >>> as_step(np.int64(7)), as_step(10)
        (7, 10)
    """
    number: Any = None
    if type(value) is int:
        number = value
    elif isinstance(value, np.integer):
        number = int(value)
    elif (isinstance(value, np.ndarray) or type(value).__module__.startswith("torch")) \
            and getattr(value, "ndim", None) == 0:
        dtype = str(value.dtype)  # "int64", "torch.int64", "uint8", "bool", "float32"...
        if "int" in dtype and not dtype.endswith("bool"):
            number = int(value.item())
    if number is None:
        kind = type(value).__name__ + (f" of {value.dtype}" if hasattr(value, "dtype") else "")
        raise InvalidValueError(f"step={value!r} must be an int (a Python int, a numpy integer, "
                                f"or a 0-d integer numpy array or torch tensor), not {kind}")
    if not 0 <= number <= _MAX_STEP:
        raise InvalidValueError(f"step={number} must be between 0 and {_MAX_STEP}")
    return number


def _name(step: int) -> str:
    """The file name of checkpoint ``step`` (a checked step)."""
    return f"step-{step:010d}.sckpt"


def _entry_of(reader: Reader, path: str, step: int) -> _Entry:
    """The _Entry of an open file's header; SafeckptError if its metadata is not a checkpoint's
    of ``step`` [C1]."""
    meta = reader.metadata
    shards = tuple(reader.shard_index["files"]) if reader.shard_index else ()
    refs = reader.refs
    check_metadata(meta, repr(path), step)
    return _Entry(Checkpoint(meta["step"], path, meta.get("metrics", {})), shards,
                  tuple(refs.files) if refs else (),
                  tuple(zip(refs.sizes, refs.header_crcs, refs.save_ids)) if refs else (),
                  (reader.size, reader.header_crc, reader.save_id), sum(reader.table.nbytes))


Files = Dict[str, Tuple[int, int]]  # a commit object's files: name -> (size, header_crc) [RS8]


def parse_commit(data: bytes, where: str, name: str, step: int) -> Tuple[Metrics, Files]:
    """The metrics and files of ``data``, the commit object of checkpoint file ``name`` (of
    ``step``), checked [RS8]; ``where`` names the object in messages.

    Raises:
        CommitError: not UTF-8 JSON, a key twice, not the schema of [RS8], another step, or a
            file that is not that checkpoint's own; the message says which.

    Example:
        >>> parse_commit(b'{"safeckpt_commit": 1, "step": 7, "metrics": {}, "files": '
        ...              b'{"step-0000000007.sckpt": {"size": 96, "header_crc": 5}}}',
        ...              "step-0000000007.sckpt.commit", "step-0000000007.sckpt", 7)
        ({}, {'step-0000000007.sckpt': (96, 5)})
    """
    def refuse(problem: str) -> CommitError:
        return CommitError(f"{where} is not a valid commit object: {problem} [RS8]; checkpoint "
                           f"step {step} is not taken for one (delete it, or restore the object)")

    try:
        value = json.loads(data.decode("utf-8"),
                           object_pairs_hook=functools.partial(unique_object, where=where))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # HeaderError: a key twice
        raise refuse(f"not UTF-8 JSON ({exc})") from exc
    if not isinstance(value, dict) or set(value) != COMMIT_KEYS:
        keys = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise refuse(f"it must be an object with exactly the keys {sorted(COMMIT_KEYS)}, not "
                     f"{quote(keys)}")
    if type(value["safeckpt_commit"]) is not int or value["safeckpt_commit"] != COMMIT_VERSION:
        raise refuse(f"safeckpt_commit is {quote(value['safeckpt_commit'])}; this safeckpt reads "
                     f"{COMMIT_VERSION} (a newer safeckpt wrote it?)")
    if type(value["step"]) is not int or value["step"] != step:
        raise refuse(f"it says step {quote(value['step'])}, but is named for step {step}")
    try:
        check_metrics(value["metrics"], f"{where}: metrics", "RS8")
    except HeaderError as exc:
        raise refuse(str(exc)) from exc
    files, stem = value["files"], name[:-len(".sckpt")]
    if not isinstance(files, dict) or name not in files:
        raise refuse(f"'files' must be an object naming {name!r}, not {quote(files)}")
    out: Files = {}
    for file, entry in files.items():
        shard = SHARD.match(file)
        if file != name and not (shard and shard.group(1) == stem):
            raise refuse(f"'files' names {quote(file)}, which is not {name!r} or one of its "
                         "shards")
        if (not isinstance(entry, dict) or set(entry) != {"size", "header_crc"}
                or type(entry["size"]) is not int or not 32 <= entry["size"] < 1 << 63
                or type(entry["header_crc"]) is not int or not 0 <= entry["header_crc"] < 1 << 32):
            raise refuse(f"files[{file!r}] must be {{\"size\": an int in 32 .. 2**63-1, "
                         f"\"header_crc\": an int in 0 .. 2**32-1}}, not {quote(entry)}")
        out[file] = (entry["size"], entry["header_crc"])
    return value["metrics"], out


class _LocalDir:
    """Where a manager's checkpoints live: a local directory. A save is complete once renamed
    into place [W2]; listing reads each checkpoint file's header, cached by size, mtime and
    inode."""

    def __init__(self, directory: str) -> None:
        self.where = directory
        # file name -> ((size, mtime_ns, inode), _Entry or None)
        self._cache: Dict[str, Tuple[Tuple[int, int, int], Optional[_Entry]]] = {}
        os.makedirs(directory, exist_ok=True)

    def path(self, name: str) -> str:
        """The path of file ``name``."""
        return os.path.join(self.where, name)

    target = path  # what the save functions write to

    def exists(self, name: str) -> bool:
        """Whether anything is at file ``name`` (a damaged file too)."""
        return os.path.lexists(self.path(name))

    def remove(self, name: str) -> bool:
        """Remove file ``name``; False if it was not there."""
        self._cache.pop(name, None)
        try:
            os.unlink(self.path(name))
        except FileNotFoundError:
            return False
        return True

    def check_commit(self, step: int, metrics: Metrics, files: List[str]) -> None:
        """Nothing: a local save needs no commit object."""

    def commit(self, step: int, metrics: Metrics, name: str) -> None:
        """Nothing: the rename that ended the save made it complete [W2]."""

    def uncommitted(self) -> List[str]:
        """None: a local checkpoint is its file."""
        return []

    def uncommit(self, name: str) -> None:
        """Nothing: a local checkpoint is its file."""

    def entry(self, name: str) -> _Entry | None:
        """The _Entry of a file name, from its header (cached); None if it does not open or
        its metadata is not a checkpoint's of that step [C1]."""
        match = NAME.match(name)
        if not match:
            return None
        path = self.path(name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        key = (st.st_size, st.st_mtime_ns, st.st_ino)
        cached = self._cache.get(name)
        if cached and cached[0] == key:
            return cached[1]
        entry = None
        try:
            with Reader(path, allow_index=True, allow_refs=True) as reader:  # the header only
                entry = _entry_of(reader, path, int(match.group(1)))
        except (SafeckptError, OSError):
            entry = None
        self._cache[name] = (key, entry)
        return entry

    def remember(self, name: str, st: os.stat_result, entry: _Entry) -> None:
        """Cache the _Entry of file ``name`` read when it had the stat ``st``."""
        self._cache[name] = ((st.st_size, st.st_mtime_ns, st.st_ino), entry)

    def entries(self) -> List[_Entry]:
        """The _Entry of every file whose header is a checkpoint's."""
        return [e for e in map(self.entry, os.listdir(self.where)) if e is not None]

    def candidates(self) -> List[Tuple[int, str]]:
        """``(step, file name)`` of every file named like a checkpoint (a damaged one too)."""
        return [(int(m.group(1)), m.group(0)) for m in map(NAME.match, os.listdir(self.where))
                if m]

    def cleanup(self, pending: set[str], at_start: bool = False) -> List[str]:
        """Remove temporary files and shards whose index is missing (a sharded save stopped
        before its index [S9]), less those of the checkpoint stems in ``pending``; return their
        names. The same when the manager starts (``at_start``)."""
        names = os.listdir(self.where)
        indexes = {name[:-len(".sckpt")] for name in names if NAME.match(name)}
        removed = []
        for name in names:
            temp = _fs.TEMP_NAME.match(name)  # an atomic save's temporary file
            shard = SHARD.match(temp['base'] if temp else name)
            index = NAME.match(temp['base']) if temp else None
            stem = shard.group(1) if shard else index.group(0)[:-len(".sckpt")] if index else None
            if stem is None or stem in pending or (not temp and stem in indexes):
                continue  # not a leftover, a pending save's, or a shard whose index is there
            if self.remove(name):
                removed.append(name)
        return removed

    def load(self, step: int, name: str, verify: bool | None,
             jax: bool = False) -> Dict[str, Any]:
        """The checked content of checkpoint file ``name`` of ``step`` [C1-C3]."""
        return load_checkpoint_file(self.path(name), MANAGED, (), verify, {}, step=step,
                                    jax_keys=_JAX_KEYS if jax else ())


class _RemoteDir:
    """Where a manager's checkpoints live: a remote directory (fsspec, FORMAT.md section 12).
    Object stores have no rename, so a checkpoint is complete once its commit object, written
    after its data, is there; listing reads the commit objects only, never the data [RS8]."""

    def __init__(self, rp: _remote.RemotePath) -> None:
        self.rp = rp
        self.where = rp.url

    def path(self, name: str) -> str:
        """The URL of object ``name``."""
        return self.rp.join(name).url

    def target(self, name: str) -> _remote.RemotePath:
        """Object ``name``, for the save functions to write to."""
        return self.rp.join(name)

    def sizes(self) -> Dict[str, int]:
        """The name and size of each of the directory's objects, from one fresh listing; none
        when it does not exist yet (an object store has directories only while objects are
        under them)."""
        try:
            return self.rp.sizes()
        except FileNotFoundError:
            return {}

    def exists(self, name: str) -> bool:
        """Whether object ``name`` or its commit object is there."""
        return self.rp.join(name).exists() or self.rp.join(name + COMMIT_SUFFIX).exists()

    def remove(self, name: str) -> bool:
        """Remove object ``name`` (not there is fine)."""
        self.rp.join(name).remove()
        return True

    def commit(self, step: int, metrics: Metrics, name: str) -> None:
        """Write the commit object of checkpoint file ``name``, after its data [RS8]: the size
        and header_crc of that file and of each of its shards, as the storage holds them (read
        back from its prefix and header).

        Raises:
            LimitError: the commit object would be over MAX_COMMIT_SIZE (about 900 shards:
                raise max_shard_size); the data written stays uncommitted.
        """
        with Reader(_remote.RemoteFile(self.rp.join(name)), allow_index=True) as reader:
            files = {name: {"size": reader.size, "header_crc": reader.header_crc}}
            shards = reader.shard_index  # a sharded checkpoint's: its shards as they were written
            if shards:
                files.update({file: {"size": size, "header_crc": crc} for file, size, crc
                              in zip(shards["files"], shards["sizes"], shards["header_crcs"])})
        self.rp.join(name + COMMIT_SUFFIX).write_small(self._commit_bytes(step, metrics, files))

    def check_commit(self, step: int, metrics: Metrics, files: List[str]) -> None:
        """Raise LimitError now, before any data is written, if the commit object of checkpoint
        ``step`` (``files``: its file, then its shards) could be over MAX_COMMIT_SIZE [RS8]:
        it is measured with the largest size and header_crc each file could have."""
        self._commit_bytes(step, metrics, {file: {"size": 2 ** 63 - 1, "header_crc": 2 ** 32 - 1}
                                           for file in files})

    def _commit_bytes(self, step: int, metrics: Metrics, files: Dict[str, Any]) -> bytes:
        """The commit object's JSON [RS8].

        Raises:
            LimitError: over MAX_COMMIT_SIZE (too many shards, or large metrics).
        """
        data = json.dumps({"safeckpt_commit": COMMIT_VERSION, "step": step, "metrics": metrics,
                           "files": files}).encode()
        if len(data) > MAX_COMMIT_SIZE:
            raise LimitError(f"{self.path(_name(step))}: the commit object of its {len(files)} "
                             f"files and {len(metrics)} metrics would be {len(data)} bytes, "
                             f"over the {MAX_COMMIT_SIZE} a reader takes [RS8]; nothing was "
                             "written: pass a larger max_shard_size (fewer shards) or fewer "
                             "metrics")
        return data

    def uncommit(self, name: str) -> None:
        """Remove the commit object of checkpoint file ``name``: it is no longer a checkpoint
        (done before its data is deleted or replaced) [RS8]."""
        self.rp.join(name + COMMIT_SUFFIX).remove()

    def _commit_of(self, name: str, step: int) -> Tuple[Metrics, Files]:
        """The checked commit object of checkpoint file ``name`` [RS8].

        Raises:
            FileNotFoundError: there is none; LimitError: it is over MAX_COMMIT_SIZE (not
                read); CommitError: it breaks [RS8]; RemoteError: the storage failed.
        """
        commit = self.rp.join(name + COMMIT_SUFFIX)
        return parse_commit(commit.read_small(MAX_COMMIT_SIZE), commit.url, name, step)

    def _check_sizes(self, files: Files, sizes: Dict[str, int]) -> None:
        """Raise CommitError unless every file is in ``sizes`` (the listing) with the size its
        commit object says [RS8]."""
        for file, (size, _) in files.items():
            if sizes.get(file) != size:
                found = "missing" if file not in sizes else f"{sizes[file]} bytes"
                raise CommitError(f"{self.path(file)} is {found}, but its commit object says "
                                  f"{size} bytes [RS8]: not the save that was committed")

    def entry(self, name: str, sizes: Optional[Dict[str, int]] = None) -> _Entry | None:
        """The _Entry of checkpoint file ``name`` from its commit object; None if there is
        none, it breaks [RS8], or a file it names is missing or of another size than in
        ``sizes`` (default: a fresh listing)."""
        match = NAME.match(name)
        if not match:
            return None
        step = int(match.group(1))
        try:
            metrics, files = self._commit_of(name, step)
            self._check_sizes(files, self.sizes() if sizes is None else sizes)
        except (SafeckptError, OSError):
            return None
        shards = tuple(sorted(file for file in files if file != name))
        return _Entry(Checkpoint(step, self.path(name), metrics), shards, (), (),
                      (*files[name], None), 0)

    def entries(self) -> List[_Entry]:
        """The _Entry of every committed checkpoint [RS8], from one listing and the commit
        objects."""
        sizes = self.sizes()
        found = (self.entry(name, sizes) for _, name in self.candidates(sizes))
        return [e for e in found if e is not None]

    def candidates(self, sizes: Optional[Dict[str, int]] = None) -> List[Tuple[int, str]]:
        """``(step, checkpoint file name)`` of every commit object (a broken one too) in
        ``sizes`` (default: a fresh listing)."""
        return [(int(m.group(1)), m.group(0)[:-len(COMMIT_SUFFIX)])
                for m in map(COMMIT.match, self.sizes() if sizes is None else sizes) if m]

    def uncommitted(self, sizes: Optional[Dict[str, int]] = None) -> List[str]:
        """The checkpoint files (``step-N.sckpt``, a sharded one's index) without a commit
        object: not checkpoints [RS8] (a save killed before its commit, or files copied there
        without a manager)."""
        names = self.sizes() if sizes is None else sizes
        return sorted(name for name in names
                      if NAME.match(name) and name + COMMIT_SUFFIX not in names)

    def cleanup(self, pending: set[str], at_start: bool = False) -> List[str]:
        """Remove the data objects of a step without a commit object [RS8], less those of the
        checkpoint stems in ``pending``; return their names. ``at_start`` (a manager starting)
        removes only what is surely unfinished, as locally: shards whose index is missing [S9];
        a whole checkpoint file without a commit object (copied there without a manager?) is
        kept, and named in a warning."""
        names = self.sizes()
        committed = {name[:-len(".sckpt.commit")] for name in names if COMMIT.match(name)}
        indexes = {name[:-len(".sckpt")] for name in names if NAME.match(name)}
        removed = []
        for name in names:
            data, shard = NAME.match(name), SHARD.match(name)
            stem = name[:-len(".sckpt")] if data else shard.group(1) if shard else None
            if stem is None or stem in committed or stem in pending:
                continue  # not data, committed, or a pending save's
            if at_start and (data or stem in indexes):
                continue  # a whole file (or its shard): maybe a checkpoint copied there
            self.remove(name)
            removed.append(name)
        uncommitted = self.uncommitted() if at_start else []
        if uncommitted:
            shown = ", ".join(uncommitted[:3]) + (", ..." if len(uncommitted) > 3 else "")
            warnings.warn(f"{self.where} holds checkpoint files without a commit object "
                          f"({shown}): they are not checkpoints and are not restored [RS8] (a "
                          "save that stopped before its commit, or files copied there without "
                          "a CheckpointManager); manager.cleanup() removes them, and "
                          "safeckpt.load(url) reads one", RuntimeWarning, stacklevel=3)
        return removed

    def load(self, step: int, name: str, verify: bool | None,
             jax: bool = False) -> Dict[str, Any]:
        """The checked content of checkpoint file ``name`` of ``step`` [C1-C3], refused unless
        its commit object is valid and the file opened is the one it names: the same size and
        header_crc [RS8] (its shards are checked by the index [S7]).

        Raises:
            CommitError: a broken commit object, or another file than the one committed.
            LimitError, FileNotFoundError, RemoteError, SafeckptError: as the commit object's
                or the file's reading.
        """
        _, files = self._commit_of(name, step)
        self._check_sizes(files, self.sizes())
        size, crc = files[name]

        def check(opened: Any) -> None:  # before anything is loaded
            if (opened.size, opened.header_crc) != (size, crc):
                raise CommitError(
                    f"{self.path(name)} has {opened.size} bytes and header_crc "
                    f"{opened.header_crc:#010x}, but its commit object says {size} and "
                    f"{crc:#010x} [RS8]: not the save that was committed (replaced since?)")

        return load_checkpoint_file(self.target(name), MANAGED, (), verify, {}, step=step,
                                    check=check, jax_keys=_JAX_KEYS if jax else ())


class CheckpointManager:
    """Numbered, atomic checkpoints in a directory, with retention and crash recovery.

    Files are named ``step-<step, 10+ digits>.sckpt``. Each save is atomic; the writer's temporary
    files (``.step-….sckpt.<hex>.tmp``) and the shards of a sharded save that did not finish,
    left by a crash, are removed when the manager is created and never taken for checkpoints. A
    file that does not open (damaged) is skipped, and never deleted by retention. Use one manager
    per directory at a time.

    Retention keeps the ``keep_last`` newest checkpoints, the ``keep_best`` best, every multiple
    of ``keep_period``, and (``incremental``) every file one of those refers to; it runs after
    each save's file is renamed into place, so a crash at any moment leaves every kept
    checkpoint whole.

    Parameters:
        directory: created if missing; or a remote directory: an fsspec URL (``s3://bucket/run``,
            ``gs://``, ``memory://``), or a path inside ``fs``. There a checkpoint is complete
            once its commit object ``step-….sckpt.commit`` is written, after its data; only
            committed checkpoints are listed and restored (FORMAT.md [RS8]). A manager that
            starts removes shards whose index is missing, as locally, and warns of checkpoint
            files without a commit object (kept: maybe copied there); :meth:`cleanup` removes
            those too, and :meth:`restore` raises while they are all there is.
        storage_options: with a URL, passed to fsspec (credentials, endpoint).
        fs: an fsspec filesystem object (then ``directory`` is a path inside it).
        keep_last: keep this many newest checkpoints (at least 1).
        keep_best: also keep this many best by ``metric`` (``mode`` ``"min"`` or ``"max"``).
        keep_period: also keep, forever, every checkpoint whose step is a multiple of this.
        save_interval_steps: :meth:`save` writes only steps that are a multiple of this, and the
            first checkpoint whatever its step (others return None, unless ``force=True``);
            :meth:`should_save` says which. Once a checkpoint is saved or found (until a
            :meth:`delete`), an off-interval step is answered without a look at the directory.
        max_shard_size: write each checkpoint as shards of at most this many tensor bytes (an
            int, or a str such as ``"2GB"``), FORMAT.md section 9; one that fits is one file.
        rng: save and restore the random generators' state with every checkpoint.
        checksum: store a CRC32C of every tensor (checked at restore).
        async_save: :meth:`save` copies the state into reused host buffers and returns; a
            background thread writes the checkpoint and applies retention
            (:class:`safeckpt.AsyncSaver`). An error there is raised by the next :meth:`save`,
            :meth:`wait`, :meth:`close`, :meth:`load` or :meth:`restore`; :meth:`close` (or the
            end of a ``with`` block, or of the interpreter) writes what is pending.
        max_in_flight: with ``async_save``, how many saves may be pending at once (each holds a
            copy of the state in host memory); one more waits for the oldest. An int >= 1,
            checked also without ``async_save`` (where it has no effect).
        incremental: a tensor whose bytes equal (compared byte for byte) those of the same name,
            dtype and shape in the newest checkpoint is not written again: the new file refers
            to the file that stores them (FORMAT.md section 11). Retention keeps every file a
            kept checkpoint refers to, and deletes it once none does [X8]; :meth:`delete` and
            ``save(overwrite=True)`` refuse a step that another listed checkpoint refers to. A
            file kept only for its bytes stays listed while its own references are there, so
            :meth:`all` may list more than retention keeps; to bound that, a save refers to a
            file that retention would not keep on its own after this save only when the bytes
            it refers to there are at least half of that file's tensor bytes, and otherwise
            writes those tensors again (a frozen base stays referred to, written once; a few
            unchanged bytes never keep a whole old file). A damaged byte in a file that every
            checkpoint refers to damages them all: :meth:`restore` then raises, naming it.
            Needs ``checksum=True``; not with ``max_shard_size``, nor in a remote directory.

    Example:
        >>> manager = CheckpointManager("ckpts", keep_last=2, keep_best=1, metric="val_loss")  # doctest: +SKIP
        >>> manager.save(10, {"model": model, "optimizer": opt}, metrics={"val_loss": 0.3})   # doctest: +SKIP
        >>> manager.restore({"model": model, "optimizer": opt})                               # doctest: +SKIP
        >>> with CheckpointManager("lora", async_save=True, incremental=True) as manager:     # doctest: +SKIP
        ...     for step in range(steps):
        ...         train_one_step()
        ...         manager.save(step, state)  # returns at once; only changed tensors written
    """

    def __init__(self, directory: PathLike, *, keep_last: int = 3, keep_best: int = 0,
                 metric: str | None = None, mode: str = "min", keep_period: int | None = None,
                 save_interval_steps: int | None = None,
                 max_shard_size: Union[None, int, str] = None, rng: bool = True,
                 checksum: bool = True, async_save: bool = False, max_in_flight: int = 1,
                 incremental: bool = False, storage_options: Optional[dict] = None,
                 fs: Any = None) -> None:
        if type(keep_last) is not int or keep_last < 1:
            raise ValueError(f"keep_last={keep_last!r} must be an int >= 1 (the newest is always kept)")
        if type(keep_best) is not int or keep_best < 0:
            raise ValueError(f"keep_best={keep_best!r} must be an int >= 0")
        if keep_best and not isinstance(metric, str):
            raise ValueError(f"keep_best={keep_best} needs metric='name of a metric', not {metric!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode={mode!r} must be 'min' or 'max'")
        for name, value in (("keep_period", keep_period),
                            ("save_interval_steps", save_interval_steps)):
            if value is not None and (type(value) is not int or value < 1):
                raise ValueError(f"{name}={value!r} must be an int >= 1 or None")
        if type(max_in_flight) is not int or max_in_flight < 1:  # also when async_save=False
            raise ValueError(f"max_in_flight={max_in_flight!r} must be an int >= 1 (it counts "
                             "the async saves pending at once)")
        if max_shard_size is not None:
            _shard.parse_size(max_shard_size)  # a bad size is refused now, not at the first save
        if incremental and (not checksum or max_shard_size is not None):
            raise ValueError("incremental=True needs checksum=True (a reference holds the CRC32C "
                             "of its bytes) and no max_shard_size (shards cannot be referred to)")
        where = _remote.resolve(directory, storage_options=storage_options, fs=fs)
        if incremental and not isinstance(where, str):
            raise InvalidValueError(
                f"incremental=True is not available in a remote directory ({where.url}): the "
                "byte-for-byte comparison of each save with the previous checkpoint [X7] would "
                "read all of it back at every save; save full checkpoints there, or incremental "
                "ones to a local directory")
        self._dir = _LocalDir(where) if isinstance(where, str) else _RemoteDir(where)
        self.directory = self._dir.where
        self.keep_last, self.keep_best, self.metric, self.mode = keep_last, keep_best, metric, mode
        self.keep_period, self.save_interval_steps = keep_period, save_interval_steps
        self.max_shard_size = max_shard_size
        self.rng, self.checksum = rng, checksum
        self.async_save, self.incremental = bool(async_save), bool(incremental)
        self._saver = _async.AsyncSaver(max_in_flight=max_in_flight) if async_save else None
        self._closed = False
        self._lock = threading.RLock()  # the directory's files, its entry cache and _pending
        self._pending: Dict[int, Checkpoint] = {}  # async saves not yet written, by step
        self._handles: Dict[int, _async.SaveHandle] = {}  # their handles (see _pending_now)
        self._seen_any = False  # a checkpoint was saved or found: save_interval_steps applies
        self._held: Optional[_Held] = None  # incremental: the reader of the last file written
        self._dir.cleanup(set(), at_start=True)  # nothing of this manager is pending yet

    def __repr__(self) -> str:
        options = [f"keep_last={self.keep_last}"]
        if self.keep_best:
            options.append(f"keep_best={self.keep_best}, metric={self.metric!r}, mode={self.mode!r}")
        for name in ("keep_period", "save_interval_steps", "max_shard_size"):
            if getattr(self, name) is not None:
                options.append(f"{name}={getattr(self, name)!r}")
        if not self.rng:
            options.append("rng=False")
        if not self.checksum:
            options.append("checksum=False")
        if self._saver is not None:
            options.append(f"async_save=True, max_in_flight={self._saver.max_in_flight}")
        if self.incremental:
            options.append("incremental=True")
        pending = len(self._pending_now())
        state = " (closed)" if self._closed else (f" ({pending} saves pending)" if pending else "")
        return f"CheckpointManager({self.directory!r}, {', '.join(options)}){state}"

    # -- async saves: waiting, closing -------------------------------------------------------------

    def wait(self) -> None:
        """Wait until every pending save is written and retention has run (at once without
        ``async_save``).

        Raises:
            Exception: the error of a background save not yet raised (each is raised once).
        """
        if self._saver is not None:
            self._saver.wait()

    def close(self) -> None:
        """Write the pending saves (as :meth:`wait`) and refuse further saves; loading and
        restoring still work."""
        self._closed = True
        try:
            if self._saver is not None:
                self._saver.close()
        finally:
            with self._lock:
                self._release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- names -------------------------------------------------------------------------------------

    def path(self, step: Any) -> str:
        """The file (in a remote directory, the URL) of checkpoint ``step``."""
        return self._dir.path(_name(as_step(step)))

    def cleanup(self) -> list[str]:
        """Remove what crashed saves left: temporary files, and shards whose index is missing
        (a sharded save stopped before its index [S9]); in a remote directory, the data objects
        of every step without a commit object [RS8] (a checkpoint file copied there without a
        manager too: it is not a checkpoint). Return their names. The files of a
        pending async save are left alone: they are not a crash's.

        Example:
            >>> manager.cleanup()                                               # doctest: +SKIP
            ['.step-0000000020.sckpt.3f9a1c.tmp']
        """
        with self._lock:  # a save pending now stays pending until this ends: its job's end
            pending = {_name(step)[:-len(".sckpt")] for step in self._pending_now()}
            return self._dir.cleanup(pending)

    # -- the interval ------------------------------------------------------------------------------

    def should_save(self, step: Any) -> bool:
        """Whether :meth:`save` would write ``step`` (without ``force``): a step newer than the
        newest checkpoint (written or pending) that is a multiple of ``save_interval_steps`` (any
        step without one), or the first checkpoint, whatever its step, as orbax does. A step at
        or before the newest is False: it exists, or retention would delete it at once.

        Example:
            >>> if manager.should_save(step):                                   # doctest: +SKIP
            ...     manager.save(step, state)
        """
        step = as_step(step)
        if self._off_interval(step) and self._seen():
            return False  # without a look at the directory: this is asked at every step
        newest = self._newest()
        if newest is not None and (step <= newest or self._off_interval(step)):
            return False
        return not self._dir.exists(_name(step))  # a damaged file of that name: refused

    def _newest(self) -> int | None:
        """The newest step written (complete) or pending, or None."""
        with self._lock:
            records = self.all()
            return max([*self._pending_now(), *(r.step for r in records[-1:])], default=None)

    def _seen(self) -> bool:
        """Whether a checkpoint exists or is pending (remembered once seen, until a delete), so
        that an off-interval step costs no listing of the directory."""
        if not self._seen_any:
            self._seen_any = self._newest() is not None
        return self._seen_any

    def _pending_now(self) -> Dict[int, Checkpoint]:
        """The pending async saves, less those whose background save ended without running the
        manager's job (its snapshot's copies failed: the error is the saver's to raise)."""
        with self._lock:
            for step, handle in list(self._handles.items()):
                if handle.done():
                    del self._handles[step]
                    self._pending.pop(step, None)
            return self._pending

    def _off_interval(self, step: int) -> bool:
        """Whether ``step`` is not a multiple of ``save_interval_steps``."""
        return self.save_interval_steps is not None and step % self.save_interval_steps != 0

    # -- saving ------------------------------------------------------------------------------------

    def save(self, step: Any, state: Any, metrics: Metrics | None = None, *,
             overwrite: bool = False, force: bool = False) -> Checkpoint | None:
        """Save ``state`` (a dict of arrays, values and objects with ``state_dict()``, or such an
        object) as checkpoint ``step``, then apply retention; return its :class:`Checkpoint`, or
        None when ``step`` is not a multiple of ``save_interval_steps`` and is not the first
        checkpoint (nothing is written; pass ``force=True`` to save it anyway). Where orbax's
        ``save`` returns a bool (False for a step it skips), this returns the Checkpoint or
        None, and raises for a step it refuses (below). With ``async_save``, the state is copied
        before this returns (it may change at once) and written in the background: the
        checkpoint is on disk after :meth:`wait`.

        A save is never lost in silence: a step whose file exists (or is pending) is refused
        unless ``overwrite=True``, and a step that retention would delete at once (older than the
        ``keep_last`` newest, not among the ``keep_best`` best and not a multiple of
        ``keep_period``, e.g. training restarted from step 0 in a directory that holds step 30)
        is refused before anything is written.

        Raises:
            FileExistsError: checkpoint ``step`` exists (or a damaged file of that name does).
            InvalidValueError: retention would delete it at once (the message names what it
                keeps); ``overwrite=True`` of a step that another listed checkpoint refers to
                (``incremental``); a step that is not a non-negative int (numpy and 0-d torch
                integers are taken).
            ValueError: the manager is closed.
            Exception: with ``async_save``, the error of an earlier background save (this
                one is then not taken).

        Example:
            >>> manager.save(10, {"model": model, "optimizer": opt}, metrics={"loss": 0.3})  # doctest: +SKIP
        """
        step = as_step(step)
        if self._closed:
            raise ValueError(f"{self!r} is closed; make a new CheckpointManager to save again")
        if not force and self._off_interval(step) and self._seen():
            return None  # not the first checkpoint either (as should_save says)
        name, path = _name(step), self.path(step)
        metrics = plain_metrics(metrics)
        if overwrite:
            self.wait()  # what it replaces is checked on disk, not while a save is pending
            with self._lock:
                self._release()  # the file it holds open may be the one replaced
        with self._lock:
            self._check_new(step, name, metrics, overwrite)
        tree = {"state": state_of(state), "step": step, "metrics": metrics,
                "rng": capture_rng() if self.rng else None}
        record = Checkpoint(step, path, metrics)
        if self._saver is None:
            self._write(step, metrics, overwrite, *_tree.flatten(tree, root="checkpoint"))
            self._seen_any = True
            return record

        def check(snapshot: Snapshot) -> None:  # in this thread: refuse what cannot be written
            snapshot.plan(metadata=metadata_of(step, metrics), align=_ALIGN,
                          checksum=self.checksum)

        def job(snapshot: Snapshot) -> None:  # in the background, in the order of the saves
            try:
                self._write(step, metrics, overwrite, snapshot.tree, snapshot.names,
                            snapshot.arrays)
            finally:
                with self._lock:
                    self._pending.pop(step, None)
                    self._handles.pop(step, None)

        with self._lock:
            self._pending[step] = record
        try:
            handle = self._saver.submit(tree, job, check=check, root="checkpoint",
                                        what=f"checkpoint step {step} ({path!r})")
        except BaseException:
            with self._lock:
                self._pending.pop(step, None)
            raise
        with self._lock:
            if step in self._pending:  # not yet written (else the job removed it)
                self._handles[step] = handle
        self._seen_any = True
        return record

    def _check_new(self, step: int, name: str, metrics: Metrics, overwrite: bool) -> None:
        """Refuse a save of ``step`` (file ``name``) that would replace a checkpoint (unless
        ``overwrite``) or that retention would delete at once."""
        path = self._dir.path(name)
        if not overwrite and (self._dir.exists(name) or step in self._pending_now()):
            unfinished = (" as a file without a commit object (a save that stopped before its "
                          "commit, or a file copied there: not a checkpoint [RS8]; cleanup() "
                          "removes it)" if name in self._dir.uncommitted() else "")
            raise FileExistsError(errno.EEXIST, f"checkpoint step {step} exists{unfinished}; "
                                  "pass overwrite=True to replace it", path)
        if overwrite:
            self._refuse_referenced(step, "overwrite")
        records = [r for r in self.all() + list(self._pending_now().values()) if r.step != step]
        records.append(Checkpoint(step, path, metrics))
        records.sort(key=lambda r: r.step)
        if step not in self._kept(records):
            kept = [r.step for r in records[-self.keep_last:]]
            best = (f" and keep_best={self.keep_best} by {self.metric!r} keeps "
                    f"{[r.step for r in self._ranked(records)[:self.keep_best]]}"
                    if self.keep_best else "")
            period = (f" and keep_period={self.keep_period} keeps its multiples"
                      if self.keep_period else "")
            raise InvalidValueError(
                f"checkpoint step {step} would be deleted at once by retention: "
                f"keep_last={self.keep_last} keeps steps {kept}{best}{period}; nothing was saved. "
                "To go on, restore the newest (manager.restore(state)); to start over, use "
                "another directory")

    def _write(self, step: int, metrics: Metrics, overwrite: bool, skeleton: Any,
               names: List[str], arrays: List[Any]) -> None:
        """Write checkpoint ``step`` (atomically, [W2]; remote: its data, then its commit object
        [RS8]), then apply retention."""
        meta = metadata_of(step, metrics)
        name = _name(step)
        path, target = self._dir.path(name), self._dir.target(name)
        if not self.incremental:
            # every check of the state and of its commit object first: a save refused here
            # leaves the checkpoint it would overwrite listed [RS8]
            plan = _writer.Plan(dict(zip(names, arrays)), meta, _ALIGN, self.checksum,
                                tree=skeleton)
            files = [name]
            if self.max_shard_size is not None:
                k = len(_shard.split(plan.nbytes, _shard.parse_size(self.max_shard_size)))
                files += _shard.shard_files(name, k) if k > 1 else []
            self._dir.check_commit(step, metrics, files)
            if overwrite:
                self._dir.uncommit(name)  # no longer listed before any of its data is replaced
            if self.max_shard_size is not None:
                api.save_sharded(skeleton, names, arrays, target, metadata=meta, align=_ALIGN,
                                 checksum=self.checksum, atomic=True,
                                 max_shard_size=self.max_shard_size)
            else:
                api.save_plan(plan, target)
        else:  # a local directory (refused remote): nothing to uncommit
            refs = self._references(step, names, arrays, metrics)
            plan = _writer.Plan(dict(zip(names, arrays)), meta, _ALIGN, True, tree=skeleton,
                                refs=refs or None, save_id=fmt.new_save_id())
            api.save_plan(plan, path)
            with self._lock:
                self._hold(path)
        self._dir.commit(step, metrics, name)  # last [RS8]
        with self._lock:
            self._retain()

    def _references(self, step: int, names: List[str], arrays: List[Any],
                    metrics: Metrics | None = None) -> Dict[str, fmt.Location]:
        """The tensors of a new checkpoint whose bytes equal, byte for byte, those of the same
        name, dtype and shape in the newest other checkpoint, each with where those bytes are
        stored (the file that holds them, never a reference to a reference) [X7]; less those
        into a file that only they would keep (see :meth:`_worth_keeping`). A GPU tensor
        compared and found changed is kept in ``arrays`` as its host copy, written as it is."""
        with self._lock:
            entries = self._entries()
            previous = [e for e in self._complete(entries)
                        if e.checkpoint.step != step and not e.shards]
        if not previous:
            return {}
        refs: Dict[str, fmt.Location] = {}
        reader = self._take(previous[-1].checkpoint.path)
        if reader is None:  # damaged since: refer to nothing, write everything
            return {}
        with reader:
            for i, (name, array) in enumerate(zip(names, arrays)):
                if name not in reader:
                    continue
                info = reader.info(name)
                # the stored length: packed for a sub-byte code, not numpy's byte per element
                if (info.dtype != little_endian(array.dtype) or tuple(info.shape) != array.shape
                        or info.nbytes != _writer.stored_nbytes(array)):
                    continue
                location = reader.location(name)
                if location is None:  # not a file of an incremental save: no save_id
                    continue
                if type(array) is _writer.LazyArray:
                    arrays[i] = array = array.load()
                new = _writer.le_bytes(array)[0].reshape(-1).view(np.uint8)  # as a file holds it
                if _backend.bytes_equal(new, reader.raw_bytes(name, verify=False)):
                    refs[name] = location
        return self._worth_keeping(step, metrics or {}, entries, refs)

    def _take(self, path: str) -> Any:
        """An open reader of ``path``: the one kept since this manager wrote it, when every file
        it reads is still the file it opened (same :func:`_stamp`: a file replaced or changed
        since is opened again and checked [X5]), else a new one; None if it does not open. The
        caller closes it."""
        with self._lock:
            held, self._held = self._held, None
        if held is not None:
            try:
                if held.path == path and all(_stamp(p) == stamp for p, stamp in held.stamps):
                    return held.reader
            except OSError:
                pass
            held.reader.close()
        try:
            return api.open(path)
        except (SafeckptError, OSError):
            return None

    def _hold(self, path: str) -> None:
        """Open the file just written at ``path``, cache its :class:`_Entry` (retention needs no
        other read of its header) and keep the reader for the next save (:meth:`_take`); a
        file that does not open, or that changed while it was opened, is not kept."""
        self._release()
        name = os.path.basename(path)
        match = NAME.match(name)
        try:
            before = os.stat(path)
            reader = Reader(path, allow_refs=True)
        except (SafeckptError, OSError):
            return
        held: Any = reader
        paths = [path]
        try:
            entry = _entry_of(reader, path, int(match.group(1))) if match else None
            if reader.refs is not None:
                held = _refs.LinkedReader(reader)
                paths = list(held.shards)  # the referenced files, then this one
        except (SafeckptError, OSError):
            reader.close()
            return
        try:
            stamps = tuple((p, _stamp(p)) for p in paths)
        except OSError:
            held.close()
            return
        if stamps[-1][1] != (before.st_dev, before.st_ino, before.st_size, before.st_mtime_ns):
            held.close()  # replaced or changed while it was opened
            return
        if entry is not None and isinstance(self._dir, _LocalDir):  # incremental: always local
            self._dir.remember(name, before, entry)
        self._held = _Held(path, held, stamps)

    def _release(self) -> None:
        """Close the reader kept for the next save, if any (close, overwrite, delete)."""
        held, self._held = self._held, None
        if held is not None:
            held.reader.close()

    def _worth_keeping(self, step: int, metrics: Metrics, entries: list[_Entry],
                       refs: Dict[str, fmt.Location]) -> Dict[str, fmt.Location]:
        """``refs`` less the references into a file that retention would not keep on its own
        once checkpoint ``step`` is saved, when they cover less than half of the bytes that file
        stores: those tensors are written again, so that the file can go once older checkpoints
        stop referring to it (a few unchanged bytes never keep a whole file)."""
        records = sorted([*(e.checkpoint for e in self._complete(entries)
                            if e.checkpoint.step != step),
                          Checkpoint(step, self.path(step), metrics)], key=lambda r: r.step)
        kept = {os.path.basename(self.path(s)) for s in self._kept(records)}
        stored = {os.path.basename(e.checkpoint.path): e.nbytes for e in entries}
        referred: Dict[str, int] = {}
        for location in refs.values():
            referred[location.file] = referred.get(location.file, 0) + location.nbytes
        dropped = {file for file, nbytes in referred.items()
                   if file not in kept and 2 * nbytes < stored.get(file, 0)}
        return {name: where for name, where in refs.items() if where.file not in dropped}

    # -- the checkpoints in the directory ----------------------------------------------------------

    def _entries(self) -> list[_Entry]:
        """The _Entry of every checkpoint whose header (remote: commit object) is a
        checkpoint's, oldest first."""
        with self._lock:
            return sorted(self._dir.entries(), key=lambda e: e.checkpoint.step)

    def _complete(self, entries: Optional[list[_Entry]] = None) -> list[_Entry]:
        """The _Entry of every complete checkpoint: those of ``entries`` (default
        :meth:`_entries`) whose referenced files are all there and are the saves they were saved
        against: same size, header_crc and save_id [X5]. One that retention keeps only for the
        bytes a kept checkpoint refers to may have lost its own references, and a referenced
        file may have been replaced: it is then no longer a checkpoint."""
        if entries is None:
            entries = self._entries()
        identity = {os.path.basename(e.checkpoint.path): e.identity for e in entries}
        return [e for e in entries
                if all(identity.get(file) == ref for file, ref in zip(e.refs, e.ref_ids))]

    def all(self) -> list[Checkpoint]:
        """Every complete checkpoint, oldest first: those retention keeps and, with
        ``incremental``, those kept only for the bytes a kept checkpoint refers to, as long as
        the files they refer to are there, unchanged."""
        return [entry.checkpoint for entry in self._complete()]

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint, or None."""
        records = self.all()
        return records[-1] if records else None

    def _ranked(self, records: list[Checkpoint]) -> list[Checkpoint]:
        """The records that have ``metric``, best first (newest first on a tie)."""
        metric = self.metric
        if metric is None:
            return []
        scored = [r for r in records if type(r.metrics.get(metric)) in (int, float)
                  and not math.isnan(r.metrics[metric])]
        sign = 1 if self.mode == "min" else -1
        return sorted(scored, key=lambda r: (sign * r.metrics[metric], -r.step))

    def best(self) -> Checkpoint | None:
        """The checkpoint with the best ``metric`` (newest on a tie), or None."""
        if self.metric is None:
            raise ValueError("best() needs CheckpointManager(..., metric='name')")
        ranked = self._ranked(self.all())
        return ranked[0] if ranked else None

    def _kept(self, records: list[Checkpoint]) -> set[int]:
        """The steps that retention keeps of ``records`` (sorted by step)."""
        keep = {r.step for r in records[-self.keep_last:]}
        if self.keep_best:
            keep |= {r.step for r in self._ranked(records)[:self.keep_best]}
        if self.keep_period:
            keep |= {r.step for r in records if r.step % self.keep_period == 0}
        return keep

    # -- deleting ----------------------------------------------------------------------------------

    def _remove(self, entry: _Entry) -> None:
        """Delete a checkpoint: its commit object (remote) or its file (or index) first, so that
        it is no longer taken for one, then its data (a crash between leaves files that
        :meth:`cleanup` removes)."""
        name = os.path.basename(entry.checkpoint.path)
        if self._held is not None and self._held.path == entry.checkpoint.path:
            self._release()
        self._dir.uncommit(name)  # remote: first, so that it is no longer listed [RS8]
        for file in (name, *entry.shards):
            self._dir.remove(file)

    def _retain(self) -> None:
        """Delete the checkpoints that retention does not keep and that no kept checkpoint
        refers to [X8]."""
        entries = self._entries()
        keep = self._kept([e.checkpoint for e in self._complete(entries)])
        needed = {file for e in entries if e.checkpoint.step in keep for file in e.refs}
        for entry in entries:
            if (entry.checkpoint.step not in keep
                    and os.path.basename(entry.checkpoint.path) not in needed):
                self._remove(entry)

    def _refuse_referenced(self, step: int, action: str) -> None:
        """Raise InvalidValueError if a checkpoint other than ``step`` that :meth:`all` lists
        (kept by retention, or only for its bytes) refers to the file of checkpoint ``step``
        [X8]."""
        name = os.path.basename(self.path(step))
        referring = [e.checkpoint.step for e in self._complete()
                     if e.checkpoint.step != step and name in e.refs]
        if referring:
            raise InvalidValueError(
                f"cannot {action} checkpoint step {step}: the checkpoints of steps "
                f"{referring} refer to tensors stored in its file [X8]; delete them first, or "
                "make each a self-contained copy elsewhere with safeckpt.consolidate(path, "
                "new_path)")

    def delete(self, step: Any) -> None:
        """Delete checkpoint ``step`` (and its shards).

        Raises:
            FileNotFoundError: there is no checkpoint ``step``.
            InvalidValueError: another checkpoint that :meth:`all` lists refers to tensors
                stored in its file (see ``incremental``); the message names them.

        Example:
            >>> manager.delete(20)                                              # doctest: +SKIP
        """
        name, path = _name(as_step(step)), self.path(step)
        self.wait()
        with self._lock:
            self._refuse_referenced(as_step(step), "delete")
            entry = self._dir.entry(name)
            if entry is None:
                if not self._dir.exists(name):
                    raise FileNotFoundError(errno.ENOENT, f"there is no checkpoint step "
                                            f"{as_step(step)}", path)
                self._dir.uncommit(name)  # a damaged checkpoint: the user asked for it to go
                self._dir.remove(name)
                return
            self._remove(entry)
            self._retain()  # a file only this checkpoint referred to goes now
            self._seen_any = False  # it may have been the last one: look again when asked

    # -- loading -----------------------------------------------------------------------------------

    def load(self, step: Any = None, *, verify: bool | None = None) -> CheckpointInfo | None:
        """Load checkpoint ``step`` (default: the newest that loads and passes its checks, as
        :meth:`restore` chooses) without restoring anything; return a :class:`CheckpointInfo`,
        or None when there is no checkpoint file. Pending async saves are written first (as
        :meth:`wait`). Raises as :meth:`restore`."""
        return self._load(None, step, verify, True, None, False)

    def restore(self, state_or_model: Any, step: Any = None, *, verify: bool | None = None,
                strict: bool = True, map_location: Any = None,
                cast_x64: bool = False) -> CheckpointInfo | None:
        """Resume in one call: load checkpoint ``step`` (default: the newest complete one) into
        ``state_or_model`` in place (see :func:`safeckpt.checkpoint.restore_into`) and restore
        the random generators. Pending async saves are written first (as :meth:`wait`).

        A JAX template (a pytree holding jax arrays or ``jax.ShapeDtypeStruct``, an optax state,
        a flax TrainState, an ``nnx.State``: :func:`safeckpt.jax.is_jax_tree`) is not restored
        in place, since jax arrays are immutable: the restored pytree is ``info.state``, with
        the template's exact structure (tuples, named tuples, dataclasses, int keys), jax
        arrays on each template leaf's sharding or device, typed keys and weak types as saved
        (a sharded leaf reads only each device's slice of the file with ``verify=False``; the
        default checks every CRC32C of a file that has them, which reads each tensor whole once); checked first as
        :func:`safeckpt.jax.restore_tree` says; ``cast_x64=True`` casts 64-bit tensors to 32 bits
        while ``jax_enable_x64`` is off, reported in one ``UserWarning`` (else they are refused).
        ``strict`` and ``map_location`` are for other targets. For nnx:
        ``nnx.update((model, optimizer), info.state)``.

        With ``step=None``, a newest file that does not open, fails verification or breaks
        [C1-C3] (damaged, or not a checkpoint of this manager) is skipped, with a warning, for
        the one before it. ``verify`` and ``map_location`` as for
        :func:`safeckpt.load_checkpoint`. Returns a :class:`~safeckpt.checkpoint.CheckpointInfo`,
        or None when there is no checkpoint file at all (start fresh).

        Raises:
            SafeckptError, OSError: with ``step=None``, when there are checkpoint files but
                none loads: the newest one's error type (chained to it), listing each file and
                its error and naming a file they all refer to and failed on (with
                ``incremental``, a damaged byte in a file every checkpoint refers to); nothing
                was restored.
            StateMismatchError: the checkpoint does not fit ``state_or_model``; nothing was
                written (an older checkpoint is not tried: it would not fit either).
            InvalidValueError: a target that cannot be restored in place (e.g. an optimizer's
                ``state_dict()``: pass the optimizer; see :func:`restore_into`).
            ValueError: ``strict=False`` or ``map_location`` with a JAX template (its leaves
                say where each array goes, and every leaf must be in the file);
                ``cast_x64=True`` without one.
            SafeckptError, OSError: with ``step``, that file's problem.

        Example:
            >>> info = manager.restore({"model": model, "optimizer": opt})     # doctest: +SKIP
            >>> start = info.step + 1 if info else 0                            # doctest: +SKIP
            >>> info = manager.restore({"state": train_state, "rng": key})     # JAX: a new pytree
            >>> if info:                                                        # doctest: +SKIP
            ...     train_state, key = info.state["state"], info.state["rng"]
        """
        return self._load(state_or_model, step, verify, strict, map_location, cast_x64)

    def _candidates(self) -> list[tuple[int, str]]:
        """``(step, file name)`` of every file named like a checkpoint (remote: of every commit
        object), newest first."""
        return sorted(self._dir.candidates(), reverse=True)

    def _load(self, target: Any, step: Any, verify: bool | None, strict: bool,
              map_location: Any, cast_x64: bool) -> CheckpointInfo | None:
        """Load (and with a ``target``, restore) checkpoint ``step``, or the newest that loads."""
        jax_target = target is not None and _sck_jax.is_jax_tree(target)
        if jax_target and (not strict or map_location is not None):
            raise ValueError("strict=False and map_location are for torch and numpy targets: a "
                             "JAX template's leaves say where each array goes, and each must be "
                             "in the checkpoint")
        if cast_x64 and not jax_target:
            raise ValueError("cast_x64=True is for a JAX template (a pytree of jax arrays or "
                             "ShapeDtypeStructs); other targets take their own dtypes")
        self.wait()  # what was saved, not what was on disk before
        candidates = (self._candidates() if step is None
                      else [(as_step(step), _name(as_step(step)))])
        failed: List[Tuple[str, Exception]] = []
        for number, name in candidates:
            path = self._dir.path(name)
            try:
                tree = self._dir.load(number, name, verify, jax_target)
            except (SafeckptError, OSError) as exc:
                if step is not None:
                    raise
                warnings.warn(f"skipping checkpoint {path!r}: {exc}", RuntimeWarning, stacklevel=3)
                failed.append((path, exc))
                continue
            state = tree["state"]
            if jax_target:  # a new pytree: jax arrays are immutable
                state = _sck_jax.restore_tree(target, state, cast_x64=cast_x64,
                                              where=f"{path!r}['state']")
            elif target is not None:
                state = restore_into(target, state, strict=strict, map_location=map_location,
                                     where=f"{path!r}['state']")
            if target is not None and self.rng:
                restore_rng(tree["rng"])
            return CheckpointInfo(path, tree["step"], None, tree["metrics"], None, state)
        if failed:
            raise self._none_loads(failed) from failed[0][1]
        uncommitted = self._dir.uncommitted() if step is None and not candidates else []
        if uncommitted:  # remote: files there, but no checkpoint: never "start fresh" in silence
            raise CommitError(
                f"{self.directory} holds checkpoint files but no commit object [RS8]: "
                f"{', '.join(uncommitted[:3])}{', ...' if len(uncommitted) > 3 else ''} (a save "
                "that stopped before its commit, or files copied there without a "
                "CheckpointManager), so no checkpoint; load one with safeckpt.load(url) and "
                "save it with this manager, or remove them with manager.cleanup() to start "
                "fresh")
        return None

    def _none_loads(self, failed: List[Tuple[str, Exception]]) -> Exception:
        """The error for a directory whose checkpoint files all failed to load (``failed``:
        each path and its error, newest first): of the newest one's type, listing every file
        and its error, and naming a file they all refer to (or are) and failed on: with
        ``incremental``, one damaged byte of a file every checkpoint refers to damages them all."""
        shown = [f"{os.path.basename(path)}: {exc}" for path, exc in failed[:_SHOWN]]
        if len(failed) > _SHOWN:
            shown.append(f"and {len(failed) - _SHOWN} more")
        referred: Dict[str, int] = {}  # each file the failed ones refer to: by how many
        for path, _ in failed:
            entry = self._dir.entry(os.path.basename(path))
            for file in entry.refs if entry else ():
                referred[file] = referred.get(file, 0) + 1

        def names(exc: Exception, path: str) -> bool:  # the error is about that file
            return getattr(exc, "filename", None) == path or path in str(exc)

        culprits = [file for file in sorted(referred, key=lambda f: -referred[f])
                    if all(names(exc, self._dir.path(file)) for _, exc in failed)]
        cause = (f"; each failed on {culprits[0]!r}, which the others refer to: a damaged or "
                 "missing file that every checkpoint refers to loses them all" if culprits else "")
        message = (f"no checkpoint in {self.directory!r} loads ({len(failed)} files, newest first: "
                   f"{'; '.join(shown)}){cause}. Restore a copy of the damaged file, or move the "
                   "files away to start fresh")
        first = failed[0][1]
        if isinstance(first, OSError) and first.errno is not None:
            return type(first)(first.errno, message, first.filename)
        return type(first)(message)
