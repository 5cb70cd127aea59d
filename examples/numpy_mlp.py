"""A numpy MLP trained on generated data, checkpointed every epoch; kill it and run it again, and it
resumes where it stopped (weights, optimizer state, epoch and random state).

    python examples/numpy_mlp.py [checkpoint directory] [epochs]
"""

import os
import sys
import tempfile

import numpy as np

import safeckpt


def data(n=2048, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8)).astype(np.float32)
    y = (np.sin(x[:, :1] * 2) + x[:, 1:2] * x[:, 2:3]).astype(np.float32)
    return x, y


def init(seed=0):
    rng = np.random.default_rng(seed)
    return {"w1": (rng.standard_normal((8, 64)) / np.sqrt(8)).astype(np.float32),
            "b1": np.zeros(64, np.float32),
            "w2": (rng.standard_normal((64, 1)) / 8).astype(np.float32),
            "b2": np.zeros(1, np.float32)}


def epoch(params, velocity, x, y, lr=0.05, batch=64):
    """One epoch of SGD with momentum; batches in a random order (np.random: checkpointed too)."""
    order = np.random.permutation(len(x))
    total = 0.0
    for start in range(0, len(x), batch):
        idx = order[start:start + batch]
        xb, yb = x[idx], y[idx]
        h = np.tanh(xb @ params["w1"] + params["b1"])
        err = h @ params["w2"] + params["b2"] - yb
        dh = err @ params["w2"].T * (1 - h ** 2)
        grads = {"w2": h.T @ err / len(xb), "b2": err.mean(0), "w1": xb.T @ dh / len(xb),
                 "b1": dh.mean(0)}
        for k, g in grads.items():
            velocity[k] = 0.9 * velocity.get(k, np.zeros_like(g)) + g
            params[k] -= lr * velocity[k]
        total += float((err ** 2).sum())
    return total / len(x)


def main(directory=None, epochs=20):
    directory = directory or os.path.join(tempfile.gettempdir(), "safeckpt-numpy-mlp")
    x, y = data()
    state = {"params": init(), "velocity": {}, "epoch": -1}
    np.random.seed(0)
    manager = safeckpt.CheckpointManager(directory, keep_last=2, keep_best=1, metric="loss")
    info = manager.restore(state)  # the newest complete checkpoint, or None: start fresh
    start = state["epoch"] + 1
    print(f"resuming after epoch {state['epoch']}" if info else "starting fresh", f"({directory})")
    for e in range(start, epochs):
        loss = epoch(state["params"], state["velocity"], x, y)
        state["epoch"] = e
        manager.save(e, state, metrics={"loss": loss})
        print(f"epoch {e:3d}  loss {loss:.5f}")
    print("best:", manager.best())
    return state


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None, int(sys.argv[2]) if len(sys.argv) > 2 else 20)
