"""safeckpt vs orbax-checkpoint on a flax TrainState, side by side in one process.

The state is a flax ``TrainState`` (432 MiB by default): bfloat16 and float32 parameters, optax
adamw's state after one step (mu and nu, in each parameter's dtype), the schedule's count and a
typed PRNG key (``jax.random.key``). Each library saves it through its own checkpoint manager
and restores it into an abstract template (``jax.ShapeDtypeStruct`` leaves with the arrays'
shardings), as its documentation shows:

- safeckpt: ``safeckpt.CheckpointManager(dir).save(step, state)``,
  ``manager.restore(abstract).state``; subtree: ``safeckpt.jax.load(path, prefix="state.params",
  target=abstract.params)``.
- orbax: ``ocp.CheckpointManager(dir, options=...)`` with ``ocp.args.StandardSave`` /
  ``StandardRestore``; subtree: ``PyTreeCheckpointer().restore(step/"default",
  args=PyTreeRestore(item={"params": ...}, partial_restore=True))``.

Measured, as medians of ``--repeat`` rounds (the two libraries alternate which goes first,
and ``os.sync()`` runs, untimed, before each save, so that neither pays for the other's
writeback): a full synchronous save to completion; the time an async save blocks the caller (safeckpt
``CheckpointManager(async_save=True)``, orbax's default async CheckpointManager) and its total
time to completion; restore into the template with the files in the page cache ("warm"), and,
when run as root, after ``sync; echo 3 > /proc/sys/vm/drop_caches`` ("cold"); the same for the
parameters alone. Each round's timed restores follow an untimed one, which fills the page
cache and brings the allocators to a steady state (without it, the first restore paid for fresh
memory and came out slower warm than cold). "+read" adds one pass over every restored byte (a
lazy restore would pay there). Bytes on disk: the sum of the file sizes of one checkpoint. Every
restore is checked bit for bit against the saved state once, outside the timings.

    python benchmarks/bench_orbax.py [--size-mib 432] [--repeat 5] [--dir /tmp] [--no-cold]

Both saves fsync (orbax through tensorstore: strace counts its fsync calls); safeckpt's is
atomic (temporary file, fsync, rename) and stores a CRC32C per tensor, which the manager's
restore checks; the figures include that work. ``safeckpt.jax.load`` (the params-only rows) maps
the file and does not check CRCs unless ``verify=True``.
"""

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax.training import train_state

import safeckpt
import safeckpt.jax as sj

WIDTH = 1024  # columns of every kernel
LAYERS = 8  # half bfloat16, half float32 kernels (each with a float32 bias)


class TrainState(train_state.TrainState):
    """flax's TrainState plus a typed PRNG key."""

    key: jax.Array


def make_state(size_mib):
    """A TrainState of about ``size_mib`` MiB after one adamw step (mu, nu nonzero)."""
    param_bytes = size_mib * 2 ** 20 / 3  # params, mu and nu have the same dtypes and sizes
    rng = np.random.default_rng(0)
    params = {}
    for i in range(LAYERS):
        dtype = jnp.bfloat16 if i % 2 == 0 else jnp.float32
        itemsize = np.dtype(dtype).itemsize
        rows = max(1, int(param_bytes / LAYERS / (WIDTH * itemsize)))
        params[f"layer{i}"] = {
            "kernel": jnp.asarray(rng.standard_normal((rows, WIDTH), np.float32), dtype=dtype),
            "bias": jnp.asarray(rng.standard_normal(WIDTH, np.float32))}
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, warmup_steps=10, decay_steps=1000)
    state = TrainState.create(apply_fn=None, params=params, tx=optax.adamw(schedule),
                              key=jax.random.key(0))
    grads = jax.tree.map(  # random, as real gradients: mu and nu do not compress either
        lambda p: jnp.asarray(rng.standard_normal(p.shape, np.float32) * 0.01, p.dtype), params)
    state = jax.jit(lambda s, g: s.apply_gradients(grads=g, key=jax.random.split(s.key)[0]))(
        state, grads)
    return jax.block_until_ready(state)


def abstract(tree):
    """The template of a restore: ShapeDtypeStructs with each array's sharding and weak type
    (a TrainState's ``step`` is weakly typed after a jitted step; safeckpt checks it)."""
    def leaf(x):  # a typed key array has no weak_type
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding,
                                    weak_type=getattr(x, "weak_type", False))
    return jax.tree.map(leaf, tree)


def raw(leaf):
    """The bytes of a leaf as a numpy array (a typed key: its key data)."""
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    return np.asarray(leaf)


def read_all(tree):
    """Read every byte of every leaf once (an XOR over 8-byte words)."""
    for leaf in jax.tree.leaves(tree):
        data = raw(leaf).reshape(-1).view(np.uint8)
        words = data[:data.size // 8 * 8].view(np.uint64)
        np.bitwise_xor.reduce(words)
        np.bitwise_xor.reduce(data[words.size * 8:])


def check_equal(got, want, who):
    """Raise unless ``got`` has ``want``'s treedef and every leaf's dtype, shape and bytes."""
    if jax.tree.structure(got) != jax.tree.structure(want):
        raise AssertionError(f"{who}: treedef {jax.tree.structure(got)} != "
                             f"{jax.tree.structure(want)}")
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        if a.dtype != b.dtype or a.shape != b.shape or raw(a).tobytes() != raw(b).tobytes():
            raise AssertionError(f"{who}: {jax.tree_util.keystr(path)} differs: "
                                 f"{a.dtype}{a.shape} vs {b.dtype}{b.shape}")


def drop_caches():
    """Empty the page cache (root only): the next read comes from the disk."""
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def disk_bytes(path):
    """The sum of the sizes of the files under ``path`` (a file or a directory)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


class Safeckpt:
    name = "safeckpt"

    def __init__(self, root):
        self.sync = safeckpt.CheckpointManager(os.path.join(root, "sck"), keep_last=1)
        self.asyn = safeckpt.CheckpointManager(os.path.join(root, "sck-async"), keep_last=1,
                                               async_save=True)

    def save(self, step, state):
        self.sync.save(step, state)

    def async_save(self, step, state):
        self.asyn.save(step, state)

    def async_wait(self):
        self.asyn.wait()

    def restore(self, step, template):
        return jax.block_until_ready(self.sync.restore(template, step).state)

    def restore_params(self, step, template):
        return jax.block_until_ready(
            sj.load(self.sync.path(step), prefix="state.params", target=template.params))

    def files(self, step):
        return self.sync.path(step)

    def close(self):
        self.sync.close()
        self.asyn.close()


class Orbax:
    name = "orbax"

    def __init__(self, root):
        self.root = os.path.join(root, "orbax")
        self.sync = ocp.CheckpointManager(self.root, options=ocp.CheckpointManagerOptions(
            max_to_keep=1, enable_async_checkpointing=False))
        self.asyn = ocp.CheckpointManager(os.path.join(root, "orbax-async"),
                                          options=ocp.CheckpointManagerOptions(max_to_keep=1))

    def save(self, step, state):
        self.sync.save(step, args=ocp.args.StandardSave(state))
        self.sync.wait_until_finished()

    def async_save(self, step, state):
        self.asyn.save(step, args=ocp.args.StandardSave(state))

    def async_wait(self):
        self.asyn.wait_until_finished()

    def restore(self, step, template):
        return jax.block_until_ready(
            self.sync.restore(step, args=ocp.args.StandardRestore(template)))

    def restore_params(self, step, template):
        item = {"params": template.params}
        restored = ocp.PyTreeCheckpointer().restore(
            os.path.join(self.root, str(step), "default"),
            args=ocp.args.PyTreeRestore(item=item, partial_restore=True,
                                        restore_args=ocp.checkpoint_utils.construct_restore_args(
                                            item)))
        return jax.block_until_ready(restored["params"])

    def files(self, step):
        return os.path.join(self.root, str(step))

    def close(self):
        self.sync.close()
        self.asyn.close()


COLUMNS = [("save", "full save"), ("async_block", "async save: blocks"),
           ("async_total", "async save: total"), ("restore_warm", "restore, warm"),
           ("restore_warm_read", "restore+read, warm"), ("restore_cold", "restore, cold"),
           ("restore_cold_read", "restore+read, cold"), ("params_warm", "params only, warm"),
           ("params_warm_read", "params only+read, warm"), ("params_cold", "params only, cold"),
           ("params_cold_read", "params only+read, cold")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=float, default=432)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-cache restores")
    args = parser.parse_args(argv)
    cold = not args.no_cold and os.geteuid() == 0
    if not args.no_cold and not cold:
        print("not root: no cold-cache restores (drop_caches needs root)")

    state = make_state(args.size_mib)
    template = abstract(state)
    nbytes = sum(raw(x).nbytes for x in jax.tree.leaves(state))
    root = tempfile.mkdtemp(dir=args.dir, prefix="bench-orbax-")
    libs = [Safeckpt(root), Orbax(root)]
    times = {lib.name: {key: [] for key, _ in COLUMNS} for lib in libs}
    sizes = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # orbax's deprecation notices
        for r in range(args.repeat + 1):  # round 0 warms up (jit, imports), untimed
            step = r + 1
            order = libs if r % 2 == 0 else libs[::-1]
            rounds = {}
            for lib in order:
                t = rounds.setdefault(lib.name, {})
                os.sync()  # untimed: the other library's writes are not left for this one
                t["save"], _ = timed(lambda: lib.save(step, state))
                os.sync()
                t["async_block"], _ = timed(lambda: lib.async_save(step, state))
                wait, _ = timed(lib.async_wait)
                t["async_total"] = t["async_block"] + wait
            for lib in order:
                t = rounds[lib.name]
                # untimed: fills the page cache and lets each library's allocator reach its
                # steady state, so that warm and cold restores start alike
                jax.tree.leaves(lib.restore(step, template))
                t["restore_warm"], got = timed(lambda: lib.restore(step, template))
                t["restore_warm_read"] = t["restore_warm"] + timed(lambda: read_all(got))[0]
                if r == 0:
                    check_equal(got, state, f"{lib.name} restore")
                del got
                t["params_warm"], got = timed(lambda: lib.restore_params(step, template))
                t["params_warm_read"] = t["params_warm"] + timed(lambda: read_all(got))[0]
                if r == 0:
                    check_equal(got, state.params, f"{lib.name} params restore")
                del got
                if cold:
                    drop_caches()
                    t["restore_cold"], got = timed(lambda: lib.restore(step, template))
                    t["restore_cold_read"] = t["restore_cold"] + timed(lambda: read_all(got))[0]
                    del got
                    drop_caches()
                    t["params_cold"], got = timed(lambda: lib.restore_params(step, template))
                    t["params_cold_read"] = t["params_cold"] + timed(lambda: read_all(got))[0]
                    del got
                sizes[lib.name] = disk_bytes(lib.files(step))
            if r == 0:
                continue
            for name, t in rounds.items():
                for key, value in t.items():
                    times[name][key].append(value)
            print(f"round {r}: " + "; ".join(
                f"{name} " + " ".join(f"{k}={v * 1e3:.0f}ms" for k, v in t.items())
                for name, t in rounds.items()), flush=True)
    for lib in libs:
        lib.close()
    shutil.rmtree(root)

    print()
    print(f"TrainState of {nbytes / 2 ** 20:.1f} MiB ({len(jax.tree.leaves(state))} leaves: "
          "bf16 + f32 params, adamw mu/nu, count, step, typed key); medians of "
          f"{args.repeat} rounds")
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"jax {jax.__version__}, orbax-checkpoint {ocp.__version__}, safeckpt "
          f"{safeckpt.__version__} ({safeckpt.backend} backend), files in {args.dir}")
    print()
    print("| | safeckpt | orbax | orbax / safeckpt |")
    print("|---|---:|---:|---:|")
    for key, label in COLUMNS:
        if not times["safeckpt"][key]:
            continue
        ours, theirs = (statistics.median(times[n][key]) for n in ("safeckpt", "orbax"))
        print(f"| {label} | {ours * 1e3:.0f} ms | {theirs * 1e3:.0f} ms | {theirs / ours:.2f}x |")
    print(f"| bytes on disk | {sizes['safeckpt']:,} | {sizes['orbax']:,} | "
          f"{sizes['orbax'] / sizes['safeckpt']:.3f}x |")
    print()
    print("command: " + " ".join([os.path.basename(sys.executable)] + sys.argv))


if __name__ == "__main__":
    main()
