"""Save a few arrays with metadata, load them back zero-copy, read a slice lazily, verify.

    python examples/quickstart.py
"""

import os
import tempfile

import numpy as np

import safeckpt


def main():
    path = os.path.join(tempfile.mkdtemp(), "model.sckpt")
    rng = np.random.default_rng(0)
    tensors = {
        "embed.weight": rng.standard_normal((1000, 64), dtype=np.float32),
        "head.bias": np.zeros(10, np.float16),
        "step": np.int64(1200),
    }
    safeckpt.save_file(tensors, path, metadata={"epoch": 3, "lr": [1e-3, 1e-4]})

    loaded = safeckpt.load_file(path, verify=True)  # every CRC32C checked; arrays view the file
    assert all(np.array_equal(loaded[k], v) for k, v in tensors.items())

    with safeckpt.open(path) as f:
        print(f"{os.path.getsize(path)} bytes, backend {safeckpt.backend}, metadata {f.metadata}")
        for name in f:
            print(f"  {name}: {f.info(name).dtype} {f.info(name).shape}")
        rows = f.get_slice("embed.weight")[10:12]  # reads two rows, not the whole tensor
        print("rows 10-11, first columns:", rows[:, :3])


if __name__ == "__main__":
    main()
