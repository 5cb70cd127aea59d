"""Side-by-side timings of safeckpt and its peers on the same data, in the same process run.

    python benchmarks/bench_core.py                 # GPT-2-small shapes and 20,000 tiny tensors
    python benchmarks/bench_core.py --repeat 9 --workload tiny

Every figure is the median of ``--repeat`` runs after one warm-up run (warm page cache). Peers:
safetensors (numpy ``save_file`` / ``load_file`` and ``safe_open``), and the machine's own limits:
one ``write`` of the same bytes and one ``readinto`` of the whole file. "Touched" means one byte of
every 4 KiB page of every array was read, so zero-copy loads pay for their page faults.
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

import safeckpt

try:
    import safetensors.numpy
    from safetensors import safe_open
except ImportError:  # the peer is optional: pip install -e ".[bench]"
    safetensors = None


def gpt2_small():
    """The 148 float32 tensors of GPT-2 small (124M parameters), filled with random values."""
    rng = np.random.default_rng(0)
    shapes = {"wte.weight": (50257, 768), "wpe.weight": (1024, 768)}
    for i in range(12):
        p = f"h.{i}."
        shapes.update({
            p + "ln_1.weight": (768,), p + "ln_1.bias": (768,),
            p + "attn.c_attn.weight": (768, 2304), p + "attn.c_attn.bias": (2304,),
            p + "attn.c_proj.weight": (768, 768), p + "attn.c_proj.bias": (768,),
            p + "ln_2.weight": (768,), p + "ln_2.bias": (768,),
            p + "mlp.c_fc.weight": (768, 3072), p + "mlp.c_fc.bias": (3072,),
            p + "mlp.c_proj.weight": (3072, 768), p + "mlp.c_proj.bias": (768,),
        })
    shapes.update({"ln_f.weight": (768,), "ln_f.bias": (768,)})
    return {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}


def tiny(count=20_000):
    """``count`` small float32 tensors (8 to 64 elements): a header-bound file."""
    rng = np.random.default_rng(1)
    return {f"layer.{i}.param": rng.standard_normal(int(rng.integers(8, 65)), dtype=np.float32)
            for i in range(count)}


def touch(arrays):
    """Read one byte of every page of every array; return a checksum so nothing is skipped."""
    total = 0
    for array in arrays.values():
        flat = array.reshape(-1).view(np.uint8)
        if flat.size:
            total += int(flat[::4096].sum()) + int(flat[-1])
    return total


def raw_write(path, arrays):
    with open(path, "wb") as f:
        for array in arrays.values():
            f.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))


def raw_readinto(path):
    size = os.path.getsize(path)
    buffer = np.empty(size, np.uint8)
    with open(path, "rb", buffering=0) as f:
        f.readinto(memoryview(buffer))
    return buffer


def median_time(fn, repeat):
    fn()  # warm-up: page cache, lazy imports, first-touch allocations
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(name, tensors, directory, repeat):
    ours = os.path.join(directory, f"{name}.sckpt")
    theirs = os.path.join(directory, f"{name}.safetensors")
    raw = os.path.join(directory, f"{name}.raw")
    small = min(tensors, key=lambda name: tensors[name].nbytes)  # "open, read one small tensor"
    rows = []  # (operation, implementation, seconds)

    def add(operation, implementation, fn):
        rows.append((operation, implementation, median_time(fn, repeat)))

    add("save", "safeckpt", lambda: safeckpt.save_file(tensors, ours))
    add("save", "safeckpt atomic=False", lambda: safeckpt.save_file(tensors, ours, atomic=False))
    add("save", "raw write (limit)", lambda: raw_write(raw, tensors))
    if safetensors:
        add("save", "safetensors.numpy", lambda: safetensors.numpy.save_file(tensors, theirs))

    add("load, touched", "safeckpt mmap", lambda: touch(safeckpt.load_file(ours)))
    if safetensors:
        add("load, touched", "safetensors.numpy", lambda: touch(safetensors.numpy.load_file(theirs)))

    add("load into fresh memory", "safeckpt mmap=False",
        lambda: touch(safeckpt.load_file(ours, mmap=False)))
    add("load into fresh memory", "readinto (limit)", lambda: raw_readinto(ours))

    def ours_one():
        with safeckpt.open(ours) as f:
            return f[small].sum()

    add("open + read one small tensor", "safeckpt", ours_one)
    if safetensors:
        def theirs_one():
            with safe_open(theirs, framework="np") as f:
                return f.get_tensor(small).sum()
        add("open + read one small tensor", "safetensors safe_open", theirs_one)

    def verify():
        with safeckpt.open(ours) as f:
            f.verify()

    add("verify all CRC32C", "safeckpt", verify)
    return rows, os.path.getsize(ours)


def report(name, rows, size, tensor_count):
    print(f"\n## {name}: {tensor_count} tensors, {size / 1e6:.1f} MB\n")
    print("| operation | implementation | median ms | MB/s | vs safetensors |")
    print("|---|---|---:|---:|---:|")
    peers = {op: t for op, impl, t in rows if impl.startswith("safetensors")}
    for operation, implementation, seconds in rows:
        ratio = ""
        if operation in peers and not implementation.startswith("safetensors"):
            ratio = f"{peers[operation] / seconds:.2f}x faster"
        print(f"| {operation} | {implementation} | {seconds * 1e3:.2f} | {size / seconds / 1e6:.0f} "
              f"| {ratio} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workload", choices=["gpt2", "tiny", "all"], default="all")
    parser.add_argument("--dir", default=None, help="where the files go (default: a temp dir)")
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    print(f"# safeckpt {safeckpt.__version__} (backend {safeckpt.backend}), numpy {np.__version__}, "
          f"safetensors {getattr(safetensors, '__version__', 'not installed')}, "
          f"Python {sys.version.split()[0]}; {cpu}, {os.cpu_count()} CPUs; "
          f"median of {args.repeat} runs, warm page cache")
    workloads = {"gpt2": ("GPT-2 small, float32", gpt2_small), "tiny": ("20,000 tiny tensors", tiny)}
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        for key, (name, make) in workloads.items():
            if args.workload in (key, "all"):
                tensors = make()
                rows, size = run(key, tensors, directory, args.repeat)
                report(name, rows, size, len(tensors))
                del tensors


if __name__ == "__main__":
    main()
