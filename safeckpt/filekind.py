"""What a file's name says it holds: the one table of names that reading, saving and
converting share.

A save chooses its format by the name (``*.safetensors`` or a .sckpt file), refuses the names of
formats safeckpt reads but never writes (a file named ``*.pt`` would be taken for a torch file by
``torch.load``, ``numpy.load`` and :func:`safeckpt.convert`), and ``convert`` picks its reader by
the name of its source.

Example:
    >>> from safeckpt import filekind
    >>> filekind.kind_of("model.pt"), filekind.output_format("model.safetensors")
    ('torch', ('model.safetensors', 'safetensors'))
"""

from __future__ import annotations

import errno
import os
from typing import Optional, Tuple, Union

from .errors import InvalidValueError

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")  # what torch.save files are usually named
INDEX_SUFFIX = ".index.json"  # a Hugging Face index of .safetensors shards
OUTPUTS = {".sckpt": "sckpt", ".safetensors": "safetensors"}  # the formats safeckpt writes

PathLike = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]


def kind_of(path: PathLike) -> str:
    """The source kind of a path, from its name: ``index``, ``npz``, ``npy``, ``torch`` or ``file``.

    Example: ``kind_of("a/model.safetensors.index.json")`` is ``"index"``.
    """
    name = os.fsdecode(path).lower()
    if name.endswith(INDEX_SUFFIX):
        return "index"
    if name.endswith(".npz"):
        return "npz"
    if name.endswith(".npy"):
        return "npy"
    if name.endswith(TORCH_SUFFIXES):
        return "torch"
    return "file"


def output_format(path: PathLike, *, sharded: bool = False) -> Tuple[str, Optional[str]]:
    """``(path as a str, format)`` for a save: ``"safetensors"``, ``"sckpt"``, or ``None`` for
    another name (a .sckpt file is written) [W5]. ``sharded``: the save writes .sckpt shards or a
    .sckpt shard index (FORMAT.md section 9).

    Raises:
        TypeError: ``path`` is not a str, bytes or os.PathLike.
        InvalidValueError: the name of a format safeckpt reads but never writes (an index
            ``*.index.json`` is written beside its shards, never as a save's path), or
            ``*.safetensors`` with ``sharded`` (a .sckpt shard or index).
        IsADirectoryError: the path ends with a separator.

    Example: ``output_format("w.pt")`` raises InvalidValueError; name it ``w.sckpt``.
    """
    try:
        text = os.fsdecode(path)
    except TypeError:
        raise TypeError(f"path must be a str, bytes or os.PathLike, not {type(path).__name__} "
                        "(safeckpt.save_bytes returns the file as bytes)") from None
    if not os.path.basename(text):
        raise IsADirectoryError(errno.EISDIR, "cannot save: the path names a directory", text)
    name = text.lower()
    if kind_of(name) == "index":  # the index of Hugging Face shards is written beside them
        raise InvalidValueError(f"{text!r}: safeckpt writes a {INDEX_SUFFIX} index only beside the "
                                "shards it names; name it after the model (e.g. "
                                "'model.safetensors') and pass max_shard_size=..., which writes "
                                f"'model.safetensors{INDEX_SUFFIX}' when there is more than one shard")
    if kind_of(name) != "file":
        ext = os.path.splitext(name)[1]
        raise InvalidValueError(f"{text!r}: safeckpt does not write {ext} files, and a file named "
                                "so would be taken for one; name it *.sckpt or *.safetensors")
    kind = next((kind for suffix, kind in OUTPUTS.items() if name.endswith(suffix)), None)
    if sharded and kind == "safetensors":
        raise InvalidValueError(f"{text!r}: .sckpt shards and their .sckpt index (FORMAT.md "
                                "section 9) are never written under a .safetensors name; name it "
                                "*.sckpt (safeckpt.save/save_file with max_shard_size= write "
                                "Hugging Face shards to a *.safetensors name)")
    return text, kind
