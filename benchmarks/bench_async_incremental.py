"""Async and incremental checkpoints (issue 13) against a memory copy and the peers, side by side.

One process; the cases of each table alternate run by run, in an order shuffled each run by a
seeded random.Random, so that no case always follows the same neighbour (one
untimed warm-up round first, so that steady-state buffers exist and files are in the page cache),
and each figure is the median of ``--runs`` runs; ratios are to the table's first row.

1. GPT-2 small sized model (148 float32 tensors, 124M parameters) + its Adam state after one step
   (1.5 GB in all), as ``{"model": model, "optimizer": optimizer}``: the time a save blocks the
   training loop, and the time until the file is complete. Every save starts with the previous one
   finished. Rows: a plain copy of the state into preallocated tensors (the floor: what a snapshot
   must at least do; torch's copy_ uses its intra-op threads), the same with numpy.copyto (one
   thread), a clone (fresh memory), ``CheckpointManager(..., async_save=True).save``,
   ``AsyncSaver.save`` of the state dicts to one file, the blocking ``CheckpointManager.save``,
   ``torch.save`` of the state dicts, and
   ``torch.distributed.checkpoint.async_save`` (a gloo process group of world size 1 on
   127.0.0.1; its default stager, a fresh CPU copy per save, and a ``DefaultStager`` reused across
   saves, which keeps its copies). Every save but torch.save fsyncs.
2. Peak extra memory (peak RSS above the RSS before, read from /proc/self/status after resetting
   VmHWM) of two saves from a fresh saver, and the memory still held after them. This part runs in
   a child process with glibc's mmap threshold fixed at 1 MiB (MALLOC_MMAP_THRESHOLD_), so that
   memory freed by one case goes back to the system instead of hiding the next case's allocations.
3. LoRA-like: the same frozen GPT-2 base + rank-``--rank`` adapters on every attention projection
   (c_attn, c_proj) + Adam on the adapters only. Between checkpoints one training step changes the
   adapters and their Adam state. Bytes written per checkpoint (file size, and the bytes the
   process passed to write/pwrite, /proc/self/io wchar), save time of ``CheckpointManager(...,
   incremental=True)`` vs a full save, and ``restore`` of the newest checkpoint into the model and
   optimizer (every byte read and CRC-checked), warm page cache and cold (the checkpoint's files
   evicted with posix_fadvise(DONTNEED), so only they are read from disk; no root needed).

    python benchmarks/bench_async_incremental.py [--runs 5] [--dir /tmp] [--part all|async|memory|lora]

Needs Linux (/proc) and torch with torch.distributed (gloo). Rows whose API this safeckpt lacks
print as n/a.
"""

import argparse
import ctypes
import gc
import os
import platform
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import numpy
import torch

import safeckpt
from cases import gpt2_module

warnings.filterwarnings("ignore")  # DCP's experimental-API and single-rank warnings

GB = 1e9


# -- state --------------------------------------------------------------------------------------

def train_step(optimizer):
    """One Adam step with random gradients: every trained tensor and its Adam state change."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.randn_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def tensors_of(state):
    """Every tensor of a nested state dict."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in tensors_of(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in tensors_of(v)]
    return []


def state_dicts(model, optimizer):
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


# -- measuring ----------------------------------------------------------------------------------

def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


_ORDER = random.Random(13)  # seeded: the same orders every time the script runs


def shuffled(cases):
    """The cases in a new random order at each call (seeded), so no case always follows the same
    neighbour, as it would with a rotation."""
    order = list(cases)
    _ORDER.shuffle(order)
    return order


def proc_status(key):
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+) kB", f.read()).group(1)) * 1024


def written():
    """Bytes this process has passed to write/pwrite so far (/proc/self/io wchar)."""
    with open("/proc/self/io") as f:
        return int(re.search(r"wchar: (\d+)", f.read()).group(1))


def peak_extra(fn):
    """(peak RSS above the RSS before ``fn``, RSS still held after it), in bytes."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = proc_status("VmRSS")
    fn()
    for thread in threading.enumerate():  # DCP's executor thread holds its copy until it exits
        if thread.name.startswith("AsyncCheckpointExecutor"):
            thread.join(10)
    gc.collect()
    return proc_status("VmHWM") - before, proc_status("VmRSS") - before


def evict(directory):
    """Drop the page-cache pages of every file in ``directory`` (they are clean: saves fsync)."""
    for name in os.listdir(directory):
        fd = os.open(os.path.join(directory, name), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def manager(directory, **options):
    """A CheckpointManager with ``options``, or None when this safeckpt lacks one of them."""
    try:
        return safeckpt.CheckpointManager(directory, keep_last=2, rng=False, **options)
    except TypeError as exc:
        print(f"  (CheckpointManager{tuple(options)}: {exc}; its rows are n/a)")
        return None


def print_table(title, columns, rows):
    """rows: [(name, [seconds of each run, per column] or None)]; each cell is the median and its
    ratio to the first row's median in the same column."""
    print(f"\n{title}")
    print(f"  {'':<58}" + "".join(f"{c:>22}" for c in columns))
    base = [statistics.median(s) for s in rows[0][1]]
    for name, series in rows:
        if series is None or not series[0]:
            print(f"  {name:<58}" + f"{'n/a':>22}" * len(columns))
            continue
        medians = [statistics.median(s) for s in series]
        print(f"  {name:<58}" + "".join(f"{m * 1e3:11.1f} ms  x{m / b:5.2f}"
                                        for m, b in zip(medians, base)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- 1. blocking time and 2. memory --------------------------------------------------------------

class Saves:
    """The saves of parts 1 and 2 on one model + optimizer: each ``make_*`` returns
    ``(save, complete)`` -- ``save()`` is what blocks the loop, ``complete(result)`` waits until the
    file is complete -- or None when this safeckpt lacks the API."""

    def __init__(self, model, optimizer, root):
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
        self.model, self.optimizer, self.root = model, optimizer, root
        self.state = {"model": model, "optimizer": optimizer}
        self.total = nbytes(tensors_of(self.dicts()))
        self.step = 0
        self.dcp_dirs = []
        self.closers = []
        self.new_stager = lambda: DefaultStager(StagingOptions(
            use_pinned_memory=False, use_shared_memory=False, use_async_staging=False,
            use_non_blocking_copy=False))  # CPU only: a synchronous copy into its cached storages
        self.AsyncSaver = getattr(safeckpt, "AsyncSaver", None)
        if self.AsyncSaver is None:
            try:
                from safeckpt.async_save import AsyncSaver
                self.AsyncSaver = AsyncSaver
            except ImportError:
                print("  (no safeckpt AsyncSaver: its rows are n/a)")

    def dicts(self):
        return state_dicts(self.model, self.optimizer)

    def close(self):
        for close in self.closers:
            close()
        self.closers.clear()

    def make_copy(self):
        buffers = [torch.empty_like(t) for t in tensors_of(self.dicts())]

        def copy():
            for dst, src in zip(buffers, tensors_of(self.dicts())):
                dst.copy_(src)
        return copy, None

    def make_copy_numpy(self):
        arrays = [t.numpy() for t in tensors_of(self.dicts())]
        buffers = [a.copy() for a in arrays]

        def copy():
            for dst, src in zip(buffers, tensors_of(self.dicts())):
                numpy.copyto(dst, src.numpy())
        return copy, None

    def make_clone(self):
        return (lambda: [t.clone() for t in tensors_of(self.dicts())]), None

    def make_manager(self, name, **options):
        m = manager(os.path.join(self.root, name), **options)
        if m is None:
            return None
        if hasattr(m, "close"):
            self.closers.append(m.close)

        def save():
            self.step += 1
            m.save(self.step, self.state)
        return save, (lambda _: m.wait()) if options.get("async_save") else None

    def make_saver(self):
        if self.AsyncSaver is None:
            return None
        saver = self.AsyncSaver()
        self.closers.append(saver.close)
        path = os.path.join(self.root, "saver.sckpt")
        return (lambda: saver.save(self.dicts(), path)), (lambda handle: handle.result())

    def make_torch(self):
        path = os.path.join(self.root, "torch.pt")
        return (lambda: torch.save(self.dicts(), path)), None

    def make_dcp(self, reuse):
        import torch.distributed.checkpoint as dcp
        stager = self.new_stager() if reuse else None
        if stager is not None:
            self.closers.append(stager.close)

        def save():
            self.step += 1
            self.dcp_dirs.append(os.path.join(self.root, f"dcp-{self.step}"))
            while len(self.dcp_dirs) > 2:  # keep the last two, as the managers do
                shutil.rmtree(self.dcp_dirs.pop(0), ignore_errors=True)
            return dcp.async_save(self.dicts(), checkpoint_id=self.dcp_dirs[-1],
                                  async_stager=stager)
        return save, (lambda future: future.result())


def gloo_group():
    """A gloo process group of world size 1 on 127.0.0.1 (DCP as a training job runs it)."""
    import torch.distributed as dist
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return dist.destroy_process_group


CASES = [  # (row, Saves method, its arguments)
    ("copy_ into preallocated tensors (the floor)", "make_copy", ()),
    ("numpy.copyto into preallocated arrays (one thread)", "make_copy_numpy", ()),
    ("clone (fresh memory)", "make_clone", ()),
    ("safeckpt CheckpointManager(async_save=True).save", "make_manager",
     ("async", {"async_save": True})),
    ("safeckpt AsyncSaver.save(state dicts, one file)", "make_saver", ()),
    ("safeckpt CheckpointManager.save (blocking)", "make_manager", ("blocking", {})),
    ("torch.save(state dicts) (no fsync)", "make_torch", ()),
    ("torch DCP async_save (default stager)", "make_dcp", (False,)),
    ("torch DCP async_save (DefaultStager reused)", "make_dcp", (True,)),
]


def make_case(saves, method, arguments):
    if method == "make_manager":
        return saves.make_manager(arguments[0], **arguments[1])
    return getattr(saves, method)(*arguments)


def bench_blocking(args, saves):
    """Part 1: alternate the cases; time save() and save() + complete."""
    cases = [(name, make_case(saves, method, arguments)) for name, method, arguments in CASES]
    times = {name: ([], []) for name, _ in cases}
    for run in range(args.runs + 1):  # round 0: warm-up, untimed
        for name, case in shuffled(cases):
            if case is None:
                continue
            save, complete = case
            start = time.perf_counter()
            result = save()
            blocked = time.perf_counter() - start
            if complete is not None:
                complete(result)
            if run:
                times[name][0].append(blocked)
                times[name][1].append(time.perf_counter() - start)
    saves.close()
    print_table(f"1. Time a save blocks the training loop: GPT-2 small + Adam "
                f"({saves.total / GB:.2f} GB), median of {args.runs}",
                ["blocks loop", "file complete"],
                [(name, None if case is None else list(times[name])) for name, case in cases])


def twice(save, complete):
    def run():
        for _ in range(2):
            result = save()
            if complete is not None:
                complete(result)
            del result  # a clone's copy goes before the next one is made
    return run


def bench_memory(saves):
    """Part 2: peak and held RSS of two saves from a fresh saver, case by case."""
    print(f"\n2. Extra memory of two saves in a row from a fresh saver (state "
          f"{saves.total / GB:.2f} GB)")
    print(f"  {'':<58}{'peak extra':>14}{'x state':>9}{'held after':>14}")
    libc = ctypes.CDLL("libc.so.6")
    for name, method, arguments in CASES:
        if method.startswith("make_copy"):
            continue
        libc.malloc_trim(0)
        case = make_case(saves, method, arguments)
        if case is None:
            print(f"  {name:<58}{'n/a':>14}")
            continue
        peak, held = peak_extra(twice(*case))
        print(f"  {name:<58}{peak / GB:11.2f} GB{peak / saves.total:8.2f}x{held / GB:11.2f} GB")
        del case
        saves.close()


# -- 3. LoRA ------------------------------------------------------------------------------------

def bench_lora(args, root):
    torch.manual_seed(1)
    model = gpt2_module(lora_rank=args.rank)
    adapters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(adapters, lr=1e-3)
    train_step(optimizer)
    state = {"model": model, "optimizer": optimizer}
    sd = state_dicts(model, optimizer)
    total = nbytes(tensors_of(sd))
    changed = nbytes(adapters) + nbytes(tensors_of(sd["optimizer"]))
    print(f"\n3. LoRA-like: frozen GPT-2 small base + rank-{args.rank} adapters on attn.c_attn and "
          f"attn.c_proj + Adam on the adapters; checkpoint {total / 1e6:.1f} MB, of which "
          f"{changed / 1e6:.2f} MB change every step ({len(adapters)} adapters, their Adam state)")
    dirs = {k: os.path.join(root, "lora-" + k) for k in ("full", "incremental", "async")}
    managers = {"full": manager(dirs["full"]),
                "incremental": manager(dirs["incremental"], incremental=True),
                "async": manager(dirs["async"], incremental=True, async_save=True)}
    saves = {k: ([], []) for k in managers}  # seconds blocked, seconds until complete
    sizes = {k: [] for k in managers}         # (file size, wchar delta) per save
    step = 0
    for run in range(args.runs + 1):  # round 0 (untimed) writes each manager's first, full file
        train_step(optimizer)
        step += 1
        for key, m in shuffled(list(managers.items())):
            if m is None:
                continue
            before = written()
            start = time.perf_counter()
            m.save(step, state)
            blocked = time.perf_counter() - start
            if key == "async":
                m.wait()
            done = time.perf_counter() - start
            if run:
                saves[key][0].append(blocked)
                saves[key][1].append(done)
                sizes[key].append((os.path.getsize(m.path(step)), written() - before))
    names = {"full": "CheckpointManager.save (full)",
             "incremental": "CheckpointManager(incremental=True).save",
             "async": "CheckpointManager(incremental=True, async_save=True).save"}
    print(f"  bytes per checkpoint (median): changed tensors {changed / 1e6:.2f} MB")
    for key in managers:
        if sizes[key]:
            size = statistics.median(s for s, _ in sizes[key])
            wrote = statistics.median(w for _, w in sizes[key])
            print(f"    {names[key]:<58} file {size / 1e6:9.2f} MB, wrote {wrote / 1e6:9.2f} MB,"
                  f" {(size - changed) / 1e3:8.1f} kB over the changed bytes")
        else:
            print(f"    {names[key]:<58} n/a")
    print_table(f"  save, median of {args.runs}", ["blocks loop", "file complete"],
                [(names[k], list(saves[k]) if managers[k] else None) for k in managers])
    for m in managers.values():
        if m is not None and hasattr(m, "wait"):
            m.wait()

    loads = {(k, c): [] for k in ("full", "incremental") for c in ("warm", "cold")}
    for run in range(args.runs + 1):
        for cache in ("warm", "cold"):
            for key in shuffled(["full", "incremental"]):
                m = managers[key]
                if m is None:
                    continue
                if cache == "cold":
                    evict(dirs[key])
                seconds = timed(lambda: m.restore(state, step=step))
                if run:
                    loads[(key, cache)].append(seconds)
    print_table(f"  restore(model, optimizer) of the newest checkpoint, median of {args.runs}",
                ["warm cache", "cold (evicted)"],
                [(f"{k} checkpoint", [loads[(k, "warm")], loads[(k, "cold")]] if managers[k]
                  else None)
                 for k in ("full", "incremental")])
    for m in managers.values():
        if m is not None and hasattr(m, "close"):
            m.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--part", choices=("all", "async", "memory", "lora"), default="all")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.memory_child:
        print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
              f"{torch.__version__}, safeckpt backend {safeckpt.backend}, files in "
              f"{args.dir or tempfile.gettempdir()}")
    root = tempfile.mkdtemp(dir=args.dir, prefix="bench-async-incr-")
    try:
        if args.part in ("all", "async") or args.memory_child:
            torch.manual_seed(0)
            model = gpt2_module()
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
            train_step(optimizer)
            close_group = gloo_group()
            saves = Saves(model, optimizer, root)
            if args.memory_child:
                bench_memory(saves)
            else:
                bench_blocking(args, saves)
            close_group()
            del model, optimizer, saves
            gc.collect()
            if args.memory_child:
                return
        if args.part in ("all", "async", "memory"):
            sys.stdout.flush()
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
            subprocess.run([sys.executable, __file__, "--memory-child"]
                           + (["--dir", args.dir] if args.dir else []), env=env, check=True)
        if args.part in ("all", "lora"):
            bench_lora(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
