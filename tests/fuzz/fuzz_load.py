"""atheris harness on the Python load path: ``safeckpt.load_bytes`` and a Reader on the bytes, under
the C core and the pure-Python backend, which must agree.

Every input must load or raise a SafeckptError subclass, and both backends must give the same
outcome (the same exception class, or both load the same arrays). Anything else (another
exception, a crash, a disagreement) is a finding.

    python tests/fuzz/fuzz_load.py tests/fuzz/corpus_py -max_total_time=60

(tests/fuzz/run_fuzzers.sh runs it in CI; a copy of the corpus is used there.)
"""

import sys
import zlib

import atheris

with atheris.instrument_imports(include=["safeckpt"]):
    import safeckpt
    from safeckpt import _backend

import numpy as np

BACKENDS = ["c", "python"]
try:
    from safeckpt._native import crc32c as _native_crc
except ImportError:
    BACKENDS = ["python"]
    from safeckpt._pycrc32c import crc32c as _native_crc


def outcome(data):
    """What loading ``data`` gives: ("ok", arrays) or (exception class name, None)."""
    try:
        with safeckpt.Reader(data) as reader:
            arrays = reader.load_all()
            reader.metadata
            if reader.has_checksums:
                reader.verify(arrays=arrays)
            if hasattr(reader, "load"):
                reader.load()
            for name in reader.keys():
                s = reader.get_slice(name)
                if s.shape:
                    s[-1:]
        return "ok", arrays
    except safeckpt.SafeckptError as exc:
        return type(exc).__name__, None


def fix_header_crc(data):
    """``data`` with a correct header CRC [P8] in its prefix, when the header lies in the data.

    Without this nearly every mutation of the header stops at the checksum; seven inputs in eight
    get it, so the checksum check itself stays fuzzed too.
    """
    if len(data) < 32 or zlib.crc32(data) % 8 == 0:
        return data
    header_len = int.from_bytes(data[16:24], "little")
    if 32 + header_len > len(data):
        return data
    crc = _native_crc(data[32:32 + header_len])
    return data[:28] + crc.to_bytes(4, "little") + data[32:]


def TestOneInput(data):
    data = fix_header_crc(data)
    results = []
    for name in BACKENDS:
        _backend.use(name)
        results.append(outcome(data))
    kinds = [kind for kind, _ in results]
    if len(set(kinds)) > 1:
        raise AssertionError(f"backends disagree on this input: {dict(zip(BACKENDS, kinds))}")
    if kinds[0] == "ok" and len(results) == 2:
        first, second = results[0][1], results[1][1]
        assert list(first) == list(second)
        for key in first:
            assert first[key].dtype == second[key].dtype
            assert np.array_equal(first[key].view(np.uint8), second[key].view(np.uint8))


def main():
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
