"""The JAX adapter: pytrees of jax arrays (flax params, optax states) ``save`` and ``load``.

jax is imported when one of these functions first runs, never by ``import safeckpt``
(``pip install "safeckpt[jax]"`` installs it). Any tree :func:`safeckpt.save` takes may hold jax
arrays (they are written from host memory, bfloat16 and float8 as their bits), and
``safeckpt.load(path, framework="jax")`` returns jax arrays. A pytree with nodes of other classes
(flax ``FrozenDict`` and ``TrainState``, optax's named-tuple states) is saved as its flax state
dict (``flax.serialization.to_state_dict``, when flax is installed): plain dicts of arrays and
values, so the file needs no class to load. ``load(path, target=...)`` puts the arrays back into a
template of that shape, checking every key, shape and dtype first.

64-bit dtypes (int64, uint64, float64, complex128) load only with ``jax_enable_x64`` on: jax
would otherwise silently make them 32-bit, and a load is bit-exact or refused.

Example:
    >>> import jax, flax.linen as nn, optax, safeckpt.jax as sj         # doctest: +SKIP
    >>> params = nn.Dense(3).init(jax.random.PRNGKey(0), jax.numpy.ones((1, 4)))  # doctest: +SKIP
    >>> sj.save({"params": params, "opt": optax.adam(1e-3).init(params)}, "f.sckpt")  # doctest: +SKIP
    >>> params = sj.load("f.sckpt", prefix="params")                      # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from . import api, jax_convert
from .api import Prefix
from .errors import StateMismatchError
from .filekind import PathLike
# The conversions, public here too: code written against safeckpt.jax keeps working.
from .jax_convert import export, from_numpy

__all__ = ["export", "from_numpy", "load", "restore", "save", "to_state"]

_PLAIN = (dict, list, tuple, type(None))


def _jax() -> Any:
    import jax  # lazily: jax is optional, and `import safeckpt` must not import it
    return jax


def _flax_serialization() -> Any:
    """flax.serialization, or None when flax is not installed."""
    try:
        from flax import serialization  # lazily: flax is optional
    except ImportError:
        return None
    return serialization


def to_state(tree: Any) -> Any:
    """A pytree as plain containers: itself when it has no other node classes, else its flax
    state dict (named tuples and dataclasses become dicts keyed by field)."""
    jax = _jax()
    plain = all(type(node) in _PLAIN or jax_convert.is_array(node) or not _is_node(jax, node)
                for node in _walk(tree))
    if plain:
        return tree
    serialization = _flax_serialization()
    if serialization is None:
        raise TypeError("this pytree holds classes other than dict, list and tuple (e.g. optax "
                        "states or a FrozenDict); install flax to save them as state dicts, or "
                        "save plain containers")
    return serialization.to_state_dict(tree)


def _is_node(jax: Any, value: Any) -> bool:
    """Whether jax treats ``value`` as a pytree node (a container), not a leaf."""
    return not jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(value))


def _walk(tree: Any) -> Iterator[Any]:
    """Every container and leaf of plain containers, without recursion (stops at other nodes)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if type(node) is dict:
            stack.extend(node.values())
        elif type(node) in (list, tuple):
            stack.extend(node)


def save(tree: Any, path: PathLike, **options: Any) -> None:
    """Save a pytree of jax arrays; options as :func:`safeckpt.save` (metadata, align, ...).

    Example:
        >>> safeckpt.jax.save({"params": params, "step": 10}, "ckpt.sckpt")  # doctest: +SKIP
    """
    api.save(to_state(tree), path, **options)


def load(path: PathLike, *, target: Any = None, prefix: Prefix = None, mmap: bool = True,
         verify: Optional[bool] = None, storage_options: Optional[Dict[str, Any]] = None,
         fs: Any = None, **limits: int) -> Any:
    """Load a pytree saved by :func:`save` (or any file) with jax arrays.

    Parameters:
        target: a pytree of the expected shape (e.g. freshly initialised params, or an optax
            state): the loaded arrays are put into it, its classes kept; every key, shape and
            dtype is checked first.
        prefix, mmap, verify, storage_options, fs, limits: as :func:`safeckpt.load` (``verify=None`` checks the
            CRC32C of tensors read into fresh memory, ``mmap=False``; a mapped load stays lazy).

    Raises:
        StateMismatchError: with ``target``, lists every missing or unexpected key and every
            shape or dtype that differs; nothing is returned.
        UnsupportedDtypeError: a 64-bit tensor while ``jax_enable_x64`` is off.

    Example:
        >>> params = safeckpt.jax.load("ckpt.sckpt", prefix="params", target=params)  # doctest: +SKIP
    """
    state = api.load(path, prefix=prefix, framework="jax", mmap=mmap, verify=verify,
                     storage_options=storage_options, fs=fs, **limits)
    if target is None:
        return state
    return restore(target, state)


def restore(target: Any, state: Any) -> Any:
    """Put the arrays of ``state`` (plain containers) into ``target``'s structure; see :func:`load`."""
    jax = _jax()
    template = to_state(target)
    expected = dict(_leaves(jax, template))
    found = dict(_leaves(jax, state))
    problems = [f"missing {key}" for key in expected if key not in found]
    problems += [f"unexpected {key}" for key in found if key not in expected]
    for key, leaf in expected.items():
        if key in found and hasattr(leaf, "shape") and hasattr(found[key], "shape"):
            want = (tuple(leaf.shape), np.dtype(leaf.dtype))
            got = (tuple(found[key].shape), np.dtype(found[key].dtype))
            if want != got:
                problems.append(f"{key}: file has {got[0]} {got[1]}, target {want[0]} {want[1]}")
    if problems:
        raise StateMismatchError(f"the loaded state does not fit the target ({len(problems)} "
                                 "problems): " + "; ".join(problems[:20]))
    if template is target:
        leaves = [found[key] for key, _ in _leaves(jax, target)]
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), leaves)
    return _flax_serialization().from_state_dict(target, state)


def _leaves(jax: Any, tree: Any) -> List[Tuple[str, Any]]:
    """``(key path string, leaf)`` for every leaf of a pytree."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in flat]
