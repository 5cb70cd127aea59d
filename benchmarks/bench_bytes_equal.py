"""Exact byte comparison (``_backend.bytes_equal``, issue 13's incremental checkpoints) against numpy.

Two equal buffers of ``--mib`` MiB (random bytes, a copy), so every byte is compared; the cases
alternate run by run after one untimed round, and each figure is the median of ``--runs`` runs.
GB/s is the length of one buffer (10**9 bytes) per second. Rows: the C core (threads from 16
MiB), the C core on one thread (a plain memcmp), the pure-Python backend (1 MiB numpy chunks),
``numpy.array_equal`` (a full-size bool temporary), ``a.tobytes() == b.tobytes()`` (two copies,
then memcmp), and the C core on buffers that differ in their first byte (it stops at once).

    python benchmarks/bench_bytes_equal.py [--mib 512] [--runs 5]
"""

import argparse
import os
import statistics
import time

import numpy as np

from safeckpt import _native, _pybackend
from safeckpt._sckpt import ffi, lib


def memcmp_one_thread(a, b):
    """The C core asked for one thread: a single memcmp over the whole buffers."""
    x, y = ffi.from_buffer(a), ffi.from_buffer(b)
    equal = ffi.new("int *")
    assert lib.sck_bytes_equal(x, y, len(x), 1, equal) == 0
    return bool(equal[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    a = np.random.default_rng(0).integers(0, 256, args.mib << 20, dtype=np.uint8)
    b = a.copy()
    c = b.copy()
    c[0] ^= 1
    cases = {
        "_native.bytes_equal (threads)": lambda: _native.bytes_equal(a, b),
        "_native, one thread (memcmp)": lambda: memcmp_one_thread(a, b),
        "_pybackend.bytes_equal": lambda: _pybackend.bytes_equal(a, b),
        "numpy.array_equal": lambda: np.array_equal(a, b),
        "a.tobytes() == b.tobytes()": lambda: a.tobytes() == b.tobytes(),
        "_native, first byte differs": lambda: not _native.bytes_equal(a, c),
    }
    times = {name: [] for name in cases}
    for run in range(args.runs + 1):
        for name, case in cases.items():
            start = time.perf_counter()
            assert case(), name
            if run:  # the first round warms up (page faults, caches)
                times[name].append(time.perf_counter() - start)
    print(f"{args.mib} MiB, median of {args.runs}, {os.cpu_count()} CPUs")
    print(f"| {'case':<32} | {'ms':>9} | {'GB/s':>7} |")
    print(f"|{'-' * 34}|{'-' * 11}|{'-' * 9}|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name:<32} | {median * 1e3:9.2f} | {a.nbytes / median / 1e9:7.1f} |")


if __name__ == "__main__":
    main()
