"""safeckpt against its peers, side by side, on the same data in the same run.

    pip install -e ".[test,bench]" torch==2.13.0
    python benchmarks/bench.py                      # everything: ~15 min, writes RESULTS.md + PNGs
    python benchmarks/bench.py --workloads gpt2 --runs 3 --no-scaling   # a quicker look

Every figure is the median of ``--runs`` runs, each in a fresh process whose imports and data
generation are not timed; the peak RSS growth of each run is recorded. Cold runs drop the page
cache first (root only; skipped otherwise). Results go to benchmarks/RESULTS.md, results.png
and scaling.png.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import cases  # noqa: E402  (benchmarks/ is not a package)


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss():
    """VmHWM: this process's peak RSS (ru_maxrss would include the parent's, kept across exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux >= 4.0: reset VmHWM to the current RSS


def drop_caches():
    """Empty the page cache; False if not allowed (not root)."""
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def worker(workload, operation, implementation, path):
    """One timed run in this fresh process; prints one JSON line."""
    shapes = cases.WORKLOADS[workload][1]()
    fn = next(f for impl, _, f in cases.OPERATIONS[operation] if impl == implementation)
    import safeckpt  # noqa: F401  imports are not timed
    import safetensors.numpy  # noqa: F401
    if "torch" in implementation or operation in cases.GPU_OPERATIONS:
        import safetensors.torch  # noqa: F401
        import torch
        if operation in cases.GPU_OPERATIONS:
            torch.empty(1, device="cuda")  # the CUDA context is made before the clock starts
    if operation == "save":
        arg = cases.make_tensors(shapes)
        if os.path.exists(path):  # every saver starts from no file (ext4 flushes truncated files)
            os.unlink(path)
    elif operation.startswith("open"):
        arg = cases.smallest(shapes)
    else:
        arg = None
    before = rss()
    reset_peak_rss()
    start = time.perf_counter()
    fn(path, arg)
    seconds = time.perf_counter() - start
    peak = peak_rss()
    print(json.dumps({"seconds": seconds, "peak_growth": max(0, peak - before)}))


def run_one(workload, operation, implementation, path, runs, cold):
    results = []
    command = [sys.executable, os.path.abspath(__file__), "--worker", workload, operation,
               implementation, path]
    for _ in range(runs):
        if cold and not drop_caches():
            return None
        out = subprocess.run(command, capture_output=True, text=True)
        if out.returncode:
            print(f"  FAILED {workload}/{operation}/{implementation}: {out.stderr[-500:]}")
            return None
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {
        "seconds": statistics.median(r["seconds"] for r in results),
        "peak_growth": statistics.median(r["peak_growth"] for r in results),
        "runs": [r["seconds"] for r in results],
    }


def prepare(workload, directory):
    """Write the workload once in every format; return {format: path}."""
    tensors = cases.make_tensors(cases.WORKLOADS[workload][1]())
    paths = {}
    for fmt, save in cases.FORMATS.items():
        paths[fmt] = os.path.join(directory, f"{workload}.{fmt}")
        save(paths[fmt], tensors)
    paths["raw"] = os.path.join(directory, f"{workload}.raw")
    return paths, sum(a.nbytes for a in tensors.values()), len(tensors)


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    import safeckpt
    import safetensors
    import torch
    return (f"{cpu}, {os.cpu_count()} CPUs, {memory:.0f} GiB RAM, Linux {platform.release()}; "
            f"Python {platform.python_version()}, numpy {np.__version__}, safeckpt "
            f"{safeckpt.__version__} ({safeckpt.backend} backend), safetensors "
            f"{safetensors.__version__}, torch {torch.__version__}")


def scaling(directory, runs):
    """Time against tensor count and file size, in this process (medians of ``runs``)."""
    import safeckpt

    def timed(fn):
        fn()
        samples = []
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    path = os.path.join(directory, "scale.sckpt")

    def measure(tensors):
        save = timed(lambda: safeckpt.save_file(tensors, path, atomic=False))
        load = timed(lambda: cases.touch(safeckpt.load_file(path)))
        return os.path.getsize(path), save, load

    rows = []
    for count in (1, 10, 100, 1_000, 10_000, 100_000):
        tensors = {f"t.{i}": np.full(16, i, np.float32) for i in range(count)}
        rows.append(("count", count, *measure(tensors)))
    for size in (1 << 20, 16 << 20, 256 << 20, 1 << 30, 4 << 30):
        tensors = {f"t.{i}": np.ones(size // 8 // 4, np.float32) for i in range(8)}
        rows.append(("size", 8, *measure(tensors)))
        del tensors
    os.unlink(path)
    return rows


def write_results(out, machine_line, command, workloads, results, scale_rows, cuda):
    lines = [
        "# Benchmark results", "",
        f"Machine: {machine_line}.", "",
        f"Command: `{command}`. Each figure is the median of the runs shown, each run a fresh "
        "process (imports and data generation not timed); *vs safeckpt* is the peer's time "
        "divided by safeckpt's (above 1: safeckpt is faster). *RSS* is the run's peak resident "
        "memory growth. Cold runs drop the page cache before each run.", "",
    ]
    if not cuda:
        lines += ["*Load to GPU* was not run: torch sees no CUDA device on this machine.", ""]
    for workload, (title, size, count) in workloads.items():
        lines += [f"## {title}", "", f"{count} tensors, {size / 2**20:.0f} MiB of tensor data.", "",
                  "| operation | implementation | median ms | GB/s | RSS MiB | vs safeckpt | runs (ms) |",
                  "|---|---|---:|---:|---:|---:|---|"]
        for operation, entries in cases.OPERATIONS.items():
            ours = next((results.get((workload, operation, impl)) for impl, _, _ in entries
                         if impl.startswith("safeckpt")), None)
            for impl, _, _ in entries:
                r = results.get((workload, operation, impl))
                if r is None:
                    continue
                ratio = f"{r['seconds'] / ours['seconds']:.2f}" if ours else ""
                runs = ", ".join(f"{s * 1e3:.0f}" for s in r["runs"])
                lines.append(f"| {operation} | {impl} | {r['seconds'] * 1e3:.1f} | "
                             f"{size / r['seconds'] / 1e9:.2f} | {r['peak_growth'] / 2**20:.0f} | "
                             f"{ratio} | {runs} |")
        lines.append("")
    if scale_rows:
        lines += ["## Scaling", "", "Save (atomic=False) and load with every page touched, warm; "
                  "per-tensor and per-byte costs show whether growth is linear.", "",
                  "| series | tensors | file MB | save ms | load ms | save µs/tensor | load µs/tensor | load GB/s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for series, count, size, save, load in scale_rows:
            lines.append(f"| {series} | {count} | {size / 1e6:.1f} | {save * 1e3:.2f} | "
                         f"{load * 1e3:.2f} | {save / count * 1e6:.2f} | {load / count * 1e6:.2f} | "
                         f"{size / load / 1e9:.2f} |")
        lines.append("")
    with open(out, "w") as f:
        f.write("\n".join(lines))


def draw(results, workloads, scale_rows, directory):
    """results.png and scaling.png in ``directory`` (beside RESULTS.md)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(w, op) for w in workloads for op in ("save", "load warm", "load cold",
                                                     "open + read one small tensor")
              if any(k[:2] == (w, op) for k in results)]
    fig, axes = plt.subplots(max(1, len(panels)), 1, figsize=(8, 1.0 + 1.6 * len(panels)),
                             squeeze=False)
    for ax, (workload, operation) in zip(axes[:, 0], panels):
        entries = [(impl, results[(workload, operation, impl)]["seconds"] * 1e3)
                   for impl, _, _ in cases.OPERATIONS[operation] if (workload, operation, impl) in results]
        names = [e[0] for e in entries][::-1]
        values = [e[1] for e in entries][::-1]
        colors = ["tab:green" if n.startswith("safeckpt") else
                  "tab:gray" if "limit" in n else "tab:blue" for n in names]
        ax.barh(names, values, color=colors)
        ax.set_xscale("log")
        ax.set_title(f"{workload}: {operation} (median ms, log scale; lower is better)", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(directory, "results.png"), dpi=110)
    if scale_rows:
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        for series, ax, x_label in (("count", a, "tensors"), ("size", b, "file bytes")):
            rows = [r for r in scale_rows if r[0] == series]
            x = [r[1] if series == "count" else r[2] for r in rows]
            ax.loglog(x, [r[3] for r in rows], "o-", label="save")
            ax.loglog(x, [r[4] for r in rows], "s-", label="load (touched)")
            ax.loglog(x, [rows[-1][4] * xi / x[-1] for xi in x], ":", color="gray",
                      label="linear (through the last load)")
            ax.set_xlabel(x_label)
            ax.set_ylabel("seconds")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(directory, "scaling.png"), dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=4, metavar=("WORKLOAD", "OPERATION", "IMPL", "PATH"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--workloads", default="gpt2,tiny,large")
    parser.add_argument("--operations", default=",".join(cases.OPERATIONS))
    parser.add_argument("--no-scaling", action="store_true")
    parser.add_argument("--dir", default=None, help="where the files go (default: a temp dir)")
    parser.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    command = "python benchmarks/bench.py " + " ".join(sys.argv[1:])
    machine_line = machine()
    print(machine_line)
    import torch
    cuda = torch.cuda.is_available()
    results, workloads = {}, {}
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        for workload in args.workloads.split(","):
            paths, size, count = prepare(workload, directory)
            workloads[workload] = (cases.WORKLOADS[workload][0], size, count)
            for operation in args.operations.split(","):
                if operation in cases.GPU_OPERATIONS and not cuda:
                    print(f"{workload:6} {operation:28} skipped: torch sees no CUDA device")
                    continue
                for impl, fmt, _ in cases.OPERATIONS[operation]:
                    path = paths[fmt] if operation != "save" else os.path.join(directory, f"out.{fmt}")
                    r = run_one(workload, operation, impl, path, args.runs, operation.endswith("cold"))
                    if r:
                        results[(workload, operation, impl)] = r
                        print(f"{workload:6} {operation:28} {impl:30} {r['seconds'] * 1e3:10.1f} ms "
                              f"{r['peak_growth'] / 2**20:8.0f} MiB", flush=True)
            for path in paths.values():
                if os.path.exists(path):
                    os.unlink(path)
        scale_rows = [] if args.no_scaling else scaling(directory, min(args.runs, 3))
    write_results(args.out, machine_line, command, workloads, results, scale_rows, cuda)
    draw(results, workloads, scale_rows, os.path.dirname(os.path.abspath(args.out)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
