"""Replays the fuzzers' corpora (tests/fuzz/corpus_*) as plain tests, under both backends.

corpus_py holds inputs of the atheris harness (tests/fuzz/fuzz_load.py): whole files, each of which
must load or raise a SafeckptError subclass. corpus_c holds inputs of the libFuzzer harness
(tests/fuzz/fuzz_table.c), replayed here through the same framing (tests/fuzz/framing.py): the
validators of both backends must agree, and a table they accept must pass the padding check or
fail it with PADDING. Inputs a fuzzer found are added to the corpora, so each stays a regression
test.
"""

import pathlib
import sys

import numpy as np
import pytest

import safeckpt
from safeckpt.errors import Code

FUZZ = pathlib.Path(__file__).parent / "fuzz"
sys.path.insert(0, str(FUZZ))
from framing import unframe  # noqa: E402

PY_CORPUS = sorted((FUZZ / "corpus_py").iterdir())
C_CORPUS = sorted((FUZZ / "corpus_c").iterdir())


def test_corpora_are_small_and_present():
    assert len(PY_CORPUS) >= 5 and len(C_CORPUS) >= 5
    assert all(p.stat().st_size <= 64 << 10 for p in PY_CORPUS + C_CORPUS)


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("path", PY_CORPUS + C_CORPUS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_corpus_file_loads_or_raises_safeckpt_error(path):
    data = path.read_bytes()
    try:
        with safeckpt.Reader(data) as reader:
            arrays = reader.load_all()
            if reader.has_checksums:
                reader.verify(arrays=arrays)
            if hasattr(reader, "load"):
                reader.load()
            for name in reader.keys():
                if reader.info(name).shape:
                    reader.get_slice(name)[-1:]
    except safeckpt.SafeckptError:
        return
    assert all(isinstance(a, np.ndarray) for a in arrays.values())


@pytest.mark.parametrize("path", C_CORPUS, ids=lambda p: p.name)
def test_c_corpus_validators_agree(path):
    pytest.importorskip("safeckpt._native")
    from safeckpt import _native, _pybackend

    data = path.read_bytes()
    for limit in (len(data), (1 << 64) - 1):
        prefix = data[:32]
        assert _native.parse_prefix(prefix, len(data), limit)[0] == \
            _pybackend.parse_prefix(prefix, len(data), limit)[0]
    framed = unframe(data)
    if framed is None:
        return
    n, dtypes, ndims, offsets, nbytes, shape, header_end, align, max_ndim = framed
    args = (n, dtypes, ndims, shape, offsets, nbytes, header_end, align, len(data), max_ndim)
    result = _native.validate_table(*args)
    assert tuple(map(int, _pybackend.validate_table(*args))) == tuple(map(int, result))
    if result[0] == Code.OK:
        for backend in (_native, _pybackend):
            code, _ = backend.check_padding(data, n, offsets, nbytes, header_end)
            assert code in (Code.OK, Code.PADDING)
