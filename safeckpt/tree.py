"""The tree codec (FORMAT.md section 8): nested state <-> flat tensors plus a skeleton.

A tree of dicts, lists and tuples with arrays and plain values at its leaves is stored as a flat
tensor table (readable by any .sckpt reader: ``open(path).keys()`` lists ``"model.layers.0.weight"``)
plus the skeleton, a msgpack value under the header key ``"tree"``, whose tensor leaves point into
the table by index. Nothing is ever pickled: any other class is refused at save time, naming where
it was found.

This module encodes (:func:`flatten`), validates (:func:`check_tree`) and decodes (:func:`find`,
:func:`view`, :func:`materialize`) the skeleton; it reads tensors only through the reader
protocol of :class:`safeckpt.reader.TensorMap` and never imports the reader. The public
``save``/``load`` are in :mod:`safeckpt.api`.

Example:
    >>> import collections, numpy as np, safeckpt, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "s.sckpt")
    >>> w = np.ones((2, 2), np.float32)
    >>> state = {"model": collections.OrderedDict(w=w, tied=w), "step": 7, "betas": (0.9, 0.999)}
    >>> safeckpt.save(state, path)
    >>> safeckpt.open(path).keys()
    ['model.w']
    >>> back = safeckpt.load(path)
    >>> back["betas"], back["model"]["tied"] is back["model"]["w"]
    ((0.9, 0.999), True)
"""

from __future__ import annotations

import collections
import itertools
import re
from typing import (Any, Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Set, Tuple,
                    Union, cast)

import numpy as np

from . import format as fmt
from . import jax_convert, packing, torch_convert, writer
from .dtypes import BITS_BY_CODE, DTYPE_BY_CODE, code_of, is_little_endian
from .errors import HeaderError, InvalidValueError, LimitError, quote

# Node tags (FORMAT.md section 8, [R2]). Containers hold children; the others are leaves.
LIST, TUPLE, DICT, ODICT = "list", "tuple", "dict", "odict"
TENSOR, REF, SCALAR = "tensor", "ref", "scalar"
WEAK, KEY = "weak", "key"  # jax wrappers of one tensor, ref (or, for weak, scalar) node [R9] [R10]
CONTAINERS = frozenset((LIST, TUPLE, DICT, ODICT))
WRAPPERS = frozenset((WEAK, KEY))
# allowed lengths of each leaf node; a wrapper's child is its last item
_LEAF_ARITY = {TENSOR: (2, 3), REF: (2,), SCALAR: (3,), WEAK: (2,), KEY: (3,)}
_WRAPPED = {WEAK: (TENSOR, REF, SCALAR), KEY: (TENSOR, REF)}  # the child tags each wrapper takes
_RULE = {WEAK: "[R9]", KEY: "[R10]"}
# The lowest minor version that holds a tree (its scalar codes and node kinds): in the writer,
# which is below this module and needs it, and public here.
tree_minor = writer.tree_minor
ROOT_NAME = "_"  # the flat name of a tensor that is the whole tree [R7]
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1
_PRIMITIVES = (type(None), bool, int, float, str, bytes)
_FRAMEWORKS = (None, "numpy", "torch", "jax")
Key = Union[str, int]  # a dict key, or an index into a list or tuple


class TreeReader(Protocol):
    """What this module uses of a reader (the reader protocol of
    :class:`safeckpt.reader.TensorMap`, which it never imports)."""

    where: str

    @property
    def names(self) -> List[str]: ...
    @property
    def skeleton(self) -> Any: ...
    @property
    def subtree_cache(self) -> Dict[int, Any]: ...
    def check_open(self) -> List[str]: ...
    def locate(self, i: int) -> Tuple[Any, int]: ...
    def load_indices(self, indices: Sequence[int],
                     verify: Optional[bool] = None) -> List[np.ndarray]: ...


# -- save side: nested -> (skeleton, names, arrays) ------------------------------------------------

def _describe(root: str, path: Sequence[Key]) -> str:
    """``state['model'][0]``: the Python expression that reaches a value, for messages."""
    return fmt.path_of(root, path)


class _Where:
    """The path of a value, spelled out (by :func:`_describe`) only when a message uses it.

    Passed as ``where`` to the framework adapters and :func:`code_of`, which use it only in
    f-strings (``{where}``, ``{where!r}``): a save of many tensors builds no path string unless
    something fails, and the message reads exactly as with the string.
    """

    __slots__ = ("_root", "_path")

    def __init__(self, root: str, path: Tuple[Key, ...]) -> None:
        self._root, self._path = root, path

    def __str__(self) -> str:
        return _describe(self._root, self._path)

    def __repr__(self) -> str:
        return repr(str(self))

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def _where(root: str, path: Tuple[Key, ...]) -> str:
    """A :class:`_Where` typed as the str it stands for (the adapters only format it)."""
    return cast(str, _Where(root, path))


def flatten(obj: Any, *, root: str = "obj", max_depth: int = fmt.MAX_DEPTH
            ) -> Tuple[Any, List[str], List[Any]]:
    """Split ``obj`` into ``(tree, names, arrays)``: its skeleton [R1-R6], tensor names [R7] and data.

    ``tree`` is ``format.NO_TREE`` when ``obj`` is a plain dict of str -> array whose keys are the names
    (such a file is version 1.0, and loads back the same). ``arrays`` hold numpy arrays or
    :class:`safeckpt.writer.LazyArray` (a GPU tensor copied to host when written).

    Raises:
        InvalidValueError: a value of a class safeckpt does not store, an int beyond the int64 and
            uint64 ranges, or a dict key that is not a str or int; the message names its path,
            e.g. ``state['scheduler']``.
        UnsupportedDtypeError: an array of a dtype the format cannot hold.
        LimitError: nesting deeper than ``max_depth`` (or a container that holds itself).
    """
    names: List[str] = []
    arrays: List[Any] = []
    taken: Set[str] = set()
    shared: Dict[Any, int] = {}  # identity of a tensor's memory -> its index: a tied tensor once
    top: List[Any] = []  # receives the root node
    # Each entry: (value, parent node list, key to write before the value or _NO_KEY, path, level).
    stack: List[Tuple[Any, List[Any], Any, Tuple[Key, ...], int]] = [(obj, top, _NO_KEY, (), 2)]
    # (the header map is level 1, its "tree" value level 2)
    while stack:
        value, parent, key, path, level = stack.pop()
        if key is not _NO_KEY:
            parent.append(key)
        kind = type(value)
        if kind in _PRIMITIVES:
            if kind is int and not _INT_MIN <= value <= _INT_MAX:
                raise InvalidValueError(
                    f"{_describe(root, path)}: int {value} is outside the int64 and uint64 ranges "
                    "(-2**63 .. 2**64-1); store it as a str or bytes [R3]")
            parent.append(value)
            continue
        if level > max_depth:
            raise LimitError(f"{_describe(root, path)}: nesting deeper than max_depth={max_depth} "
                             "(does a container hold itself?) [R6]")
        node: List[Any]
        if kind is dict or kind is collections.OrderedDict:
            node = [DICT if kind is dict else ODICT]
            children: List[Tuple[Any, List[Any], Any, Tuple[Key, ...], int]] = []
            for k, v in value.items():
                if type(k) is not str and type(k) is not int:
                    raise InvalidValueError(
                        f"{_describe(root, path)}: dict key {quote(k)} ({type(k).__name__}) is not a "
                        "str or int [R4]")
                if type(k) is int and not _INT_MIN <= k <= _INT_MAX:
                    raise InvalidValueError(f"{_describe(root, path)}: dict key {k} is outside "
                                            "the int64 and uint64 ranges [R4]")
                children.append((v, node, k, path + (k,), level + 1))
            stack.extend(reversed(children))
        elif kind is list or kind is tuple:
            node = [LIST if kind is list else TUPLE]
            stack.extend((v, node, _NO_KEY, path + (i,), level + 1)
                         for i, v in reversed(list(enumerate(value))))
        elif kind is np.ndarray or torch_convert.is_tensor(value) or jax_convert.is_array(value):
            node = _tensor_node(value, root, path, names, arrays, taken, shared)
        elif isinstance(value, np.generic):
            code = code_of(value.dtype, _describe(root, path))
            raw = packing.pack(np.asarray(value).reshape(1), code).tobytes()  # canonical [R5]
            node = [SCALAR, code, raw]
        else:
            cls = type(value)
            raise InvalidValueError(
                f"{_describe(root, path)}: cannot save a {cls.__module__}.{cls.__qualname__}; "
                "safeckpt stores dict (str or int keys), OrderedDict, list, tuple, numpy arrays "
                "and scalars, torch tensors, None, bool, int, float, str and bytes, and never "
                "pickles. Save the object's state instead (e.g. its state_dict()) [R2]")
        parent.append(node)
    tree = top[0]
    if _is_plain_flat(tree, names):
        tree = fmt.NO_TREE
    return tree, names, arrays


_NO_KEY = object()


def _tensor_node(value: Any, root: str, path: Tuple[Key, ...], names: List[str],
                 arrays: List[Any], taken: Set[str], shared: Dict[Any, int]) -> List[Any]:
    """The node of an array, torch tensor or jax array: a new table entry, or a ref to one stored
    already; a weakly typed jax array or a typed key array wrapped in its node [R9] [R10]."""
    if jax_convert.is_array(value):
        where = _where(root, path)
        if jax_convert.is_key(value):
            impl = jax_convert.key_impl_name(value, where)
            return [KEY, impl, _table_node(value, root, path, names, arrays, taken, shared)]
        node = _table_node(value, root, path, names, arrays, taken, shared)
        return [WEAK, node] if getattr(value, "weak_type", False) else node
    return _table_node(value, root, path, names, arrays, taken, shared)


def _table_node(value: Any, root: str, path: Tuple[Key, ...], names: List[str],
                arrays: List[Any], taken: Set[str], shared: Dict[Any, int]) -> List[Any]:
    """The tensor node of an array, torch tensor or jax array (a key's key data), with its device
    [R11]; or a ref to the same memory stored already [R8]."""
    device: Optional[str] = None
    array: Any
    identity: Optional[tuple]
    if type(value) is np.ndarray:
        array = value
        identity = ("numpy", array.__array_interface__["data"][0], array.shape, array.strides,
                    array.dtype.str) if array.nbytes else None
    elif jax_convert.is_array(value):
        array, identity = jax_convert.export(value, _where(root, path))
        device = jax_convert.device_of(value)
    else:
        array, device, identity = torch_convert.export(value, _where(root, path))
    if identity is not None and identity in shared:
        return [REF, shared[identity]]
    code_of(array.dtype, _where(root, path))
    index = len(names)
    if identity is not None:
        shared[identity] = index
    name = ".".join(str(key) for key in path) or ROOT_NAME
    if name in taken:  # a clash, e.g. {"a.b": x, "a": {"b": y}} or {1: x, "1": y} [R7]
        suffix = 1
        while f"{name}~{suffix}" in taken:
            suffix += 1
        name = f"{name}~{suffix}"
    taken.add(name)
    names.append(name)
    arrays.append(array)
    return [TENSOR, index] if device is None else [TENSOR, index, device]


def _is_plain_flat(tree: Any, names: List[str]) -> bool:
    """Whether the tree is a plain dict whose values are the tensors in order, named by their keys."""
    if type(tree) is not list or tree[0] != DICT or len(tree) - 1 != 2 * len(names):
        return False
    for i, name in enumerate(names):
        key, node = tree[1 + 2 * i], tree[2 + 2 * i]
        if key != name or type(key) is not str or node != [TENSOR, i]:
            return False
    return True


# -- read side: check the skeleton, view it lazily, materialise it ---------------------------------

def _nodes(tree: Any) -> Iterator[Tuple[Any, int, List[Any]]]:
    """The root and every node below it that is not a plain value (None, bool, int, float, str,
    bytes: leaves that need no check), depth first and in order, without recursion.

    Yields ``(node, level, keys)``: the root is level 2 (the header map is level 1), and ``keys``
    is the live list of keys and indices from the root down to the node (see :func:`_path`).
    A container is entered only when the caller asks for the next node, so a caller that checks
    each node and raises never walks into a node it has not checked. Memory: one iterator per
    level, whatever the width.
    """
    keys: List[Any] = []
    stack: List[Iterator[Tuple[Any, Any]]] = []
    node = tree
    while True:
        yield node, len(stack) + 2, keys
        if _is_container(node):
            children: Iterator[Tuple[Any, Any]]
            if node[0] in (LIST, TUPLE):
                children = enumerate(itertools.islice(node, 1, None))
            else:
                children = zip(itertools.islice(node, 1, None, 2), itertools.islice(node, 2, None, 2))
            stack.append((key, child) for key, child in children if type(child) not in _PRIMITIVES)
            keys.append(None)
        while stack:  # the next node: in the innermost container that has one left
            item = next(stack[-1], None)
            if item is not None:
                break
            stack.pop()
            keys.pop()
        else:
            return
        keys[-1], node = item


def _path(keys: Sequence[Any]) -> str:
    """``tree['model'][0]``, for a message."""
    return fmt.path_of("tree", keys)


def _first(tree: Any, tag: str, index: int) -> str:
    """The path of the first ``tag`` node of tensor ``index`` (to name it in a message)."""
    for node, _, keys in _nodes(tree):
        if type(node) is list and node and node[0] in WRAPPERS:
            node = node[-1]
        if type(node) is list and len(node) > 1 and node[0] == tag and node[1] == index:
            return _path(keys)
    return "tree"


def check_tree(tree: Any, names: Sequence[str], max_depth: int, where: str) -> Any:
    """Validate a raw ``tree`` header value against the tensor table [R1-R6]; return it.

    Walks the skeleton without recursion, in memory that grows with its depth and the number of
    tensors, not with its size; the path of a bad node is spelled out only for the message.
    ``NO_TREE`` (a flat file) is returned as is.

    Raises:
        HeaderError: a malformed node, an unknown tag, a bad or duplicate key, a tensor index out of
            range or used twice, a tensor not in the tree, a bad scalar; the message names the
            file and the path in the tree, e.g. ``tree['model'][2]``.
        LimitError: deeper than ``max_depth`` [R6].
    """
    if tree is fmt.NO_TREE:
        return tree
    # per tensor: bit 1 once its tensor node is seen, bit 2 if a ref points to it
    used = bytearray(len(names))
    for node, level, keys in _nodes(tree):
        if type(node) in _PRIMITIVES:
            continue
        tag = _check_node(node, level, keys, max_depth, where)
        if tag in (LIST, TUPLE):
            continue
        if tag in (DICT, ODICT):
            _check_map_keys(node, tag, keys, where)
            continue
        if len(node) not in _LEAF_ARITY[tag]:
            raise HeaderError(f"{where}: {_path(keys)}: a {tag} node has {len(node)} items, not "
                              f"{' or '.join(map(str, _LEAF_ARITY[tag]))} {_RULE.get(tag, '[R2]')}")
        if tag in WRAPPERS:
            node, tag = _check_wrapper(node, tag, level, keys, max_depth, where)
        if tag == SCALAR:
            _check_scalar(node, keys, where)
        else:
            _check_tensor_index(tree, node, tag, keys, names, used, where)
    _check_every_tensor_used(tree, names, used, where)
    return tree


def _check_wrapper(node: List[Any], tag: str, level: int, keys: List[Any], max_depth: int,
                   where: str) -> Tuple[List[Any], str]:
    """A weak [R9] or key [R10] node of the right length: a key's impl a non-empty str, the child
    a node of a form the wrapper takes, not deeper than ``max_depth`` [R6], of its form's length;
    returns the child and its tag (checked further as any such node)."""
    rule = _RULE[tag]
    if tag == KEY and (type(node[1]) is not str or not node[1]):
        raise HeaderError(f"{where}: {_path(keys)}: key implementation {quote(node[1])} is not a "
                          f"non-empty str {rule}")
    child = node[-1]
    allowed = _WRAPPED[tag]
    child_tag = child[0] if type(child) is list and child else None
    if type(child_tag) is not str or child_tag not in allowed:
        what = (f"a {child_tag} node" if type(child_tag) is str and child_tag in _LEAF_ARITY
                or child_tag in CONTAINERS else f"{_msgpack_name(child)} {quote(child)}")
        raise HeaderError(f"{where}: {_path(keys)}: a {tag} node holds {what}, not a "
                          f"{' or '.join(allowed)} node {rule}")
    if level + 1 > max_depth:
        raise LimitError(f"{where}: {_path(keys)}: tree nesting deeper than "
                         f"max_depth={max_depth}; pass max_depth=... if you trust this file [R6]")
    if len(child) not in _LEAF_ARITY[child_tag]:
        raise HeaderError(f"{where}: {_path(keys)}: the {child_tag} node in a {tag} node has "
                          f"{len(child)} items, not "
                          f"{' or '.join(map(str, _LEAF_ARITY[child_tag]))} [R2]")
    return child, child_tag


def _check_node(node: Any, level: int, keys: List[Any], max_depth: int, where: str) -> str:
    """A node that is not a plain value: a list [R2], not deeper than ``max_depth`` [R6], with a
    known tag [R2]; returns the tag."""
    if type(node) is not list:
        raise HeaderError(f"{where}: {_path(keys)}: a {_msgpack_name(node)} is not a tree "
                          "node [R2]")
    if level > max_depth:
        raise LimitError(f"{where}: {_path(keys)}: tree nesting deeper than "
                         f"max_depth={max_depth}; pass max_depth=... if you trust this file [R6]")
    tag = node[0] if node else None
    if type(tag) is not str or (tag not in CONTAINERS and tag not in _LEAF_ARITY):
        raise HeaderError(f"{where}: {_path(keys)}: node tag {quote(tag)} is not one of "
                          f"{sorted(CONTAINERS | set(_LEAF_ARITY))} [R2]")
    return tag


def _check_map_keys(node: List[Any], tag: str, keys: List[Any], where: str) -> None:
    """A dict or odict node: key, value pairs whose keys are str or int, each once [R4]."""
    if len(node) % 2 != 1:
        raise HeaderError(f"{where}: {_path(keys)}: a {tag} node needs an even number of "
                          f"items (key, value pairs) after its tag, found {len(node) - 1} "
                          "items [R4]")
    seen: Set[Union[str, int]] = set()  # str and int never compare equal (bool, float refused)
    for key in itertools.islice(node, 1, None, 2):
        if type(key) is not str and type(key) is not int:
            raise HeaderError(f"{where}: {_path(keys)}: dict key {quote(key)} is not a str "
                              "or int [R4]")
        if key in seen:
            raise HeaderError(f"{where}: {_path(keys)}: dict key {quote(key)} appears "
                              "twice [R4]")
        seen.add(key)


def _check_scalar(node: List[Any], keys: List[Any], where: str) -> None:
    """A scalar node: a known dtype code and a bin of that dtype's item size [R5]."""
    code, raw = node[1], node[2]
    if type(code) is not int or not 0 <= code < len(DTYPE_BY_CODE):
        raise HeaderError(f"{where}: {_path(keys)}: scalar dtype code {quote(code)} is "
                          "unknown [R5]")
    if type(raw) is not bytes or len(raw) != DTYPE_BY_CODE[code].itemsize:
        raise HeaderError(f"{where}: {_path(keys)}: scalar of dtype "
                          f"{DTYPE_BY_CODE[code]} needs {DTYPE_BY_CODE[code].itemsize} "
                          "bytes of bin [R5]")
    bits = BITS_BY_CODE[code]
    if bits < 8 and raw[0] >> bits:
        raise HeaderError(f"{where}: {_path(keys)}: scalar of dtype {DTYPE_BY_CODE[code]} is "
                          f"the byte {raw[0]:#04x}, which has bits set above the low {bits}; "
                          "they MUST be zero [R5]")


def _check_tensor_index(tree: Any, node: List[Any], tag: str, keys: List[Any],
                        names: Sequence[str], used: bytearray, where: str) -> None:
    """A tensor or ref node: an index into the table [R3], a tensor node's device a non-empty str
    and at most one tensor node per tensor [R3]; marks the tensor in ``used``."""
    n = len(names)
    index = node[1]
    if type(index) is not int or not 0 <= index < n:
        raise HeaderError(f"{where}: {_path(keys)}: tensor index {quote(index)} is not in "
                          f"0..{n - 1} [R3]")
    if tag == REF:
        used[index] |= 2
        return
    if len(node) == 3 and (type(node[2]) is not str or not node[2]):
        raise HeaderError(f"{where}: {_path(keys)}: tensor device {quote(node[2])} is not a "
                          "non-empty str [R3]")
    if used[index] & 1:
        raise HeaderError(f"{where}: {_path(keys)}: tensor {quote(names[index])} has a "
                          f"tensor node already at {_first(tree, TENSOR, index)}; a second use "
                          "must be a ref node [R3]")
    used[index] |= 1


def _check_every_tensor_used(tree: Any, names: Sequence[str], used: bytearray, where: str
                             ) -> None:
    """Every tensor of the table has a tensor node, and every ref points to one [R3]."""
    index = used.find(2)  # refs only: no tensor node
    if index >= 0:
        raise HeaderError(f"{where}: {_first(tree, REF, index)}: ref to tensor "
                          f"{quote(names[index])}, which has no tensor node [R3]")
    index = used.find(0)
    if index >= 0:
        raise HeaderError(f"{where}: tensor {quote(names[index])} is not in the tree [R3]")


def _msgpack_name(value: Any) -> str:
    return {dict: "map"}.get(type(value), type(value).__name__)


def flat_skeleton(names: Sequence[str]) -> List[Any]:
    """The skeleton of a file without a tree: a dict of its tensors by name.

    Example:
        >>> flat_skeleton(["a", "b"])
        ['dict', 'a', ['tensor', 0], 'b', ['tensor', 1]]
    """
    node: List[Any] = [DICT]
    for i, name in enumerate(names):
        node += [name, [TENSOR, i]]
    return node


def find(reader: TreeReader, prefix: Union[None, str, Sequence[Any]]) -> Any:
    """The node at ``prefix``: a str such as ``"model"`` or ``"optimizer.state.0"`` (dict keys may
    hold dots: the longest key that matches wins), or a tuple of exact keys and indices. Each step
    is a lookup in the dict's key index (built once per reader), whatever the dict's size.

    Raises:
        KeyError: nothing is at ``prefix``.
    """
    def child(node: Any, key: Any) -> Any:
        if not _is_container(node):
            return _MISSING
        return view(reader, node)._child(key) if node[0] in (DICT, ODICT) else _item(node, key)

    def is_sequence(node: Any) -> bool:
        return _is_container(node) and node[0] in (LIST, TUPLE)

    return _walk(reader.skeleton, prefix, child, is_sequence, f"{reader.where} has nothing at",
                 " in its tree")


def find_in(obj: Any, prefix: Union[None, str, Sequence[Any]], *, where: str = "obj") -> Any:
    """The part of a nested Python value (dicts, lists, tuples) at ``prefix``, found as
    :func:`find` finds it in a file's tree, so that a prefix means the same thing in a state in
    memory as in a file: a dotted str (the longest dict key wins; ``"runs.-1"`` is the int key
    -1 of ``runs``; a list takes only indices ``0..len-1`` there) or a tuple of exact keys (a
    list's negative index counts from its end; ``True`` is not the key ``1``).

    Raises:
        KeyError: nothing is at ``prefix``, naming ``where``.

    Example:
        >>> find_in({"runs": {-1: {"w": 1}}}, "runs.-1")
        {'w': 1}
        >>> find_in({"a": [[5], [6]]}, ("a", -1, 0))
        6
    """
    return _walk(obj, prefix, _value_child, lambda node: isinstance(node, (list, tuple)),
                 f"{where} has nothing at", "")


def _value_child(node: Any, key: Any) -> Any:
    """The child at ``key`` of a dict (a key of the same type only), list or tuple; _MISSING."""
    if isinstance(node, dict):
        child = node.get(key, _MISSING)
        if child is not _MISSING and type(key) is not str:
            # 1, 1.0 and True are one dict key; a file's tree tells them apart: so does this
            child = next((node[k] for k in node if type(k) is type(key) and k == key), _MISSING)
        return child
    if isinstance(node, (list, tuple)) and type(key) is int and -len(node) <= key < len(node):
        return node[key]
    return _MISSING


def _walk(root: Any, prefix: Union[None, str, Sequence[Any]], child: Callable[[Any, Any], Any],
          is_sequence: Callable[[Any], bool], missing: str, tail: str) -> Any:
    """The node at ``prefix`` below ``root``, with ``child(node, key)`` (_MISSING if none) and
    ``is_sequence(node)``: one walk for a file's skeleton and for a value in memory.

    Raises:
        KeyError: ``"<missing> <prefix><tail>"``.
    """
    node = root
    if prefix is None:
        return node
    if isinstance(prefix, str):
        rest = prefix
        while rest:
            node, rest = _step_str(node, rest, child, is_sequence)
            if node is _MISSING:
                raise KeyError(f"{missing} {quote(prefix)}{tail}")
        return node
    for key in prefix:
        node = child(node, key)
        if node is _MISSING:
            raise KeyError(f"{missing} {quote(tuple(prefix))}{tail}")
    return node


def _is_container(node: Any) -> bool:
    return type(node) is list and node[0] in CONTAINERS


def _item(node: List[Any], key: Any) -> Any:
    """The child at ``key`` of a list or tuple node (negative indices count from the end)."""
    if type(key) is int and -(len(node) - 1) <= key < len(node) - 1:
        return node[1 + key % (len(node) - 1)]
    return _MISSING


_INT_TEXT = re.compile(r"0|-?[1-9][0-9]{0,19}")  # str() of an int key (int64 and uint64 range)


def _step_str(node: Any, rest: str, child: Callable[[Any, Any], Any],
              is_sequence: Callable[[Any], bool]) -> Tuple[Any, str]:
    """One step of a dotted prefix: the child and what is left of the prefix. In a list or tuple
    the step is an index ``0..len-1``; a dict key may hold dots: the longest key that ``rest``
    starts with (then a dot) wins, a str key over an equal int."""
    if is_sequence(node):
        head, _, tail = rest.partition(".")
        if not (head.isascii() and head.isdigit() and len(head) <= 20):
            return _MISSING, rest
        return child(node, int(head)), tail
    end = len(rest)
    while end >= 0:  # all of rest, then up to each dot from the right: the longest key first
        text = rest[:end]
        found = child(node, text)
        if found is _MISSING and _INT_TEXT.fullmatch(text):
            found = child(node, int(text))
        if found is not _MISSING:
            return found, rest[end + 1:]
        end = rest.rfind(".", 0, end)
    return _MISSING, rest


def _tensor_indices(node: Any) -> Dict[int, Optional[str]]:
    """Indices of the tensors a subtree uses (each once), in tree order."""
    found: Dict[int, Optional[str]] = {}
    stack = [node]
    while stack:
        node = stack.pop()
        if type(node) is not list:
            continue
        if node[0] in (TENSOR, REF):
            if len(node) == 3:  # a tensor node's device wins over a ref seen before it
                found[node[1]] = node[2]
            else:
                found.setdefault(node[1], None)
        elif node[0] in CONTAINERS:
            stack.extend(reversed(node[1:]))
        elif node[0] in WRAPPERS:
            stack.append(node[-1])
    return found


def _leaf(node: Any, tensors: Dict[int, Any]) -> Any:
    """The value of a leaf node; tensors come from ``tensors[index]``. A weak or key node is its
    child's value (numpy and torch have neither) [R9] [R10]."""
    if type(node) is not list:
        return node
    if node[0] in WRAPPERS:
        node = node[-1]
    if node[0] == SCALAR:
        scalar = np.frombuffer(node[2], DTYPE_BY_CODE[node[1]])
        # bytes are little-endian [R5]; a dtype numpy has in native order only is swapped into it
        return (scalar if is_little_endian(scalar.dtype) else scalar.byteswap())[0]
    return tensors[node[1]]


def _build(node: Any, tensors: Dict[int, Any],
           leaf: Optional[Callable[[Any], Any]] = None) -> Any:
    """The Python value of a checked subtree, built without recursion; ``leaf(node)`` gives the
    value of a leaf node (default: :func:`_leaf` with ``tensors``)."""
    if leaf is None:
        leaf = lambda child: _leaf(child, tensors)  # noqa: E731
    if not _is_container(node):
        return leaf(node)
    stack: List[List[Any]] = [[node, 1, []]]  # frames: node, index of the next child, values so far
    while True:
        frame = stack[-1]
        node, i, out = frame
        if i < len(node):
            frame[1] = i + 1
            child = node[i]
            if _is_container(child):
                stack.append([child, 1, []])
            else:
                out.append(leaf(child))
            continue
        stack.pop()
        tag = node[0]
        if tag == LIST:
            value = out
        elif tag == TUPLE:
            value = tuple(out)
        else:
            pairs = zip(out[0::2], out[1::2])
            value = dict(pairs) if tag == DICT else collections.OrderedDict(pairs)
        if not stack:
            return value
        stack[-1][2].append(value)


def materialize(reader: TreeReader, node: Any, *, framework: Optional[str] = None,
                map_location: Any = None, verify: Optional[bool] = None,
                jax_leaves: bool = False) -> Any:
    """The Python value of ``node``, reading only the tensors it uses.

    ``framework`` is ``None`` or ``"numpy"`` (numpy arrays; a key node gives its key data, a weak
    node its plain value [R9] [R10]) or ``"torch"`` (torch tensors, zero-copy from the mapping, or
    copied to a GPU through pinned buffers, as ``map_location`` says; see
    :func:`safeckpt.torch_convert.device_tensors`) or ``"jax"`` (jax arrays: typed keys and weak
    types restored, each on its saved device [R11]; with ``jax_leaves=True``,
    :class:`safeckpt.jax_convert.JaxLeaf` values not yet on any device, lazy views of a mapped
    file, for a caller that places them itself). Tensors referenced twice come back as the same
    object.

    Example:
        >>> with safeckpt.open(path) as f:                             # doctest: +SKIP
        ...     leaves = materialize(f, find(f, "params"), framework="jax", jax_leaves=True)
    """
    if framework not in _FRAMEWORKS:
        raise ValueError(f"framework={framework!r}: use None, 'numpy', 'torch' or 'jax'")
    if map_location is not None and framework != "torch":
        raise ValueError("map_location needs framework='torch'")
    if jax_leaves and framework != "jax":
        raise ValueError("jax_leaves=True needs framework='jax'")
    devices = _tensor_indices(node)
    if framework == "torch":
        return _build(node, torch_convert.load_tensors(reader, devices, map_location, verify))
    indices = list(devices)
    tensors = dict(zip(indices, reader.load_indices(indices, verify)))
    if framework == "jax":
        return _build_jax(node, tensors, devices, reader.names, jax_leaves)
    return _build(node, tensors)


def _jax_leaf_key(node: Any) -> Any:
    """What identifies a leaf's jax value: (tensor index, wrapper tag, impl), so that a tensor and
    its refs give one object; a (wrapped) scalar node by identity; None for a plain value."""
    if type(node) is not list:
        return None
    tag = node[0] if node[0] in WRAPPERS else None
    inner = node[-1] if tag is not None else node
    if inner[0] == SCALAR:
        return None if tag is None else (SCALAR, id(inner))
    return inner[1], tag, node[1] if tag == KEY else None


def _build_jax(node: Any, tensors: Dict[int, np.ndarray], devices: Dict[int, Optional[str]],
               names: Sequence[str], jax_leaves: bool) -> Any:
    """The value of ``node`` with a :class:`JaxLeaf` (or, unless ``jax_leaves``, its jax array)
    for each tensor, ref and weak or key node [R9]-[R11]."""
    leaves: Dict[Any, jax_convert.JaxLeaf] = {}
    stack = [node]
    while stack:  # every leaf node, once: one JaxLeaf per distinct value
        item = stack.pop()
        if _is_container(item):
            stack.extend(item[1:])
            continue
        key = _jax_leaf_key(item)
        if key is None or key in leaves:
            continue
        inner = item[-1]
        if key[0] == SCALAR:
            scalar = _leaf(inner, tensors)
            leaves[key] = jax_convert.JaxLeaf(np.asarray(scalar), f"scalar of dtype {scalar.dtype}",
                                              weak=True)
        else:
            index, tag, impl = key
            leaves[key] = jax_convert.JaxLeaf(tensors[index], names[index], weak=tag == WEAK,
                                              key_impl=impl, device=devices[index])
    values: Dict[Any, Any] = dict(leaves)
    if not jax_leaves:
        values = dict(zip(leaves, jax_convert.to_jax_values(leaves.values())))

    def leaf(item: Any) -> Any:
        key = _jax_leaf_key(item)
        return _leaf(item, tensors) if key is None else values[key]

    return _build(node, tensors, leaf)


def view(reader: TreeReader, node: Any) -> Any:
    """A lazy :class:`Subtree` for a container node (one per node and reader, so that each
    builds its key index once), else the leaf's value."""
    if _is_container(node):
        views = reader.subtree_cache
        subtree = views.get(id(node))  # the reader's skeleton keeps every node alive
        if subtree is None:
            subtree = views[id(node)] = Subtree(reader, node)
        return subtree
    indices = list(_tensor_indices(node))
    return _leaf(node, dict(zip(indices, reader.load_indices(indices))))


class Subtree:
    """A lazy view of a dict, list or tuple of a file's tree; made by ``Reader.tree``.

    Indexing returns a child: another ``Subtree`` for a container, else the value (a tensor is
    read when it is indexed, and only then). ``load()`` returns the whole subtree as Python values.
    Valid while the reader is open.

    Example:
        >>> with safeckpt.open("ckpt.sckpt") as f:                     # doctest: +SKIP
        ...     f.tree["optimizer"]["param_groups"][0]["lr"]
        0.001
    """

    __slots__ = ("_reader", "_node", "_index")

    _reader: TreeReader
    _node: List[Any]
    _index: Optional[Dict[Tuple[type, Any], Any]]

    def __init__(self, reader: TreeReader, node: List[Any]) -> None:
        self._reader, self._node, self._index = reader, node, None

    @property
    def kind(self) -> type:
        """The container's type: ``dict``, ``collections.OrderedDict``, ``list`` or ``tuple``."""
        return {DICT: dict, ODICT: collections.OrderedDict, LIST: list, TUPLE: tuple}[self._node[0]]

    def _is_map(self) -> bool:
        return self._node[0] in (DICT, ODICT)

    def keys(self) -> Union[List[Any], range]:
        """Dict keys in order, or ``range(len)`` for a list or tuple."""
        if self._is_map():
            return self._node[1::2]
        return range(len(self._node) - 1)

    def __len__(self) -> int:
        return (len(self._node) - 1) // (2 if self._is_map() else 1)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.keys())

    def __contains__(self, key: object) -> bool:
        return self._child(key) is not _MISSING

    def _child(self, key: Any) -> Any:
        if self._is_map():
            if self._index is None:
                node = self._node
                self._index = {(type(node[i]), node[i]): node[i + 1] for i in range(1, len(node), 2)}
            return self._index.get((type(key), key), _MISSING)
        return _item(self._node, key)

    def __getitem__(self, key: Any) -> Any:
        self._reader.check_open()
        child = self._child(key)
        if child is _MISSING:
            raise KeyError(key)
        return view(self._reader, child)

    def items(self) -> List[Tuple[Any, Any]]:
        return [(key, self[key]) for key in self.keys()]

    def load(self, *, framework: Optional[str] = None, map_location: Any = None,
             verify: Optional[bool] = None) -> Any:
        """The subtree as Python values; see :func:`safeckpt.load`."""
        self._reader.check_open()
        return materialize(self._reader, self._node, framework=framework, map_location=map_location,
                           verify=verify)

    def __repr__(self) -> str:
        return f"<safeckpt Subtree {self.kind.__name__} of {len(self)}>"


_MISSING = object()


def same(a: Any, b: Any) -> bool:
    """Whether two trees are equal with exact types and bits (NaN payloads, -0.0, dtypes).

    Example:
        >>> same({"x": (1, float("nan"))}, {"x": (1, float("nan"))})
        True
    """
    # pairs of children, one iterator per open container: memory grows with the depth, not the
    # width (R1)
    stack: List[Iterator[Tuple[Any, Any]]] = [iter([(a, b)])]
    while stack:
        pair = next(stack[-1], None)
        if pair is None:
            stack.pop()
            continue
        a, b = pair
        if type(a) is not type(b):
            return False
        if type(a) in (dict, collections.OrderedDict):
            if len(a) != len(b) or any(type(x) is not type(y) or (x is not y and x != y)
                                      for x, y in zip(a, b)):
                return False
            stack.append(zip(a.values(), b.values()))
        elif type(a) in (list, tuple):
            if len(a) != len(b):
                return False
            stack.append(zip(a, b))
        elif type(a) is float:
            if np.float64(a).tobytes() != np.float64(b).tobytes():
                return False
        elif isinstance(a, (np.ndarray, np.generic)):
            if a.dtype != b.dtype or a.shape != b.shape or (
                    np.ascontiguousarray(a).tobytes() != np.ascontiguousarray(b).tobytes()):
                return False
        elif torch_convert.is_tensor(a):
            if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
                return False
            if not same(torch_convert.export(a.cpu(), "a")[0], torch_convert.export(b.cpu(), "b")[0]):
                return False
        elif a != b:
            return False
    return True

