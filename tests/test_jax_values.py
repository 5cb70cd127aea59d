"""jax values in the tree (FORMAT.md section 8, version 1.5): typed PRNG keys [R10], weak types
[R9], saved devices [R11], and safeckpt.jax_convert.JaxLeaf (shardings, x64 casts, dtypes), under
both backends; hostile weak/key nodes on hand-made headers (tests/forge.py)."""

import importlib.util
import struct
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from forge import forge

pytest.importorskip("jax")  # an optional package: skipped without it, as test_jax.py

import jax  # noqa: E402
import jax.extend.random  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import safeckpt  # noqa: E402
from safeckpt import jax_convert, tree, writer  # noqa: E402
from safeckpt.jax_convert import JaxLeaf  # noqa: E402

pytestmark = pytest.mark.usefixtures("backend")

W = np.arange(6, dtype=np.float32).reshape(2, 3)


def save_load(obj, tmp_path, **kwargs):
    path = tmp_path / "j.sckpt"
    safeckpt.save(obj, path)
    return safeckpt.load(path, **kwargs), path


def _header(path):
    import msgpack
    data = path.read_bytes()
    length = struct.unpack_from("<Q", data, 16)[0]
    return msgpack.unpackb(data[32:32 + length], raw=False, strict_map_key=False)


def minor_of(path):
    return struct.unpack_from("<HH", path.read_bytes(), 8)[1]


def need_devices(n):
    if len(jax.devices()) < n:
        pytest.skip(f"needs {n} jax devices (tests/conftest.py sets XLA_FLAGS for 4 CPU devices; "
                    f"jax was imported before it, with {len(jax.devices())})")


def bits(x):
    return np.asarray(x).tobytes()


# -- typed PRNG keys [R10] -------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
@pytest.mark.parametrize("shape", [(), (3,)])
def test_R10_typed_keys_round_trip_and_draw_the_same(tmp_path, impl, shape):
    key = jax.random.key(7, impl=impl)
    if shape:
        key = jax.random.split(key, shape[0])
    back, path = save_load({"rng": key, "w": W}, tmp_path, framework="jax")
    rng = back["rng"]
    assert jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
    assert rng.dtype == key.dtype and rng.shape == key.shape
    assert str(jax.random.key_impl(rng)) == impl
    assert bits(jax.random.key_data(rng)) == bits(jax.random.key_data(key))
    draw = jax.vmap(lambda k: jax.random.normal(k, (5,)))
    assert bits(draw(rng.reshape(-1))) == bits(draw(key.reshape(-1)))
    assert bits(jax.random.key_data(jax.random.fold_in(rng.reshape(-1)[0], 3))) == bits(
        jax.random.key_data(jax.random.fold_in(key.reshape(-1)[0], 3)))
    assert _header(path)["tree"][2] == ["key", impl, ["tensor", 0]]
    assert minor_of(path) == 5


def test_R10_numpy_and_torch_loads_give_the_key_data(tmp_path):
    key = jax.random.split(jax.random.key(1), 3)
    path = tmp_path / "k.sckpt"
    safeckpt.save({"rng": key}, path)
    data = safeckpt.load(path)["rng"]
    assert type(data) is np.ndarray and data.dtype == np.uint32 and data.shape == (3, 2)
    assert bits(data) == bits(jax.random.key_data(key))
    with safeckpt.open(path) as f:  # a lazy view sees through the wrapper too
        assert bits(f.tree["rng"]) == bits(data)
        assert f.keys() == ["rng"]
    if need_torch():
        tensor = safeckpt.load(path, framework="torch")["rng"]
        assert str(tensor.dtype) == "torch.uint32" and tuple(tensor.shape) == (3, 2)


def need_torch():
    return importlib.util.find_spec("torch") is not None


def test_R10_the_same_key_twice_is_one_tensor_and_one_object(tmp_path):
    key = jax.random.key(5)
    back, path = save_load({"a": key, "b": [key]}, tmp_path, framework="jax")
    assert _header(path)["tree"] == ["dict", "a", ["key", "threefry2x32", ["tensor", 0]], "b",
                                     ["list", ["key", "threefry2x32", ["ref", 0]]]]
    assert back["a"] is back["b"][0]


def test_R10_prefix_and_subtree_loads_give_typed_keys(tmp_path):
    key = jax.random.key(2, impl="rbg")
    path = tmp_path / "p.sckpt"
    safeckpt.save({"state": {"rng": key, "step": 3}}, path)
    rng = safeckpt.load(path, prefix="state.rng", framework="jax")
    assert rng.dtype == key.dtype and bits(jax.random.key_data(rng)) == bits(jax.random.key_data(key))
    with safeckpt.open(path) as f:
        sub = f.tree["state"].load(framework="jax")
    assert sub["step"] == 3 and sub["rng"].dtype == key.dtype


def test_R10_a_custom_impl_that_cannot_be_named_is_refused_with_its_path(tmp_path):
    base = jax.extend.random.threefry_prng_impl
    custom = jax.extend.random.define_prng_impl(
        key_shape=base.key_shape, seed=base.seed, split=base.split, random_bits=base.random_bits,
        fold_in=base.fold_in, name="my_custom_prng", tag="mcp")
    key = jax.random.key(0, impl=custom)
    with pytest.raises(safeckpt.InvalidValueError, match=r"obj\['model'\]\['rng'\].*my_custom_prng"):
        safeckpt.save({"model": {"rng": key}}, tmp_path / "c.sckpt")
    shadow = jax.extend.random.define_prng_impl(  # a custom impl under a registered name
        key_shape=base.key_shape, seed=base.seed, split=base.split, random_bits=base.random_bits,
        fold_in=base.fold_in, name="threefry2x32", tag="fake")
    with pytest.raises(safeckpt.InvalidValueError, match=r"obj\['k'\].*custom"):
        safeckpt.save({"k": jax.random.key(0, impl=shadow)}, tmp_path / "d.sckpt")


def test_R10_key_data_that_do_not_fit_the_impl_are_refused_when_loaded_as_jax():
    data = forge({"k": np.zeros((2, 3), np.uint32)}, minor=5,
                 extra={"tree": ["dict", "k", ["key", "threefry2x32", ["tensor", 0]]]})
    assert safeckpt.load_bytes(data)["k"].shape == (2, 3)  # numpy: the key data, no check
    with safeckpt.Reader(data) as f:
        with pytest.raises(safeckpt.HeaderError, match=r"'k'.*threefry2x32.*\[R10\]"):
            f.load(framework="jax")
    data = forge({"k": np.zeros((2,), np.uint32)}, minor=5,
                 extra={"tree": ["dict", "k", ["key", "no_such_prng", ["tensor", 0]]]})
    with safeckpt.Reader(data) as f:
        with pytest.raises(safeckpt.HeaderError, match=r"'k'.*no_such_prng.*\[R10\]"):
            f.load(framework="jax")


def test_R10_key_data_not_uint32_are_refused_before_any_cast(tmp_path):
    """uint64 key data are not cast to uint32 by cast_x64 (nor refused as a 64-bit tensor): the
    [R10] HeaderError names the tensor and the impl, with or without a key template."""
    data = forge({"k": np.zeros((2,), np.uint64)}, minor=5,
                 extra={"tree": ["dict", "k", ["key", "threefry2x32", ["tensor", 0]]]})
    import safeckpt.jax as sj
    path = tmp_path / "k.sckpt"
    path.write_bytes(data)
    template = {"k": jax.random.key(0)}
    for load in (lambda: sj.load(path, cast_x64=True), lambda: sj.load(path),
                 lambda: sj.load(path, target=template, cast_x64=True),
                 lambda: sj.load(path, target=template)):
        with pytest.raises(safeckpt.HeaderError,
                           match=r"'k'.*uint64, not uint32.*threefry2x32.*\[R10\]"):
            load()


_DTYPES = st.sampled_from([np.float32, np.float16, np.int32, np.uint8, np.bool_])
_arrays = _DTYPES.flatmap(lambda d: hnp.arrays(d, hnp.array_shapes(min_dims=0, max_dims=3,
                                                                    max_side=4)))


@settings(max_examples=30)
@given(values=st.lists(st.tuples(st.sampled_from(["plain", "weak", "key"]), _arrays,
                                 st.sampled_from(["threefry2x32", "rbg", "unsafe_rbg"]),
                                 st.booleans()), min_size=1, max_size=4))
def test_property_jax_values_round_trip_bit_exactly(tmp_path_factory, values):
    """Weak and strong arrays of any bits (NaN payloads, -0.0), keys of each impl, each saved
    once or twice (refs), come back with the same bits, dtype, weak type and key impl."""
    state = {}
    for i, (kind, array, impl, twice) in enumerate(values):
        if kind == "key":
            size = jax.random.key_data(jax.random.key(0, impl=impl)).shape[-1]
            raw = np.frombuffer(array.tobytes() or b"\1", np.uint8)
            data = np.resize(raw, 4 * size * 2).view(np.uint32)
            value = jax.random.wrap_key_data(data.reshape(2, size), impl=impl)
        elif kind == "weak":
            value = jax_convert.weakly_typed(jnp.asarray(array))
        else:
            value = jnp.asarray(array)
        state[f"v{i}"] = (value, value) if twice else (value,)
    path = tmp_path_factory.mktemp("p") / "h.sckpt"
    safeckpt.save(state, path)
    back = safeckpt.load(path, framework="jax")
    for name, saved in state.items():
        loaded = back[name]
        assert len(loaded) == len(saved) and loaded[0] is loaded[-1]
        want, got = saved[0], loaded[0]
        assert got.dtype == want.dtype and got.shape == want.shape
        assert getattr(got, "weak_type", False) == getattr(want, "weak_type", False)
        if jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
            want, got = jax.random.key_data(want), jax.random.key_data(got)
        assert bits(got) == bits(want)


# -- weak types [R9] -------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [jnp.asarray(0.5), jnp.full((2, 3), 1.5), jnp.asarray(3)])
def test_R9_weak_type_is_kept(tmp_path, value):
    assert value.weak_type
    back, path = save_load({"v": value, "strong": jnp.ones(2)}, tmp_path, framework="jax")
    assert back["v"].weak_type and not back["strong"].weak_type
    assert back["v"].dtype == value.dtype and bits(back["v"]) == bits(value)
    assert _header(path)["tree"][2] == ["weak", ["tensor", 0]]
    plain = safeckpt.load(path)["v"]
    assert type(plain) is np.ndarray and bits(plain) == bits(value)


def test_R9_bf16_arithmetic_after_a_load_keeps_its_dtype(tmp_path):
    params = jnp.ones(4, jnp.bfloat16)
    lr = jnp.asarray(0.1)
    assert (params * lr).dtype == jnp.bfloat16
    back, _ = save_load({"params": params, "lr": lr}, tmp_path, framework="jax")
    step = back["params"] - back["lr"] * back["params"]
    assert step.dtype == jnp.bfloat16
    assert bits(step) == bits(params - lr * params)


def test_R9_weakly_typed_is_weak_same_bits_and_sharding():
    """weakly_typed uses jax's private lax._convert_element_type: this fails if jax changes it."""
    need_devices(4)
    mesh = jax.make_mesh((2, 2), ("a", "b"))
    sharding = NamedSharding(mesh, PartitionSpec("a", "b"))
    x = jax.device_put(np.arange(16, dtype=np.float32).reshape(4, 4), sharding)
    weak = jax_convert.weakly_typed(x)
    assert weak.weak_type and not x.weak_type and weak.dtype == x.dtype
    assert bits(weak) == bits(x) and weak.sharding == sharding
    one = jax.device_put(np.float32(2.5), jax.devices()[3])
    weak = jax_convert.weakly_typed(one)
    assert weak.weak_type and weak.devices() == {jax.devices()[3]} and weak.committed


def test_R9_a_weak_scalar_node_loads_as_a_weak_jax_array():
    data = forge({"w": W}, minor=5, extra={"tree": ["dict", "w", ["tensor", 0], "lr",
                                                    ["weak", ["scalar", 10, b"\x00\x00\x00\x3f"]]]})
    with safeckpt.Reader(data) as f:
        lr = f.load(framework="jax")["lr"]
        assert lr.weak_type and lr.dtype == jnp.float32 and float(lr) == 0.5
        assert f.load()["lr"] == np.float32(0.5)


# -- devices [R11] ---------------------------------------------------------------------------------

def test_R11_a_committed_device_is_saved_and_restored(tmp_path):
    need_devices(4)
    on2 = jax.device_put(jnp.arange(4.0), jax.devices()[2])
    fresh = jnp.arange(3.0)  # on the default device, not committed: no device saved
    back, path = save_load({"on2": on2, "fresh": fresh}, tmp_path, framework="jax")
    assert _header(path)["tree"] == ["dict", "on2", ["tensor", 0, "cpu:2"], "fresh",
                                     ["tensor", 1]]
    assert back["on2"].devices() == {jax.devices()[2]} and back["on2"].committed
    assert not back["fresh"].committed and bits(back["on2"]) == bits(on2)
    key = jax.device_put(jax.random.key(4), jax.devices()[1])
    weak = jax.device_put(jnp.asarray(0.5), jax.devices()[3])
    back, path = save_load({"k": key, "lr": weak}, tmp_path, framework="jax")
    assert back["k"].devices() == {jax.devices()[1]} and back["k"].dtype == key.dtype
    assert back["lr"].devices() == {jax.devices()[3]} and back["lr"].weak_type


def test_R11_a_device_this_host_lacks_loads_to_the_default_with_one_warning():
    names = [f"w{i}" for i in range(3)]
    data = forge({n: W for n in names}, minor=1, extra={"tree": [
        "dict", *[x for i, n in enumerate(names) for x in (n, ["tensor", i, "cpu:99"])]]})
    with safeckpt.Reader(data) as f:
        with pytest.warns(UserWarning) as record:
            back = f.load(framework="jax")
    assert len(record) == 1
    assert all(f"'{n}' (cpu:99)" in str(record[0].message) for n in names)
    assert back["w0"].devices() == {jax.devices()[0]} and bits(back["w0"]) == bits(W)
    with pytest.warns(UserWarning, match="'w' was saved on device 'tpu:7'"):
        JaxLeaf(W, "w", device="tpu:7").to_jax()


def test_R11_sharded_arrays_save_no_device(tmp_path):
    need_devices(4)
    mesh = jax.make_mesh((2, 2), ("a", "b"))
    x = jax.device_put(np.arange(16.0, dtype=np.float32).reshape(4, 4),
                       NamedSharding(mesh, PartitionSpec("a", "b")))
    back, path = save_load({"x": x}, tmp_path, framework="jax")
    assert minor_of(path) == 0 and "tree" not in _header(path)  # a flat 1.0 file
    assert bits(back["x"]) == bits(x)


def test_R11_torch_refuses_a_jax_device_it_lacks_unless_remapped(tmp_path):
    need_devices(4)
    if not need_torch():
        pytest.skip("torch is not installed")
    path = tmp_path / "t.sckpt"
    safeckpt.save({"x": jax.device_put(jnp.ones(2), jax.devices()[2])}, path)
    with pytest.raises(safeckpt.InvalidValueError, match="'x'.*cpu:2.*map_location"):
        safeckpt.load(path, framework="torch")
    assert safeckpt.load(path, framework="torch", map_location="cpu")["x"].tolist() == [1.0, 1.0]


# -- JaxLeaf: shardings, devices, x64, dtypes ------------------------------------------------------

class Recording:
    """A lazy array: shape, dtype and slicing only (no __array__), recording every slice read."""

    def __init__(self, array):
        self._array, self.shape, self.dtype, self.reads = array, array.shape, array.dtype, []

    def __getitem__(self, index):
        self.reads.append(index)
        return self._array[index]


def _norm(index, shape):
    return tuple(range(*s.indices(n)) for s, n in zip(index, shape))


def test_jax_leaf_named_sharding_reads_only_each_shards_slice():
    need_devices(4)
    mesh = jax.make_mesh((2, 2), ("a", "b"))
    sharding = NamedSharding(mesh, PartitionSpec("a", "b"))
    array = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    lazy = Recording(array)
    x = JaxLeaf(lazy, "w").to_jax(sharding=sharding)
    assert x.sharding == sharding and bits(x) == bits(array)
    for shard in x.addressable_shards:
        assert bits(shard.data) == bits(array[shard.index])
    wanted = {_norm(i, array.shape) for i in sharding.devices_indices_map(array.shape).values()}
    assert {_norm(i, array.shape) for i in lazy.reads} == wanted  # shard slices, nothing else
    assert all(len(r[0]) * len(r[1]) == 12 for r in (_norm(i, array.shape) for i in lazy.reads))


def test_jax_leaf_sharded_keys_and_weak_arrays():
    need_devices(4)
    mesh = jax.make_mesh((2, 2), ("a", "b"))
    sharding = NamedSharding(mesh, PartitionSpec("a", "b"))
    keys = jax.random.split(jax.random.key(9), 4).reshape(2, 2)
    data = np.asarray(jax.random.key_data(keys))
    leaf = JaxLeaf(Recording(data), "rng", key_impl="threefry2x32")
    assert leaf.shape == (2, 2) and leaf.dtype == keys.dtype
    back = leaf.to_jax(sharding=sharding)
    assert back.dtype == keys.dtype and back.sharding == sharding
    assert bits(jax.random.key_data(back)) == bits(data)
    weak = JaxLeaf(np.ones((4, 4), np.float32), "lr", weak=True).to_jax(sharding=sharding)
    assert weak.weak_type and weak.sharding == sharding


def test_jax_leaf_to_a_device_and_to_the_saved_device():
    need_devices(4)
    x = JaxLeaf(W, "w").to_jax(sharding=jax.devices()[3])
    assert x.devices() == {jax.devices()[3]} and bits(x) == bits(W)
    y = JaxLeaf(W, "w", device="cpu:1").to_jax()
    assert y.devices() == {jax.devices()[1]} and y.committed
    z = JaxLeaf(W, "w").to_jax()
    assert not z.committed and bits(z) == bits(W)


def test_jax_leaves_from_materialize_are_lazy_and_unplaced(tmp_path):
    path = tmp_path / "l.sckpt"
    key = jax.random.key(3)
    safeckpt.save({"w": W, "rng": key, "lr": jnp.asarray(0.5), "tied": [W, W]}, path)
    with safeckpt.open(path) as f:
        leaves = tree.materialize(f, tree.find(f, None), framework="jax", jax_leaves=True)
        assert isinstance(leaves["w"], JaxLeaf) and leaves["w"].array.base is not None  # a view
        assert leaves["tied"][0] is leaves["tied"][1]
        assert leaves["rng"].key_impl == "threefry2x32" and leaves["rng"].shape == ()
        assert leaves["lr"].weak and leaves["lr"].dtype == np.float32
        assert bits(jax.random.key_data(leaves["rng"].to_jax())) == bits(jax.random.key_data(key))
        with pytest.raises(ValueError, match="jax_leaves=True needs framework='jax'"):
            tree.materialize(f, tree.find(f, None), jax_leaves=True)


def test_jax_leaf_x64_is_refused_or_cast_on_request():
    if jax.config.jax_enable_x64:
        pytest.skip("x64 is on")
    big = np.array([1.5, -2.25], np.float64)
    with pytest.raises(safeckpt.UnsupportedDtypeError, match="'d'.*cast_x64=True"):
        JaxLeaf(big, "d").to_jax()
    cast = JaxLeaf(big, "d").to_jax(cast_x64=True)
    assert cast.dtype == jnp.float32 and bits(cast) == bits(big.astype(np.float32))
    ints = JaxLeaf(np.array([1, -5], np.int64), "i").to_jax(cast_x64=True)
    assert ints.dtype == jnp.int32 and ints.tolist() == [1, -5]
    with pytest.raises(safeckpt.UnsupportedDtypeError, match="'i'.*int32"):
        JaxLeaf(np.array([1 << 40], np.int64), "i").to_jax(cast_x64=True)


def test_jax_leaf_ml_dtypes_jax_has_and_lacks():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    for name in ("int4", "float8_e4m3", "float4_e2m1fn"):
        if hasattr(ml_dtypes, name):
            array = np.arange(4).astype(getattr(ml_dtypes, name))
            x = JaxLeaf(array, "q").to_jax()
            assert x.dtype == array.dtype and bits(x) == bits(array)
    if hasattr(ml_dtypes, "float6_e2m3fn"):
        with pytest.raises(safeckpt.UnsupportedDtypeError, match="'q6'.*float6_e2m3fn"):
            JaxLeaf(np.zeros(2, ml_dtypes.float6_e2m3fn), "q6").to_jax()


def test_from_numpy_still_works_and_refuses_64_bits():
    assert bits(jax_convert.from_numpy(W, "w")) == bits(W)
    if not jax.config.jax_enable_x64:
        with pytest.raises(safeckpt.UnsupportedDtypeError, match="'d'.*jax_enable_x64"):
            jax_convert.from_numpy(np.ones(2), "d")


# -- minor version, hostile nodes ------------------------------------------------------------------

def test_minor_is_5_only_with_weak_or_key_nodes(tmp_path):
    assert set(writer.NODE_MINOR) == tree.WRAPPERS and tree.tree_minor is writer.tree_minor
    plain = tmp_path / "a.sckpt"
    safeckpt.save({"w": jnp.ones(3), "step": 1}, plain)
    assert minor_of(plain) == 1
    for value in (jnp.asarray(0.5), jax.random.key(0)):
        path = tmp_path / "b.sckpt"
        safeckpt.save({"v": value, "step": 1}, path)
        assert minor_of(path) == 5
    assert tree.tree_minor(["list", ["tensor", 0], ["list", ["key", "rbg", ["ref", 0]]]]) == 5
    assert tree.tree_minor(["list", ["tensor", 0, "cpu:2"]]) == 0


def forged(node, minor=5):
    return forge({"w": W}, minor=minor, extra={"tree": ["dict", "a", ["list", 1, node]]})


def refuse(data, error, *words, **limits):
    for load in (lambda: safeckpt.Reader(data, **limits),
                 lambda: safeckpt.load_bytes(data, **limits)):
        with pytest.raises(error) as info:
            load()
        for word in words:
            assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("node, words", [
    (["weak"], ["1 items", "[R9]"]),
    (["weak", ["tensor", 0], 1], ["3 items", "[R9]"]),
    (["weak", 0.5], ["float 0.5", "[R9]"]),
    (["weak", ["list", ["tensor", 0]]], ["a list node", "[R9]"]),
    (["weak", ["weak", ["tensor", 0]]], ["a weak node", "[R9]"]),
    (["weak", ["key", "rbg", ["tensor", 0]]], ["a key node", "[R9]"]),
    (["weak", ["tensor"]], ["tensor node in a weak node has 1 items", "[R2]"]),
    (["weak", ["tensor", 1]], ["tensor index 1", "[R3]"]),
    (["weak", ["scalar", 10, b"\0"]], ["4 bytes", "[R5]"]),
    (["key", "rbg"], ["2 items", "[R10]"]),
    (["key", "", ["tensor", 0]], ["implementation ''", "[R10]"]),
    (["key", 7, ["tensor", 0]], ["implementation 7", "[R10]"]),
    (["key", "rbg", ["scalar", 7, b"\0" * 4]], ["a scalar node", "[R10]"]),
    (["key", "rbg", ["ref", 0]], ["ref to tensor 'w'", "no tensor node", "[R3]"]),
    (["key", "rbg", ["tensor", 0, ""]], ["device ''", "[R3]"]),
])
def test_R9_R10_bad_wrapper_nodes_name_the_path(node, words):
    path_words = [] if "no tensor node" in words else ["tree['a'][1]"]
    refuse(forged(node), safeckpt.HeaderError, *path_words, *words)


def test_R9_R10_a_second_tensor_node_inside_a_wrapper_is_named():
    data = forge({"w": W}, minor=5, extra={"tree": ["list", ["tensor", 0],
                                                    ["weak", ["tensor", 0]]]})
    refuse(data, safeckpt.HeaderError, "tree[1]", "tensor node already at tree[0]", "[R3]")
    data = forge({"w": W}, minor=5, extra={"tree": ["list", ["key", "rbg", ["tensor", 0]],
                                                    ["tensor", 0]]})
    refuse(data, safeckpt.HeaderError, "tree[1]", "already at tree[0]", "[R3]")


def test_R6_a_wrapper_child_counts_for_the_depth_limit():
    node = ["weak", ["tensor", 0]]
    for _ in range(62):
        node = ["list", node]
    refuse(forge({"w": W}, minor=5, extra={"tree": node}), safeckpt.LimitError,
           "tree" + "[0]" * 62, "max_depth=64", "[R6]")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = safeckpt.Reader(forge({"w": W}, minor=5, extra={"tree": node[1]})).load()
    inner = back
    while isinstance(inner, list):
        inner = inner[0]
    assert bits(inner) == bits(W)
