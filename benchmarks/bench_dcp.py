"""DCP save and load: torch's FileSystemWriter/Reader against safeckpt.dcp, on the same state.

    python benchmarks/bench_dcp.py              # ~256 MB of model + Adam state, 7 runs each
    python benchmarks/bench_dcp.py --mb 64 --runs 5

One process (no process group: DCP's own single-rank path). The state is a model of float32
matrices with its Adam state (exp_avg, exp_avg_sq, step) and param_groups, as
``{"model": ..., "optim": ...}``. Every save goes to a fresh directory and fsyncs (both writers'
default); every load fills a preallocated state of zeros. The page cache is warm (the files were
just written), so loads measure the format and the code, not the disk. Prints medians.
"""

import argparse
import os
import shutil
import statistics
import tempfile
import time
import warnings

import torch
import torch.distributed.checkpoint as dcp

from safeckpt.dcp import SafeckptReader, SafeckptWriter

warnings.filterwarnings("ignore")


def make_state(megabytes, fill=True):
    """Model weights + Adam state totalling about ``megabytes`` MB (3 copies of the weights)."""
    layers = 16
    side = int((megabytes * 1e6 / 3 / layers / 4) ** 0.5)
    make = (lambda shape: torch.randn(shape)) if fill else torch.zeros
    model = {f"layers.{i}.weight": make((side, side)) for i in range(layers)}
    model.update({f"layers.{i}.bias": make((side,)) for i in range(layers)})
    state = {i: {"step": torch.tensor(10.0), "exp_avg": make(v.shape), "exp_avg_sq": make(v.shape)}
             for i, v in enumerate(model.values())}
    groups = [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
               "amsgrad": False, "foreach": None, "params": list(range(len(model)))}]
    return {"model": model, "optim": {"state": state, "param_groups": groups}}


def nbytes(state):
    total = 0
    for value in state.values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, dict):
            total += nbytes(value)
    return total


def median_seconds(run, runs, setup=lambda: None):
    times = []
    for _ in range(runs):
        setup()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=256, help="state size in MB (default 256)")
    parser.add_argument("--runs", type=int, default=7, help="runs per figure (default 7)")
    args = parser.parse_args()
    state = make_state(args.mb)
    target = make_state(args.mb, fill=False)
    size = nbytes(state)
    root = tempfile.mkdtemp(prefix="bench_dcp_")
    kinds = {"torch FileSystemWriter/Reader": (dcp.FileSystemWriter, dcp.FileSystemReader),
             "safeckpt SafeckptWriter/Reader": (SafeckptWriter, SafeckptReader)}
    rows = []
    try:
        for label, (writer, reader) in kinds.items():
            path = os.path.join(root, label.split()[0])

            def fresh():
                shutil.rmtree(path, ignore_errors=True)

            save = median_seconds(lambda: dcp.save(state, storage_writer=writer(path)), args.runs,
                                  fresh)
            load = median_seconds(lambda: dcp.load(target, storage_reader=reader(path)), args.runs)
            files = sorted(os.listdir(path))
            rows.append((label, save, load, len(files)))
        torch.testing.assert_close(target["model"]["layers.0.weight"],
                                   state["model"]["layers.0.weight"], rtol=0, atol=0)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"state: {size / 1e6:.0f} MB in {sum(1 for _ in _tensors(state))} tensors, "
          f"medians of {args.runs} runs, torch {torch.__version__}, {os.cpu_count()} CPUs")
    print(f"{'storage':34} {'save s':>8} {'load s':>8} {'save GB/s':>10} {'load GB/s':>10}")
    for label, save, load, _ in rows:
        print(f"{label:34} {save:8.3f} {load:8.3f} {size / save / 1e9:10.2f} {size / load / 1e9:10.2f}")


def _tensors(state):
    for value in state.values():
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            yield from _tensors(value)


if __name__ == "__main__":
    main()
