"""jax arrays to and from the format: the conversions that the layers above share.

The public functions are in :mod:`safeckpt.jax`; this module is what ``safeckpt.tree`` uses to
save and load jax arrays. jax is imported lazily, inside :func:`from_numpy`, never by
``import safeckpt``; :func:`is_array` never imports it.

Example:
    >>> array, identity = export(jax.numpy.ones(3), "obj['w']")  # doctest: +SKIP
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Optional, Tuple

import numpy as np

from .errors import UnsupportedDtypeError, quote

if TYPE_CHECKING:  # jax is optional: its types are for the checker only
    import jax


def _jax() -> Any:
    import jax  # lazily: jax is optional, and `import safeckpt` must not import it
    return jax


def is_array(value: object) -> bool:
    """Whether ``value`` is a jax.Array; jax is never imported here (no jax loaded: no).

    Example:
        >>> is_array(np.zeros(2))
        False
    """
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(value, jax.Array)


def export(array: jax.Array, where: str) -> Tuple[np.ndarray, Optional[tuple]]:
    """``(numpy array, identity)`` of a jax array being saved: host memory (a view on CPU).

    ``identity`` is the same for the same jax.Array twice (stored once), ``None`` when empty.
    ``where`` names the value in messages, as for :func:`safeckpt.torch_convert.export`.

    Example:
        >>> host, identity = export(jax.numpy.arange(3), "obj['w']")  # doctest: +SKIP
    """
    host = np.asarray(array)
    identity = ("jax", id(array)) if host.size else None
    return host, identity


def from_numpy(array: np.ndarray, name: str) -> jax.Array:
    """A jax array of a loaded numpy array, refusing a dtype jax would change (64-bit without x64).

    Raises:
        UnsupportedDtypeError: naming the tensor and the fix.

    Example:
        >>> from_numpy(np.ones(2, np.float32), "w")                  # doctest: +SKIP
        Array([1., 1.], dtype=float32)
    """
    jax = _jax()
    if jax.dtypes.canonicalize_dtype(array.dtype) != array.dtype:
        raise UnsupportedDtypeError(
            f"tensor {quote(name)} is {array.dtype}, which jax would silently turn into "
            f"{jax.dtypes.canonicalize_dtype(array.dtype)}; enable 64-bit types first "
            "(jax.config.update('jax_enable_x64', True)) or load with framework='numpy'")
    return jax.numpy.asarray(array)
