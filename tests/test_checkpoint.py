"""Checkpoints (safeckpt/checkpoint.py) with plain dicts of numpy arrays: save/load, RNG state,
exact resume in a new process, the manager's retention and crash recovery under SIGKILL."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import safeckpt
from safeckpt.checkpoint import capture_rng, restore_rng
from safeckpt.tree import same

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] + sys.path)}


def params(seed=0):
    rng = np.random.default_rng(seed)
    return {"w1": rng.standard_normal((4, 8)), "b1": np.zeros(8), "w2": rng.standard_normal((8, 1))}


@pytest.mark.usefixtures("backend")
def test_save_and_load_checkpoint_with_plain_dicts(tmp_path):
    model = params()
    optimizer = {"state": {i: {"momentum": np.full(3, i, np.float32)} for i in range(3)},
                 "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "foreach": None}]}
    path = tmp_path / "c.sckpt"
    safeckpt.save_checkpoint(path, model=model, optimizer=optimizer, step=10, epoch=2,
                             extra={"config": {"layers": (4, 8, 1)}}, metrics={"loss": np.float32(0.5)})
    target, kept = params(seed=1), None
    kept = target["w1"]
    target_opt = {}
    info = safeckpt.load_checkpoint(path, model=target, optimizer=target_opt)
    assert (info.step, info.epoch, info.metrics) == (10, 2, {"loss": 0.5})
    assert info.extra == {"config": {"layers": (4, 8, 1)}}
    assert same(target, model) and target["w1"] is kept  # restored in place
    assert same(target_opt, optimizer)
    with safeckpt.open(path) as f:  # a checkpoint is an ordinary nested file
        assert f.metadata == {"format": "safeckpt.checkpoint/1", "step": 10, "metrics": {"loss": 0.5}}
        assert "model.w1" in f.keys() and "optimizer.state.2.momentum" in f.keys()
    with pytest.raises(safeckpt.InvalidValueError, match="step=-1"):
        safeckpt.save_checkpoint(path, step=-1)
    with pytest.raises(safeckpt.InvalidValueError, match=r"checkpoint\['extra'\]\['gen'\]"):
        safeckpt.save_checkpoint(path, extra={"gen": np.random.default_rng()})
    safeckpt.save(params(), tmp_path / "plain.sckpt")
    with pytest.raises(safeckpt.SafeckptError, match="not a checkpoint"):
        safeckpt.load_checkpoint(tmp_path / "plain.sckpt")


def test_rng_state_round_trips(tmp_path):
    random.seed(5)
    np.random.seed(6)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    state = capture_rng()
    path = tmp_path / "r.sckpt"
    safeckpt.save(state, path)
    expected = ([random.random() for _ in range(3)], np.random.standard_normal(3).tolist())
    random.seed(0)
    np.random.seed(0)
    restore_rng(safeckpt.load(path))
    assert ([random.random() for _ in range(3)], np.random.standard_normal(3).tolist()) == expected


NUMPY_RESUME = r"""
import hashlib, json, random, sys
import numpy as np, safeckpt

def step(p, v):
    x = np.random.standard_normal((16, 4))
    y = x.sum(1, keepdims=True) + random.random()
    h = np.tanh(x @ p["w1"] + p["b1"])
    err = h @ p["w2"] - y
    grads = {"w2": h.T @ err / 16}
    dh = err @ p["w2"].T * (1 - h ** 2)
    grads["w1"], grads["b1"] = x.T @ dh / 16, dh.mean(0)
    for k in p:
        v[k] = 0.9 * v.get(k, 0) + grads[k]
        p[k] -= 0.05 * v[k]
    return float((err ** 2).mean())

mode, path, k, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(0 if mode == "full" else 7)
p = {"w1": rng.standard_normal((4, 8)), "b1": np.zeros(8), "w2": rng.standard_normal((8, 1))}
v = {}
if mode == "full":
    random.seed(1); np.random.seed(1)
    losses = []
    for i in range(n):
        if i == k:
            safeckpt.save_checkpoint(path, model=p, optimizer=v, step=k)
        losses.append(step(p, v))
    losses = losses[k:]
else:
    info = safeckpt.load_checkpoint(path, model=p, optimizer=v)
    losses = [step(p, v) for _ in range(info.step, n)]
print(json.dumps({"losses": [x.hex() for x in losses],
                  "weights": hashlib.sha256(b"".join(a.tobytes() for a in p.values())).hexdigest()}))
"""


def test_numpy_resume_in_a_new_process_is_bit_exact(tmp_path):
    def run(mode):
        out = subprocess.run([sys.executable, "-c", NUMPY_RESUME, mode, str(tmp_path / "n.sckpt"),
                              "5", "12"], capture_output=True, text=True, env=ENV, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)
    full, resumed = run("full"), run("resume")
    assert len(full["losses"]) == 7 and resumed == full


def test_safeckpt_works_without_torch(tmp_path):
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np, safeckpt\n"
            "m = safeckpt.CheckpointManager(sys.argv[1])\n"
            "m.save(1, {'w': np.ones(2), 't': (1, 2)})\n"
            "s = {'w': np.zeros(2)}\n"
            "assert m.restore(s).step == 1 and s['w'].tolist() == [1, 1] and s['t'] == (1, 2)\n"
            "print(safeckpt.load(m.latest().path, prefix='state.w'))\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                         env=ENV, timeout=60)
    assert out.returncode == 0 and "[1. 1.]" in out.stdout, out.stderr


# -- the manager -----------------------------------------------------------------------------------

@pytest.mark.usefixtures("backend")
def test_manager_retention_keeps_last_and_best(tmp_path):
    manager = safeckpt.CheckpointManager(tmp_path, keep_last=2, keep_best=1, metric="loss")
    assert manager.latest() is None and manager.best() is None and manager.restore({}) is None
    for step, loss in [(0, 3.0), (10, 1.0), (20, 2.0), (30, 4.0), (40, float("nan")), (50, 5.0)]:
        manager.save(step, {"w": np.full(3, step), "note": f"step {step}"}, metrics={"loss": loss})
    assert [c.step for c in manager.all()] == [10, 40, 50]
    assert manager.best().step == 10 and manager.latest().step == 50
    assert sorted(os.listdir(tmp_path)) == ["step-0000000010.sckpt", "step-0000000040.sckpt",
                                            "step-0000000050.sckpt"]
    state = {"w": np.zeros(3, np.int64)}
    info = manager.restore(state, step=10)
    assert info.step == 10 and state["w"].tolist() == [10] * 3 and state["note"] == "step 10"
    assert manager.load().state["note"] == "step 50"
    maximizing = safeckpt.CheckpointManager(tmp_path, keep_last=1, keep_best=1, metric="loss",
                                            mode="max")
    assert maximizing.best().step == 50
    for bad in [dict(keep_last=0), dict(keep_best=1), dict(mode="up"), dict(keep_best=-1)]:
        with pytest.raises(ValueError):
            safeckpt.CheckpointManager(tmp_path, **bad)


def test_manager_skips_damaged_and_temporary_files(tmp_path):
    manager = safeckpt.CheckpointManager(tmp_path, keep_last=5)
    for step in (1, 2, 3):
        manager.save(step, {"w": np.full(1000, step)})
    newest = manager.path(3)
    data = bytearray(open(newest, "rb").read())
    data[-1] ^= 0xFF  # damage the newest one's data: it opens, but fails verification
    open(newest, "wb").write(bytes(data))
    temp = tmp_path / ".step-0000000004.sckpt.0123456789ab.tmp"
    temp.write_bytes(b"half a checkpoint")
    (tmp_path / "step-0000000005.sckpt").write_bytes(b"garbage")  # does not even open
    (tmp_path / "notes.txt").write_text("not mine")
    manager = safeckpt.CheckpointManager(tmp_path, keep_last=5)
    assert not temp.exists() and (tmp_path / "notes.txt").exists()
    assert [c.step for c in manager.all()] == [1, 2, 3]
    state = {"w": np.zeros(1000, np.int64)}
    with pytest.warns(RuntimeWarning, match="skipping checkpoint.*step-0000000003"):
        info = manager.restore(state)
    assert info.step == 2 and state["w"][0] == 2
    with pytest.raises(safeckpt.ChecksumError):
        manager.restore(state, step=3)


CRASH_CHILD = r"""
import sys
import numpy as np, safeckpt
manager = safeckpt.CheckpointManager(sys.argv[1], keep_last=2)
latest = manager.latest()
step = latest.step + 1 if latest else 0
while True:
    manager.save(step, {"w": np.full(50_000, step, np.int64), "step": step})
    print(step, flush=True)
    step += 1
"""


def test_crash_recovery_under_sigkill(tmp_path):
    """A child saves in a loop and is SIGKILLed at random moments. After each kill the newest
    complete checkpoint loads, verifies, and is the last save that returned or the one in flight."""
    rng = random.Random(0)
    last_done = -1
    started = time.monotonic()
    for _ in range(20):
        child = subprocess.Popen([sys.executable, "-c", CRASH_CHILD, str(tmp_path)], env=ENV,
                                 stdout=subprocess.PIPE, text=True)
        child.stdout.readline()  # one save done: it is running
        time.sleep(rng.uniform(0, 0.03))
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate()
        done = [int(line) for line in out.split()]
        if done:
            last_done = done[-1]
        manager = safeckpt.CheckpointManager(tmp_path, keep_last=2)
        assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
        info = manager.load(verify=True)
        assert info.step in (last_done, last_done + 1)
        assert info.state["step"] == info.step and (info.state["w"] == info.step).all()
        assert len(manager.all()) <= 3  # keep_last, plus one if killed before retention ran
        last_done = info.step
    assert time.monotonic() - started < 30
