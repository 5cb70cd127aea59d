"""The drop-in replacements of issue 12 against the code they replace, side by side.

GPT-2 small (148 float32 tensors, 498 MB), warm page cache, one process; the implementations of
each row alternate run by run and each figure is the median of ``--runs`` runs. Every load reads
every page of every tensor (zero-copy loads pay their page faults inside the timing).

- ``safe_open``: ``{k: f.get_tensor(k) for k in f.keys()}`` with safetensors' ``safe_open`` and
  with ``safeckpt.safe_open`` (framework "pt" and "np"), on the same .safetensors file; and
  ``safeckpt.safe_open`` of the same tensors in a .sckpt file.
- Hugging Face shards (4 of about 125 MB): into a torch model, with a loop of
  ``safetensors.torch.load_file`` + ``load_state_dict(strict=False)`` per shard, with
  ``huggingface_hub.load_torch_model`` (when installed), and with ``safeckpt.torch.load_model``;
  saved with ``huggingface_hub.save_torch_state_dict`` and ``safeckpt.torch.save(...,
  max_shard_size=...)`` (which fsyncs every file; the hub does not).
- Lightning: a checkpoint of the model and its Adam state (1.5 GB) through Lightning's
  ``TorchCheckpointIO`` (``torch.save``/``torch.load``) and ``SafeckptCheckpointIO``.

    python benchmarks/bench_ecosystem.py [--runs 7] [--dir /tmp]
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch

import safeckpt
import safeckpt.torch as st
from cases import gpt2_shapes, touch


def touch_torch(tensors):
    return touch({k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in tensors.items()})


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(title, runs, cases):
    """Alternate the cases ``runs`` times; print each one's median and its ratio to the first."""
    times = {name: [] for name, _ in cases}
    for _ in range(runs):
        for name, fn in cases:
            times[name].append(timed(fn))
    base = statistics.median(times[cases[0][0]])
    print(f"\n{title}")
    for name, _ in cases:
        median = statistics.median(times[name])
        print(f"  {name:<58} {median * 1e3:8.1f} ms   x{median / base:5.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    import safetensors
    import safetensors.torch
    from safetensors import safe_open as st_safe_open

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, safetensors {safetensors.__version__}, "
          f"safeckpt backend {safeckpt.backend}; medians of {args.runs} runs, warm cache")
    shapes = gpt2_shapes()
    rng = np.random.default_rng(0)
    tensors = {name: torch.from_numpy(rng.random(shape, dtype=np.float32))
               for name, shape in shapes.items()}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        sft, sck = os.path.join(tmp, "m.safetensors"), os.path.join(tmp, "m.sckpt")
        safetensors.torch.save_file(tensors, sft)
        st.save(tensors, sck)

        def read_all(opener, path, framework):
            def run():
                with opener(path, framework=framework) as f:
                    got = {k: f.get_tensor(k) for k in f.keys()}
                (touch_torch if framework == "pt" else touch)(got)
            return run

        for framework in ("pt", "np"):
            compare(f"safe_open(framework={framework!r}): every tensor of GPT-2 small", args.runs, [
                ("safetensors.safe_open, .safetensors", read_all(st_safe_open, sft, framework)),
                ("safeckpt.safe_open, same .safetensors", read_all(safeckpt.safe_open, sft, framework)),
                ("safeckpt.safe_open, .sckpt", read_all(safeckpt.safe_open, sck, framework)),
            ])

        shards = os.path.join(tmp, "hf")
        os.mkdir(shards)
        model = torch.nn.Module()
        for name, shape in shapes.items():  # a module whose state_dict keys are the file's names
            parent = model
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, torch.nn.Module())
                parent = getattr(parent, part)
            parent.register_parameter(leaf, torch.nn.Parameter(torch.zeros(shape)))
        try:
            import huggingface_hub as hub
        except ImportError:
            hub = None

        def hf_loop():
            with open(os.path.join(shards, "model.safetensors.index.json")) as f:
                weight_map = json.load(f)["weight_map"]
            for file in sorted(set(weight_map.values())):
                model.load_state_dict(safetensors.torch.load_file(os.path.join(shards, file)),
                                      strict=False)

        st.save(tensors, os.path.join(shards, "model.safetensors"), max_shard_size="130MB")
        cases = [("loop: safetensors.torch.load_file + load_state_dict", hf_loop)]
        if hub is not None:
            cases.append(("huggingface_hub.load_torch_model",
                          lambda: hub.load_torch_model(model, shards, strict=True)))
        cases.append(("safeckpt.torch.load_model(model, directory)",
                      lambda: st.load_model(model, shards)))
        compare(f"Hugging Face shards ({len(os.listdir(shards)) - 1}) into a torch model",
                args.runs, cases)
        if hub is not None:
            hub_dir, our_dir = os.path.join(tmp, "hub"), os.path.join(tmp, "ours")
            os.mkdir(hub_dir)
            os.mkdir(our_dir)
            compare("Hugging Face shards: save a state dict (safeckpt fsyncs each file)", args.runs, [
                ("huggingface_hub.save_torch_state_dict", lambda: hub.save_torch_state_dict(
                    tensors, hub_dir, max_shard_size="130MB")),
                ("safeckpt.torch.save(..., max_shard_size=)", lambda: st.save(
                    tensors, os.path.join(our_dir, "model.safetensors"), max_shard_size="130MB")),
                ("safeckpt.torch.save(..., max_shard_size=, atomic=False): no fsync", lambda: st.save(
                    tensors, os.path.join(our_dir, "model.safetensors"), max_shard_size="130MB",
                    atomic=False)),
            ])

        try:
            from lightning.pytorch.plugins.io import TorchCheckpointIO
            from safeckpt.lightning import SafeckptCheckpointIO
        except ImportError:
            return
        params = list(model.parameters())
        optimizer = torch.optim.Adam(params)
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()
        checkpoint = {"epoch": 1, "global_step": 100, "state_dict": model.state_dict(),
                      "optimizer_states": [optimizer.state_dict()], "lr_schedulers": [],
                      "loops": {}, "callbacks": {}}
        plugins = [("TorchCheckpointIO (torch.save / torch.load)", TorchCheckpointIO(),
                    os.path.join(tmp, "torch.ckpt")),
                   ("SafeckptCheckpointIO", SafeckptCheckpointIO(), os.path.join(tmp, "sckpt.ckpt"))]

        def save(io, path):
            return lambda: io.save_checkpoint(checkpoint, path)

        def load(io, path):
            def run():
                got = io.load_checkpoint(path)
                touch_torch(got["state_dict"])
                for state in got["optimizer_states"][0]["state"].values():
                    touch_torch(state)
            return run

        compare("Lightning checkpoint (GPT-2 small + Adam, 1.5 GB): save", args.runs,
                [(name, save(io, path)) for name, io, path in plugins])
        compare("Lightning checkpoint: load (every page read)", args.runs,
                [(name, load(io, path)) for name, io, path in plugins])


if __name__ == "__main__":
    main()
