"""The cost of every entry point that takes a file, bounded by the file's size (SECURITY.md, "Bounds").

Each hostile *shape* below is a valid-looking file that packs as many objects as it can into each
header byte: empty tensors, deep or wide metadata, tree nodes, long names, a .safetensors header.
Every entry point that takes a file (open, load, per-name access, verify, the CLI's inspect, verify
and diff, convert) runs on every shape, and

- **memory**: the peak of what it allocates (tracemalloc, which sees Python objects and numpy
  buffers; mapped file pages are not allocations) stays below ``MEMORY_PER_BYTE`` times the file
  size, plus a fixed ``SLACK``;
- **time**: the same shape made 8 times larger costs less than ``TIME_RATIO`` (24) times the CPU
  time: linear work gives about 8, quadratic work 64. This compares the machine with itself in one
  process, so a busy or slow machine does not change the outcome.

convert from .npz, .npy and torch files and the DCP reader have their own bound tests
(tests/test_interop.py, tests/test_dcp.py), since their hostile shapes are of other formats.
"""

import base64
import contextlib
import json
import os
import struct
import tempfile
import time
import tracemalloc

import msgpack
import numpy as np
import pytest

import safeckpt
from safeckpt import cli

from forge import forge

MEMORY_PER_BYTE = 80  # SECURITY.md, "Guaranteed" 2: the bound on decoding a header
SLACK = 2 << 20  # caches and first-use imports that do not grow with the file
TIME_RATIO = 24  # 8x the file: linear ~8x the time, quadratic ~64x
TIME_TRIES = 3  # measured again when over: a shared VM once slowed one large run 4x (144 ms
# for a ~30 ms verify beside a CPU hog), while a quadratic path stays over the bound
pytestmark = pytest.mark.cost  # .ci/sanitize skips these: ASan changes what memory and time cost

HEADER_BYTES = 1 << 18  # every shape is made about this large (counts below)


def _tensors(n):
    """n empty tensors with short names: the tensor table at its densest."""
    return forge([(f"t{i}", np.empty(0, np.float32)) for i in range(n)], align=8)


def _ranks(n):
    """n tensors of 32 dimensions of size 1: the shape column at its densest."""
    return forge([(f"r{i}", np.empty((1,) * 32, np.uint8)) for i in range(n)], align=8)


def _meta(value):
    return lambda n: forge([("x", np.zeros(1, np.float32))], metadata={"m": value(n)})


def _wide(n):
    """The red team's metadata: one long key holding a long list (paths were quadratic) [R1]."""
    return forge([("x", np.zeros(1, np.float32))], metadata={"A" * n: [0] * n})


def _tree(value):
    def make(n):
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "tree.sckpt")
            safeckpt.save({"w": np.zeros(1, np.float32), "s": value(n)}, path)
            with open(path, "rb") as file:
                return file.read()
    return make


def _long_names(n):
    """A few tensors with very long names."""
    return forge([("n" * (n * 4) + str(i), np.empty(0, np.uint8)) for i in range(8)], align=8)


def _safetensors(n, extra=None):
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(n)}
    if extra is not None:
        header["__metadata__"] = extra
    data = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(data)) + data


def _safetensors_extras(n):
    """A .safetensors file whose ``__safeckpt__`` entry holds a wide metadata list [ST9]."""
    packed = msgpack.packb({"metadata": {"m": [[] for _ in range(n * 3)]}})
    return _safetensors(1, {"__safeckpt__": base64.b64encode(packed).decode()})


# name -> (builder of the file from a count, the count that makes about HEADER_BYTES, suffix)
SHAPES = {
    "tensors": (_tensors, HEADER_BYTES // 36, ".sckpt"),
    "ranks": (_ranks, HEADER_BYTES // 290, ".sckpt"),
    "metadata-empty-lists": (_meta(lambda n: [[] for _ in range(n)]), HEADER_BYTES, ".sckpt"),
    "metadata-empty-maps": (_meta(lambda n: [{} for _ in range(n)]), HEADER_BYTES, ".sckpt"),
    "metadata-wide": (_wide, HEADER_BYTES // 2, ".sckpt"),
    "tree-lists": (_tree(lambda n: [[] for _ in range(n)]), HEADER_BYTES // 6, ".sckpt"),
    "tree-none": (_tree(lambda n: [None] * n), HEADER_BYTES, ".sckpt"),
    "tree-dicts": (_tree(lambda n: [{} for _ in range(n)]), HEADER_BYTES // 6, ".sckpt"),
    "long-names": (_long_names, HEADER_BYTES // 32, ".sckpt"),
    "safetensors": (_safetensors, HEADER_BYTES // 57, ".safetensors"),
    "safetensors-extras": (_safetensors_extras, HEADER_BYTES // 4, ".safetensors"),
}


def _each(reader, action):
    for name in reader.keys():
        action(reader, name)


def _cli(*argv):
    """Run the command line with its output thrown away (what it prints is not kept either)."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), \
            contextlib.redirect_stderr(sink):
        cli.main(list(argv))


def _with(path, action, **kwargs):
    with safeckpt.open(path, **kwargs) as reader:
        action(reader)


ENTRY_POINTS = {
    "open": lambda p: _with(p, lambda r: None),
    "open-pread": lambda p: _with(p, lambda r: None, mmap=False),
    "load_file": lambda p: safeckpt.load_file(p),
    "load_file-pread": lambda p: safeckpt.load_file(p, mmap=False),
    "load": lambda p: safeckpt.load(p),
    "load-verify": lambda p: safeckpt.load(p, verify=True) if _checksummed(p) else None,
    "info-each": lambda p: _with(p, lambda r: _each(r, lambda r, k: r.info(k))),
    "getitem-each": lambda p: _with(p, lambda r: _each(r, lambda r, k: r[k])),
    "getitem-each-pread": lambda p: _with(p, lambda r: _each(r, lambda r, k: r[k]), mmap=False),
    "get_slice-each": lambda p: _with(p, lambda r: _each(r, lambda r, k: r.get_slice(k)[:1])),
    "tree-each": lambda p: _with(p, lambda r: [r.tree[k] for k in r.tree]
                                 if isinstance(r.tree, safeckpt.Subtree) else None),
    "verify": lambda p: _with(p, lambda r: r.verify() if r.has_checksums else None),
    "cli-inspect": lambda p: _cli("inspect", str(p)),
    "cli-inspect-json": lambda p: _cli("inspect", "--json", str(p)),
    "cli-verify": lambda p: _cli("verify", str(p)),
    "cli-diff": lambda p: _cli("diff", str(p), str(p)),  # two inputs: INPUTS
    "convert-sckpt": lambda p: safeckpt.convert(p, p.parent / "out.sckpt"),
    "convert-safetensors": lambda p: _convert_safetensors(p),
}


# Entry points that read the file more than once count each reading as an input of its size.
INPUTS = {"cli-diff": 2}


def _checksummed(path):
    with safeckpt.open(path) as reader:
        return reader.has_checksums


def _convert_safetensors(path):
    try:
        safeckpt.convert(path, path.parent / "out.safetensors")
    except safeckpt.InvalidValueError:
        pass  # a tree or metadata safetensors cannot hold is refused, after reading it


def _write(directory, shape, fraction=1):
    """The file of ``shape`` at about ``HEADER_BYTES / fraction`` bytes, in ``directory``."""
    build, count, suffix = SHAPES[shape]
    directory.mkdir(exist_ok=True)
    path = directory / f"{shape}{suffix}"
    path.write_bytes(build(count // fraction))
    return path


def _peak(action, path):
    """Peak bytes that ``action(path)`` allocates (after one warm-up call for lazy imports)."""
    action(path)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        action(path)
        return tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()


# The entry points whose work differs between the backends (the validators are C or Python).
BACKEND_ENTRY_POINTS = ("open", "open-pread", "load_file", "verify")


def _over_the_bound(entries, shape, tmp_path):
    """Run ``entries`` on ``shape``; return the lines of those above the memory bound."""
    path = _write(tmp_path, shape, fraction=2)  # half the size: the bound does not need more
    size = path.stat().st_size
    over = []
    for entry in entries:
        peak = _peak(ENTRY_POINTS[entry], path)
        inputs = INPUTS.get(entry, 1) * size
        if peak > MEMORY_PER_BYTE * inputs + SLACK:
            over.append(f"{entry}: {peak / inputs:.1f} bytes of memory per input byte "
                        f"({peak} for {inputs})")
    return over


@pytest.mark.parametrize("shape", SHAPES)
def test_memory_per_file_byte(tmp_path, shape):
    """Peak memory of each entry point <= MEMORY_PER_BYTE x file size + SLACK (SECURITY.md)."""
    over = _over_the_bound(ENTRY_POINTS, shape, tmp_path)
    assert not over, f"{shape}:\n" + "\n".join(over)


@pytest.mark.parametrize("shape", SHAPES)
def test_memory_per_file_byte_python_backend(tmp_path, shape, backend):
    """The same bound where the pure-Python backend does the work instead of the C core."""
    over = _over_the_bound(BACKEND_ENTRY_POINTS, shape, tmp_path)
    assert not over, f"{shape} ({backend}):\n" + "\n".join(over)


def _cpu(action, path, runs=3):
    """Least CPU time of ``runs`` calls (process time: other processes do not count)."""
    best = float("inf")
    for _ in range(runs):
        start = time.process_time()
        action(path)
        best = min(best, time.process_time() - start)
    return best


TIME_SHAPES = ["tensors", "metadata-empty-lists", "metadata-wide", "tree-lists", "safetensors",
               "safetensors-extras"]


@pytest.mark.parametrize("shape", TIME_SHAPES)
def test_time_grows_linearly_with_the_file(tmp_path, shape):
    """8x the file costs less than TIME_RATIO x the CPU time: no quadratic path (SECURITY.md)."""
    small = _write(tmp_path / "small", shape, fraction=8)
    large = _write(tmp_path / "large", shape)
    slow = []
    for entry, action in ENTRY_POINTS.items():
        action(small)  # lazy imports, first-use caches
        for _ in range(TIME_TRIES):  # a quadratic path is over the bound every time
            t_small = max(_cpu(action, small), 2e-3)  # below a few ms, the clock's grain
            t_large = _cpu(action, large, runs=2)
            if t_large <= TIME_RATIO * t_small:
                break
        else:
            slow.append(f"{entry}: 8x the file took {t_large / t_small:.1f}x the CPU time "
                        f"({t_small * 1e3:.1f} -> {t_large * 1e3:.1f} ms), {TIME_TRIES} times")
    assert not slow, f"{shape}:\n" + "\n".join(slow)
