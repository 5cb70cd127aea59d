"""A flax.linen MLP trained with optax adamw and a warmup-cosine schedule, checkpointed by
``safeckpt.CheckpointManager`` and resumed from the newest checkpoint with no conversion code.

The TrainState holds bfloat16 and float32 parameters, adamw's state (with the schedule's count)
and a typed PRNG key (``jax.random.key``) that the jitted step splits for dropout. Each step
prints its loss as the float's exact bits (``float.hex``), so two runs compare bit for bit.
Data come from a seed, batch by batch, so a resumed run sees what an unbroken one sees.

    pip install safeckpt[jax] flax optax
    python examples/flax_linen_resume.py --dir /tmp/linen --steps 20
    python examples/flax_linen_resume.py --dir /tmp/linen2 --steps 20 --kill-at 11  # SIGKILL
    python examples/flax_linen_resume.py --dir /tmp/linen2 --steps 20               # resumes
"""

import argparse
import os
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

import safeckpt

SEED = 0
BATCH, FEATURES, HIDDEN = 32, 16, 64


class MLP(nn.Module):
    """Two dense layers: the first computes and stores its parameters in bfloat16."""

    hidden: int = HIDDEN

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.Dense(self.hidden, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)(x)
        x = nn.gelu(x)
        x = nn.Dropout(0.1, deterministic=not train)(x)
        return nn.Dense(1, dtype=jnp.float32)(x.astype(jnp.float32))


class TrainState(train_state.TrainState):
    """flax's TrainState plus the dropout key, split at every step."""

    key: jax.Array


def batch(step):
    """Batch ``step`` of the generated data: the same at every run."""
    rng = np.random.default_rng([SEED, step])
    x = rng.standard_normal((BATCH, FEATURES), dtype=np.float32)
    y = np.sin(2 * x[:, :1]) + x[:, 1:2] * x[:, 2:3]
    return jnp.asarray(x), jnp.asarray(y)


def create_state():
    """A fresh TrainState (also the template that a restore fills)."""
    model = MLP()
    params = model.init(jax.random.key(SEED), jnp.zeros((1, FEATURES)), train=False)["params"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, warmup_steps=5, decay_steps=100)
    return TrainState.create(apply_fn=model.apply, params=params,
                             tx=optax.adamw(schedule, weight_decay=1e-4),
                             key=jax.random.key(SEED + 1))


@jax.jit
def train_step(state, x, y):
    """One adamw step; the state's key is split, one half for this step's dropout."""
    key, dropout_key = jax.random.split(state.key)

    def loss_fn(params):
        pred = state.apply_fn({"params": params}, x, train=True, rngs={"dropout": dropout_key})
        return jnp.mean((pred - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads, key=key), loss


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

    state = create_state()
    with safeckpt.CheckpointManager(args.dir, keep_last=2, async_save=args.async_save) as mngr:
        info = mngr.restore({"state": state})  # None: no checkpoint yet
        start = 0
        if info:
            state, start = info.state["state"], info.step + 1
            print(f"resumed {info.step}", flush=True)
        for step in range(start, args.steps):
            state, loss = train_step(state, *batch(step))
            print(f"step {step} loss {float(loss).hex()}", flush=True)
            if (step + 1) % args.save_every == 0:
                mngr.save(step, {"state": state}, metrics={"loss": float(loss)})
            if step == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main()
