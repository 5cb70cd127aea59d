"""jax arrays to and from the format: the conversions that the layers above share.

The public functions are in :mod:`safeckpt.jax`; this module is what ``safeckpt.tree`` uses to
save and load jax values (FORMAT.md section 8): arrays, weakly typed arrays [R9], typed PRNG key
arrays [R10] and the device of an array committed to one device [R11]. A stored value not yet on
a device is a :class:`JaxLeaf`; :meth:`JaxLeaf.to_jax` puts it on a device or a sharding, reading
only each shard's slice of its (possibly memory-mapped) bytes. jax is imported lazily, never by
``import safeckpt``; :func:`is_array` never imports it.

Example:
    >>> array, identity = export(jax.numpy.ones(3), "obj['w']")  # doctest: +SKIP
    >>> JaxLeaf(np.ones((4, 4), np.float32), "w").to_jax(sharding=named_sharding)  # doctest: +SKIP
"""

from __future__ import annotations

import re
import sys
import warnings
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Tuple

import numpy as np

from .errors import HeaderError, InvalidValueError, UnsupportedDtypeError, quote

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


# -- save side -------------------------------------------------------------------------------------

def export(array: jax.Array, where: str) -> Tuple[np.ndarray, Optional[tuple]]:
    """``(numpy array, identity)`` of a jax array being saved: host memory (a view on CPU).

    A typed key array gives its key data (``jax.random.key_data``). ``identity`` is the same for
    the same jax.Array twice (stored once), ``None`` when empty. ``where`` names the value in
    messages, as for :func:`safeckpt.torch_convert.export`.

    Example:
        >>> host, identity = export(jax.numpy.arange(3), "obj['w']")  # doctest: +SKIP
    """
    jax = _jax()
    data = jax.random.key_data(array) if is_key(array) else array
    host = np.asarray(data)
    identity = ("jax", id(array)) if host.size else None
    return host, identity


def is_key(array: Any) -> bool:
    """Whether a jax array is a typed PRNG key array (``jax.random.key(0)``; not a legacy uint32
    ``PRNGKey``)."""
    jax = _jax()
    return bool(jax.dtypes.issubdtype(array.dtype, jax.dtypes.prng_key))


def key_impl_name(array: jax.Array, where: str) -> str:
    """The name of a typed key array's implementation, under which ``jax.random.wrap_key_data``
    finds it again [R10] (jax registers the built-in ones by name; a custom one is not).

    Raises:
        InvalidValueError: a custom implementation (``jax.extend.random.define_prng_impl``),
            naming ``where``.

    Example:
        >>> key_impl_name(jax.random.key(0), "obj['rng']")           # doctest: +SKIP
        'threefry2x32'
    """
    jax = _jax()
    spec = jax.random.key_impl(array)  # a registered implementation's name, else a PRNGSpec
    if type(spec) is not str:
        raise InvalidValueError(
            f"{where}: a PRNG key of a custom implementation ({spec!r}), which "
            "jax.random.wrap_key_data cannot name back; save jax.random.key_data(key) instead and "
            "wrap it again after loading [R10]")
    # a custom implementation under a built-in's name: jax gives that name, not the impl
    back = jax.eval_shape(lambda data: jax.random.wrap_key_data(data, impl=spec),
                          jax.ShapeDtypeStruct(jax.random.key_data(array).shape, np.uint32))
    if back.dtype != array.dtype:
        raise InvalidValueError(
            f"{where}: a PRNG key of a custom implementation named {spec!r}, which is another "
            "implementation to jax.random.wrap_key_data; save jax.random.key_data(key) instead "
            "[R10]")
    return spec


def device_of(array: jax.Array) -> Optional[str]:
    """``"<platform>:<id>"`` of a jax array committed to one device, else None [R11].

    Example:
        >>> device_of(jax.device_put(jax.numpy.ones(2), jax.devices()[2]))  # doctest: +SKIP
        'cpu:2'
    """
    if not getattr(array, "committed", False):
        return None
    devices = array.sharding.device_set
    if len(devices) != 1:
        return None
    device = next(iter(devices))
    return f"{device.platform}:{device.id}"


# -- load side -------------------------------------------------------------------------------------

_DEVICE = re.compile(r"([a-z][a-z0-9_]*):([0-9]{1,9})")
_PLATFORM_ALIASES = {"cuda": "gpu", "rocm": "gpu"}  # torch's and jax's names of one platform
_TWIN_32 = {np.dtype(np.int64): np.dtype(np.int32), np.dtype(np.uint64): np.dtype(np.uint32),
            np.dtype(np.float64): np.dtype(np.float32),
            np.dtype(np.complex128): np.dtype(np.complex64)}
_JAX_DTYPES: Dict[np.dtype, bool] = {}  # dtype -> whether jax holds it (probed once)


def local_device(saved: str) -> Any:
    """The local jax device that a saved device string names (``"cpu:2"``, ``"cuda:0"``), or None
    when this host has none [R11].

    Example:
        >>> local_device("cpu:0")                                    # doctest: +SKIP
        CpuDevice(id=0)
    """
    match = _DEVICE.fullmatch(saved)
    if match is None:
        return None
    platform = _PLATFORM_ALIASES.get(match.group(1), match.group(1))
    number = int(match.group(2))
    for device in _jax().local_devices():
        if device.platform == platform and device.id == number:
            return device
    return None


def _check_dtype(dtype: np.dtype, name: str) -> None:
    """Raise UnsupportedDtypeError when jax has no array type for ``dtype`` (float6, complex32)."""
    supported = _JAX_DTYPES.get(dtype)
    if supported is None:
        jax = _jax()
        probe = np.zeros(1, dtype)
        try:  # device_put, not asarray: jax moves some dtypes (int1) but cannot compute with them
            supported = np.asarray(jax.device_put(probe)).tobytes() == probe.tobytes()
        except Exception:  # jax says no in several ways: TypeError, its runtime errors
            supported = False
        _JAX_DTYPES[dtype] = supported
    if not supported:
        raise UnsupportedDtypeError(
            f"tensor {quote(name)} is {dtype}, which jax {_jax().__version__} has no array type "
            "for; load it with framework='numpy'")


def weakly_typed(array: jax.Array) -> jax.Array:
    """The same array (values, sharding) with ``weak_type=True`` [R9].

    jax has no public function for this: ``lax._convert_element_type`` is private to jax, so it is
    used here only, and tests/test_jax_values.py checks it still gives a weak array of the same
    bits and sharding.
    """
    from jax._src.lax import lax as lax_internal  # private: see the docstring
    return lax_internal._convert_element_type(array, None, weak_type=True)


class JaxLeaf:
    """A stored jax value not yet on a device: what ``materialize(..., jax_leaves=True)`` gives.

    Attributes:
        array: the stored numpy array (possibly a lazy view of a mapping; a key's key data).
        name: the tensor's name, for messages.
        weak: whether the value is weakly typed [R9].
        key_impl: the PRNG implementation of a typed key array [R10], else None.
        device: the saved device (``"cpu:2"``) [R11], else None.

    Example:
        >>> leaf = JaxLeaf(np.zeros((2, 2), np.uint32), "rng", key_impl="threefry2x32")
        >>> leaf.shape
        (2,)
    """

    __slots__ = ("array", "name", "weak", "key_impl", "device")

    def __init__(self, array: np.ndarray, name: str, *, weak: bool = False,
                 key_impl: Optional[str] = None, device: Optional[str] = None) -> None:
        self.array, self.name, self.weak = array, name, weak
        self.key_impl, self.device = key_impl, device

    @property
    def shape(self) -> Tuple[int, ...]:
        """The shape of the jax value (a key array's: without the key data's last axis)."""
        shape = tuple(self.array.shape)
        return shape[:-1] if self.key_impl is not None else shape

    @property
    def dtype(self) -> Any:
        """The dtype of the jax value: the stored dtype (64-bit as stored, whatever x64), or a
        key array's jax key dtype (``key<fry>``)."""
        if self.key_impl is None:
            return self.array.dtype
        jax = _jax()
        self._check_key_data()
        return self._wrap_checked(jax, lambda data: jax.eval_shape(
            lambda d: jax.random.wrap_key_data(d, impl=self.key_impl),
            jax.ShapeDtypeStruct(data.shape, data.dtype)), self.array).dtype

    def __repr__(self) -> str:
        extra = "".join(f" {k}={getattr(self, k)!r}" for k in ("weak", "key_impl", "device")
                        if getattr(self, k))
        return f"<JaxLeaf {self.name!r} {self.shape} {self.dtype}{extra}>"

    def to_jax(self, *, sharding: Any = None, cast_x64: bool = False) -> jax.Array:
        """The jax value, placed as ``sharding`` says, weak type and key implementation restored.

        Parameters:
            sharding: ``None``: the saved device when this host has it (committed; warns naming
                the tensor when it does not), else jax's default device. A
                ``jax.sharding.Sharding``: built with ``jax.make_array_from_callback``, each device
                reading only its shard's slice of ``array``. A ``jax.Device``: put there.
            cast_x64: with 64-bit types off in jax, a 64-bit dtype raises (``False``) or is cast to
                its 32-bit twin (``True``; the caller reports it). An int out of the twin's range
                raises.

        Raises:
            UnsupportedDtypeError: a dtype jax lacks, or a 64-bit one without x64 (and no cast).
            HeaderError: key data that do not fit ``key_impl``, or an implementation jax lacks.

        Example:
            >>> leaf.to_jax(sharding=NamedSharding(mesh, PartitionSpec("a", "b")))  # doctest: +SKIP
        """
        if sharding is None and self.device is not None and local_device(self.device) is None:
            warnings.warn(f"tensor {self.name!r} was saved on device {self.device!r}, which this "
                          "host does not have: it is loaded to jax's default device", UserWarning,
                          stacklevel=2)
        return self._to_jax(sharding, cast_x64)

    def _to_jax(self, sharding: Any, cast_x64: bool) -> jax.Array:
        jax = _jax()
        dtype = self._target_dtype(jax, cast_x64)
        if sharding is None and self.device is not None:
            sharding = local_device(self.device)  # committed there, as it was saved [R11]
        if sharding is None:  # jax's default device, not committed (as a fresh array)
            value = jax.device_put(self._host(Ellipsis, dtype))
        elif isinstance(sharding, jax.sharding.Sharding):
            value = jax.make_array_from_callback(
                tuple(self.array.shape), sharding, lambda index: self._host(index, dtype))
        else:
            value = jax.device_put(self._host(Ellipsis, dtype), sharding)
        if self.key_impl is not None:
            value = self._wrap_checked(
                jax, lambda data: jax.random.wrap_key_data(data, impl=self.key_impl), value)
        if self.weak:
            value = weakly_typed(value)
        return value

    def _wrap_checked(self, jax: Any, wrap: Any, data: Any) -> Any:
        """``wrap(data)`` for a key [R10]; its refusal of the data or impl as a HeaderError."""
        try:
            return wrap(data)
        except (ValueError, TypeError) as exc:
            raise HeaderError(
                f"tensor {quote(self.name)}: key data of dtype {self.array.dtype} and shape "
                f"{tuple(self.array.shape)} are not a PRNG key of implementation "
                f"{quote(self.key_impl)} to jax {jax.__version__}: {exc} [R10]") from exc

    def _check_key_data(self) -> None:
        """Key data must be uint32 [R10], checked before anything else looks at them (a cast
        would hide another dtype)."""
        if np.dtype(self.array.dtype) != np.uint32:
            raise HeaderError(
                f"tensor {quote(self.name)}: key data of dtype {self.array.dtype}, not uint32, "
                f"are not a PRNG key of implementation {quote(self.key_impl)} [R10]")

    def _target_dtype(self, jax: Any, cast_x64: bool) -> np.dtype:
        """The dtype the host slices get: the stored one, or its 32-bit twin when cast (never
        for key data: uint32 or refused)."""
        if self.key_impl is not None:
            self._check_key_data()
            return np.dtype(np.uint32)
        stored = np.dtype(self.array.dtype)
        if jax.dtypes.canonicalize_dtype(stored) == stored:
            _check_dtype(stored, self.name)
            return stored
        twin = _TWIN_32.get(stored)
        if not cast_x64 or twin is None:
            raise UnsupportedDtypeError(
                f"tensor {quote(self.name)} is {stored}, which jax would silently turn into "
                f"{jax.dtypes.canonicalize_dtype(stored)}; enable 64-bit types first "
                "(jax.config.update('jax_enable_x64', True)), pass cast_x64=True to cast it, "
                "or load with framework='numpy'")
        return twin

    def _host(self, index: Any, dtype: np.dtype) -> np.ndarray:
        """``array[index]`` as ``dtype``: the only read of ``array`` (one shard's slice)."""
        part = np.asarray(self.array[index])
        if part.dtype == dtype:
            return part
        if dtype.kind in "iu" and part.size:
            info = np.iinfo(dtype)
            low, high = part.min(), part.max()
            if low < info.min or high > info.max:
                raise UnsupportedDtypeError(
                    f"tensor {quote(self.name)}: {part.dtype} values {low}..{high} do not fit "
                    f"{dtype} (cast_x64=True); enable 64-bit types "
                    "(jax.config.update('jax_enable_x64', True))")
        return part.astype(dtype)


def to_jax_values(leaves: Iterable[JaxLeaf], *, cast_x64: bool = False) -> List[Any]:
    """``leaf.to_jax(cast_x64=cast_x64)`` of each leaf, with one warning naming every tensor
    whose saved device this host lacks [R11] (not one per tensor); the caller reports casts.

    Example:
        >>> to_jax_values([JaxLeaf(np.ones(2, np.float32), "w")])    # doctest: +SKIP
        [Array([1., 1.], dtype=float32)]
    """
    leaves = list(leaves)
    missing = [f"{leaf.name!r} ({leaf.device})" for leaf in leaves
               if leaf.device is not None and local_device(leaf.device) is None]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more"
                                            if len(missing) > 10 else "")
        warnings.warn(f"{len(missing)} tensors were saved on devices this host does not have and "
                      f"are loaded to jax's default device: {shown}", UserWarning, stacklevel=3)
    return [leaf._to_jax(None, cast_x64) for leaf in leaves]


def from_numpy(array: np.ndarray, name: str) -> jax.Array:
    """A jax array of a loaded numpy array, refusing a dtype jax would change (64-bit without x64).

    Raises:
        UnsupportedDtypeError: naming the tensor and the fix.

    Example:
        >>> from_numpy(np.ones(2, np.float32), "w")                  # doctest: +SKIP
        Array([1., 1.], dtype=float32)
    """
    return JaxLeaf(array, name)._to_jax(None, False)
