"""The JAX adapter: pytrees of jax arrays (flax params, optax states, ``nnx.State``) ``save``,
``load`` and ``restore``.

jax is imported when one of these functions first runs, never by ``import safeckpt``
(``pip install "safeckpt[jax]"`` installs it). Any tree :func:`safeckpt.save` takes may hold jax
arrays: bfloat16, float8 and int4 as their bits, typed PRNG keys as their key data and
implementation, weakly typed values marked weak, and the device of an array committed to one
device (FORMAT.md section 8, [R9]-[R11]). ``safeckpt.load(path, framework="jax")`` returns jax
arrays. A pytree with nodes of other classes is saved as plain containers (:func:`to_state`): an
``nnx.State`` (or an nnx module) as its pure dict (``nnx.to_pure_dict``), a flax ``TrainState``
or ``FrozenDict`` and optax's named-tuple states as their flax state dicts
(``flax.serialization.to_state_dict``); the file needs no class to load.

``load(path, target=...)`` and :func:`restore` give back a pytree of the template's exact
structure (its treedef: named tuples, dataclasses, ``nnx.State`` and its Variables, int keys), each
array placed as the template's leaf is: a ``jax.Array``'s sharding, a ``jax.ShapeDtypeStruct``'s
``sharding`` (a sharded template reads only each device's slice of the file, lazily from its
mapping), or, for a ``ShapeDtypeStruct`` without one, the saved device. Everything is checked
first, and every problem listed in one :class:`~safeckpt.StateMismatchError`: keys, shapes,
dtypes, key implementations, and Python scalar leaves (``{"step": 0}`` takes the
file's int, or a 0-d integer array, and refuses anything else). A value is weakly typed when the
file or the template leaf says so. A file of safeckpt <= 1.4 (tuples stored as flax's
``{'0': ..., '1': ...}``) restores into today's templates.

64-bit dtypes (int64, uint64, float64, complex128) load only with ``jax_enable_x64`` on: jax
would otherwise silently make them 32-bit, and a load is bit-exact or refused. ``cast_x64=True``
casts them to their 32-bit twins instead and reports the cast leaves in one ``UserWarning``.

Example:
    >>> import jax, flax.linen as nn, optax, safeckpt.jax as sj         # doctest: +SKIP
    >>> params = nn.Dense(3).init(jax.random.PRNGKey(0), jax.numpy.ones((1, 4)))  # doctest: +SKIP
    >>> sj.save({"params": params, "opt": optax.adam(1e-3).init(params)}, "f.sckpt")  # doctest: +SKIP
    >>> params = sj.load("f.sckpt", prefix="params", target=params)      # doctest: +SKIP
    >>> nnx.update(model, sj.load("m.sckpt", target=nnx.state(model)))   # doctest: +SKIP
"""

from __future__ import annotations

import collections
import sys
import warnings
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from . import api
from . import tree as _tree
from .api import Prefix
from .errors import StateMismatchError
from .filekind import PathLike
# The conversions, public here too: code written against safeckpt.jax keeps working.
from .jax_convert import JaxLeaf, export, from_numpy, is_array, to_jax_values, weakly_typed

__all__ = ["export", "from_numpy", "is_jax_tree", "load", "restore", "restore_tree", "save",
           "to_state"]

# Containers that are saved as they are (the tree codec's own kinds), and that jax flattens too.
_PLAIN = (dict, collections.OrderedDict, list, tuple)
_MAX_DEPTH = 1000  # is_jax_tree and to_state stop there (a container that holds itself)
_LISTED = 20  # problems (and cast leaves) listed in one message; the rest are counted


def _jax() -> Any:
    import jax  # lazily: jax is optional, and `import safeckpt` must not import it
    return jax


def _nnx() -> Any:
    """flax.nnx when something imported it already, else None (never imported here)."""
    return sys.modules.get("flax.nnx")


def _flax_serialization() -> Any:
    """flax.serialization, or None when flax is not installed."""
    try:
        from flax import serialization  # lazily: flax is optional
    except ImportError:
        return None
    return serialization


def _is_node(jax: Any, value: Any) -> bool:
    """Whether jax treats ``value`` as a pytree node (a container, empty ones too), not a leaf."""
    treedef = jax.tree_util.tree_structure(value)
    return not (treedef.num_nodes == 1 and treedef.num_leaves == 1)


def _nnx_kind(value: Any) -> Optional[str]:
    """``"state"``, ``"variable"`` or ``"graph"`` for an nnx State, Variable or graph node
    (module, optimizer, Rngs), else None."""
    nnx = _nnx()
    if nnx is None:
        return None
    if isinstance(value, nnx.State):
        return "state"
    if isinstance(value, nnx.Variable):
        return "variable"
    from flax.nnx import graphlib  # flax.nnx is imported already (above)
    return "graph" if graphlib.is_graph_node(value) else None


def is_jax_tree(obj: Any) -> bool:
    """Whether ``obj`` is a JAX pytree that :func:`restore` should rebuild: it holds a jax array,
    a ``jax.ShapeDtypeStruct``, nnx state, or a pytree node other than dict, list and tuple
    (an optax state, a flax TrainState). jax is never imported here: without it, False.

    :class:`safeckpt.CheckpointManager` restores such a template with :func:`restore_tree`, and
    saves such a state through :func:`to_state`.

    Example:
        >>> is_jax_tree({"w": np.zeros(2), "step": 3})
        False
    """
    jax = sys.modules.get("jax")
    if jax is None:
        return False
    stack: List[Tuple[Any, int]] = [(obj, 0)]
    while stack:
        node, depth = stack.pop()
        if is_array(node) or isinstance(node, jax.ShapeDtypeStruct) or _nnx_kind(node):
            return True
        if type(node) in _PLAIN:
            if depth < _MAX_DEPTH:
                values = node.values() if isinstance(node, dict) else node
                stack.extend((value, depth + 1) for value in values)
        elif node is not None and _is_node(jax, node):
            return True
    return False


def to_state(tree: Any) -> Any:
    """A pytree as plain containers (dict, list, tuple) of arrays and values, as saved.

    dicts, lists and tuples stay what they are; an ``nnx.State``, nnx module or Variable becomes
    its pure dict (``nnx.to_pure_dict``: int keys stay ints); any other pytree node (optax's
    named tuples, a flax TrainState or FrozenDict) its flax state dict (dicts keyed by field).
    Leaves (jax arrays, typed keys, numpy arrays, values) are kept.

    Raises:
        TypeError: a pytree node of another class while flax is not installed.

    Example:
        >>> to_state({"opt": optax.adam(1e-3).init(params)})  # doctest: +SKIP
        {'opt': ({'count': Array(0, dtype=int32), 'mu': {...}, 'nu': {...}}, {})}
    """
    return _state(_jax(), tree, 0)


def _state(jax: Any, node: Any, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise ValueError(f"a pytree deeper than {_MAX_DEPTH} levels (a container that holds "
                         "itself?)")
    kind = type(node)
    if kind in (dict, collections.OrderedDict):
        return kind((key, _state(jax, value, depth + 1)) for key, value in node.items())
    if kind in (list, tuple):
        return kind(_state(jax, value, depth + 1) for value in node)
    nnx_kind = _nnx_kind(node)
    if nnx_kind is not None:
        nnx = _nnx()
        if nnx_kind == "variable":
            return node.get_value()
        return nnx.to_pure_dict(node if nnx_kind == "state" else nnx.state(node))
    if node is None or is_array(node) or not _is_node(jax, node):
        return node
    serialization = _flax_serialization()
    if serialization is None:
        raise TypeError(f"this pytree holds a {type(node).__name__}, a class other than dict, "
                        "list and tuple (e.g. an optax state or a FrozenDict); install flax to "
                        "save it as a state dict, or save plain containers")
    return serialization.to_state_dict(node)


def save(tree: Any, path: PathLike, **options: Any) -> None:
    """Save a pytree of jax arrays (:func:`to_state`); options as :func:`safeckpt.save`.

    Example:
        >>> safeckpt.jax.save({"params": params, "step": 10}, "ckpt.sckpt")  # doctest: +SKIP
        >>> safeckpt.jax.save(nnx.state(model), "model.sckpt")              # doctest: +SKIP
    """
    api.save(to_state(tree), path, **options)


def load(path: PathLike, *, target: Any = None, prefix: Prefix = None, cast_x64: bool = False,
         mmap: bool = True, verify: Optional[bool] = None,
         storage_options: Optional[Dict[str, Any]] = None, fs: Any = None,
         **limits: int) -> Any:
    """Load a pytree saved by :func:`save` (or any file) with jax arrays.

    Parameters:
        target: a template: a pytree of jax arrays or ``jax.ShapeDtypeStruct`` (e.g. from
            ``jax.eval_shape``, with ``sharding``), an ``nnx.State`` (concrete or abstract), an
            optax state, a flax TrainState. The result has its exact structure, its arrays on
            the template leaves' shardings; see :func:`restore`. Without one: the file's
            structure, each array on its saved device or jax's default device.
        prefix: load only the subtree there (``"params"``, or a tuple of exact keys); messages
            name paths from the file's root (``state['a']['b']...`` for a tuple).
        cast_x64: with ``jax_enable_x64`` off, cast 64-bit tensors to their 32-bit twins (one
            ``UserWarning`` lists them) instead of refusing them.
        mmap, verify, storage_options, fs, limits: as :func:`safeckpt.load` (``verify=None``
            checks the CRC32C of tensors read into fresh memory, ``mmap=False``; a mapped load
            stays lazy: a sharded template reads only each device's slice).

    Raises:
        StateMismatchError: with ``target``, lists every missing or unexpected key and every
            shape, dtype, key implementation or scalar kind that differs; nothing is
            returned.
        UnsupportedDtypeError: a 64-bit tensor while ``jax_enable_x64`` is off (and no cast).

    Example:
        >>> params = safeckpt.jax.load("ckpt.sckpt", prefix="params", target=params)  # doctest: +SKIP
        >>> abstract = jax.eval_shape(init_fn)                  # ShapeDtypeStructs, with shardings
        >>> state = safeckpt.jax.load("ckpt.sckpt", target=abstract)                   # doctest: +SKIP
    """
    with api.open(path, mmap=mmap, storage_options=storage_options, fs=fs, **limits) as reader:
        stored = _tree.materialize(reader, _tree.find(reader, prefix), framework="jax",
                                   verify=verify, jax_leaves=True)
    if target is not None:
        return restore_tree(target, stored, cast_x64=cast_x64, where=_where(prefix))
    leaves = _stored_leaves(stored)
    if cast_x64:
        _report_casts(leaves)
    return _rebuild(stored, leaves, to_jax_values(leaves, cast_x64=cast_x64))


def _where(prefix: Prefix) -> str:
    """How messages name the subtree at ``prefix`` of the file's tree (``state['a']['b']``)."""
    if prefix is None:
        return "state"
    if isinstance(prefix, str):  # a dotted prefix: its keys may hold dots, so it is not split
        return f"state at {prefix!r}: subtree"
    return "state" + "".join(_path("", key) for key in prefix)


def restore(target: Any, state: Any, *, cast_x64: bool = False) -> Any:
    """``target``'s structure filled with the arrays and values of ``state`` (as loaded: plain
    containers of jax or numpy arrays and values); see :func:`restore_tree`. With
    ``cast_x64=True`` numpy values given here are cast and reported as stored tensors are; a
    typed key's uint32 key data (what a numpy load gives) are wrapped with the template's
    implementation.

    Example:
        >>> state = safeckpt.jax.restore(train_state, safeckpt.load("ckpt.sckpt"))  # doctest: +SKIP
    """
    return restore_tree(target, state, cast_x64=cast_x64)


class _Slot:
    """Stands for template leaf ``index`` while the template is turned into its saved layout."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


_MISSING = object()  # a template leaf that the file lacks


def restore_tree(target: Any, stored: Any, *, cast_x64: bool = False,
                 where: str = "state") -> Any:
    """``target``'s pytree (its treedef) with the values of ``stored``, checked first.

    A tuple or list of ``n`` items also takes a dict with exactly the keys ``'0'`` ..
    ``str(n - 1)`` (flax's state dict of a tuple: how safeckpt <= 1.4 saved optax chains, and how
    a tuple inside a TrainState is saved), and such a dict in the template takes a tuple.

    ``stored`` is what was saved, as plain containers: :class:`~safeckpt.jax_convert.JaxLeaf`
    values (``materialize(..., jax_leaves=True)``: nothing read yet), or jax or numpy arrays,
    and values. Each template leaf says what its value becomes:

    - a ``jax.Array`` or ``jax.ShapeDtypeStruct`` (a typed key too): a jax array of its shape,
      dtype and key implementation, on its ``sharding`` (a sharded one reads only each device's
      slice); a ``jax.Array`` not committed to a device: jax's default device, not committed; a
      ``ShapeDtypeStruct`` without sharding: the saved device, else jax's default device. It is
      weakly typed when it was saved weak [R9] or the template's ``weak_type`` is true (a file
      without weak nodes, e.g. of safeckpt <= 1.4 or numpy, into a template from
      ``jax.eval_shape``: arithmetic promotes as before). A 0-d one takes a Python or numpy
      scalar of its kind (bool, integer, floating) that its dtype holds exactly (a TrainState's
      ``step=0`` saved before the first jitted step); a typed key one takes uint32 key data
      ``(*shape, n)`` (a numpy load's), wrapped with the template's implementation (the data do
      not say which; the template does);
    - a numpy array: a numpy array of its shape and dtype;
    - a Python bool, int, float, complex or str: the file's value, which must be of that kind
      (a numpy scalar or 0-d array of that kind too: a TrainState's ``step`` is ``0`` when
      created and an int32 array after a jitted step); anything else: a value of its type.

    Parameters:
        cast_x64: with ``jax_enable_x64`` off, 64-bit tensors are cast to 32 bits (reported in
            one ``UserWarning`` listing those cast, numpy values given to restore() too; a leaf
            whose template is a numpy array stays 64-bit and is not listed) instead of refused.
        where: how messages name the stored tree.

    Raises:
        StateMismatchError: every problem at once: missing and unexpected keys, shapes, dtypes,
            key implementations, scalar kinds, scalars a 0-d template's dtype does not hold.
            Nothing is read before it passes.
        HeaderError: key data that are not uint32 [R10] (never cast).

    Example:
        >>> state = restore_tree(nnx.state(model), stored)     # doctest: +SKIP
        >>> nnx.update(model, state)                           # doctest: +SKIP
    """
    jax = _jax()
    leaves, treedef = jax.tree_util.tree_flatten(target)
    layout = to_state(jax.tree_util.tree_unflatten(treedef, [_Slot(i) for i in range(len(leaves))]))
    found: List[Any] = [_MISSING] * len(leaves)
    names: List[str] = [where] * len(leaves)
    problems: List[str] = []
    _match(layout, stored, where, found, names, problems)
    plans = [_plan(jax, leaf, value, name, cast_x64, problems)
             for leaf, value, name in zip(leaves, found, names) if value is not _MISSING]
    if problems:
        shown = problems[:_LISTED] + ([f"and {len(problems) - _LISTED} more"]
                                      if len(problems) > _LISTED else [])
        raise StateMismatchError(f"{where} does not fit the target ({len(problems)} problems): "
                                 + "; ".join(shown))
    if cast_x64:  # what _finish casts: stored values that become jax arrays (not numpy ones)
        _report_casts(list({id(plan.value): plan.value for plan in plans
                            if plan.kind != "numpy" and isinstance(plan.value, JaxLeaf)}.values()))
    return jax.tree_util.tree_unflatten(treedef, [_finish(jax, plan, cast_x64) for plan in plans])


def _path(where: str, key: Any) -> str:
    return f"{where}[{key!r}]"


def _match(layout: Any, stored: Any, where: str, found: List[Any], names: List[str],
           problems: List[str]) -> None:
    """Pair each slot of ``layout`` (the template as saved) with the value at its place in
    ``stored``; list what is missing, unexpected or of another kind of container."""
    if isinstance(layout, _Slot):
        found[layout.index], names[layout.index] = stored, where
        return
    if layout is None:
        if stored is not None:
            problems.append(f"{where}: file has {_kind(stored)}, target None")
        return
    if isinstance(layout, dict) and isinstance(stored, (list, tuple)) and _is_index_dict(
            layout, len(stored)):
        stored = {str(index): item for index, item in enumerate(stored)}  # a tuple, as saved 1.5
    if isinstance(layout, (list, tuple)) and isinstance(stored, dict) and _is_index_dict(
            stored, len(layout)):
        # flax's state dict of a tuple ({'0': ..., '1': ...}): how safeckpt <= 1.4 saved every
        # tuple, and how a tuple inside a TrainState or another flax struct is saved
        for index, value in enumerate(layout):
            key = str(index)
            _match(value, stored[key], _path(where, key), found, names, problems)
        return
    if isinstance(layout, dict):
        if not isinstance(stored, dict):
            problems.append(f"{where}: file has {_kind(stored)}, target a dict")
            return
        for key, value in layout.items():
            if key in stored:
                _match(value, stored[key], _path(where, key), found, names, problems)
            else:
                problems.append(f"missing {_path(where, key)}")
        problems.extend(f"unexpected {_path(where, key)}" for key in stored if key not in layout)
        return
    if isinstance(layout, (list, tuple)):
        if not isinstance(stored, (list, tuple)) or len(stored) != len(layout):
            problems.append(f"{where}: file has {_kind(stored)}, target a {type(layout).__name__}"
                            f" of {len(layout)} items")
            return
        for index, (value, item) in enumerate(zip(layout, stored)):
            _match(value, item, _path(where, index), found, names, problems)
        return
    problems.append(f"{where}: a template node of type {type(layout).__name__} that is not "
                    "saved as dict, list or tuple")


def _is_index_dict(node: Dict[Any, Any], length: int) -> bool:
    """Whether ``node``'s keys are exactly the strs ``'0'`` .. ``str(length - 1)``."""
    return len(node) == length and all(str(index) in node for index in range(length))


def _kind(value: Any) -> str:
    """``(2, 3) float32`` for an array (jax, numpy or JaxLeaf), else ``an int``, ``a dict``."""
    if isinstance(value, JaxLeaf) or is_array(value) or isinstance(value, np.ndarray):
        return f"{tuple(value.shape)} {value.dtype}"
    name = type(value).__name__
    return ("an " if name[:1].lower() in "aeiou" else "a ") + name


_SCALAR_KINDS = {bool: "b", int: "iu", float: "f", complex: "c"}  # numpy dtype kinds of each
_UNCOMMITTED = object()  # _Plan.sharding of an uncommitted jax array template: jax's default


class _Plan(NamedTuple):
    """What :func:`_finish` turns into a restored leaf."""

    value: Any  # a JaxLeaf (numpy values given to restore() wrapped too), a jax array, a value
    kind: str  # "jax", "numpy" or "value"
    sharding: Any = None  # kind "jax": a Sharding or Device, _UNCOMMITTED, or None (saved device)
    weak: bool = False  # kind "jax": the template's weak_type (the result is weak if either is)


def _plan(jax: Any, template: Any, value: Any, name: str, cast_x64: bool,
          problems: List[str]) -> _Plan:
    """What ``_finish`` turns into the restored leaf; appends a problem when ``value`` does not
    fit ``template``."""
    if isinstance(template, jax.ShapeDtypeStruct) or is_array(template):
        value = _as_stored(jax, template, value, name, problems)
        _check_array(jax, template, value, name, cast_x64, problems)
        sharding = getattr(template, "sharding", None)
        if is_array(template) and not template.committed:
            sharding = _UNCOMMITTED  # a fresh array on jax's default device, as the template
        return _Plan(value, "jax", sharding, bool(getattr(template, "weak_type", False)))
    if isinstance(template, np.ndarray):
        if not _is_arraylike(value) or _is_key(jax, value.dtype) or (
                tuple(value.shape), np.dtype(value.dtype)) != (template.shape, template.dtype):
            problems.append(f"{name}: file has {_kind(value)}, target {_kind(template)}")
        return _Plan(value, "numpy")
    kinds = _SCALAR_KINDS.get(type(template))
    if kinds is not None or type(template) is str:
        if type(value) is type(template) or (kinds is not None and _scalar_of_kind(jax, value, kinds)):
            return _Plan(value, "value")
        problems.append(f"{name}: file has {_kind(value)}, target {_kind(template)} (the file's "
                        "value replaces a Python scalar of the template only if it is of its kind)")
        return _Plan(value, "value")
    if isinstance(template, np.generic):
        if not (isinstance(value, np.generic) and value.dtype == template.dtype):
            problems.append(f"{name}: file has {_kind(value)}, target a {template.dtype} scalar")
        return _Plan(value, "value")
    if type(value) is not type(template):
        problems.append(f"{name}: file has {_kind(value)}, target {_kind(template)}")
    return _Plan(value, "value")


def _as_stored(jax: Any, template: Any, value: Any, name: str, problems: List[str]) -> Any:
    """``value`` for an array template as a JaxLeaf where it is not one yet: a numpy array given
    to restore(); uint32 key data ``(*shape, n)`` for a key template (a numpy load of a key, or
    key data saved as such), wrapped with the template's implementation; a Python or numpy scalar
    for a 0-d template, of its kind and held exactly by its dtype. Anything else is returned
    as it is (and checked by ``_check_array``)."""
    if _is_key(jax, template.dtype):
        if isinstance(value, JaxLeaf) and value.key_impl is not None:
            return value
        if isinstance(value, (JaxLeaf, np.ndarray)) and value.dtype == np.uint32:
            impl: List[Any] = []

            def key_data(key: Any) -> Any:  # the impl of an abstract key, its data's shape
                impl.append(jax.random.key_impl(key))
                return jax.random.key_data(key)

            data = jax.eval_shape(key_data, template)
            array = value.array if isinstance(value, JaxLeaf) else value
            if tuple(array.shape) == tuple(data.shape) and type(impl[0]) is str:
                return JaxLeaf(array, name, key_impl=impl[0])
        return value
    if isinstance(value, np.ndarray):
        return JaxLeaf(value, name)  # placed, checked and cast as a stored tensor is
    scalar = type(value) in _SCALAR_KINDS or isinstance(value, np.generic)
    if not scalar or tuple(template.shape) != ():
        return value
    dtype = np.dtype(template.dtype)
    given = np.asarray(value)  # a Python int: int64 (object for a larger one: refused below)
    if _numeric_kind(jax, given.dtype) != _numeric_kind(jax, dtype):
        return value  # refused by _check_array, naming both
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a value out of range: refused just below
        held = given.astype(dtype)
        back = held.astype(given.dtype)
    if back.tobytes() == given.tobytes() or (given.dtype.kind == "f" and np.isnan(given)):
        return JaxLeaf(held, name)
    problems.append(f"{name}: file has {_kind(value)} {value!r}, which a {dtype} array does not "
                    "hold exactly")
    return JaxLeaf(held, name)  # one problem listed for it (nothing is returned)


def _numeric_kind(jax: Any, dtype: Any) -> str:
    """``"f"`` (bfloat16 and float8 too), ``"i"`` (signed or not), ``"b"``, ``"c"``, or numpy's
    kind of ``dtype``."""
    if jax.numpy.issubdtype(dtype, jax.numpy.floating):
        return "f"
    kind = np.dtype(dtype).kind
    return "i" if kind == "u" else kind


def _is_arraylike(value: Any) -> bool:
    return isinstance(value, (JaxLeaf, np.ndarray)) or is_array(value)


def _is_key(jax: Any, dtype: Any) -> bool:
    return bool(jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key))


def _scalar_of_kind(jax: Any, value: Any, kinds: str) -> bool:
    """A numpy scalar or a 0-d array (jax, numpy, stored) of a dtype of numpy kind ``kinds``."""
    if not (isinstance(value, np.generic) or (_is_arraylike(value) and value.shape == ())):
        return False
    dtype = value.dtype
    if _is_key(jax, dtype):
        return False
    if "f" in kinds and jax.numpy.issubdtype(dtype, jax.numpy.floating):
        return True  # bfloat16 and float8 too (numpy kind "V")
    return np.dtype(dtype).kind in kinds


def _check_array(jax: Any, template: Any, value: Any, name: str, cast_x64: bool,
                 problems: List[str]) -> None:
    """Append a problem for each way a stored array differs from a template leaf."""
    if not _is_arraylike(value):
        problems.append(f"{name}: file has {_kind(value)}, target {_kind(template)}")
        return
    dtype = value.dtype
    wide = not _is_key(jax, dtype) and jax.dtypes.canonicalize_dtype(dtype) != dtype
    if wide and cast_x64:
        dtype = jax.dtypes.canonicalize_dtype(dtype)  # what the cast gives
    want, got = (tuple(template.shape), template.dtype), (tuple(value.shape), dtype)
    if want != got:
        hint = ""
        if wide and not cast_x64:
            hint = (" (64-bit types are off in jax: enable them, or pass cast_x64=True to cast "
                    "them, reported)")
        if isinstance(value, JaxLeaf) and value.key_impl and _is_key(jax, template.dtype):
            hint = f" (a key of implementation {value.key_impl!r})"
        problems.append(f"{name}: file has {got[0]} {value.dtype}, target {want[0]} {want[1]}"
                        + hint)
    # weak_type is not compared: the value is weak if saved weak [R9] or the template is weak
    # (ShapeDtypeStructs made from shapes and dtypes, orbax's included, say weak_type=False)


def _report_casts(leaves: Sequence[JaxLeaf]) -> None:
    """One UserWarning naming every stored 64-bit leaf that a load with ``cast_x64`` casts."""
    jax = _jax()
    cast = [f"{leaf.name!r} ({leaf.array.dtype})" for leaf in leaves
            if leaf.key_impl is None
            and jax.dtypes.canonicalize_dtype(leaf.array.dtype) != leaf.array.dtype]
    if cast:
        shown = cast[:_LISTED] + ([f"and {len(cast) - _LISTED} more"] if len(cast) > _LISTED else [])
        warnings.warn(f"cast_x64=True: {len(cast)} 64-bit tensors were cast to 32 bits, since "
                      f"jax_enable_x64 is off: {', '.join(shown)}", UserWarning, stacklevel=3)


def _finish(jax: Any, plan: _Plan, cast_x64: bool) -> Any:
    """The restored leaf: ``plan.value`` converted as :func:`_plan` said."""
    value, sharding = plan.value, plan.sharding
    if plan.kind == "numpy":
        return np.asarray(value.array if isinstance(value, JaxLeaf) else value)
    if isinstance(value, JaxLeaf):
        if sharding is _UNCOMMITTED or (plan.weak and not value.weak):
            value = JaxLeaf(value.array, value.name, weak=value.weak or plan.weak,
                            key_impl=value.key_impl,
                            device=None if sharding is _UNCOMMITTED else value.device)
        return value.to_jax(sharding=None if sharding is _UNCOMMITTED else sharding,
                            cast_x64=cast_x64)
    if plan.kind == "jax" and is_array(value):
        if sharding is not None and sharding is not _UNCOMMITTED and value.sharding != sharding:
            value = jax.device_put(value, sharding)
        if plan.weak and not value.weak_type:
            value = weakly_typed(value)
    return value


def _stored_leaves(stored: Any) -> List[JaxLeaf]:
    """The distinct JaxLeaf values of a stored tree (a tied tensor once), and the tree."""
    seen: Dict[int, JaxLeaf] = {}
    stack = [stored]
    while stack:
        node = stack.pop()
        if isinstance(node, JaxLeaf):
            seen.setdefault(id(node), node)
        elif isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return list(seen.values())


def _rebuild(tree: Any, leaves: List[JaxLeaf], values: List[Any]) -> Any:
    """``tree`` with each JaxLeaf replaced by its value (a tied one by the same jax array)."""
    by_id = {id(leaf): value for leaf, value in zip(leaves, values)}

    def build(node: Any) -> Any:
        if isinstance(node, JaxLeaf):
            return by_id[id(node)]
        if isinstance(node, dict):
            return type(node)((key, build(value)) for key, value in node.items())
        if isinstance(node, (list, tuple)):
            return type(node)(build(value) for value in node)
        return node

    return build(tree)
