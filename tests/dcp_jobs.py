"""Multi-process DCP jobs for tests/test_dcp.py and benchmarks/bench_dcp.py (spawned, gloo).

A job saves or loads a small model and its Adam state with every parameter and optimizer tensor
row-sharded as a DTensor over all ranks, and checks the result against the same state built in
one process.
"""

import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from safeckpt.dcp import SafeckptReader, SafeckptWriter
from safeckpt.tree import same


def reference(seed=0):
    """A small MLP after one Adam step, and ``{"model": ..., "optim": ..., "epoch": 3}``.

    Computed on one thread: the bits of a float sum depend on how many threads share it.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.ReLU(),
                                    torch.nn.Linear(40, 12))
        optim = torch.optim.Adam(model.parameters(), lr=1e-3 * (seed + 1), betas=(0.9, 0.99))
        model(torch.randn(5, 24)).square().sum().backward()
        optim.step()
    finally:
        torch.set_num_threads(threads)
    return {"model": model.state_dict(), "optim": optim.state_dict(), "epoch": 3 + seed}


def shard_state(state, mesh):
    """The same state with every tensor of 1 or more dimensions row-sharded over ``mesh``."""
    def shard(value):
        if isinstance(value, torch.Tensor) and value.dim():
            return distribute_tensor(value, mesh, [Shard(0)])
        if isinstance(value, dict):
            return type(value)((k, shard(v)) for k, v in value.items())
        if isinstance(value, list):
            return [shard(v) for v in value]
        return value
    return shard(state)


def full(state):
    """DTensors gathered back into plain tensors."""
    if isinstance(state, DTensor):
        return state.full_tensor()
    if isinstance(state, dict):
        return type(state)((k, full(v)) for k, v in state.items())
    if isinstance(state, list):
        return [full(v) for v in state]
    return state


def job(rank, world, port, action, path, safe):
    """One rank: ``action`` is "save" (the reference, sharded) or "load" (into another state,
    sharded over this world size, then compared with the reference)."""
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        if action == "save":
            writer = SafeckptWriter(path) if safe else dcp.FileSystemWriter(path)
            dcp.save(shard_state(reference(), mesh), storage_writer=writer)
        else:
            state = shard_state(reference(seed=1), mesh)  # other values, same structure
            reader = SafeckptReader(path, verify=True) if safe else dcp.FileSystemReader(path)
            dcp.load(state, storage_reader=reader)
            if not same(full(state), reference()):
                raise AssertionError(f"rank {rank} of {world}: the loaded state differs")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world, action, path, safe=True):
    """Run ``job`` on ``world`` spawned processes."""
    import torch.multiprocessing as mp
    mp.spawn(job, args=(world, free_port(), action, os.fspath(path), safe), nprocs=world, join=True)
