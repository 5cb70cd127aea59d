"""save_checkpoint + load_checkpoint vs torch.save + torch.load(weights_only=True), GPT-2-small sized.

The state is GPT-2 small's 148 weight tensors (124M float32 parameters, 498 MB) plus their Adam
state after one step (exp_avg, exp_avg_sq and a step tensor per parameter: 996 MB more). Both sides
do the same job: save the model's and the optimizer's state to one file, then load the file and
restore it into the model and the optimizer (every byte is read and copied into place). Runs
alternate between the two, in one process, with the file in the page cache (a re-read checkpoint);
the figures are medians.

safeckpt's loaded optimizer state views a private mapping of the file, so its pages are copied
when first written (the first optimizer step) rather than during the load; the "+touch" column adds
one in-place write to every optimizer state tensor to both sides, so that deferred cost is counted.
Before each save the optimizer state is moved back to ordinary memory (untimed), as in training.

    python benchmarks/bench_checkpoint.py [--runs 5] [--dir /tmp]

safeckpt's save is atomic (temp file, fsync, rename, fsync of the directory) and computes a CRC32C
per tensor; its load verifies every CRC32C (load_checkpoint's default, ``verify=None``, checks a file
that has checksums).
torch.save does neither: the rows "safeckpt, no fsync/no verify" show the same work without them.
"""

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch

import safeckpt
from cases import gpt2_module


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    torch.manual_seed(0)
    model = gpt2_module()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    for p in model.parameters():
        p.grad = None
    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = len(model.state_dict())
    total_bytes = 3 * n_params * 4 + 4 * n_tensors
    directory = tempfile.mkdtemp(dir=args.dir, prefix="bench-ckpt-")
    ours, theirs = os.path.join(directory, "ckpt.sckpt"), os.path.join(directory, "ckpt.pt")

    def sck_save(**kw):
        safeckpt.save_checkpoint(ours, model=model, optimizer=optimizer, step=1, **kw)

    def sck_load(**kw):
        safeckpt.load_checkpoint(ours, model=model, optimizer=optimizer, **kw)

    def pt_save():
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 1}, theirs)

    def pt_load():
        state = torch.load(theirs, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

    def state_tensors():
        return [v for s in optimizer.state.values() for v in s.values() if v.numel() > 1]

    def touch():
        torch._foreach_mul_(state_tensors(), 1.0)

    def to_ordinary_memory():
        for s in optimizer.state.values():
            for k, v in s.items():
                s[k] = v.clone()

    cases = {
        "safeckpt (atomic+fsync, CRC32C, verify)": (sck_save, sck_load),
        "safeckpt, no fsync/no verify": (lambda: sck_save(atomic=False), lambda: sck_load(verify=False)),
        "torch.save / torch.load(weights_only=True)": (pt_save, pt_load),
    }
    times = {name: ([], [], []) for name in cases}
    for _ in range(args.runs):
        for name, (save, load) in cases.items():
            for path in (ours, theirs):
                if os.path.exists(path):
                    os.unlink(path)
            to_ordinary_memory()
            times[name][0].append(timed(save))
            times[name][1].append(timed(load))
            times[name][2].append(times[name][1][-1] + timed(touch))
    print(f"GPT-2 small weights + Adam state: {n_tensors} weight tensors, {n_params / 1e6:.1f}M "
          f"parameters, {total_bytes / 1e9:.2f} GB in all; median of {args.runs} runs")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, safeckpt backend {safeckpt.backend}, files in {args.dir}")
    print(f"{'':44s} {'save s':>7s} {'load s':>7s} {'+touch s':>8s} {'total s':>8s}")
    for name, (saves, loads, touched) in times.items():
        s, l, t = (statistics.median(x) for x in (saves, loads, touched))
        print(f"{name:44s} {s:7.3f} {l:7.3f} {t:8.3f} {s + t:8.3f}")
    print("total = save + load + touch")
    for path in (ours, theirs):
        if os.path.exists(path):
            os.unlink(path)
    os.rmdir(directory)


if __name__ == "__main__":
    main()
