"""A flax.nnx MLP trained with ``nnx.Optimizer`` (optax adamw, warmup-cosine schedule),
checkpointed by ``safeckpt.CheckpointManager`` and resumed with ``nnx.update``: no conversion code.

``nnx.state((model, optimizer))`` is saved as it is: bfloat16 and float32 parameters, adamw's
state, and the ``nnx.Rngs`` streams (typed keys and their counts) that drive dropout. Each step
prints its loss as the float's exact bits (``float.hex``), so two runs compare bit for bit.

    pip install safeckpt[jax] flax optax
    python examples/flax_nnx_resume.py --dir /tmp/nnx --steps 20
    python examples/flax_nnx_resume.py --dir /tmp/nnx2 --steps 20 --kill-at 11  # SIGKILL
    python examples/flax_nnx_resume.py --dir /tmp/nnx2 --steps 20               # resumes
"""

import argparse
import os
import signal

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import safeckpt

SEED = 0
BATCH, FEATURES, HIDDEN = 32, 16, 64


class MLP(nnx.Module):
    """Two linear layers (the first in bfloat16) with dropout between them."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(FEATURES, HIDDEN, dtype=jnp.bfloat16,
                                 param_dtype=jnp.bfloat16, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.out = nnx.Linear(HIDDEN, 1, rngs=rngs)

    def __call__(self, x):
        x = self.dropout(nnx.gelu(self.hidden(x)))
        return self.out(x.astype(jnp.float32))


def batch(step):
    """Batch ``step`` of the generated data: the same at every run."""
    rng = np.random.default_rng([SEED, step])
    x = rng.standard_normal((BATCH, FEATURES), dtype=np.float32)
    y = np.sin(2 * x[:, :1]) + x[:, 1:2] * x[:, 2:3]
    return jnp.asarray(x), jnp.asarray(y)


def create():
    """A fresh model and optimizer (also the template that a restore fills)."""
    model = MLP(nnx.Rngs(params=SEED, dropout=SEED + 1))  # typed keys (jax.random.key)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, warmup_steps=5, decay_steps=100)
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=1e-4), wrt=nnx.Param)
    return model, optimizer


@nnx.jit
def train_step(model, optimizer, x, y):
    """One adamw step; dropout draws from the model's rng stream."""
    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="the checkpoint directory")
    parser.add_argument("--steps", type=int, default=20, help="train until this many steps")
    parser.add_argument("--save-every", type=int, default=3)
    parser.add_argument("--kill-at", type=int, default=None,
                        help="SIGKILL this process right after step KILL_AT (and its save)")
    parser.add_argument("--async-save", action="store_true",
                        help="CheckpointManager(async_save=True): a kill may hit a write")
    args = parser.parse_args(argv)

    model, optimizer = create()
    with safeckpt.CheckpointManager(args.dir, keep_last=2, async_save=args.async_save) as mngr:
        info = mngr.restore(nnx.state((model, optimizer)))  # None: no checkpoint yet
        start = 0
        if info:
            nnx.update((model, optimizer), info.state)
            start = info.step + 1
            print(f"resumed {info.step}", flush=True)
        for step in range(start, args.steps):
            loss = train_step(model, optimizer, *batch(step))
            print(f"step {step} loss {float(loss).hex()}", flush=True)
            if (step + 1) % args.save_every == 0:
                mngr.save(step, nnx.state((model, optimizer)), metrics={"loss": float(loss)})
            if step == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main()
