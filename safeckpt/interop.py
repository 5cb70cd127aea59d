"""Converting between .sckpt and the formats people have: ``convert(src, dst)``.

Sources, chosen by the file name (anything else is read by :func:`safeckpt.open`, which tells
.sckpt from .safetensors by their first bytes):

=============================  ====================================================================
``*.sckpt``, ``*.safetensors``  read and validated by safeckpt's own reader (zero-copy)
``*.index.json``, a directory   a sharded model (``model.safetensors.index.json``, FORMAT.md section
                                10) or a directory holding one checkpoint, read by
                                :func:`safeckpt.open`: every shard checked against the index
``*.npz``, ``*.npy``            read here with bounded reads (numpy parses the .npy header: literals
                                only); object arrays raise :class:`PickleRequiredError`
``*.pt``, ``*.pth``, ``*.bin``, ``torch.load(..., weights_only=True)`` only: a file that needs full
``*.ckpt``                      pickle raises :class:`PickleRequiredError`, never a fallback
=============================  ====================================================================

What a small hostile file can cost is bounded by its size: the arrays of an .npz and the tensors
of a torch file may hold ``max_expansion`` (16) times the file's size, checked before anything is
allocated (a zip bomb, a stride-0 tensor), and a torch file's shared objects, which a tree stores
once per appearance, may expand to ``TREE_EXPANSION`` (2) times its bytes outside tensors.

Destinations: ``*.sckpt`` or ``*.safetensors``; with ``max_shard_size``, shards and their index
(Hugging Face's for ``*.safetensors``). Tensor bytes are copied as they are (bit-exact,
dtypes kept); metadata and the tree of nested objects are kept (for safetensors, see
:mod:`safeckpt.safetensors_format`). A ``.npy`` file is one array, so it becomes a file whose
object is that array (``safeckpt.load`` returns it; its tensor is named ``_``). A torch file holds
what ``torch.save`` saved (a state dict, a nested checkpoint), stored as :func:`safeckpt.save` would.

Example:
    >>> import safeckpt                                                     # doctest: +SKIP
    >>> safeckpt.convert("model.safetensors", "model.sckpt")               # doctest: +SKIP
    >>> safeckpt.convert("pytorch_model.bin", "model.sckpt")               # doctest: +SKIP
    >>> safeckpt.convert("model.safetensors.index.json", "model.sckpt")    # doctest: +SKIP
    >>> safeckpt.convert("model.sckpt", "hf/model.safetensors", max_shard_size="5GB")  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import io
import itertools
import os
import re
import zipfile
import zlib
from typing import (IO, TYPE_CHECKING, Any, BinaryIO, Callable, Collection, Dict, Iterable,
                    Iterator, Literal, NamedTuple, Union)

import numpy as np

from . import _fs, api, remote
from . import format as fmt
from . import tree as _tree
from . import filekind
from . import writer as _writer
from .dtypes import code_of
from .filekind import OUTPUTS, kind_of
from .reader import TensorMap
from .safetensors_shards import TOTAL_SIZE_KEY, save_single
from .errors import (TRUNCATED_HINT, HeaderError, InvalidValueError, LayoutError, LimitError,
                     PickleRequiredError, SafeckptError, TruncatedFileError,
                     UnsupportedDtypeError)

if TYPE_CHECKING:
    import types


# What file names say, from filekind; interop's own names before issue 11, kept for callers.
INDEX_SUFFIX, TORCH_SUFFIXES = filekind.INDEX_SUFFIX, filekind.TORCH_SUFFIXES

# The tensors of an .npz or torch file may hold at most this many times the file's size in bytes
# (keyword max_expansion): more is a compressed member that inflates like a zip bomb, or a tensor
# whose elements repeat its storage (stride 0); either makes a small file fill memory or disk.
# numpy's own .npz of float weights inflates about 1.1x; all-zero arrays up to deflate's ~1000x.
MAX_EXPANSION = 16
# pickle stores a repeated object once, a tree once per appearance: a torch file's objects so
# expanded may be TREE_EXPANSION x its bytes outside tensors plus TREE_FLOOR (torch's optimizers
# share one `betas` tuple between parameter groups; a 2 KB DAG can have 2**60 paths).
TREE_EXPANSION = 2
TREE_FLOOR = 1 << 16
NPY_MAX_HEADER = 10_000  # numpy's own limit on an .npy header (numpy.lib.format)
NPZ_PIECE = 1 << 20  # an .npz member is decompressed this many bytes at a time

Tensors = Dict[str, Union[np.ndarray, _writer.LazyArray]]  # name -> an array, or one read later
Progress = Callable[[int, int], None]  # progress(done_bytes, total_bytes)


class Converted(NamedTuple):
    """What :func:`convert` wrote: the number of tensors and their bytes."""

    tensors: int
    nbytes: int


class Source:
    """What a source file holds: ``tensors`` (name -> array or LazyArray, in order), ``metadata``
    and ``tree`` (an encoded skeleton over the tensors' order, or ``format.NO_TREE``)."""

    def __init__(self, tensors: Tensors, metadata: dict[str, Any] | None = None,
                 tree: Any = fmt.NO_TREE) -> None:
        self.tensors, self.metadata, self.tree = tensors, metadata or {}, tree

    @property
    def nbytes(self) -> int:
        """The bytes of all its tensors."""
        return sum(int(a.nbytes) for a in self.tensors.values())


@contextlib.contextmanager
def read_source(path: str | os.PathLike[str], *, max_expansion: int = MAX_EXPANSION,
                verify: bool = False, storage_options: dict[str, Any] | None = None,
                **limits: Any) -> Iterator[Source]:
    """Open any supported source as a :class:`Source`; files stay open inside the ``with``.

    ``max_expansion``: see :func:`convert`; ``verify``: check each tensor of a .sckpt source
    against its CRC32C as it is read (convert's copies, [T10], [X6]); ``storage_options``: for a
    URL (a .sckpt or .safetensors file, or shards and their index, read with ranged requests,
    FORMAT.md section 12; .npz, .npy and torch files are read from local paths only);
    ``limits``: the reader's (``max_header_size``, ...).

    Raises:
        SafeckptError: a subclass naming the file and the problem (PickleRequiredError for a file
            that only pickle loads); ImportError: a torch file without torch; OSError: the
            operating system's own failures (a missing file, a directory, an I/O error).
    """
    path = os.fspath(path)
    kind = kind_of(path)
    if kind in ("npz", "npy", "torch") and remote.is_url(path):
        raise InvalidValueError(f"{path!r}: convert reads .npz, .npy and torch files from a local "
                                "path only; download it first (or convert it where it is)")
    with contextlib.ExitStack() as stack:
        if kind == "npz":
            yield _npz_source(path, stack, max_expansion)
        elif kind == "npy":
            yield _npy_source(path, stack)
        elif kind == "torch":
            yield _torch_source(path, stack, max_expansion, limits.get("max_depth", fmt.MAX_DEPTH))
        else:
            yield _reader_source(stack.enter_context(
                api.open(path, storage_options=storage_options, **limits)), verify)


def _reader_source(reader: TensorMap, verify: bool) -> Source:
    """A reader's tensors (a file's, shards' or one with references), each read when the writer
    reaches it; with ``verify``, checked against its CRC32C first when the file has them."""
    tensors: Tensors = {}
    check = True if verify and reader.has_checksums else None
    for i, name in enumerate(reader.keys()):
        info = reader.info(name)
        # a known CRC32C: a streamed save (to a URL) reads the tensor once, not twice [RS7]
        tensors[name] = _writer.LazyArray(info.dtype, info.shape,
                                          functools.partial(_load_one, reader, i, check),
                                          crc32c=info.crc32c)
    return Source(tensors, dict(reader.metadata), reader.stored_tree)


def _load_one(reader: TensorMap, i: int, verify: bool | None) -> np.ndarray:
    """Tensor ``i`` of ``reader``, its CRC32C checked as ``verify`` says."""
    return reader.load_indices([i], verify)[0]


def _open_source(path: str, stack: contextlib.ExitStack) -> tuple[BinaryIO, int]:
    """``(file, size)`` of a source file, closed with ``stack``: a regular file only (a FIFO is
    not waited on; see :func:`safeckpt._fs.open_regular`)."""
    file, size = _fs.open_regular(path, repr(path), "; convert reads files")
    return stack.enter_context(file), size


def _printable(text: str) -> str:
    """``text`` with control characters escaped: a message quoting a file cannot drive a terminal."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _read_exact(stream: IO[bytes], size: int, where: str, what: str) -> bytes:
    """``size`` bytes of ``stream``; fewer is a truncated file, ``what`` says where in it."""
    data = stream.read(size)
    if len(data) != size:
        raise TruncatedFileError(f"{where}: ends inside its {what} ({len(data)} of {size} bytes; "
                                 f"{TRUNCATED_HINT})")
    return data


def _npy_header(stream: IO[bytes], where: str) -> tuple[int, tuple[int, ...], np.dtype, bool]:
    """``(header size, shape, dtype, fortran_order)`` of an .npy stream, read with bounded reads.

    The header is at most ``NPY_MAX_HEADER`` bytes, parsed by numpy (literals only); object arrays
    are refused before any data is read, and the shape is checked as FORMAT.md [T3, T4] check it.
    """
    magic = _read_exact(stream, 8, where, ".npy magic")
    if magic[:6] != b"\x93NUMPY":
        raise HeaderError(f"{where}: not an .npy array (its first bytes are {magic[:6]!r}, not "
                          "b'\\x93NUMPY')")
    version = (magic[6], magic[7])
    if version == (3, 0):  # 3.0 only adds UTF-8 field names of structured dtypes
        raise UnsupportedDtypeError(f"{where}: .npy version 3.0 (a structured dtype), which "
                                    "safeckpt cannot store")
    if version not in ((1, 0), (2, 0)):
        raise HeaderError(f"{where}: unknown .npy version {version[0]}.{version[1]}")
    width = 2 if version == (1, 0) else 4
    raw = _read_exact(stream, width, where, ".npy header length")
    length = int.from_bytes(raw, "little")
    if length > NPY_MAX_HEADER:
        raise LimitError(f"{where}: .npy header of {length} bytes, more than numpy reads "
                         f"({NPY_MAX_HEADER})")
    text = _read_exact(stream, length, where, ".npy header")
    parse = (np.lib.format.read_array_header_1_0 if version == (1, 0)
             else np.lib.format.read_array_header_2_0)
    try:
        shape, fortran, dtype = parse(io.BytesIO(raw + text))
    except Exception as exc:  # numpy parses a bounded string: any failure is a bad header
        raise HeaderError(f"{where}: not a valid .npy header: "
                          f"{_printable(str(exc)) or type(exc).__name__}") from None
    if dtype.hasobject:
        raise PickleRequiredError(f"{where}: an array of Python objects ({dtype}), which only "
                                  "pickle can load; safeckpt reads .npy/.npz with "
                                  "allow_pickle=False and never unpickles")
    code_of(dtype, where)
    product = dtype.itemsize
    for dim in shape:
        if not 0 <= dim < 1 << 63:
            raise LayoutError(f"{where}: dimension {dim} of shape {shape} is negative or not below "
                              "2**63 [T3]")
        product *= dim or 1
    if product >= 1 << 63:
        raise LayoutError(f"{where}: shape {shape} of {dtype} is too large: the non-zero "
                          "dimensions times the item size are 2**63 bytes or more [T4]")
    return 8 + width + length, shape, dtype, fortran


def _npy_bytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    """The bytes of an array of ``shape`` and ``dtype`` (exact: no overflow)."""
    return int(np.prod(shape, dtype=object)) * dtype.itemsize


def _npy_source(path: str, stack: contextlib.ExitStack) -> Source:
    """One array, mapped: its size must be exactly what the header says."""
    where = repr(path)
    file, size = _open_source(path, stack)
    header, shape, dtype, fortran = _npy_header(file, where)
    nbytes = _npy_bytes(shape, dtype)
    if header + nbytes > size:
        raise TruncatedFileError(f"{where}: holds {size - header} bytes of array data, its header "
                                 f"says {nbytes} ({TRUNCATED_HINT})")
    if header + nbytes < size:
        raise LayoutError(f"{where}: {size - header - nbytes} bytes after the array's "
                          f"{nbytes} bytes, which numpy never writes")
    order: Literal["C", "F"] = "F" if fortran else "C"
    array = (np.memmap(file, dtype, "r", header, shape, order).view(np.ndarray) if nbytes
             else np.empty(shape, dtype, order))
    tree, names, arrays = _tree.flatten(array, root="array")
    return Source(dict(zip(names, arrays)), {}, tree)


_ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate",
                zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "lzma"}


@contextlib.contextmanager
def _zip_errors(where: str) -> Iterator[None]:
    """zipfile's and the decompressors' errors on bad bytes, as SafeckptErrors naming ``where``."""
    try:
        yield
    except SafeckptError:
        raise
    except EOFError:
        raise TruncatedFileError(f"{where}: the zip archive ends inside a member "
                                 f"({TRUNCATED_HINT})") from None
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # a seek before the file's start, to an offset it gave
            raise
        raise HeaderError(f"{where}: a corrupt zip archive: an offset in it points before the "
                          "start of the file") from None
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, ValueError) as exc:
        raise HeaderError(f"{where}: a corrupt zip archive: {_printable(str(exc))}") from None


def _zip_archive(file: IO[bytes], where: str, methods: Collection[int]
                 ) -> tuple[zipfile.ZipFile, list[zipfile.ZipInfo]]:
    """``(archive, members)``: a zip archive and its members, each checked: not encrypted,
    compressed only by ``methods``, no name twice (which one is read is then a reader's choice)."""
    with _zip_errors(where):
        archive = zipfile.ZipFile(file)
        members = archive.infolist()
    seen = set()
    for info in members:
        name = f"{where}, member {_printable(repr(info.filename))}"
        if info.filename in seen:
            raise HeaderError(f"{name}: the archive holds a member of this name twice")
        seen.add(info.filename)
        if info.flag_bits & 1:
            raise HeaderError(f"{name}: encrypted; safeckpt reads no encrypted member")
        if info.compress_type not in methods:
            method = _ZIP_METHODS.get(info.compress_type, f"method {info.compress_type}")
            allowed = " or ".join(_ZIP_METHODS[m] for m in methods)
            raise HeaderError(f"{name}: compressed with {method}; safeckpt reads {allowed} "
                              "members only, as the writer of this kind of file makes them")
    return archive, members


def _npz_source(path: str, stack: contextlib.ExitStack, max_expansion: int) -> Source:
    """Each member's .npy header is read first; its data, in bounded pieces, when the writer
    reaches it. Claims (the zip directory's, the headers') must agree and stay within
    ``max_expansion`` x the file's size before anything is allocated for them."""
    where = repr(path)
    file, size = _open_source(path, stack)
    if file.read(4) not in (b"PK\x03\x04", b"PK\x05\x06"):  # a member, or an empty archive
        raise HeaderError(f"{where}: not an .npz archive (a zip of .npy files)")
    archive, members = _zip_archive(file, where, (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED))
    tensors: Tensors = {}
    total = 0
    for info in members:
        name = f"{where}, member {_printable(repr(info.filename))}"
        if not info.filename.endswith(".npy"):
            raise HeaderError(f"{name}: not an .npy file; an .npz archive holds .npy files only")
        with _zip_errors(name), archive.open(info) as stream:
            header, shape, dtype, fortran = _npy_header(stream, name)
        nbytes = _npy_bytes(shape, dtype)
        if header + nbytes != info.file_size:
            raise LayoutError(f"{name}: the zip directory says it holds {info.file_size} bytes, "
                              f"its .npy header says {header + nbytes}")
        total += nbytes
        _check_expansion(total, size, max_expansion, f"{where}: its arrays up to member "
                         f"{_printable(repr(info.filename))}")
        tensors[info.filename[:-4]] = _writer.LazyArray(dtype, shape, functools.partial(
            _npz_array, archive, info, header, shape, dtype, fortran, name))
    return Source(tensors)


def _npz_array(archive: zipfile.ZipFile, info: zipfile.ZipInfo, header: int,
               shape: tuple[int, ...], dtype: np.dtype, fortran: bool, where: str) -> np.ndarray:
    """A member's array, decompressed in pieces into memory of the checked size."""
    nbytes = _npy_bytes(shape, dtype)
    with _zip_errors(where), archive.open(info) as stream:
        _read_exact(stream, header, where, ".npy header")
        out = np.empty(nbytes, np.uint8)
        done = 0
        while done < nbytes:  # zipfile checks the member's CRC-32 when its last byte is read
            piece = stream.read(min(NPZ_PIECE, nbytes - done))
            if not piece:
                raise TruncatedFileError(f"{where}: ends after {done} of its {nbytes} bytes of "
                                         f"array data ({TRUNCATED_HINT})")
            out[done:done + len(piece)] = np.frombuffer(piece, np.uint8)
            done += len(piece)
    return out.view(dtype).reshape(shape, order="F" if fortran else "C")


def _check_expansion(nbytes: int, size: int, max_expansion: int, what: str) -> None:
    """Refuse ``nbytes`` of tensors from a file of ``size`` bytes past ``max_expansion``."""
    if nbytes > max_expansion * size:
        raise LimitError(f"{what} hold {nbytes} bytes, more than max_expansion={max_expansion} "
                         f"times the file's {size} bytes (compressed data that inflates this much, "
                         "or a tensor that repeats its elements, is how a small file exhausts "
                         "memory or disk); pass max_expansion=... if you trust this file")


def _torch_kind(file: IO[bytes], where: str) -> str:
    """``"zip"`` (torch.save since torch 1.6) or ``"legacy"`` (a pickle stream), as torch.load
    tells them; a zip's members must be stored, as torch.save stores them (a compressed member
    would be mapped as tensor data, compressed bytes and all)."""
    start = file.read(4)
    if start == b"PK\x03\x04":
        _zip_archive(file, where, (zipfile.ZIP_STORED,))
        return "zip"
    if start[:1] == b"\x80":  # the pickle PROTO instruction that a legacy torch file starts with
        return "legacy"
    raise HeaderError(f"{where}: not a torch file: neither a zip archive (what torch.save writes) "
                      "nor a legacy torch pickle")


def _torch_reason(message: str) -> str:
    """The reason in a torch.load(weights_only=True) error, whole, without torch's advice about
    its own options (safeckpt never takes it)."""
    text = message.split("\n\nCheck the documentation", 1)[0]
    if "WeightsUnpickler error:" in text:
        text = text.rsplit("WeightsUnpickler error:", 1)[1]
    else:
        text = text.strip().rsplit("\n\n", 1)[-1].removeprefix("Weights only load failed.")
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    reason = re.split(r"\s+Please use\b", lines[0] if lines else "", maxsplit=1)[0]
    return _printable(reason.rstrip(". ")) or "no reason given"


def _torch_source(path: str, stack: contextlib.ExitStack, max_expansion: int, max_depth: int
                  ) -> Source:
    """What ``torch.load(weights_only=True)`` makes of a torch file (never full pickle), within
    the bounds of :func:`_check_shared` and ``max_expansion``."""
    where = repr(path)
    file, size = _open_source(path, stack)
    kind = _torch_kind(file, where)
    try:
        import torch
    except ImportError as exc:
        raise ImportError(f"{where}: reading a torch file needs torch (pip install torch)") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
    except torch.serialization.pickle.UnpicklingError as exc:  # safeckpt never imports pickle
        raise PickleRequiredError(
            f"{where}: torch.load(weights_only=True) refused it: {_torch_reason(str(exc))}. "
            "Loading it needs full pickle, which can run code from the file; nothing from the file "
            "ran, and safeckpt never falls back to it. If you trust the file, load it yourself "
            "with torch.load's full unpickling and save its tensors and plain values with "
            "safeckpt.save") from None
    except EOFError:
        raise TruncatedFileError(f"{where}: its pickle ends too early ({TRUNCATED_HINT})") from None
    except MemoryError:
        raise LimitError(f"{where}: torch ran out of memory reading it (a size it claims?)"
                         ) from None
    except OSError as exc:
        if exc.errno is None:
            raise HeaderError(f"{where}: torch cannot read it: {_printable(str(exc))}") from None
        raise
    except Exception as exc:  # torch raises RuntimeError, KeyError, IndexError... for bad bytes
        raise HeaderError(f"{where}: torch cannot read it as a torch.save file: "
                          f"{type(exc).__name__}: {_printable(str(exc))}") from None
    _check_shared(torch, obj, size, where)
    tree, names, arrays = _tree.flatten(obj, root="checkpoint", max_depth=max_depth)
    source = Source(dict(zip(names, arrays)), {}, tree)
    _check_expansion(source.nbytes, size, max_expansion, f"{where}: its tensors")
    return source


def _check_shared(torch: types.ModuleType, obj: object, size: int, where: str) -> None:
    """Refuse a torch file's object that holds itself, or whose shared parts expand too far.

    pickle stores an object that appears several times once; a tree stores each appearance
    (tied tensors excepted: they are stored once and referenced [R8]). Each container is walked
    once, its expanded size (1 per node, plus the length of each str and bytes) computed from its
    children's, so a DAG of 2**60 paths costs its few nodes, not 2**60. The expanded tree may be
    ``TREE_EXPANSION`` x the file's bytes outside tensor storage, plus ``TREE_FLOOR``.
    """
    containers = (dict, collections.OrderedDict, list, tuple)
    cap = TREE_EXPANSION * size + TREE_FLOOR + 1  # no budget is larger: sizes stop growing here
    sizes: dict[int, int] = {}  # id of a container walked -> its expanded size
    walking: set[int] = set()  # ids of the containers being walked
    storages: dict[int, int] = {}  # tensor storages: address -> bytes

    def children(value: Any) -> Iterable[Any]:
        if type(value) is dict or type(value) is collections.OrderedDict:
            return itertools.chain.from_iterable(value.items())
        return value

    def leaf(value: object) -> int:
        if type(value) is str or type(value) is bytes:
            return 1 + len(value)
        if isinstance(value, torch.Tensor) and value.layout == torch.strided:
            storage = value.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return 1

    stack = [(obj, False)]
    while stack:
        value, walked = stack.pop()
        key = id(value)
        if walked:  # every child is sized: this container's size is 1 + theirs
            walking.discard(key)
            total = 1
            for child in children(value):
                total += sizes[id(child)] if type(child) in containers else leaf(child)
            sizes[key] = min(total, cap)
        elif key in walking:  # reached again below itself
            raise LimitError(f"{where}: a container holds itself (a cycle in the pickle), which "
                             "a tree cannot store")
        elif key not in sizes and type(value) in containers:
            walking.add(key)
            stack.append((value, True))
            stack.extend((child, False) for child in children(value)
                         if type(child) in containers and id(child) not in sizes)
    expanded = sizes.get(id(obj), 1)
    budget = TREE_EXPANSION * max(0, size - sum(storages.values())) + TREE_FLOOR
    if expanded > budget:
        raise LimitError(f"{where}: its objects, each shared part counted every time it appears "
                         f"(a tree stores each appearance), come to more than {budget} nodes and "
                         f"string bytes: over {TREE_EXPANSION}x the file's bytes outside tensors. "
                         "A structure that holds one part many times would expand without bound; "
                         "if you trust the file, load it with torch.load and save what you need "
                         "with safeckpt.save")


def _counting(tensors: Tensors, progress: Progress | None) -> Tensors:
    """The tensors, each wrapped so that reaching it reports its bytes to ``progress(done, total)``."""
    if progress is None:
        return tensors
    total = sum(int(a.nbytes) for a in tensors.values())
    done = [0]
    progress(0, total)

    def wrap(array: np.ndarray | _writer.LazyArray) -> _writer.LazyArray:
        counted = [False]  # a streamed save without a known CRC loads a tensor twice [RS7]

        def load() -> np.ndarray:
            value = array.load() if isinstance(array, _writer.LazyArray) else array
            if not counted[0]:
                counted[0] = True
                done[0] += int(array.nbytes)
                progress(done[0], total)
            return value
        return _writer.LazyArray(array.dtype, array.shape, load,
                                 crc32c=getattr(array, "crc32c", None))
    return {name: wrap(array) for name, array in tensors.items()}


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
            align: int = fmt.ALIGN_DEFAULT, checksum: bool = True, progress: Progress | None = None,
            max_expansion: int = MAX_EXPANSION, max_shard_size: int | str | None = None,
            storage_options: dict[str, Any] | None = None, **limits: Any) -> Converted:
    """Convert ``src`` to ``dst``, each format chosen by the file name (see the module docstring).

    Parameters:
        src: a .sckpt, .safetensors, sharded ``*.index.json``, .npz, .npy or torch file, or a
            directory holding one checkpoint (as :func:`safeckpt.open` takes it). Each tensor
            of a source with checksums is checked against its CRC32C as it is copied; a .sckpt
            with references (FORMAT.md section 11) gives a self-contained copy.
        dst: a path ending in ``.sckpt`` or ``.safetensors``; written atomically.
        align, checksum: for a .sckpt destination, as :func:`safeckpt.save_file`.
        progress: called as ``progress(done_bytes, total_bytes)`` as tensors are written.
        max_expansion: the tensors of an .npz or torch file may hold at most this many times the
            file's size in bytes (default 16): a bound on what a small file can make convert
            decompress or write. Raise it for a trusted .npz of mostly-zero arrays.
        max_shard_size: write shards of at most this many tensor bytes (an int, or a str such as
            ``"5GB"``), as :func:`safeckpt.save_file`: for ``model.safetensors``, Hugging Face
            shards and ``model.safetensors.index.json`` (a ``total_size`` in the source's
            metadata is the source files' own: the index gets the new one).
        storage_options: for ``src`` and ``dst`` that are URLs (``s3://bucket/model.sckpt``,
            FORMAT.md section 12), passed to fsspec; at least one of them must be a URL. A
            remote ``dst`` is streamed and visible only once whole [RS7]; ``http(s)://`` is
            read-only.
        limits: reader limits for .sckpt/.safetensors sources (``max_header_size``, ...).

    Returns:
        A :class:`Converted` (number of tensors, tensor bytes).

    Raises:
        ValueError: ``dst`` has no known extension.
        SafeckptError: a bad source (the subclass names the file and tensor; corrupt bytes:
            :class:`ChecksumError`), a source that needs pickle (:class:`PickleRequiredError`), or
            a value the destination cannot hold (e.g. complex128 in safetensors:
            :class:`UnsupportedDtypeError`).
        ImportError: a torch source without torch installed.

    Example:
        >>> safeckpt.convert("model.safetensors", "model.sckpt")   # doctest: +SKIP
        Converted(tensors=291, nbytes=2471636992)
        >>> safeckpt.convert("pytorch_model.bin", "hf/model.safetensors", max_shard_size="5GB")  # doctest: +SKIP
        Converted(tensors=291, nbytes=16060522496)
    """
    dst = os.fspath(dst)
    out = next((kind for suffix, kind in OUTPUTS.items() if dst.lower().endswith(suffix)), None)
    if out is None:
        raise ValueError(f"{dst!r}: unknown output format; name it *.sckpt or *.safetensors")
    src_url, dst_url = remote.is_url(src), remote.is_url(dst)
    if storage_options is not None and not (src_url or dst_url):
        raise InvalidValueError(f"{os.fspath(src)!r} and {dst!r} are local paths: "
                                "storage_options= is for URLs (s3://, gs://, ...); remove it")
    target = remote.resolve(dst, storage_options=storage_options if dst_url else None)
    with read_source(src, max_expansion=max_expansion, verify=True,
                     storage_options=storage_options if src_url else None, **limits) as source:
        tensors = _counting(source.tensors, progress)
        if max_shard_size is not None:
            metadata = source.metadata
            if out == "safetensors":
                metadata = {k: v for k, v in metadata.items() if k != TOTAL_SIZE_KEY}
            api.save_sharded(source.tree, list(tensors), list(tensors.values()), target,
                             metadata=metadata, align=align, checksum=checksum, atomic=True,
                             max_shard_size=max_shard_size)
        elif out == "sckpt":
            plan = _writer.Plan(tensors, source.metadata, align, checksum, tree=source.tree)
            api.save_plan(plan, target, atomic=True)
        else:
            save_single(tensors, target, metadata=source.metadata, tree=source.tree)
        return Converted(len(source.tensors), source.nbytes)
