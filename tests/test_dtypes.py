"""The dtype table (FORMAT.md section 4, safeckpt/dtypes.py): one table, ml_dtypes loaded lazily."""

import subprocess
import sys

import numpy as np
import pytest
from forge import forge

import safeckpt
from safeckpt import dtypes

BIG_ENDIAN_MACHINE = sys.byteorder == "big"  # the real host, whatever a test forces
ML_DTYPES_NAMES = ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                   "float8_e4m3b11fnuz", "float8_e3m4", "float8_e4m3", "float8_e8m0fnu",
                   "float8_e5m3fnu", "float6_e2m3fn", "float6_e3m2fn", "float4_e2m1fn", "int4",
                   "uint4", "int2", "uint2", "int1", "uint1", "complex32", "bcomplex32")


def _in_fresh_python(code):
    """Run ``code`` in a new interpreter and return its stdout (its stderr on failure)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_import_safeckpt_loads_neither_ml_dtypes_nor_a_framework():
    """``import safeckpt`` stays light: ml_dtypes (~0.5-1.3 s), torch and jax load on first use."""
    out = _in_fresh_python("import sys, safeckpt; print(sorted(m for m in "
                           "('ml_dtypes', 'torch', 'jax') if m in sys.modules))")
    assert out == "[]"


def test_a_plain_file_round_trips_without_ml_dtypes():
    out = _in_fresh_python(
        "import sys, numpy as np, safeckpt\n"
        "data = safeckpt.save_bytes({'w': np.arange(3, dtype=np.float32)})\n"
        "back = safeckpt.load_bytes(data)['w']\n"
        "with safeckpt.Reader(data) as f: info = f.info('w')\n"
        "print(back.tolist(), info.dtype, 'ml_dtypes' in sys.modules)")
    assert out == "[0.0, 1.0, 2.0] float32 False"


def test_bfloat16_codes_resolve_on_first_use_in_a_fresh_process():
    """A file holding bfloat16 loads ml_dtypes when read; an array of it is saved with ml_dtypes
    imported by the caller after safeckpt (CODE_BY_DTYPE must still find its code)."""
    out = _in_fresh_python(
        "import sys, numpy as np, safeckpt\n"
        "from safeckpt.dtypes import CODE_BY_DTYPE\n"
        "import ml_dtypes\n"
        "x = np.arange(3, dtype=np.float32).astype(ml_dtypes.bfloat16)\n"
        "print(CODE_BY_DTYPE.get(x.dtype), CODE_BY_DTYPE[x.dtype])\n"
        "data = safeckpt.save_bytes({'x': x})\n"
        "print(safeckpt.load_bytes(data)['x'].dtype)")
    assert out.splitlines() == ["12 12", "bfloat16"]
    out = _in_fresh_python(
        "import sys, numpy as np, safeckpt\n"
        "from safeckpt.dtypes import DTYPE_BY_CODE\n"
        "print('ml_dtypes' in sys.modules, DTYPE_BY_CODE[13], 'ml_dtypes' in sys.modules)")
    assert out == "False float8_e4m3fn True"


def test_the_table_reads_as_one_sequence_of_codes():
    """Every name of the table keeps its meaning: DTYPES, DTYPE_BY_CODE, NAME_BY_CODE,
    ITEMSIZE_BY_CODE and CODE_BY_DTYPE agree, code by code, with FORMAT.md section 4."""
    n = len(dtypes.NAME_BY_CODE)
    assert n == 35 == len(dtypes.DTYPE_BY_CODE) == len(dtypes.ITEMSIZE_BY_CODE) == len(dtypes.DTYPES)
    assert n == len(dtypes.BITS_BY_CODE) == len(dtypes.MINOR_BY_CODE)
    assert list(dtypes.DTYPE_BY_CODE) == [dtypes.DTYPE_BY_CODE[code] for code in range(n)]
    for code, name, dt in dtypes.DTYPES:
        assert dt.name == name == dtypes.NAME_BY_CODE[code]
        assert dt.itemsize == dtypes.ITEMSIZE_BY_CODE[code]
        assert dtypes.CODE_BY_DTYPE[dt] == dtypes.code_of(dt) == code
        assert dtypes.dtype_of(code) == dt and dt.byteorder in "=|<"
    assert [n for n in dtypes.NAME_BY_CODE if n in ML_DTYPES_NAMES] == list(ML_DTYPES_NAMES)
    for bad in (-1, n, 255):
        with pytest.raises(IndexError):
            dtypes.DTYPE_BY_CODE[bad]
    assert dtypes.CODE_BY_DTYPE.get(np.dtype(object)) is None
    with pytest.raises(KeyError):
        dtypes.CODE_BY_DTYPE[np.dtype(">f4")]  # big-endian: code_of turns it little-endian first
    assert dtypes.code_of(np.dtype(">f4")) == 10


def test_minor_version_of_codes():
    """[T1], FORMAT.md section 5: codes 0-16 are version 1.0, the fnuz float8 codes 1.3, codes
    19-34 (every other ml_dtypes type) 1.5."""
    assert dtypes.minor_of(b"") == 0
    assert dtypes.minor_of(bytes(range(17))) == 0
    assert dtypes.minor_of(bytes([0, 17])) == dtypes.minor_of(bytes([18])) == 3
    for code in range(19, 35):
        assert dtypes.minor_of(bytes([0, 17, code])) == dtypes.minor_of(bytes([code])) == 5


@pytest.mark.parametrize("name", ["float8_e4m3fnuz", "float8_e5m2fnuz"])
def test_fnuz_float8_round_trips_in_sckpt_with_version_1_3(backend, name):
    import ml_dtypes
    x = np.array([0.5, -2, 0], getattr(ml_dtypes, name))
    data = safeckpt.save_bytes({"x": x, "y": np.ones(2, np.float32)})
    assert int.from_bytes(data[10:12], "little") == 3  # minor: the lowest that holds code 17/18
    with safeckpt.Reader(data) as f:
        assert f.version == (1, 3) and f.info("x").dtype == x.dtype
        assert f["x"].tobytes() == x.tobytes() and f["x"].dtype == x.dtype
    plain = safeckpt.save_bytes({"y": np.ones(2, np.float32)})
    assert int.from_bytes(plain[10:12], "little") == 0



def test_a_tree_scalar_of_a_1_3_code_makes_the_file_1_3(backend, tmp_path):
    """FORMAT.md section 4: a ``scalar`` node's code counts for the file's minor version too."""
    import ml_dtypes
    scale = ml_dtypes.float8_e5m2fnuz(0.5)
    path = tmp_path / "s.sckpt"
    safeckpt.save({"w": np.ones(2, np.float32), "scale": scale, "step": 3}, path)
    assert int.from_bytes(path.read_bytes()[10:12], "little") == 3
    back = safeckpt.load(path)["scale"]
    assert back.dtype == scale.dtype and back.tobytes() == scale.tobytes()
    safeckpt.save({"w": np.ones(2, np.float32), "scale": np.float32(0.5)}, path)
    assert int.from_bytes(path.read_bytes()[10:12], "little") == 1  # a tree, no new code


def test_a_code_this_reader_does_not_know_is_refused_naming_the_tensor(backend):
    """[T1]: how a reader older than a file's codes refuses it (here: the code after the table)."""
    data = forge({"w": np.zeros(2, np.uint8)},
                       edit=lambda header: header.update(dtypes=bytes([len(dtypes.NAME_BY_CODE)])))
    unknown = len(dtypes.NAME_BY_CODE)  # 35
    with pytest.raises(safeckpt.UnsupportedDtypeError, match=rf"'w'.*code {unknown}.*newer safeckpt"):
        safeckpt.load_bytes(data)


def test_format_md_lists_the_same_table():
    """docs/FORMAT.md section 4 and dtypes.py agree code by code (name and bits)."""
    import pathlib
    import re
    text = (pathlib.Path(__file__).parent.parent / "docs" / "FORMAT.md").read_text()
    section = text[text.index("## 4. Dtype codes"):text.index("## 5. Versions")]
    rows = re.findall(r"\|\s*(\d+)\s*\|\s*(\w+)\s*\|\s*(\d+)\s*\|", section)
    table = sorted((int(code), name, int(size)) for code, name, size in rows)
    assert table == [(code, dtypes.NAME_BY_CODE[code], dtypes.BITS_BY_CODE[code])
                     for code in range(len(dtypes.NAME_BY_CODE))]


# ---------------------------------------------------------------------------------------------
# Byte order: native ('=') is big-endian on a big-endian host; BIG_ENDIAN_HOST forces that path


@pytest.fixture(params=[False, True], ids=["little-endian host", "big-endian host"])
def big_endian_host(request, monkeypatch):
    """Run the test as on a host of each byte order (native order resolved by the flag).

    On a little-endian machine numpy spells ``'<'`` as ``'='``: a forced big-endian host has no
    little-endian dtype of more than one byte, so the ``'<'`` cases check the real host only.
    """
    monkeypatch.setattr(dtypes, "BIG_ENDIAN_HOST", request.param)
    return request.param


def test_is_little_endian_resolves_native_order_with_the_host(big_endian_host):
    import ml_dtypes
    assert dtypes.is_little_endian(np.dtype("=f4")) is not big_endian_host
    assert dtypes.is_little_endian(np.dtype(ml_dtypes.bfloat16)) is not big_endian_host
    for single in ("|u1", "?", "=i1", ml_dtypes.float8_e4m3fn):  # one byte: no order to get wrong
        assert dtypes.is_little_endian(np.dtype(single))
    assert not dtypes.is_little_endian(np.dtype(">i8"))
    assert dtypes.is_little_endian(np.dtype("<c16")) is (not big_endian_host or BIG_ENDIAN_MACHINE)


@pytest.mark.parametrize("order", ["<", ">", "="])
def test_code_of_accepts_every_byte_order_on_every_host(big_endian_host, order):
    for name in ("int16", "float32", "complex128", "uint64"):
        dt = np.dtype(name).newbyteorder(order)
        assert dtypes.code_of(dt) == dtypes.NAME_BY_CODE.index(name)
        assert dtypes.little_endian(dt) == np.dtype(name).newbyteorder("<")
        assert dtypes.CODE_BY_DTYPE[dtypes.little_endian(dt)] == dtypes.code_of(dt)
    with pytest.raises(safeckpt.UnsupportedDtypeError, match="'w'.*<U3"):
        dtypes.code_of(np.dtype("<U3").newbyteorder(order), "w")


def test_a_native_array_is_byteswapped_only_on_a_big_endian_host(big_endian_host):
    native = np.array([[1, 0x0102], [0x7F00, 3]], dtype="=u2")
    out = dtypes.to_little_endian(native)
    if big_endian_host:  # its bytes are big-endian: a little-endian copy
        assert out is not native and out.tobytes() == native.byteswap().tobytes()
        assert out.dtype == np.dtype("<u2") and out.flags.c_contiguous
    else:
        assert out is native


def test_little_and_big_endian_arrays_are_the_same_on_every_host(big_endian_host):
    little = np.arange(6, dtype="<i4").reshape(2, 3)
    if not big_endian_host or BIG_ENDIAN_MACHINE:  # see the fixture
        assert dtypes.to_little_endian(little) is little
    big = np.arange(6, dtype=">i4").reshape(3, 2).T  # not C-contiguous
    out = dtypes.to_little_endian(big)
    assert out.flags.c_contiguous and out.dtype == np.dtype("<i4")
    assert np.array_equal(out, big) and out.tobytes() == np.ascontiguousarray(big, "<i4").tobytes()


def test_bfloat16_bytes_are_swapped_on_a_big_endian_host(big_endian_host):
    """numpy has bfloat16 in native order only: its bytes are swapped, its dtype kept."""
    import ml_dtypes
    x = np.array([1.0, -2.5], ml_dtypes.bfloat16)
    assert dtypes.code_of(x.dtype) == 12 and dtypes.little_endian(x.dtype) == x.dtype
    out = dtypes.to_little_endian(x)
    assert out.dtype == x.dtype
    assert out.tobytes() == (x.byteswap().tobytes() if big_endian_host else x.tobytes())
