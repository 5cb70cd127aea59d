"""pytest-benchmark regression tracking of the hot functions (not part of the test suite).

    pytest benchmarks/test_hot.py --benchmark-enable            # add --benchmark-autosave to keep
    pytest benchmarks/test_hot.py --benchmark-enable --benchmark-compare   # against the last save
"""

import numpy as np
import pytest

import safeckpt
from safeckpt import _backend

TINY = {f"layer.{i}.param": np.full(16, i, np.float32) for i in range(20_000)}
BIG = np.ones(64 << 20, np.uint8)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("hot") / "tiny.sckpt"
    safeckpt.save_file(TINY, path)
    return path


def test_crc32c_64mib(benchmark):
    benchmark(_backend.backend.crc32c, BIG)


def test_open_20k_tensors(benchmark, tiny_path):
    benchmark(lambda: safeckpt.open(tiny_path).close())


def test_load_20k_tensors(benchmark, tiny_path):
    benchmark(safeckpt.load_file, tiny_path)


def test_load_20k_tensors_fresh_memory(benchmark, tiny_path):
    benchmark(safeckpt.load_file, tiny_path, mmap=False)


def test_save_20k_tensors(benchmark, tmp_path):
    benchmark(safeckpt.save_file, TINY, tmp_path / "out.sckpt", atomic=False)


def test_save_bytes_20k_tensors(benchmark):
    benchmark(safeckpt.save_bytes, TINY)
