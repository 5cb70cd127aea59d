"""Nested objects (docs/FORMAT.md section 8): save/load, exact types, names, sharing, lazy access,
and one test per MUST of [R1]-[R8] on hand-made headers (tests/forge.py), under both backends."""

import collections
import struct

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import safeckpt
from safeckpt import _backend, tree
from safeckpt import format as fmt
from safeckpt.dtypes import BITS_BY_CODE, CODE_BY_DTYPE, DTYPE_BY_CODE
from safeckpt.api import save_tree_bytes as save_bytes
from safeckpt.tree import same
from forge import forge

pytestmark = pytest.mark.usefixtures("backend")

W = np.arange(6, dtype=np.float32).reshape(2, 3)


def roundtrip(obj, tmp_path, **kwargs):
    path = tmp_path / "t.sckpt"
    safeckpt.save(obj, path)
    return safeckpt.load(path, **kwargs)


def header_of(data):
    length = struct.unpack_from("<Q", data, 16)[0]
    return msgpack.unpackb(data[32:32 + length], raw=False, strict_map_key=False)


def test_spec_example():
    """Section 8's example: the table, the tree and the version."""
    obj = {"w": W, "tied": W, "betas": (0.9, 0.999), 3: np.float32(1.5)}
    data = save_bytes(obj)
    assert struct.unpack_from("<HH", data, 8) == (1, 1)
    header = header_of(data)
    assert header["names"] == ["w"]
    assert header["tree"] == ["dict", "w", ["tensor", 0], "tied", ["ref", 0], "betas",
                              ["tuple", 0.9, 0.999], 3, ["scalar", 10, b"\x00\x00\xc0\x3f"]]
    back = safeckpt.Reader(data).load()
    assert same(back, obj) and back["tied"] is back["w"]


def test_R1_plain_flat_dict_is_a_version_1_0_file(tmp_path):
    data = save_bytes({"a.b": W, "c": np.int64(3) * np.ones(2, np.int64)})
    assert struct.unpack_from("<HH", data, 8) == (1, 0) and "tree" not in header_of(data)
    assert data == safeckpt.save_bytes({"a.b": W, "c": 3 * np.ones(2, np.int64)})
    # an OrderedDict, a non-tensor value or a shared tensor needs the tree
    for obj in [collections.OrderedDict(a=W), {"a": W, "n": 1}, {"a": W, "b": W}, {"a": {"b": W}}]:
        assert struct.unpack_from("<HH", save_bytes(obj), 8) == (1, 1)
        assert same(safeckpt.Reader(save_bytes(obj)).load(), obj)


def test_flat_file_loads_as_dict_and_by_prefix(tmp_path):
    path = tmp_path / "flat.sckpt"
    safeckpt.save_file({"model.w": W, "model.b": W[0], "step": np.int64(3)}, path)
    back = safeckpt.load(path)
    assert list(back) == ["model.w", "model.b", "step"]
    assert safeckpt.load(path, prefix="model.w").tolist() == W.tolist()
    assert list(safeckpt.open(path).tree) == ["model.w", "model.b", "step"]


def test_exact_types(tmp_path):
    nan_payload = struct.unpack("<d", struct.pack("<Q", 0x7FF8_0000_DEAD_BEEF))[0]
    neg_snan = struct.unpack("<d", struct.pack("<Q", 0xFFF0_0000_0000_0001))[0]
    obj = collections.OrderedDict([
        ("ints", [0, -1, 2**63 - 1, -2**63, 2**64 - 1, True, False]),
        ("floats", (0.0, -0.0, float("inf"), -float("inf"), nan_payload, neg_snan, 5e-324)),
        ("text", ["", "é", "a.b", b"", b"\x00\xff"]),
        ("none", None),
        ("int_keys", {0: "zero", "0": "str zero", -5: [], 2**64 - 1: ()}),
        ("nested", {"t": (1, (2, [3, {"x": ()}])), "l": [[], {}, collections.OrderedDict()]}),
        ("scalars", [DTYPE_BY_CODE[code].type(1) for code in range(len(DTYPE_BY_CODE))]
         + [np.float64(-0.0), np.float32("nan"), np.int64(-2**63), np.uint64(2**64 - 1),
            np.bool_(True)]),
        ("arrays", [W, np.array(7, np.int8), np.zeros((0, 3), np.float16), W.T]),
    ])
    back = roundtrip(obj, tmp_path)
    assert same(back, obj)
    assert type(back) is collections.OrderedDict and list(back) == list(obj)
    assert [type(k) for k in back["int_keys"]] == [int, str, int, int]
    assert type(back["scalars"][10]) is np.float32 and type(back["scalars"][-5]) is np.float64
    assert np.float64(back["floats"][4]).view(np.uint64) == 0x7FF8_0000_DEAD_BEEF
    assert str(back["floats"][1]) == "-0.0"


def test_root_can_be_any_node(tmp_path):
    for obj in [W, 3, None, "x", (W, W), [], np.float16(2)]:
        assert same(roundtrip(obj, tmp_path), obj)
    with safeckpt.open(tmp_path / "t.sckpt") as f:
        assert f.keys() == []  # the last one, a scalar, is in the header
    safeckpt.save(W, tmp_path / "w.sckpt")
    assert safeckpt.open(tmp_path / "w.sckpt").keys() == ["_"]  # [R7]


@pytest.mark.parametrize("value, words", [
    (2**64, ["obj['a'][1]", "2**64-1", "str or bytes"]),
    (-2**63 - 1, ["obj['a'][1]", "int64"]),
    ({1.5: 1}, ["obj['a'][1]", "key 1.5", "str or int"]),
    ({True: 1}, ["key True"]),
    ({(1, 2): 1}, ["key (1, 2)"]),
    ({2**70: 1}, ["key 1180591620717411303424", "range"]),
    (collections.defaultdict(int), ["obj['a'][1]", "collections.defaultdict", "never pickles"]),
    (collections.namedtuple("P", "x")(1), ["P"]),
    (np.ma.masked_array([1]), ["numpy.ma.MaskedArray"]),
    (bytearray(b"x"), ["bytearray"]),
    ({1, 2}, ["set"]),
    (object(), ["builtins.object", "state_dict()"]),
    (np.str_("x"), ["obj['a'][1]", "cannot be stored"]),
])
def test_R2_unsupported_values_are_refused_naming_the_path(tmp_path, value, words):
    error = safeckpt.UnsupportedDtypeError if isinstance(value, np.str_) else safeckpt.InvalidValueError
    with pytest.raises(error) as info:
        safeckpt.save({"a": [0, value]}, tmp_path / "x.sckpt")
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert not list(tmp_path.iterdir())  # nothing written


def test_object_with_state_is_refused_naming_it(tmp_path):
    class Scheduler:
        def state_dict(self):
            return {}
    with pytest.raises(safeckpt.InvalidValueError, match=r"state\['scheduler'\].*Scheduler"):
        safeckpt.tree.flatten({"scheduler": Scheduler()}, root="state")
    with pytest.raises(safeckpt.UnsupportedDtypeError, match=r"obj\['o'\]"):
        safeckpt.save({"o": np.array([None])}, tmp_path / "x.sckpt")


def test_R6_cycles_and_depth_are_refused_at_save(tmp_path):
    loop = []
    loop.append(loop)
    with pytest.raises(safeckpt.LimitError, match="max_depth=64"):
        safeckpt.save(loop, tmp_path / "x.sckpt")
    deep = W
    for _ in range(62):
        deep = [deep]
    assert same(roundtrip(deep, tmp_path), deep)  # 62 lists + the tensor node at level 64
    with pytest.raises(safeckpt.LimitError):
        safeckpt.save([deep], tmp_path / "x.sckpt")


def test_flatten_spells_paths_out_only_for_a_message(monkeypatch):
    # a save of many tensors builds no path string; a failing one names its path exactly
    calls = []
    real = fmt.path_of
    monkeypatch.setattr(fmt, "path_of", lambda root, keys: calls.append(keys) or real(root, keys))
    tree.flatten({"model": {f"w{i}": np.ones(2, np.float32) for i in range(50)}, "step": 3})
    assert calls == []
    with pytest.raises(safeckpt.UnsupportedDtypeError, match=r"""tensor "obj\['a'\]\[0\]": """):
        tree.flatten({"a": [np.array(["x"])]})
    assert calls == [("a", 0)]


def test_R7_names(tmp_path):
    obj = {"model": collections.OrderedDict([("layers.0.weight", W), ("b", W[0])]),
           "a.b": W + 1, "a": {"b": W + 2}, 1: W + 3, "1": W + 4, "l": [W + 5, (W + 6,)]}
    data = save_bytes(obj)
    assert header_of(data)["names"] == ["model.layers.0.weight", "model.b", "a.b", "a.b~1", "1",
                                        "1~1", "l.0", "l.1.0"]
    assert same(safeckpt.Reader(data).load(), obj)


def test_R8_shared_tensors_stored_once_and_come_back_shared(tmp_path):
    big = np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)
    obj = {"embed": big, "head": big, "view": big[:], "t": big.T, "half": big[:128], "copy": big.copy()}
    path = tmp_path / "s.sckpt"
    safeckpt.save(obj, path)
    with safeckpt.open(path) as f:
        assert f.keys() == ["embed", "t", "half", "copy"]  # big[:] is the same memory and layout
    back = safeckpt.load(path)
    assert back["embed"] is back["head"] is back["view"]
    assert same(back, obj)
    # empty arrays are never merged (they have no memory to share)
    e = np.zeros(0)
    back = roundtrip({"a": e, "b": e}, tmp_path)
    assert back["a"] is not back["b"]


def test_prefix(tmp_path):
    obj = {"model": {"layers.0.weight": W, "layers": [W + 1]}, "optimizer": {"state": {3: {"m": W + 2}},
           "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]}, "3": "str key"}
    path = tmp_path / "p.sckpt"
    safeckpt.save(obj, path)
    assert same(safeckpt.load(path, prefix="model"), obj["model"])
    assert same(safeckpt.load(path, prefix="model.layers.0.weight"), W)  # the longest key wins
    assert same(safeckpt.load(path, prefix="model.layers.0"), W + 1)
    assert same(safeckpt.load(path, prefix="optimizer.state.3"), {"m": W + 2})
    assert safeckpt.load(path, prefix="optimizer.param_groups.0.betas") == (0.9, 0.99)
    assert same(safeckpt.load(path, prefix=("optimizer", "state", 3, "m")), W + 2)
    assert safeckpt.load(path, prefix=("3",)) == "str key"
    for bad in ["nope", "model.x", "optimizer.param_groups.1", ("optimizer", "state", "3"),
                "optimizer.param_groups.0.lr.x", "model.layers.\u00b2", "model.layers." + "9" * 5000]:
        with pytest.raises(KeyError):
            safeckpt.load(path, prefix=bad)


def test_prefix_keys_of_both_types(tmp_path):
    """A str key wins over an int key with the same text; int keys match their str() exactly."""
    path = tmp_path / "k.sckpt"
    safeckpt.save({3: "int", "3": "str", -1: "minus", 7: {"a.b": 1, "a": {"b": 2}}}, path)
    assert safeckpt.load(path, prefix="3") == "str" and safeckpt.load(path, prefix=(3,)) == "int"
    assert safeckpt.load(path, prefix="-1") == "minus"
    assert safeckpt.load(path, prefix="7.a.b") == 1 and safeckpt.load(path, prefix="7.a") == {"b": 2}
    for bad in ("03", "-0", "+3", "7.a.c"):
        with pytest.raises(KeyError):
            safeckpt.load(path, prefix=bad)


def test_find_in_finds_what_a_prefix_finds_in_a_file(tmp_path):
    """tree.find_in (a prefix in a state in memory, as safeckpt.torch.load_state takes one)
    finds what the same prefix finds in the saved file, or raises KeyError where that does."""
    obj = {"runs": {-1: {"w": W}, 0: [W + 1, (W + 2,)], "0": "str"}, "a.b": {"c": 1},
           "a": {"b": 2}, "l": [W, W + 1], 1: "one"}
    path = tmp_path / "f.sckpt"
    safeckpt.save(obj, path)
    found = 0
    for prefix in [None, "runs.-1", "runs.-1.w", ("runs", -1), "runs.0", ("runs", 0),
                   ("runs", 0, -1, 0), ("runs", 0, -3), "runs.0.1", "a.b", "a.b.c", "l.1", "l.-1",
                   ("l", -1), ("l", -2), ("l", -3), "l.2", "l.01", "1", (1,), (True,), (1.0,),
                   ("1",), "runs.-2", "x", ()]:
        try:
            expected = safeckpt.load(path, prefix=prefix)
        except KeyError:
            with pytest.raises(KeyError):
                tree.find_in(obj, prefix)
            continue
        assert same(tree.find_in(obj, prefix), expected), prefix
        found += 1
    assert found == 16
    with pytest.raises(KeyError, match=r"^\"state has nothing at 'runs.-2'\"$"):
        tree.find_in(obj, "runs.-2", where="state")


class ReadSpy:
    """Wraps the backend to record which byte ranges are read with pread."""

    def __init__(self, monkeypatch):
        self.offsets, self.ranges = [], []
        real = _backend.backend.read_into

        def read_into(fd, offsets, lengths, dests, checksum=False):
            self.offsets.extend(offsets)
            self.ranges.extend((o, o + n) for o, n in zip(offsets, lengths))
            return real(fd, offsets, lengths, dests, checksum)
        monkeypatch.setattr(_backend.backend, "read_into", read_into)


def test_lazy_subtree_reads_only_what_is_asked(tmp_path, monkeypatch):
    obj = {"model": {"a": W, "b": W + 1}, "optimizer": {"m": W + 2, "v": [W + 3]}, "step": 5}
    path = tmp_path / "l.sckpt"
    safeckpt.save(obj, path)
    spy = ReadSpy(monkeypatch)
    with safeckpt.open(path, mmap=False) as f:
        tree = f.tree
        assert list(tree) == ["model", "optimizer", "step"] and tree["step"] == 5
        assert tree.kind is dict and len(tree) == 3 and "model" in tree and "x" not in tree
        assert spy.offsets == []
        assert same(tree["model"]["b"], W + 1)
        assert spy.offsets == [f.info("model.b").offset]
        spy.offsets.clear()
        spy.ranges.clear()
        assert same(tree["optimizer"].load(), obj["optimizer"])
        # neighbouring small tensors are read together: exactly the bytes from m to the end of v.0
        m, v0 = f.info("optimizer.m"), f.info("optimizer.v.0")
        assert spy.ranges == [(m.offset, v0.offset + v0.nbytes)]
        assert tree["optimizer"]["v"].kind is list and repr(tree["optimizer"]["v"]).endswith("of 1>")
        spy.offsets.clear()
        assert same(f.load("model.a"), W) and spy.offsets == [f.info("model.a").offset]
    with pytest.raises(safeckpt.ReaderClosedError):
        tree["model"]


def test_verify_checks_only_the_loaded_subtree(tmp_path):
    path = tmp_path / "v.sckpt"
    safeckpt.save({"good": {"w": W}, "bad": {"w": W + 1}}, path)
    data = bytearray(path.read_bytes())
    with safeckpt.open(path) as f:
        data[f.info("bad.w").offset] ^= 1
    path.write_bytes(bytes(data))
    assert same(safeckpt.load(path, prefix="good", verify=True), {"w": W})
    with pytest.raises(safeckpt.ChecksumError, match="'bad.w'"):
        safeckpt.load(path, verify=True)
    with pytest.raises(safeckpt.ChecksumError, match="'bad.w'"):
        safeckpt.load(path, prefix="bad", verify=True, mmap=False)


def test_loads_that_copy_the_bytes_verify_by_default(tmp_path):
    """verify=None (auto) [T10]: load, prefix loads, tree views and Subtree.load check what they
    read into fresh memory; a mapped load stays lazy; verify=False checks nothing."""
    path = tmp_path / "v.sckpt"
    safeckpt.save({"model": {"w": W}, "step": 3}, path)
    data = bytearray(path.read_bytes())
    with safeckpt.open(path) as f:
        data[f.info("model.w").offset] ^= 1
    path.write_bytes(bytes(data))
    for load in (lambda: safeckpt.load(path, mmap=False),
                 lambda: safeckpt.load(path, prefix="model", mmap=False),
                 lambda: safeckpt.Reader(bytes(data)).load(),
                 lambda: safeckpt.open(path, mmap=False).tree["model"]["w"],
                 lambda: safeckpt.open(path, mmap=False).tree["model"].load(),
                 lambda: safeckpt.load(path, verify=True)):
        with pytest.raises(safeckpt.ChecksumError, match="'model.w'"):
            load()
    assert safeckpt.load(path)["model"]["w"][0, 0] != W[0, 0]
    assert safeckpt.load(path, mmap=False, verify=False)["model"]["w"][0, 0] != W[0, 0]
    assert safeckpt.open(path, mmap=False).tree["step"] == 3


def test_load_options_are_checked(tmp_path):
    path = tmp_path / "o.sckpt"
    safeckpt.save({"w": W}, path)
    with pytest.raises(ValueError, match="framework"):
        safeckpt.load(path, framework="tensorflow")
    with pytest.raises(ValueError, match="map_location"):
        safeckpt.load(path, map_location="cpu")


# -- hostile trees, one per MUST (section 8) -------------------------------------------------------

def forged(tree, tensors=(("w", W),), minor=1, **kwargs):
    return forge(tensors, minor=minor, extra={"tree": tree}, **kwargs)


def refuse(data, error, *words, **limits):
    for load in (lambda: safeckpt.Reader(data, **limits), lambda: safeckpt.load_bytes(data, **limits)):
        with pytest.raises(error) as info:
            load()
        for word in words:
            assert word in str(info.value), (word, str(info.value))


def test_hostile_valid_forged_tree_loads():
    data = forged(["dict", "a", ["list", ["tensor", 0, "cuda:0"], ["ref", 0]], 7, 1.5])
    back = safeckpt.Reader(data).load()
    assert same(back, {"a": [W, W], 7: 1.5}) and back["a"][0] is back["a"][1]


def test_H8_tree_in_a_version_1_0_file_is_refused():
    refuse(forged(["tensor", 0], minor=0), safeckpt.HeaderError, "'tree'", "[H8]")


def test_H8_newer_minor_with_unknown_keys_keeps_the_tree():
    data = forge({"w": W}, minor=fmt.VERSION_MINOR + 1,
                 extra={"tree": ["list", ["tensor", 0]], "future": 1})
    assert same(safeckpt.Reader(data).load(), [W])


@pytest.mark.parametrize("tree, words", [
    ({"a": ["tensor", 0]}, ["tree", "map is not a tree node", "[R2]"]),
    (["dict", "a", ["set", 1], "w", ["tensor", 0]], ["tree['a']", "'set'", "[R2]"]),
    (["list", [], ["tensor", 0]], ["tree[0]", "None", "[R2]"]),
    (["list", [1, 2], ["tensor", 0]], ["tree[0]", "tag 1", "[R2]"]),
    (["tensor"], ["tree", "2 or 3", "[R2]"]),
    (["tensor", 0, "cpu", 1], ["4 items", "[R2]"]),
    (["list", ["tensor", 0], ["ref", 0, 1]], ["tree[1]", "ref node", "[R2]"]),
])
def test_R2_bad_nodes(tree, words):
    refuse(forged(tree), safeckpt.HeaderError, *words)


@pytest.mark.parametrize("tree, words", [
    (["tensor", 1], ["index 1", "0..0", "[R3]"]),
    (["tensor", -1], ["index -1", "[R3]"]),
    (["tensor", True], ["index True", "[R3]"]),
    (["tensor", "w"], ["index 'w'", "[R3]"]),
    (["list", ["tensor", 0], ["dict", "x", ["tensor", 0]]], ["tree[1]['x']", "'w'", "tree[0]", "ref",
                                                            "[R3]"]),
    (["list", ["ref", 0]], ["tree[0]", "'w'", "no tensor node", "[R3]"]),
    (["list", 1], ["'w'", "not in the tree", "[R3]"]),
    (["tensor", 0, ""], ["device ''", "[R3]"]),
    (["tensor", 0, 5], ["device 5", "[R3]"]),
])
def test_R3_bad_tensor_references(tree, words):
    refuse(forged(tree), safeckpt.HeaderError, *words)


@pytest.mark.parametrize("tree, words", [
    (["dict", "a"], ["even number", "1 items", "[R4]"]),
    (["dict", "w", ["tensor", 0], "w", 1], ["key 'w' appears twice", "[R4]"]),
    (["odict", 1, 0, 1, ["tensor", 0]], ["key 1 appears twice", "[R4]"]),
    (["dict", 1.5, ["tensor", 0]], ["key 1.5", "not a str or int", "[R4]"]),
    (["dict", None, ["tensor", 0]], ["key None", "[R4]"]),
    (["dict", True, ["tensor", 0]], ["key True", "[R4]"]),
    (["dict", b"k", ["tensor", 0]], ["key b'k'", "[R4]"]),
    (["dict", [1], ["tensor", 0]], ["key [1]", "not a str or int", "[R4]"]),  # unhashable
])
def test_R4_bad_dict_nodes(tree, words):
    refuse(forged(tree), safeckpt.HeaderError, *words)


def test_R4_int_and_str_keys_are_distinct():
    back = safeckpt.Reader(forged(["dict", 1, ["tensor", 0], "1", 2])).load()
    assert same(back, {1: W, "1": 2})


@pytest.mark.parametrize("tree, words", [
    (["list", ["tensor", 0], ["scalar", len(DTYPE_BY_CODE), b"\0"]],
     ["tree[1]", f"code {len(DTYPE_BY_CODE)}", "[R5]"]),
    (["list", ["tensor", 0], ["scalar", "f4", b"\0" * 4]], ["code 'f4'", "[R5]"]),
    (["list", ["tensor", 0], ["scalar", 10, b"\0"]], ["float32", "4 bytes", "[R5]"]),
    (["list", ["tensor", 0], ["scalar", 10, "abcd"]], ["4 bytes of bin", "[R5]"]),
])
def test_R5_bad_scalars(tree, words):
    refuse(forged(tree), safeckpt.HeaderError, *words)


@pytest.mark.parametrize("code, byte", [(24, 0x8E), (24, 0x40), (25, 0xC0), (26, 0x10),
                                         (27, 0xF1), (28, 0x10), (29, 0x04), (30, 0x80),
                                         (31, 0x02), (32, 0xFF)])
def test_R5_packed_scalar_bits_above_the_width_are_refused(code, byte):
    """[R5] a packed code's scalar byte has no bit set above ``bits`` (section 4): a file with
    one is refused naming the path, as [T11] refuses a tensor's padding bits."""
    name = tree.DTYPE_BY_CODE[code].name
    refuse(forged(["list", ["tensor", 0], ["scalar", code, bytes([byte])]], minor=5),
           safeckpt.HeaderError, "tree[1]", name, "above", "[R5]")
    low = byte & ((1 << BITS_BY_CODE[code]) - 1)  # the same bits, canonical: loaded
    back = safeckpt.Reader(forged(["list", ["tensor", 0], ["scalar", code, bytes([low])]],
                                  minor=5)).load()
    assert back[1].dtype == tree.DTYPE_BY_CODE[code] and back[1].view(np.uint8) == low


def test_R5_packed_scalars_are_written_canonical(tmp_path):
    """[R5] a numpy scalar of a packed code whose byte has high bits set (ml_dtypes reads them:
    0x8E as float6_e2m3fn is -1.75, 0x40 is -0.0; int4 negation sets them) is stored as its
    value's canonical byte, as packing.pack stores a tensor's element; the value comes back."""
    import ml_dtypes
    from safeckpt import packing
    f6 = ml_dtypes.float6_e2m3fn
    values = [np.uint8(0x8E).view(f6), np.uint8(0x40).view(f6), -np.array([3], ml_dtypes.int4)[0],
              np.uint8(0xF5).view(ml_dtypes.float4_e2m1fn), np.uint8(0x01).view(ml_dtypes.uint1)]
    path = tmp_path / "s.sckpt"
    safeckpt.save({"a": values}, path)
    nodes = safeckpt.open(path).stored_tree[2][1:]
    for value, node in zip(values, nodes):
        code = CODE_BY_DTYPE[value.dtype]
        assert node == ["scalar", code, packing.pack(np.asarray(value).reshape(1), code).tobytes()]
        assert node[2][0] >> BITS_BY_CODE[code] == 0
    back = safeckpt.load(path)["a"]
    for value, got in zip(values, back):
        assert got.dtype == value.dtype
        assert np.float32(got).tobytes() == np.float32(value).tobytes()  # the sign of -0.0 too


def test_R6_depth_limit_names_the_path():
    tree = ["tensor", 0]
    for _ in range(63):
        tree = ["list", tree]
    refuse(forged(tree), safeckpt.LimitError, "tree" + "[0]" * 62, "max_depth=64", "[R6]")
    tree = ["list", tree]
    back = safeckpt.Reader(forged(tree), max_depth=70).load()
    for _ in range(64):
        back = back[0]
    assert same(back, W)
    refuse(forged(["list", ["list", ["tensor", 0]]]), safeckpt.LimitError, "max_depth=3", max_depth=3)


def test_R6_deep_trees_do_not_recurse():
    """Depth up to what msgpack decodes is checked and built without recursion."""
    tree = ["tensor", 0]
    for _ in range(1000):
        tree = ["list", tree]
    data = forged(tree)
    refuse(data, safeckpt.LimitError, "[R6]")
    with safeckpt.Reader(data, max_depth=2000) as reader:
        back = reader.load()  # 1000 levels, built without recursion
        assert len(reader.tree) == 1
    for _ in range(1000):
        assert type(back) is list and len(back) == 1
        back = back[0]
    assert same(back, W)


def test_a_none_in_a_list_is_a_value_not_a_missing_key():
    with safeckpt.Reader(save_bytes({"a": [W, None], "b": (None,)})) as reader:
        assert reader.tree["a"][1] is None and 1 in reader.tree["a"]
        assert reader.tree["b"][0] is None and list(reader.tree["b"]) == [0]


HOSTILE_NODES = [None, True, -1, 2**64 - 1, 1.5, "x", b"", [], [[]], [None], {"a": 1}, ["tensor"],
                 ["tensor", 1], ["tensor", 2], ["tensor", 0, ""], ["tensor", 1, 7], ["ref", 0], ["ref", 1],
                 ["ref", 9], ["scalar", 10, b"\0" * 4], ["scalar", 12, b"\0" * 2], ["scalar", 13, b"\0"],
                 ["scalar", 99, b""], ["scalar", 10, b"\0"], ["scalar", -1, b""], ["dict", 1],
                 ["dict", [1], 1], ["dict", 1.5, 1], ["dict", "a", 1, "a", 2], ["odict", True, 1],
                 ["dict", 2**64 - 1, None, -2**63, None], ["list", ["list", ["list"]]], ["tuple"],
                 ["set", 1], [["list"]], ["list", {"k": []}]]


def _walk_views(subtree):
    """Read every value of a lazy tree view."""
    stack = [subtree]
    while stack:
        node = stack.pop()
        for key in node:
            value = node[key]
            if isinstance(value, safeckpt.tree.Subtree):
                stack.append(value)


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("where", ["child", "root", "key"])
def test_hostile_nodes_raise_only_safeckpt_errors(where):
    """Every malformed node, at every kind of place, through every way to read a tree (open, lazy
    views, prefixes, load as numpy and as jax arrays): a SafeckptError or a correct load, never
    another exception (issue 10 item 6)."""
    tensors = (("w", W), ("b", np.arange(3, dtype=np.int8)))
    for bad in HOSTILE_NODES:
        tree = {"child": ["dict", "a", ["list", ["tensor", 0], bad], "b", ["tensor", 1]],
                "root": bad,
                "key": ["dict", bad, ["tensor", 0], "b", ["tensor", 1]]}[where]
        data = forged(tree, tensors=tensors)
        try:
            with safeckpt.Reader(data) as reader:
                tree_view = reader.tree
                if isinstance(tree_view, safeckpt.tree.Subtree):
                    _walk_views(tree_view)
                    for prefix in ("a", "a.1", ("a", 1), "b"):
                        try:
                            reader.load(prefix)
                        except KeyError:
                            pass
                reader.load()
                if _has_jax():
                    reader.load(framework="jax")
        except safeckpt.SafeckptError:
            pass


def _has_jax():
    try:
        import jax  # noqa: F401
    except ImportError:
        return False
    return True


# -- properties ------------------------------------------------------------------------------------

def _float(bits):
    return struct.unpack("<d", struct.pack("<Q", bits))[0]


@st.composite
def numpy_values(draw):
    """Numpy scalars and small arrays of any storable dtype, with random bytes (every bit pattern)."""
    dtype = draw(st.sampled_from(DTYPE_BY_CODE))
    shape = draw(st.sampled_from([None, (), (0,), (3,), (2, 2)]))
    count = int(np.prod(shape or ())) * dtype.itemsize
    raw = draw(st.binary(min_size=count, max_size=count))
    if dtype == np.bool_:
        raw = bytes(b & 1 for b in raw)
    bits = BITS_BY_CODE[CODE_BY_DTYPE[dtype]]
    if bits < 8:  # a packed code: canonical bytes (packing keeps the value; test_dtypes_packed)
        raw = bytes(b & ((1 << bits) - 1) for b in raw)
    array = np.frombuffer(raw, np.uint8).view(dtype).reshape(shape or ()).copy()
    return array[()] if shape is None else array


leaves = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1)
          | st.floats(allow_nan=True) | st.integers(0, 2**64 - 1).map(_float)
          | st.text(max_size=8) | st.binary(max_size=8) | numpy_values())
keys = st.text(max_size=6) | st.integers(-2**63, 2**64 - 1)
trees = st.recursive(
    leaves,
    lambda inner: (st.lists(inner, max_size=4) | st.lists(inner, max_size=4).map(tuple)
                   | st.dictionaries(keys, inner, max_size=4)
                   | st.dictionaries(keys, inner, max_size=4).map(
                       lambda d: collections.OrderedDict(reversed(list(d.items()))))),
    max_leaves=20,
)


@settings(max_examples=60)
@given(trees)
def test_property_nested_trees_round_trip_exactly(obj):
    data = save_bytes(obj)
    assert same(safeckpt.Reader(data).load(), obj)


tensors = st.builds(lambda shape, seed: np.random.default_rng(seed).standard_normal(shape).astype(np.float32),
                    st.sampled_from([(), (3,), (2, 3)]), st.integers(0, 2**32 - 1))
param_groups = st.fixed_dictionaries({
    "lr": st.floats(1e-6, 1.0), "betas": st.tuples(st.floats(0, 1), st.floats(0, 1)),
    "eps": st.floats(1e-12, 1e-6), "weight_decay": st.sampled_from([0, 0.0, 1e-2]),
    "amsgrad": st.booleans(), "foreach": st.sampled_from([None, True, False]),
    "maximize": st.booleans(), "fused": st.none(),
})


@st.composite
def optimizer_states(draw):
    """What torch.optim state_dicts look like: int parameter ids, step counters, tuples, None."""
    n = draw(st.integers(0, 5))
    state = {}
    for pid in draw(st.permutations(range(n))):
        entry = {"step": draw(st.sampled_from([np.float32(3), np.array(3.0, np.float32), 3]))}
        for name in draw(st.lists(st.sampled_from(["exp_avg", "exp_avg_sq", "momentum_buffer",
                                                   "max_exp_avg_sq"]), unique=True, max_size=3)):
            entry[name] = draw(tensors | st.none())
        state[pid] = entry
    groups = []
    ids = list(range(n))
    while ids or not groups:
        take = draw(st.integers(0, len(ids)))
        groups.append({**draw(param_groups), "params": ids[:take]})
        ids = ids[take:]
        if not take:
            break
    return {"state": state, "param_groups": groups}


@settings(max_examples=40)
@given(optimizer_states())
def test_property_optimizer_like_states_round_trip_exactly(obj):
    assert same(safeckpt.Reader(save_bytes(obj)).load(), obj)


def test_prefix_to_a_none_or_plain_leaf(tmp_path):
    path = tmp_path / "leaf.sckpt"
    safeckpt.save({"epoch": None, "step": 0, "cfg": {"name": None}}, path)
    assert safeckpt.load(path, prefix="epoch") is None
    assert safeckpt.load(path, prefix=("step",)) == 0
    assert safeckpt.load(path, prefix="cfg.name") is None
    with pytest.raises(KeyError):
        safeckpt.load(path, prefix="missing")



def test_R5_scalars_are_little_endian_on_a_big_endian_host(monkeypatch):
    """[R5] a scalar node holds the value's little-endian bytes. dtypes.BIG_ENDIAN_HOST takes a
    big-endian host's path: a bfloat16 (which numpy has in native order only) is swapped on save
    and back on load, so the tree holds the bytes a little-endian host writes for it, reversed,
    and it loads back equal. A native float32 is big-endian there too, so its bytes are reversed
    as well, and it loads as a '<f4' view with the value that host gave it."""
    import ml_dtypes
    from safeckpt import dtypes
    obj = {"bf16": ml_dtypes.bfloat16(1.5), "f32": np.float32(2.5)}
    little = dict(zip(*[iter(header_of(save_bytes(obj))["tree"][1:])] * 2))
    monkeypatch.setattr(dtypes, "BIG_ENDIAN_HOST", True)
    data = save_bytes(obj)
    big = dict(zip(*[iter(header_of(data)["tree"][1:])] * 2))
    assert big["bf16"][2] == little["bf16"][2][::-1] != little["bf16"][2]
    assert big["f32"][2] == little["f32"][2][::-1]
    back = safeckpt.Reader(data).load()
    assert same(back["bf16"], obj["bf16"])
    assert back["f32"] == np.float32(2.5).view(">f4") and back["f32"].dtype.str == "<f4"
