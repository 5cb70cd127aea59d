"""Converting between .sckpt and the formats people have: ``convert(src, dst)``.

Sources, chosen by the file name (anything else is read by :func:`safeckpt.open`, which tells
.sckpt from .safetensors by their first bytes):

=============================  ====================================================================
``*.sckpt``, ``*.safetensors``  read and validated by safeckpt's own reader (zero-copy)
``*.index.json``                a sharded safetensors model (``model.safetensors.index.json``): every
                                shard it names, checked against its ``weight_map``, as one file
``*.npz``, ``*.npy``            ``numpy.load(..., allow_pickle=False)``, always
``*.pt``, ``*.pth``, ``*.bin``, ``torch.load(..., weights_only=True)`` only: a file that needs full
``*.ckpt``                      pickle raises :class:`PickleRequiredError`, never a fallback
=============================  ====================================================================

Destinations: ``*.sckpt`` or ``*.safetensors``. Tensor bytes are copied as they are (bit-exact,
dtypes kept); metadata and the tree of nested objects are kept (for safetensors, see
:mod:`safeckpt.safetensors_format`). A ``.npy`` file is one array, so it becomes a file whose
object is that array (``safeckpt.load`` returns it; its tensor is named ``_``). A torch file holds
what ``torch.save`` saved (a state dict, a nested checkpoint), stored as :func:`safeckpt.save` would.

Example:
    >>> import safeckpt                                                     # doctest: +SKIP
    >>> safeckpt.convert("model.safetensors", "model.sckpt")               # doctest: +SKIP
    >>> safeckpt.convert("pytorch_model.bin", "model.sckpt")               # doctest: +SKIP
    >>> safeckpt.convert("model.safetensors.index.json", "model.sckpt")    # doctest: +SKIP
"""

import collections
import contextlib
import json
import os
import re
import zipfile

import numpy as np

from . import format as fmt
from . import safetensors_format as _sft
from . import tree as _tree
from . import writer as _writer
from .errors import (HeaderError, LayoutError, LimitError, PickleRequiredError,
                     UnsupportedDtypeError)

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
INDEX_SUFFIX = ".index.json"
OUTPUTS = {".sckpt": "sckpt", ".safetensors": "safetensors"}

Converted = collections.namedtuple("Converted", "tensors nbytes")
Converted.__doc__ = "What :func:`convert` wrote: the number of tensors and their bytes."


class Source:
    """What a source file holds: ``tensors`` (name -> array or LazyArray, in order), ``metadata``
    and ``tree`` (an encoded skeleton over the tensors' order, or ``format.NO_TREE``)."""

    def __init__(self, tensors, metadata=None, tree=fmt.NO_TREE):
        self.tensors, self.metadata, self.tree = tensors, metadata or {}, tree

    @property
    def nbytes(self):
        return sum(int(a.nbytes) for a in self.tensors.values())


def kind_of(path):
    """The source kind of a path, from its name: ``index``, ``npz``, ``npy``, ``torch`` or ``file``."""
    name = os.fspath(path).lower()
    if name.endswith(INDEX_SUFFIX):
        return "index"
    if name.endswith(".npz"):
        return "npz"
    if name.endswith(".npy"):
        return "npy"
    if name.endswith(TORCH_SUFFIXES):
        return "torch"
    return "file"


@contextlib.contextmanager
def read_source(path, **limits):
    """Open any supported source as a :class:`Source`; files stay open inside the ``with``.

    Raises:
        SafeckptError: a subclass naming the file and the problem (PickleRequiredError for a file
            that only pickle loads); ImportError: a torch file without torch; OSError.
    """
    path = os.fspath(path)
    kind = kind_of(path)
    with contextlib.ExitStack() as stack:
        if kind == "index":
            yield _index_source(path, stack, limits)
        elif kind == "npz":
            yield _npz_source(path, stack)
        elif kind == "npy":
            yield _npy_source(path)
        elif kind == "torch":
            yield _torch_source(path)
        else:
            yield _reader_source(stack.enter_context(_open(path, **limits)))


def _open(path, **limits):
    from .reader import open as open_file
    return open_file(path, **limits)


def _reader_source(reader):
    """A .sckpt or .safetensors reader's tensors, each read when the writer reaches it."""
    tensors = {}
    for name in reader.keys():
        info = reader.info(name)
        tensors[name] = _writer.LazyArray(info.dtype, info.shape,
                                          lambda name=name: reader[name])
    return Source(tensors, dict(reader.metadata), getattr(reader, "_skeleton", fmt.NO_TREE))


def _plain_name(name, where):
    """A file name in the index's own directory: no path, no hidden file (as FORMAT.md [S3])."""
    if (type(name) is not str or not name or len(name.encode("utf-8", "replace")) > 255
            or any(c in name for c in "/\\\0") or name.startswith(".")):
        raise HeaderError(f"{where}: shard file {name!r} must be a plain file name in the index's "
                          "directory")
    return name


def _index_source(path, stack, limits):
    """A sharded safetensors model: ``{"metadata": {...}, "weight_map": {tensor: shard file}}``."""
    where = repr(path)
    max_size = limits.get("max_header_size", fmt.MAX_HEADER_SIZE)
    with open(path, "rb") as f:
        raw = f.read(max_size + 1)
    if len(raw) > max_size:
        raise LimitError(f"{where}: index is larger than max_header_size={max_size}; pass "
                         "max_header_size=... if you trust this file")
    try:
        index = json.loads(raw.decode("utf-8"), object_pairs_hook=_sft._unique_object,
                           parse_constant=_sft._refuse_constant)
    except HeaderError as exc:
        raise HeaderError(f"{where}: {exc}") from None
    except RecursionError:
        raise LimitError(f"{where}: index nesting is too deep to decode") from None
    except ValueError as exc:
        raise HeaderError(f"{where}: not a JSON index: {exc}") from None
    weight_map = index.get("weight_map") if type(index) is dict else None
    if type(weight_map) is not dict or not weight_map:
        raise HeaderError(f"{where}: a sharded safetensors index needs a non-empty 'weight_map' "
                          "object of tensor name -> shard file")
    metadata = index.get("metadata", {})
    if type(metadata) is not dict:
        raise HeaderError(f"{where}: 'metadata' must be an object, not {type(metadata).__name__}")
    metadata = dict(metadata)
    fmt._walk_metadata(metadata, limits.get("max_depth", fmt.MAX_DEPTH), HeaderError)
    by_file = collections.defaultdict(set)
    for name, file in weight_map.items():
        by_file[_plain_name(file, where)].add(name)
    directory = os.path.dirname(os.path.abspath(path))
    tensors = {}
    for file in sorted(by_file):  # model-00001-of-00003... sort in shard order
        reader = stack.enter_context(_open(os.path.join(directory, file), **limits))
        if getattr(reader, "format", None) != "safetensors":
            raise HeaderError(f"{where}: shard {file!r} is not a safetensors file")
        names = reader.keys()
        extra = [n for n in names if n not in by_file[file]]
        missing = by_file[file].difference(names)
        if extra or missing:
            problem = (f"holds {extra[0]!r}, which the weight_map does not map to it" if extra
                       else f"does not hold {sorted(missing)[0]!r}, which the weight_map maps to it")
            raise LayoutError(f"{where}: shard {file!r} {problem}")
        for key, value in reader.metadata.items():
            metadata.setdefault(key, value)
        tensors.update(_reader_source(reader).tensors)
    return Source(tensors, metadata)


def _npy_header(stream, where):
    """``(shape, dtype)`` from an .npy header, refusing object arrays before any data is read."""
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
        else:  # 3.0 only adds UTF-8 field names of structured dtypes, which we cannot store
            raise UnsupportedDtypeError(f"{where}: .npy version {version} (structured dtype) "
                                        "cannot be stored")
    except ValueError as exc:
        if isinstance(exc, UnsupportedDtypeError):
            raise
        raise HeaderError(f"{where}: not a valid .npy header: {exc}") from None
    if dtype.hasobject:
        raise PickleRequiredError(f"{where}: an array of Python objects ({dtype}), which only "
                                  "pickle can load; safeckpt loads .npy/.npz with "
                                  "allow_pickle=False and never unpickles")
    return shape, dtype


def _npy_source(path):
    with open(path, "rb") as f:
        _npy_header(f, repr(path))
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise HeaderError(f"{path!r}: numpy cannot read it: {exc}") from None
    tree, names, arrays = _tree.flatten(array.view(np.ndarray), root="array")  # not np.memmap
    return Source(dict(zip(names, arrays)), {}, tree)


def _npz_source(path, stack):
    """Each member's header is read first (dtype, shape); its data when the writer reaches it."""
    archive = stack.enter_context(np.load(path, allow_pickle=False))
    if not hasattr(archive, "files"):
        raise HeaderError(f"{path!r}: not an .npz archive (a plain .npy?)")
    members = {info.filename: info for info in archive.zip.infolist()}
    tensors = {}
    for key in archive.files:
        where = f"{path!r}, array {key!r}"
        member = key if key in members else key + ".npy"
        with archive.zip.open(member) as stream:
            shape, dtype = _npy_header(stream, where)
        claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if claimed > members[member].file_size:  # before numpy allocates what the header claims
            raise LayoutError(f"{where}: header claims {claimed} bytes, the member holds "
                              f"{members[member].file_size}")
        tensors[key] = _writer.LazyArray(dtype, shape, lambda key=key: archive[key])
    return Source(tensors)


def _torch_source(path):
    try:
        import torch
    except ImportError as exc:
        raise ImportError(f"{path!r}: reading a torch file needs torch (pip install torch)") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True,
                         mmap=zipfile.is_zipfile(path))
    except torch.serialization.pickle.UnpicklingError as exc:  # safeckpt never imports pickle
        found = re.search(r"WeightsUnpickler error: ([^\n]*)", str(exc))
        reason = found.group(1).split(" Please use", 1)[0].strip() if found else ""
        if "unsupported" not in reason.lower():  # not a refused class or opcode: not a torch file
            raise HeaderError(f"{path!r}: torch cannot read it as a torch.save file: "
                              f"{reason or str(exc).strip()[:200]}") from None
        raise PickleRequiredError(
            f"{path!r}: torch.load(weights_only=True) refused it ({reason}). Loading it needs "
            "full pickle, which runs code from the file; safeckpt never falls back to it. If you "
            "trust the file, load it yourself with torch.load's full unpickling and save its "
            "tensors and plain values with safeckpt.save") from None
    except OSError:
        raise
    except Exception as exc:  # torch raises RuntimeError, KeyError, EOFError... for non-torch bytes
        raise HeaderError(f"{path!r}: torch cannot read it as a torch.save file: "
                          f"{type(exc).__name__}: {exc}") from None
    tree, names, arrays = _tree.flatten(obj, root="checkpoint")
    return Source(dict(zip(names, arrays)), {}, tree)


def _counting(tensors, progress):
    """The tensors, each wrapped so that reaching it reports its bytes to ``progress(done, total)``."""
    if progress is None:
        return tensors
    total = sum(int(a.nbytes) for a in tensors.values())
    done = [0]
    progress(0, total)

    def wrap(array):
        def load():
            value = array.load() if isinstance(array, _writer.LazyArray) else array
            done[0] += int(array.nbytes)
            progress(done[0], total)
            return value
        return _writer.LazyArray(array.dtype, array.shape, load)
    return {name: wrap(array) for name, array in tensors.items()}


def convert(src, dst, *, align=fmt.ALIGN_DEFAULT, checksum=True, progress=None, **limits):
    """Convert ``src`` to ``dst``, each format chosen by the file name (see the module docstring).

    Parameters:
        src: a .sckpt, .safetensors, sharded ``*.index.json``, .npz, .npy or torch file.
        dst: a path ending in ``.sckpt`` or ``.safetensors``; written atomically.
        align, checksum: for a .sckpt destination, as :func:`safeckpt.save_file`.
        progress: called as ``progress(done_bytes, total_bytes)`` as tensors are written.
        limits: reader limits for .sckpt/.safetensors sources (``max_header_size``, ...).

    Returns:
        A :class:`Converted` (number of tensors, tensor bytes).

    Raises:
        ValueError: ``dst`` has no known extension.
        SafeckptError: a bad source (the subclass names the file and tensor), a source that needs
            pickle (:class:`PickleRequiredError`), or a value the destination cannot hold (e.g.
            complex128 in safetensors: :class:`UnsupportedDtypeError`).
        ImportError: a torch source without torch installed.

    Example:
        >>> safeckpt.convert("model.safetensors", "model.sckpt")   # doctest: +SKIP
        Converted(tensors=291, nbytes=2471636992)
    """
    dst = os.fspath(dst)
    out = next((kind for suffix, kind in OUTPUTS.items() if dst.lower().endswith(suffix)), None)
    if out is None:
        raise ValueError(f"{dst!r}: unknown output format; name it *.sckpt or *.safetensors")
    with read_source(src, **limits) as source:
        tensors = _counting(source.tensors, progress)
        if out == "sckpt":
            plan = _writer._Plan(tensors, source.metadata, align, checksum, tree=source.tree)
            _writer._save_plan(plan, dst, True)
        else:
            _sft.save_file(tensors, dst, metadata=source.metadata, tree=source.tree)
        return Converted(len(source.tensors), source.nbytes)
