"""Writing .sckpt files: ``save_file`` and ``save_bytes``.

Tensor bytes go from each array's own buffer to the file (no whole-file buffer); only an array
that is not C-contiguous or not little-endian is copied, one at a time.

Example:
    >>> import numpy as np, safeckpt
    >>> data = safeckpt.save_bytes({"w": np.ones(3, np.float32)}, metadata={"epoch": 1})
    >>> data[:8]
    b'\\x89SCK\\r\\n\\x1a\\n'
"""

import collections.abc
import contextlib
import errno
import os
import secrets
import stat
import sys
import warnings

import numpy as np

from . import format as fmt
from . import _backend
from .dtypes import CODE_BY_DTYPE, MINOR_BY_CODE, code_of, minor_of
from .errors import InvalidValueError, LimitError, plural, quote

# A batch handed to the backend is written once the copies it holds (non-contiguous or big-endian
# arrays) reach this size, so extra memory during a save stays bounded.
_MAX_HELD_COPIES = 64 << 20
_MAX_BATCH = 4096  # tensors per backend call: amortises the call without huge pointer arrays


class LazyArray:
    """A tensor whose bytes are fetched only when the writer reaches it (e.g. from a GPU).

    ``dtype`` and ``shape`` describe the array that ``load()`` returns; the writer calls ``load()``
    once, writes the result and drops it, so only one such copy is held at a time (at most
    ``_MAX_HELD_COPIES`` bytes of them).
    """

    __slots__ = ("dtype", "shape", "load")

    def __init__(self, dtype, shape, load):
        self.dtype, self.shape, self.load = np.dtype(dtype), tuple(shape), load

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def nbytes(self):
        return int(np.prod(self.shape, dtype=object)) * self.dtype.itemsize


class _Plan:
    """What a save writes: checked arrays, the table's columns and the file layout.

    ``tree`` is an encoded skeleton (FORMAT.md section 8) or ``NO_TREE``; with one the file is
    version 1.1, else 1.0 (the lowest version that holds what is written). ``shards`` makes the
    plan a shard index (FORMAT.md section 9: no tensors, flag ``SHARD_INDEX``, version 1.2).
    """

    def __init__(self, tensors, metadata, align, checksum, tree=fmt.NO_TREE, shards=None):
        if not isinstance(tensors, collections.abc.Mapping):
            raise InvalidValueError(f"tensors must be a dict of name -> numpy array, "
                                    f"not {type(tensors).__name__}")
        if (type(align) is not int or align & (align - 1)
                or not fmt.ALIGN_MIN <= align <= fmt.ALIGN_MAX):
            raise ValueError(f"align={align!r} must be a power of two between {fmt.ALIGN_MIN} "
                             f"and {fmt.ALIGN_MAX} [P7]")
        self.align, self.checksum, self.tree = align, bool(checksum), tree
        self.minor = 0 if tree is fmt.NO_TREE else fmt.KEY_MINOR["tree"]
        self.shards = shards
        if shards is not None:  # [S1]: no tensors, no other flag
            self.minor, self.checksum = fmt.KEY_MINOR["shards"], False
        self.metadata = fmt.check_metadata(metadata)
        self.names, self.arrays = list(tensors), []
        codes, ndims, dims, nbytes = [], [], [], []
        code_by_dtype, arrays = CODE_BY_DTYPE, self.arrays  # locals: this loop is per tensor
        direct = True  # every array can be written as it is (C-contiguous, little-endian)
        for name, value in tensors.items():
            if type(name) is not str or not name:
                raise InvalidValueError(f"key {name!r}: tensor names must be non-empty str [H5]")
            if type(value) is not np.ndarray and type(value) is not LazyArray:
                if isinstance(value, np.generic):
                    value = np.asarray(value)
                elif not isinstance(value, (np.ndarray, LazyArray)):
                    raise InvalidValueError(f"tensor {name!r}: a {type(value).__module__}."
                                            f"{type(value).__name__} is not a numpy array")
            code = code_by_dtype.get(value.dtype)  # None for big-endian (or unsupported) dtypes
            if code is None or type(value) is not np.ndarray or not value.flags.c_contiguous:
                direct = False
            codes.append(code_of(value.dtype, name) if code is None else code)
            ndim = value.ndim
            if ndim > fmt.MAX_NDIM:
                raise LimitError(f"tensor {name!r}: {ndim} dimensions, more than readers "
                                 f"accept by default ({fmt.MAX_NDIM}) [T2]")
            arrays.append(value)
            ndims.append(ndim)
            dims.extend(value.shape)
            nbytes.append(value.nbytes)
        self.nbytes, self.direct = nbytes, direct
        sizes = np.array(nbytes, "<u8")
        self.columns = {
            "dtypes": bytes(codes),
            "ndims": bytes(ndims),
            "shape": np.array(dims, "<u8").tobytes(),
            "offsets": bytes(8 * len(nbytes)),
            "nbytes": sizes.tobytes(),
        }
        # dtype codes added by a later minor version (FORMAT.md section 5) raise the file's minor
        self.minor = max(self.minor, minor_of(self.columns["dtypes"]), _scalar_minor(tree))
        self.flags = fmt.FLAG_TENSOR_CRC if self.checksum else 0
        if shards is not None:
            self.flags = fmt.FLAG_SHARD_INDEX
        empty_crcs = bytes(4 * len(nbytes)) if self.checksum else None
        # Every column has a fixed width, so the header's length is known before offsets and CRCs.
        try:
            self.header_len = len(fmt.encode_header(self.names, self.columns, empty_crcs,
                                                    self.metadata, tree, shards))
        except UnicodeEncodeError as exc:
            rule = "[H5]" if exc.object in tensors else "[H7]"
            raise _unicode_error(exc, tensors, rule) from None
        self.header_end = fmt.PREFIX_SIZE + self.header_len
        # [T6]: tensor i starts at align_up(end of i-1); as every start is aligned, that is the
        # first start plus the sum of the earlier sizes, each rounded up to the alignment.
        first = fmt.align_up(self.header_end, align)
        padded = (sizes + np.uint64(align - 1)) & ~np.uint64(align - 1)
        offsets = np.empty(len(nbytes), "<u8")
        if len(nbytes):
            offsets[0] = first
            np.cumsum(padded[:-1], out=offsets[1:])
            offsets[1:] += np.uint64(first)
        self.offsets = offsets.tolist()
        self.file_size = int(offsets[-1]) + nbytes[-1] if nbytes else self.header_end
        self.columns["offsets"] = offsets.tobytes()

    def warn_beyond_reader_defaults(self):
        """Warn if readers with the default limits refuse the file [W4] (the metadata or the
        tree can make the header as large as anyone wants)."""
        index = self.shards is not None
        count = len(self.shards["names"]) if index else len(self.names)
        _warn_beyond_reader_defaults(self.header_len, count, "[P5]", "[S4]" if index else "[H6]")

    def prefix_and_header(self, crcs):
        """The final prefix and header, once the tensors' CRCs are known."""
        crc_column = np.array(crcs, "<u4").tobytes() if self.checksum else None
        header = fmt.encode_header(self.names, self.columns, crc_column, self.metadata, self.tree,
                                   self.shards)
        if len(header) != self.header_len:
            raise RuntimeError("safeckpt bug: the header changed length between encodings")
        header_crc = _backend.backend.crc32c(header)
        return fmt.encode_prefix(self.flags, len(header), self.align, header_crc, self.minor) + header


def _scalar_minor(tree):
    """The lowest minor version that holds the dtype codes of a tree's scalar nodes [R5]."""
    minor, stack = 0, [tree]
    while stack:
        node = stack.pop()
        if type(node) is list and node:
            if node[0] == "scalar":
                minor = max(minor, MINOR_BY_CODE[node[1]])
            else:
                stack.extend(node[1:])
    return minor


def _unicode_error(exc, names, rule):
    """InvalidValueError for a str UTF-8 cannot encode (``exc.object``, with a lone surrogate)."""
    text = exc.object
    what = (f"tensor name {quote(text)}" if text in names
            else f"the str {quote(text)} (in the metadata or the tree)")
    return InvalidValueError(f"{what} is not valid Unicode: {text[exc.start:exc.end]!r} is a lone "
                             f"surrogate, which UTF-8 cannot encode {rule}")


def _warn_beyond_reader_defaults(header_len, count, header_rule, count_rule):
    """Warn when a reader with the default limits would refuse a file with this header [W4]."""
    if header_len > fmt.MAX_HEADER_SIZE:
        _warn(f"the header is {header_len} bytes, more than max_header_size={fmt.MAX_HEADER_SIZE}, "
              f"the most that readers accept by default {header_rule}: load this file with "
              f"max_header_size={header_len} (or store big values as tensors, not metadata)")
    if count > fmt.MAX_TENSORS:
        _warn(f"the file names {plural(count, 'tensor')}, more than max_tensors={fmt.MAX_TENSORS}, "
              f"the most that readers accept by default {count_rule}: load this file with "
              f"max_tensors={count}")


def _warn(message):
    """``warnings.warn`` pointing at the first caller outside this package."""
    package, frame, level = os.path.dirname(__file__), sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


def _le_bytes(array):
    """The array's bytes, little-endian and C-ordered (the array itself when it already is).

    Returns the array to write and whether it is a copy.
    """
    if type(array) is np.ndarray and array.flags.c_contiguous and array.dtype.byteorder != ">":
        return array, False
    if isinstance(array, LazyArray):
        expected = (array.dtype, array.shape)
        array = array.load()
        if (array.dtype, array.shape) != expected:
            raise RuntimeError(f"safeckpt bug: a lazy array loaded as {array.dtype} {array.shape}, "
                               f"planned {expected[0]} {expected[1]}")
    if array.dtype.byteorder == ">":
        return array.astype(array.dtype.newbyteorder("<"), order="C"), True
    return np.ascontiguousarray(array), True


def _pwrite_all(fd, data, offset):
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if not written:
            raise OSError(errno.EIO, f"pwrite wrote nothing at offset {offset}")
        view, offset = view[written:], offset + written


def _write(fd, plan):
    write_tensors = _backend.backend.write_tensors
    crcs, batch, held, pos = [], [], 0, plan.header_end
    if plan.direct:  # nothing to convert: hand the arrays over in batches, no per-tensor Python
        for start in range(0, len(plan.arrays), _MAX_BATCH):
            batch_crcs, pos = write_tensors(fd, pos, plan.arrays[start:start + _MAX_BATCH],
                                            plan.align, plan.checksum)
            crcs.extend(batch_crcs or ())
    for array in () if plan.direct else plan.arrays:
        data, copied = _le_bytes(array)
        batch.append(data)
        held += data.nbytes if copied else 0
        if held >= _MAX_HELD_COPIES or len(batch) >= _MAX_BATCH:
            batch_crcs, pos = write_tensors(fd, pos, batch, plan.align, plan.checksum)
            crcs.extend(batch_crcs or ())
            batch, held = [], 0
    if batch:
        batch_crcs, pos = write_tensors(fd, pos, batch, plan.align, plan.checksum)
        crcs.extend(batch_crcs or ())
    if pos != plan.file_size:
        raise RuntimeError(f"safeckpt bug: wrote {pos} bytes, planned {plan.file_size}")
    _pwrite_all(fd, plan.prefix_and_header(crcs), 0)


def _fsync_directory(path):
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_file(tensors, path, *, metadata=None, align=fmt.ALIGN_DEFAULT, checksum=True, atomic=True,
              max_shard_size=None):
    """Save a flat ``{name: np.ndarray}`` dict to a .sckpt file (or .safetensors, by its name).

    Every save writes a new file and never into the one at ``path`` (FORMAT.md [W3]): arrays that
    anyone loaded (memory-mapped) from the old file keep its bytes.

    Parameters:
        tensors: names (non-empty str) to numpy arrays or scalars of a dtype in FORMAT.md sect. 4.
        path: a str, bytes or path-like. The name chooses the format, as in
            :func:`safeckpt.convert`: ``*.safetensors`` writes a safetensors file (no checksums,
            ``align`` unused; see :mod:`safeckpt.safetensors_format`), any other name a .sckpt
            file; names of formats safeckpt reads but never writes (``.pt``, ``.bin``, ``.npz``,
            ``.index.json``, ...) are refused.
        metadata: a dict with str keys of msgpack primitives (None, bool, int, float, str,
            bytes, lists and dicts of them).
        align: tensor alignment, a power of two from 8 to 1 MiB (4096 suits O_DIRECT).
        checksum: store a CRC32C per tensor, checked by ``verify``.
        atomic: write a temporary file in the same directory, fsync, rename it over ``path`` and
            fsync the directory, so a crash leaves the old file or the new one, never a mix
            [W2]. ``False`` skips the fsyncs and the second copy on disk: the old file is
            unlinked, then the new one is written at ``path``; an error removes the partial file
            (the old one is gone), a crash may leave one (readers refuse it).
        max_shard_size: split into shards of at most this many tensor bytes (an int, or a str
            such as ``"500MB"`` or ``"2GiB"``) plus an index at ``path`` (FORMAT.md section 9).

    Raises:
        InvalidValueError: a key is not a str, a value is not an array, metadata has a value
            msgpack cannot hold, or ``path`` names a format safeckpt does not write; the message
            names it.
        UnsupportedDtypeError: an array's dtype cannot be stored.
        LimitError: more dimensions or deeper metadata than readers accept by default [W4].
        OSError: from the file system (a missing directory is named as such); no partial file
            is left behind.

    Warns:
        UserWarning: the header or the tensor count is over the readers' default limit [W4];
            the message says which keyword loads the file.

    Example:
        >>> safeckpt.save_file({"w": np.zeros((2, 3))}, "w.sckpt", metadata={"step": 10})  # doctest: +SKIP
    """
    if max_shard_size is not None:
        from . import shard
        if not isinstance(tensors, collections.abc.Mapping):
            raise InvalidValueError(f"tensors must be a dict of name -> numpy array, "
                                    f"not {type(tensors).__name__}")
        shard.save_sharded(fmt.NO_TREE, list(tensors), list(tensors.values()), path,
                           metadata=metadata, align=align, checksum=checksum, atomic=atomic,
                           max_shard_size=max_shard_size)
        return
    _save_plan(_Plan(tensors, metadata, align, checksum), path, atomic)


def _output(path, *, sharded=False):
    """``(path as a str, format)`` for a save: the format follows the name as in
    :func:`safeckpt.convert`: ``"safetensors"``, ``"sckpt"``, or ``None`` for another name (a
    .sckpt file is written).

    Raises:
        TypeError: ``path`` is not a str, bytes or os.PathLike.
        InvalidValueError: the name of a format safeckpt reads but never writes (a file named
            ``*.pt`` would be taken for one: by torch.load, numpy.load, ``convert``), or
            ``*.safetensors`` for a sharded save.
        IsADirectoryError: the path ends with a separator.
    """
    from . import interop  # it imports this module
    try:
        path = os.fsdecode(path)
    except TypeError:
        raise TypeError(f"path must be a str, bytes or os.PathLike, not {type(path).__name__} "
                        "(safeckpt.save_bytes returns the file as bytes)") from None
    if not os.path.basename(path):
        raise IsADirectoryError(errno.EISDIR, "cannot save: the path names a directory", path)
    name = path.lower()
    if interop.kind_of(name) != "file":
        index = name.endswith(interop.INDEX_SUFFIX)
        ext = interop.INDEX_SUFFIX if index else os.path.splitext(name)[1]
        raise InvalidValueError(f"{path!r}: safeckpt does not write {ext} files, and a file named "
                                "so would be taken for one; name it *.sckpt or *.safetensors")
    kind = next((kind for suffix, kind in interop.OUTPUTS.items() if name.endswith(suffix)), None)
    if sharded and kind == "safetensors":
        raise InvalidValueError(f"{path!r}: a sharded save writes .sckpt shards and a .sckpt index "
                                "(FORMAT.md section 9); name it *.sckpt")
    return path, kind


@contextlib.contextmanager
def _new_file(path, atomic):
    """The descriptor of a new, empty file that becomes ``path`` when the block ends [W2], [W3].

    Nothing is ever written into the file already at ``path``: readers may have it mapped.
    With ``atomic``, a temporary file in the same directory is fsynced and renamed over
    ``path``, then the directory is fsynced. Without, the old file is unlinked first and the
    new one created at ``path``: no room for two copies is needed, and ext4 does not flush the
    new file as it does (auto_da_alloc) on a rename over a file or a truncation to zero. On an
    error the new file is removed.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "cannot save over a directory", path)
    if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise FileExistsError(errno.EEXIST, "cannot save over what is not a regular file (a "
                              "FIFO, socket or device)", path)
    directory, base = os.path.split(os.path.abspath(path))
    target = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp") if atomic else path
    if not atomic and mode is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                     0o666)
    except FileNotFoundError:  # a hidden temporary name would only confuse: say what is missing
        raise FileNotFoundError(errno.ENOENT, f"cannot save {path!r}: the directory does not "
                                "exist", directory) from None
    except OSError as exc:
        raise OSError(exc.errno, f"cannot save {path!r} in {directory!r}: {exc.strerror}") from None
    try:
        try:
            yield fd
            if atomic:
                os.fsync(fd)
        finally:
            os.close(fd)
        if atomic:
            try:
                os.replace(target, path)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot save {path!r}: {exc.strerror}") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
        raise
    if atomic:
        _fsync_directory(directory)


def _save_plan(plan, path, atomic):
    """Write ``plan`` to ``path`` as a new file [W2], [W3]; a ``*.safetensors`` name gets a
    safetensors file."""
    path, kind = _output(path, sharded=plan.shards is not None)
    if kind == "safetensors":
        from . import safetensors_format as sft  # it imports this module
        sft.save_file(dict(zip(plan.names, plan.arrays)), path, metadata=plan.metadata,
                      tree=plan.tree, atomic=atomic)
        return
    plan.warn_beyond_reader_defaults()
    with _new_file(path, atomic) as fd:
        _write(fd, plan)


def save_bytes(tensors, *, metadata=None, align=fmt.ALIGN_DEFAULT, checksum=True):
    """Return the .sckpt file of ``tensors`` as bytes; options as for :func:`save_file`.

    Example:
        >>> safeckpt.load_bytes(safeckpt.save_bytes({"x": np.arange(3)}))["x"]
        array([0, 1, 2])
    """
    return _plan_bytes(_Plan(tensors, metadata, align, checksum))


def _plan_bytes(plan):
    """The bytes of the file that ``plan`` describes."""
    plan.warn_beyond_reader_defaults()
    out = bytearray(plan.file_size)
    crcs = []
    for array, offset, size in zip(plan.arrays, plan.offsets, plan.nbytes):
        data = _le_bytes(array)[0].reshape(-1).view(np.uint8)
        out[offset:offset + size] = memoryview(data)
        if plan.checksum:
            crcs.append(_backend.backend.crc32c(data))
    head = plan.prefix_and_header(crcs)
    out[:len(head)] = head
    return bytes(out)
