"""safeckpt: pickle-free, checksummed, zero-copy files for machine-learning state.

Example:
    >>> import numpy as np, safeckpt
    >>> data = safeckpt.save_bytes({"w": np.arange(4, dtype=np.float32)}, metadata={"step": 7})
    >>> safeckpt.load_bytes(data)["w"]
    array([0., 1., 2., 3.], dtype=float32)

``safeckpt.backend`` is ``"c"`` when the C core is in use, ``"python"`` for the fallback.

This module only re-exports: the entry points live in :mod:`safeckpt.api`, and docs/ARCHITECTURE.md
shows the layers below them.
"""

from ._backend import NAME as backend
from .errors import (
    ChecksumError,
    CommitError,
    HeaderError,
    InvalidValueError,
    LayoutError,
    LimitError,
    NotSafeckptError,
    ObjectChangedError,
    PickleRequiredError,
    ReaderClosedError,
    RefError,
    RemoteError,
    SafeckptError,
    ShardError,
    StateMismatchError,
    TruncatedFileError,
    UnsupportedDtypeError,
    UnsupportedVersionError,
)
from .api import consolidate, load, load_bytes, load_file, open, save, save_bytes, save_file
from .reader import Reader, TensorInfo, TensorSlice
from .tree import Subtree
from .shard import ShardedReader
from .refs import LinkedReader
from .checkpoint import load_checkpoint, save_checkpoint
from .manager import CheckpointManager
from . import torch  # the public torch module; torch itself is imported only when it is used
from . import jax  # likewise: jax is imported only when it is used
from .interop import convert
from .safetensors_compat import safe_open
from .async_save import AsyncSaver

from . import _version

__version__ = _version.__version__

__all__ = [
    "ChecksumError", "HeaderError", "InvalidValueError", "LayoutError", "LimitError",
    "NotSafeckptError", "ReaderClosedError", "SafeckptError", "TruncatedFileError",
    "UnsupportedDtypeError", "UnsupportedVersionError", "Reader", "TensorInfo", "TensorSlice",
    "backend", "load_bytes", "load_file", "open", "save_bytes", "save_file",
    "ShardError", "ShardedReader", "StateMismatchError", "Subtree", "load", "save", "torch",
    "CheckpointManager", "load_checkpoint", "save_checkpoint",
    "PickleRequiredError", "convert", "jax",
    "safe_open", "AsyncSaver",
    "RefError", "LinkedReader", "consolidate",
    "RemoteError", "ObjectChangedError", "CommitError",
]
