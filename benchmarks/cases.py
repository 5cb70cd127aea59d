"""Workloads, file formats and timed operations of the benchmark (see bench.py).

Each operation is ``fn(path, tensors) -> object``; ``tensors`` is only made for saves. Peers are
imported lazily so that a run pays only for the libraries it times.
"""

import mmap
import os
import pickle  # the reference peer only: benchmarks never load untrusted files

import numpy as np

PAGE = 4096


# -- workloads ----------------------------------------------------------------------------------

def gpt2_shapes():
    """The 148 tensors of GPT-2 small (124M parameters)."""
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
    return shapes


def gpt2_module(lora_rank=0):
    """A torch module with GPT-2 small's parameter names and shapes (no forward: only its state
    matters); with ``lora_rank``, the base is frozen and each attention projection gets trainable
    ``lora_A``/``lora_B`` adapters (GPT-2's Conv1D weights are (in, out))."""
    import torch

    root = torch.nn.Module()
    for name, shape in gpt2_shapes().items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(torch.randn(shape) * 0.02,
                                                           requires_grad=not lora_rank))
        if lora_rank and leaf == "weight" and path[-2:] in (["attn", "c_attn"], ["attn", "c_proj"]):
            n_in, n_out = shape
            module.register_parameter("lora_A",
                                      torch.nn.Parameter(torch.randn(n_in, lora_rank) * 0.01))
            module.register_parameter("lora_B", torch.nn.Parameter(torch.zeros(lora_rank, n_out)))
    return root


def tiny_shapes(count=20_000):
    """``count`` float32 tensors of 8 to 64 elements: a header-bound file."""
    rng = np.random.default_rng(1)
    return {f"layer.{i}.param": (int(n),) for i, n in enumerate(rng.integers(8, 65, count))}


def large_shapes():
    """8 tensors of 256 MiB each: a 2 GiB file."""
    return {f"block.{i}": (8192, 8192) for i in range(8)}


WORKLOADS = {
    "gpt2": ("GPT-2 small, float32 (124M parameters, 148 tensors)", gpt2_shapes),
    "tiny": ("20,000 tiny float32 tensors", tiny_shapes),
    "large": ("2 GiB: 8 tensors of 256 MiB", large_shapes),
}


def make_tensors(shapes):
    """Deterministic float32 data for ``shapes`` (contents do not matter to any format here)."""
    rng = np.random.default_rng(0)
    return {name: rng.random(shape, dtype=np.float32) for name, shape in shapes.items()}


def smallest(shapes):
    return min(shapes, key=lambda name: int(np.prod(shapes[name])))


# -- helpers ------------------------------------------------------------------------------------

def touch(arrays):
    """Read one byte of every page of every array (so zero-copy loads pay their page faults)."""
    total = 0
    for array in arrays.values():
        if not isinstance(array, np.ndarray):
            array = array.numpy()
        if array.nbytes <= PAGE:  # one read touches it (and keeps this loop cheap for tiny ones)
            total += array.size and hash(array.item(0))
            continue
        flat = array.reshape(-1).view(np.uint8)
        total += int(flat[::PAGE].sum()) + int(flat[-1])
    return total


def _torch_tensors(tensors):
    import torch
    return {name: torch.from_numpy(array) for name, array in tensors.items()}


# -- savers: fn(path, tensors) ------------------------------------------------------------------

def save_safeckpt(path, tensors):
    import safeckpt
    safeckpt.save_file(tensors, path)


def save_safeckpt_not_atomic(path, tensors):
    import safeckpt
    safeckpt.save_file(tensors, path, atomic=False)


def save_safetensors(path, tensors):
    import safetensors.numpy
    safetensors.numpy.save_file(tensors, path)


def save_torch(path, tensors):
    import torch
    torch.save(_torch_tensors(tensors), path)


def save_npz(path, tensors):
    with open(path, "wb") as f:
        np.savez(f, **tensors)


def save_pickle(path, tensors):
    with open(path, "wb") as f:
        pickle.dump(tensors, f, protocol=pickle.HIGHEST_PROTOCOL)


def save_raw(path, tensors):
    """The limit: one buffered write of every array's bytes, nothing else."""
    with open(path, "wb") as f:
        for array in tensors.values():
            f.write(memoryview(array.reshape(-1).view(np.uint8)))


# -- loaders: fn(path, None) -> touched checksum ------------------------------------------------

def load_safeckpt(path, _):
    import safeckpt
    return touch(safeckpt.load_file(path))


def load_safeckpt_fresh(path, _):
    """mmap=False: read into fresh memory, every tensor's CRC32C checked (verify=None, auto)."""
    import safeckpt
    return touch(safeckpt.load_file(path, mmap=False))


def load_safeckpt_fresh_unverified(path, _):
    import safeckpt
    return touch(safeckpt.load_file(path, mmap=False, verify=False))


def load_safeckpt_verify(path, _):
    import safeckpt
    return touch(safeckpt.load_file(path, verify=True))


def load_safetensors_numpy(path, _):
    import safetensors.numpy
    return touch(safetensors.numpy.load_file(path))


def load_safetensors_torch(path, _):
    import safetensors.torch
    return touch(safetensors.torch.load_file(path))


def load_torch(path, _):
    import torch
    return touch(torch.load(path, weights_only=True))


def load_torch_mmap(path, _):
    import torch
    return touch(torch.load(path, weights_only=True, mmap=True))


def load_npz(path, _):
    with np.load(path, allow_pickle=False) as data:  # noqa: the npz peer, pickle refused
        return touch({name: data[name] for name in data.files})


def load_pickle(path, _):
    with open(path, "rb") as f:
        return touch(pickle.load(f))


def load_readinto(path, _):
    """The limit for loading into fresh memory: one readinto of the whole file."""
    buffer = np.empty(os.path.getsize(path), np.uint8)
    with open(path, "rb", buffering=0) as f:
        f.readinto(memoryview(buffer))
    return touch({"all": buffer})


def load_bare_mmap(path, _):
    """The limit for zero-copy loading: mmap the file and touch every page."""
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return touch({"all": np.frombuffer(mapped, np.uint8)})


# -- one small tensor ---------------------------------------------------------------------------

def one_safeckpt(path, name):
    import safeckpt
    with safeckpt.open(path) as f:
        return float(f[name].sum())


def one_safetensors(path, name):
    from safetensors import safe_open
    with safe_open(path, framework="np") as f:
        return float(f.get_tensor(name).sum())


def one_torch_mmap(path, name):
    import torch
    return float(torch.load(path, weights_only=True, mmap=True)[name].sum())


def verify_safeckpt(path, _):
    import safeckpt
    with safeckpt.open(path) as f:
        f.verify()


# -- to a GPU: run only where torch sees CUDA (bench.py skips these otherwise) ------------------

def _on_gpu(load):
    """Run ``load()``, which puts tensors on the GPU, and wait until every copy is done."""
    import torch
    tensors = load()
    torch.cuda.synchronize()
    return len(tensors)


def gpu_safeckpt(path, _):
    import safeckpt.torch
    return _on_gpu(lambda: safeckpt.torch.load(path, map_location="cuda", mmap=False))


def gpu_safetensors(path, _):
    import safetensors.torch
    return _on_gpu(lambda: safetensors.torch.load_file(path, device="cuda"))


def gpu_torch_mmap(path, _):
    import torch
    return _on_gpu(lambda: torch.load(path, weights_only=True, mmap=True, map_location="cuda"))


# -- the table: operation -> [(implementation, file format, fn)] --------------------------------

FORMATS = {"sckpt": save_safeckpt, "safetensors": save_safetensors, "pt": save_torch,
           "npz": save_npz, "pkl": save_pickle}

OPERATIONS = {
    "save": [
        ("safeckpt", "sckpt", save_safeckpt),
        ("safeckpt atomic=False", "sckpt", save_safeckpt_not_atomic),
        ("safetensors.numpy", "safetensors", save_safetensors),
        ("torch.save", "pt", save_torch),
        ("np.savez", "npz", save_npz),
        ("pickle", "pkl", save_pickle),
        ("raw write (limit)", "raw", save_raw),
    ],
    "load warm": [
        ("safeckpt", "sckpt", load_safeckpt),
        ("safetensors.torch", "safetensors", load_safetensors_torch),
        ("safetensors.numpy", "safetensors", load_safetensors_numpy),
        ("torch.load", "pt", load_torch),
        ("torch.load mmap", "pt", load_torch_mmap),
        ("np.load npz", "npz", load_npz),
        ("pickle", "pkl", load_pickle),
        ("bare mmap + touch (limit)", "sckpt", load_bare_mmap),
    ],
    "load cold": [
        ("safeckpt", "sckpt", load_safeckpt),
        ("safeckpt verify=True", "sckpt", load_safeckpt_verify),
        ("safeckpt mmap=False", "sckpt", load_safeckpt_fresh),
        ("safeckpt mmap=False verify=False", "sckpt", load_safeckpt_fresh_unverified),
        ("safetensors.torch", "safetensors", load_safetensors_torch),
        ("torch.load mmap", "pt", load_torch_mmap),
        ("readinto (limit)", "sckpt", load_readinto),
    ],
    "load fresh memory": [
        ("safeckpt mmap=False", "sckpt", load_safeckpt_fresh),
        ("safeckpt mmap=False verify=False", "sckpt", load_safeckpt_fresh_unverified),
        ("readinto (limit)", "sckpt", load_readinto),
    ],
    "open + read one small tensor": [
        ("safeckpt", "sckpt", one_safeckpt),
        ("safetensors safe_open", "safetensors", one_safetensors),
        ("torch.load mmap", "pt", one_torch_mmap),
    ],
    "verify": [
        ("safeckpt verify()", "sckpt", verify_safeckpt),
    ],
    "load to GPU": [
        ("safeckpt map_location=cuda", "sckpt", gpu_safeckpt),
        ("safetensors.torch device=cuda", "safetensors", gpu_safetensors),
        ("torch.load mmap map_location=cuda", "pt", gpu_torch_mmap),
    ],
}
GPU_OPERATIONS = {"load to GPU"}  # skipped where torch.cuda.is_available() is false
