"""Reading and writing .safetensors ([ST1]-[ST9] in safeckpt/safetensors_format.py), both backends."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import safeckpt
from safeckpt import safetensors_format as sft
from safeckpt import safetensors_writer

pytestmark = pytest.mark.usefixtures("backend")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

TENSORS = {
    "embed.weight": np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32),
    "norm": np.array([1.5, -0.0, np.inf, np.nan], np.float16),
    "bf": np.arange(9, dtype=np.float32).reshape(3, 3).astype(ml_dtypes.bfloat16),
    "f8": np.array([0.5, -2], ml_dtypes.float8_e4m3fn),
    "f8b": np.array([0.25], ml_dtypes.float8_e5m2),
    "mask": np.array([True, False, True]),
    "step": np.array(12, np.int64),
    "u": np.array([2**64 - 1], np.uint64),
    "i8": np.array([-128, 127], np.int8),
    "u16": np.array([65535], np.uint16),
    "c": np.array([1 + 2j], np.complex64),
    "empty": np.zeros((0, 3), np.float64),
}


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("mmap", [True, False])
def test_reads_a_file_written_by_the_safetensors_package_bit_for_bit(tmp_path, mmap):
    path = tmp_path / "model.safetensors"
    safetensors_numpy.save_file(TENSORS, str(path), metadata={"format": "pt", "note": "é"})
    with safeckpt.open(path, mmap=mmap) as f:
        assert f.format == "safetensors" and f.metadata == {"format": "pt", "note": "é"}
        assert sorted(f.keys()) == sorted(TENSORS)
        for name, expected in TENSORS.items():
            assert same_bits(f[name], expected), name
            assert f.info(name).shape == expected.shape
        assert f.get_slice("embed.weight")[2:4].tolist() == TENSORS["embed.weight"][2:4].tolist()
        with pytest.raises(safeckpt.ChecksumError, match="safetensors files hold no checksums"):
            f.verify()
    loaded = safeckpt.load_file(path, mmap=mmap)
    assert all(same_bits(loaded[k], v) for k, v in TENSORS.items())
    assert same_bits(safeckpt.load(path)["bf"], TENSORS["bf"])


def test_writes_files_the_safetensors_package_reads(tmp_path):
    path = tmp_path / "out.safetensors"
    safetensors_writer.save_file(TENSORS, path, metadata={"format": "np", "epoch": 3})
    # safetensors' numpy loader has no float8 dtypes; every other tensor comes back bit for bit
    from safetensors import safe_open
    with safe_open(str(path), "np") as f:
        for k, v in TENSORS.items():
            if not k.startswith("f8"):
                assert same_bits(f.get_tensor(k), v), k
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
    assert meta["format"] == "np" and set(meta) == {"format", sft.SAFECKPT_KEY}
    with safeckpt.open(path) as f:  # our extras come back: the int is an int again [ST9]
        assert f.metadata == {"format": "np", "epoch": 3}
        assert f.keys() == list(TENSORS)  # the header keeps the caller's order
        assert all(f.info(k).offset % max(v.dtype.itemsize, 1) == 0 for k, v in TENSORS.items())


@pytest.mark.parametrize("name, st_name", [("float8_e4m3fnuz", "F8_E4M3FNUZ"),
                                           ("float8_e5m2fnuz", "F8_E5M2FNUZ")])
def test_fnuz_float8_both_ways_with_the_safetensors_package(tmp_path, name, st_name):
    """[ST4]: F8_E4M3FNUZ and F8_E5M2FNUZ are ml_dtypes' (and torch's) fnuz float8 types."""
    torch = pytest.importorskip("torch")
    import safetensors.torch
    x = np.array([0.5, -2, 0, 1.75], getattr(ml_dtypes, name))
    theirs = tmp_path / "theirs.safetensors"
    bits = torch.from_numpy(x.view(np.uint8))
    safetensors.torch.save_file({"x": bits.view(getattr(torch, name))}, str(theirs))
    assert st_name.encode() in theirs.read_bytes()
    assert same_bits(safeckpt.load_file(theirs)["x"], x)
    ours = tmp_path / "ours.safetensors"
    safetensors_writer.save_file({"x": x}, ours)
    back = safetensors.torch.load_file(str(ours))["x"]
    assert back.dtype == getattr(torch, name)
    assert back.view(torch.uint8).numpy().tobytes() == x.tobytes()
    safeckpt.convert(ours, tmp_path / "x.sckpt")  # and on to .sckpt, version 1.3 [T1]
    with safeckpt.open(tmp_path / "x.sckpt") as f:
        assert f.version == (1, 3) and same_bits(f["x"], x)


def test_save_refuses_what_safetensors_cannot_hold(tmp_path):
    with pytest.raises(safeckpt.UnsupportedDtypeError, match="'z'.*complex128"):
        safetensors_writer.save_file({"z": np.zeros(2, np.complex128)}, tmp_path / "x.safetensors")
    with pytest.raises(safeckpt.InvalidValueError, match="reserved"):
        safetensors_writer.save_file({"a": np.zeros(1)}, tmp_path / "x.safetensors",
                      metadata={sft.SAFECKPT_KEY: "x"})
    assert not list(tmp_path.iterdir())


def forge(header, data=b"", pad=True, length=None):
    """A safetensors file from a header (dict or raw bytes) and data bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


HOSTILE = [
    # (case, file bytes, error class, words in the message)
    ("length over the limit [ST1]", forge({}, length=200 << 20), safeckpt.LimitError,
     "max_header_size"),
    ("length 2**64-1 [ST1]", forge({}, length=2**64 - 1), safeckpt.LimitError, "max_header_size"),
    ("header past the end [ST1]", forge({}, length=1000), safeckpt.TruncatedFileError, "past the end"),
    ("not UTF-8 [ST2]", forge(b'{"\xff": 1}'), safeckpt.HeaderError, "UTF-8"),
    ("duplicate key [ST2]", forge(b'{"a": ' + json.dumps(entry()).encode() + b', "a": '
                                  + json.dumps(entry()).encode() + b"}", bytes(8)),
     safeckpt.HeaderError, "duplicate"),
    ("trailing JSON [ST2]", forge(b'{} {}'), safeckpt.HeaderError, "JSON"),
    ("NaN constant [ST2]", forge(b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 0]}}'),
     safeckpt.HeaderError, "NaN"),
    ("lone surrogate [ST2]", forge(b'{"\\ud800": ' + json.dumps(entry()).encode() + b"}", bytes(8)),
     safeckpt.HeaderError, "Unicode"),
    ("metadata not str [ST3]", forge({"__metadata__": {"a": 1}}), safeckpt.HeaderError, "not a str"),
    ("unknown dtype [ST4]", forge({"w": entry("F128")}, bytes(8)), safeckpt.UnsupportedDtypeError,
     "'w'"),
    ("F4 ending inside a byte [ST5]", forge({"w": entry("F4", (3,), (0, 2))}, bytes(2)),
     safeckpt.LayoutError, "'w'.*12 bits"),
    ("F6 of unpacked length [ST5]", forge({"w": entry("F6_E2M3", (4,), (0, 4))}, bytes(4)),
     safeckpt.LayoutError, "'w'.*needs 3"),
    ("extra key [ST4]", forge({"w": {**entry(), "x": 1}}, bytes(8)), safeckpt.HeaderError, "exactly"),
    ("negative dim [ST4]", forge({"w": entry(shape=(-2,))}, bytes(8)), safeckpt.HeaderError,
     "dimension"),
    ("float offset [ST4]", forge({"w": entry(offsets=(0.0, 8))}, bytes(8)), safeckpt.HeaderError,
     "data offset"),
    ("shape overflows [ST5]", forge({"w": entry(shape=(2**62, 4, 0), offsets=(0, 0))}),
     safeckpt.LayoutError, "too large"),
    ("size mismatch [ST5]", forge({"w": entry(offsets=(0, 12))}, bytes(12)), safeckpt.LayoutError,
     "needs 8"),
    ("gap [ST6]", forge({"w": entry(offsets=(4, 12))}, bytes(12)), safeckpt.LayoutError, "gap"),
    ("overlap [ST6]", forge({"a": entry(), "b": entry(offsets=(4, 12))}, bytes(12)),
     safeckpt.LayoutError, "overlaps"),
    ("data cut short [ST7]", forge({"w": entry()}, bytes(4)), safeckpt.TruncatedFileError,
     "not fully written"),
    ("trailing zip [ST7]", forge({"w": entry()}, bytes(8) + b"PK\x05\x06" + bytes(18)),
     safeckpt.LayoutError, "trailing"),
    ("bad extras [ST9]", forge({"__metadata__": {"__safeckpt__": "!!"}}), safeckpt.HeaderError,
     "__safeckpt__"),
    # A zero dimension must not hide the others: numpy refuses shapes whose non-zero dims times
    # the item size reach 2**63 even when the array is empty ("array is too big").
    ("zero dim hides a huge one [ST5]", forge({"w": entry(shape=(0, 2**62), offsets=(0, 0))}),
     safeckpt.LayoutError, "'w'.*too large"),
    ("zero dim, int16 [ST5]", forge({"w": entry("I16", (0, 2**63 - 1), (0, 0))}),
     safeckpt.LayoutError, "'w'.*too large"),
    # serde_json (which defines the header) reads -0 as a float, so it is no usize
    ("-0 dimension [ST4]", forge(b'{"w": {"dtype": "F32", "shape": [-0], "data_offsets": [0, 0]}}'),
     safeckpt.HeaderError, "'w'.*dimension -0"),
    ("-0 offset [ST4]", forge(b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [-0, 8]}}',
                              bytes(8)), safeckpt.HeaderError, "'w'.*data offset -0"),
    ("dtype a list [ST4]", forge({"w": entry(["F32"])}, bytes(8)), safeckpt.HeaderError,
     "'w'.*dtype.*str"),
    ("dtype an object [ST4]", forge({"w": entry({"F32": 1})}, bytes(8)), safeckpt.HeaderError,
     "'w'.*dtype.*str"),
    ("leading space [ST2]", forge(b' {"w": ' + json.dumps(entry()).encode() + b"}", bytes(8)),
     safeckpt.HeaderError, "whitespace before '{'"),
    ("leading newline, short file [ST2]", forge(b"\n{}"), safeckpt.HeaderError,
     "whitespace before '{'"),
]


@pytest.mark.parametrize("data, error, words", [case[1:] for case in HOSTILE],
                         ids=[case[0] for case in HOSTILE])
def test_hostile_safetensors_files_are_refused(tmp_path, data, error, words):
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(data)
    for mmap in (True, False):
        with pytest.raises(error, match=words):
            safeckpt.open(path, mmap=mmap)
    with pytest.raises(error, match=words):
        safeckpt.load_bytes(data)


@pytest.mark.parametrize("field", ["dtype", "shape", "data_offsets", "dimension", "offset"])
@pytest.mark.parametrize("bad", [{"x": "a" * 100_000}, [[[[[[[[[[[[1]]]]]]]]]]]] * 1000, 10**4000],
                         ids=["long", "deep", "huge int"])
def test_a_wrong_value_is_named_in_a_message_of_bounded_size(field, bad):
    """A message quotes a bad value in at most a few dozen characters, however large or deeply
    nested it is (repr of a 100 kB string or 4000-digit int; repr recursion)."""
    header = {"w": entry(), "__metadata__": {"k": "v"}}
    if field in ("dimension", "offset"):
        header["w"]["shape" if field == "dimension" else "data_offsets"][0] = bad
    else:
        header["w"][field] = bad
    with pytest.raises(safeckpt.SafeckptError, match="'w'") as caught:
        safeckpt.load_bytes(forge(json.dumps(header).encode(), bytes(8)))
    assert len(str(caught.value)) < 400


def test_more_dimensions_than_numpy_holds_is_a_limit_error_under_any_max_ndim():
    """[ST4], [T2]: a max_ndim above numpy's own limit (64; 32 before numpy 2) cannot let numpy's
    'maximum supported dimension' ValueError out, in either format."""
    from forge import forge as forge_sckpt, u64s
    from safeckpt.dtypes import NUMPY_MAX_NDIM
    ndim = NUMPY_MAX_NDIM + 6
    sckpt = forge_sckpt({"x": np.zeros((1,) * 32, np.float32)}, align=4096,  # data stays put
                        edit=lambda header: header.update(ndims=bytes([ndim]), shape=u64s([1] * ndim)))
    st = forge({"x": entry(shape=(1,) * ndim, offsets=(0, 4))}, bytes(4))
    for data in (sckpt, st):
        with pytest.raises(safeckpt.LimitError, match=f"'x'.*{ndim}.*numpy holds"):
            safeckpt.load_bytes(data, max_ndim=100)


def test_the_safetensors_package_refuses_our_layout_cases_too(tmp_path):
    """Our [ST6]/[ST7] are safetensors' own rules: the reference reader refuses the same files."""
    from safetensors import SafetensorError
    for case in ("gap [ST6]", "overlap [ST6]", "trailing zip [ST7]", "size mismatch [ST5]"):
        data = dict((c[0], c[1]) for c in HOSTILE)[case]
        with pytest.raises(SafetensorError):
            safetensors_numpy.load(data)


def test_a_tree_survives_sckpt_to_safetensors_and_back(tmp_path):
    w = np.arange(4, dtype=np.float32)
    state = {"model": {"w": w, "tied": w}, "epoch": 3, "betas": (0.9, float("nan")),
             "blob": b"\x00", "lr": np.float32(1e-3)}
    safeckpt.save(state, tmp_path / "s.sckpt", metadata={"run": "a", "n": [1, None]})
    safeckpt.convert(tmp_path / "s.sckpt", tmp_path / "s.safetensors")
    assert safetensors_numpy.load_file(str(tmp_path / "s.safetensors"))["model.w"].tolist() == w.tolist()
    back = safeckpt.load(tmp_path / "s.safetensors")
    assert safeckpt.tree.same(back, state) and back["model"]["w"] is back["model"]["tied"]
    with safeckpt.open(tmp_path / "s.safetensors") as f:
        assert f.metadata == {"run": "a", "n": [1, None]}


def test_sckpt_and_safetensors_magic_never_overlap():
    data = safeckpt.save_bytes({"w": np.zeros(2)})
    assert not sft.looks_like(data[:32])
    assert sft.looks_like(forge({})[:32])


# -- JSON values of every type where the header has one value: only SafeckptError may come out ----

BASE_HEADER = {"__metadata__": {"format": "pt"}, "a": entry("F32", (2, 3), (0, 24)),
               "b": entry("I16", (0, 5), (24, 24)), "c": entry("BF16", (1,), (24, 26))}
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.floats() | st.text(max_size=6)
    | st.integers(-2**70, 2**70)
    | st.sampled_from([0, 1, 2, 24, 26, -1, 2**62, 2**63 - 1, 2**63, 2**64])
    | st.sampled_from(["F32", "BF16", "F8_E4M3FNUZ", "F4", "", "__metadata__", "dtype"]),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets", "x", "a"]), inner,
                      max_size=4),
    max_leaves=8)


def _places(value, path=()):
    """Every path to a value inside a JSON value (dict keys and list indices)."""
    items = value.items() if isinstance(value, dict) else enumerate(value) \
        if isinstance(value, list) else ()
    for key, item in items:
        yield path + (key,)
        yield from _places(item, path + (key,))


@settings(max_examples=300)
@given(data=st.data())
def test_any_json_value_anywhere_in_the_header_gives_a_safeckpt_error_or_loads(tmp_path, data):
    """[ST2]-[ST5]: replacing any value of a valid header (or adding a key) with any JSON value
    either loads or raises a SafeckptError, through every reading path; never TypeError,
    numpy's ValueError or a RecursionError."""
    header = json.loads(json.dumps(BASE_HEADER))
    places = list(_places(header))
    path = data.draw(st.sampled_from(places + [("a", "x"), ("z",), ("__metadata__", "k")]))
    parent = header
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = data.draw(JSON_VALUES)
    raw = json.dumps(header).encode()  # NaN and Infinity become JSON's refused constants
    path = tmp_path / "m.safetensors"
    path.write_bytes(forge(raw, bytes(26)))
    for read in (safeckpt.load_file, safeckpt.load, lambda p: safeckpt.load_bytes(p.read_bytes()),
                 lambda p: safeckpt.convert(p, tmp_path / "m.sckpt")):
        try:
            read(path)
        except safeckpt.SafeckptError:
            pass
    for mmap in (True, False):
        try:
            with safeckpt.open(path, mmap=mmap) as f:
                for name in f.keys():
                    f.info(name)
                    f[name]
        except safeckpt.SafeckptError:
            pass


def test_json_hooks_name_where_they_are():
    """One pair of strict-JSON hooks for safetensors headers [ST2] and Hugging Face indexes [HF1]:
    ``where`` says which in the message."""
    with pytest.raises(safeckpt.HeaderError, match=r"duplicate JSON key in the safetensors header "
                       r"\[ST2\]: 'a'"):
        sft.unique_object([("a", 1), ("a", 2)])
    with pytest.raises(safeckpt.HeaderError, match=r"duplicate JSON key in the index \[HF1\]: 'a'"):
        sft.unique_object([("a", 1), ("b", 2), ("a", 3)], where="the index [HF1]")
    assert sft.unique_object([("a", 1), ("b", 2)], where="the index [HF1]") == {"a": 1, "b": 2}
    with pytest.raises(safeckpt.HeaderError, match=r"JSON constant NaN is not allowed in the "
                       r"safetensors header \[ST2\]"):
        sft.refuse_constant("NaN")
    with pytest.raises(safeckpt.HeaderError, match=r"JSON constant -Infinity is not allowed in the "
                       r"index \[HF1\]"):
        sft.refuse_constant("-Infinity", where="the index [HF1]")
