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
            "s = {'w': np.zeros(2), 't': None}\n"
            "assert m.restore(s).step == 1 and s['w'].tolist() == [1, 1] and s['t'] == (1, 2)\n"
            "print(safeckpt.load(m.latest().path, prefix='state.w'))\n"
            "import warnings\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    safeckpt.checkpoint.restore_rng({'torch': np.zeros(3, np.uint8)})\n"
            "assert 'torch is not installed' in str(caught[0].message)\n")
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
    state = {"w": np.zeros(3, np.int64), "note": None}
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
    with open(newest, "rb") as f:
        data = bytearray(f.read())
    data[-1] ^= 0xFF  # damage the newest one's data: it opens, but fails verification
    with open(newest, "wb") as f:
        f.write(bytes(data))
    temp = tmp_path / ".step-0000000004.sckpt.0123456789ab.tmp"
    temp.write_bytes(b"half a checkpoint")
    lookalike = tmp_path / ".step-0000000004.sckpt\n.0123456789ab.tmp"  # not a name it writes
    lookalike.write_bytes(b"someone else's")
    (tmp_path / "step-0000000005.sckpt").write_bytes(b"garbage")  # does not even open
    (tmp_path / "notes.txt").write_text("not mine")
    manager = safeckpt.CheckpointManager(tmp_path, keep_last=5)
    assert not temp.exists() and (tmp_path / "notes.txt").exists() and lookalike.exists()
    assert [c.step for c in manager.all()] == [1, 2, 3]
    state = {"w": np.zeros(1000, np.int64)}
    with pytest.warns(RuntimeWarning) as caught:
        info = manager.restore(state)
    assert info.step == 2 and state["w"][0] == 2
    assert [str(w.message)[:90] for w in caught] == [  # each file newer than the one restored
        f"skipping checkpoint {str(tmp_path / name)!r}"[:90]
        for name in ("step-0000000005.sckpt", "step-0000000003.sckpt")]
    assert "checksum" in str(caught[1].message)
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
    complete checkpoint loads, verifies, and is the last save the child reported or the one in
    flight. The test is bounded by work (a fixed number of kills), not by the clock: on a busy
    machine it only takes longer."""
    rng = random.Random(0)
    last_done = -1
    for _ in range(20):
        child = subprocess.Popen([sys.executable, "-c", CRASH_CHILD, str(tmp_path)], env=ENV,
                                 stdout=subprocess.PIPE, text=True)
        with child.stdout:
            first = child.stdout.readline()  # one save done: it is running (else it failed)
            time.sleep(rng.uniform(0, 0.03))
            child.send_signal(signal.SIGKILL)
            out = child.stdout.read()  # through the same buffer as readline(): no line is lost
        child.wait()
        done = [int(line) for line in (first + out).split()]
        assert done, "the child failed before its first save (its stderr is above)"
        assert done == list(range(last_done + 1, last_done + 1 + len(done)))  # every save reported
        manager = safeckpt.CheckpointManager(tmp_path, keep_last=2)
        assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
        info = manager.load(verify=True)
        assert info.step in (done[-1], done[-1] + 1)  # reported, or saved but not yet reported
        assert info.state["step"] == info.step and (info.state["w"] == info.step).all()
        assert len(manager.all()) <= 3  # keep_last, plus one if killed before retention ran
        last_done = info.step


# -- restoring into targets (restore_into) ---------------------------------------------------------

def test_restore_into_plain_dicts_copies_in_place_and_checks_everything_first(tmp_path):
    manager = safeckpt.CheckpointManager(tmp_path)
    saved = {"model": params(), "opt": {}, "buffers": [np.arange(3)], "step": 7, "betas": (0.9, 0.99)}
    manager.save(1, saved)
    target = {"model": params(seed=1), "opt": {}, "buffers": [np.zeros(3, np.int64)], "step": 0,
              "betas": (0.0, 0.0)}
    arrays = dict(target["model"]), target["buffers"][0]
    assert manager.restore(target).step == 1
    assert same(target, saved)
    assert all(target["model"][k] is a for k, a in arrays[0].items())  # the same arrays, overwritten
    assert target["buffers"][0] is arrays[1]
    with pytest.raises(safeckpt.StateMismatchError) as caught:
        manager.restore({"model": {"w1": np.zeros((4, 9)), "b1": np.zeros(8, np.float32),
                                   "extra": np.zeros(1)},
                         "opt": {}, "buffers": [np.zeros(3, np.int64)], "step": 0,
                         "betas": (0.0, 0.0)})
    message = str(caught.value)
    assert "nothing was restored" in message
    assert "['model']['extra']" in message  # in the target, not the file
    assert "['model']['w2']" in message  # in the file, not the target
    assert "['model']['w1']: file has shape (4, 8) float64, target has shape (4, 9) float64" in message
    assert "['model']['b1']: file has shape (8,) float64, target has shape (8,) float32" in message
    untouched = {"w1": np.zeros((4, 8)), "w2": np.zeros((8, 1)), "b1": np.zeros(7)}
    with pytest.raises(safeckpt.StateMismatchError, match=r"\['b1'\]: file has shape \(8,\)"):
        manager.restore({"model": untouched, "opt": {}, "buffers": [np.zeros(3, np.int64)],
                         "step": 0, "betas": (0.0, 0.0)})
    assert not untouched["w1"].any()  # checked before anything is written
    with pytest.warns(RuntimeWarning, match=r"\['b1'\]: file has shape \(8,\)"):
        manager.restore({"model": untouched}, strict=False)
    assert same(untouched["w1"], saved["model"]["w1"]) and not untouched["b1"].any()


def test_restore_into_refuses_targets_it_cannot_change_in_place(tmp_path):
    manager = safeckpt.CheckpointManager(tmp_path)
    manager.save(1, {"w": np.ones(3), "n": 5})
    for target in (5, None, "w", (1, 2)):
        with pytest.raises(safeckpt.InvalidValueError, match="in place.*pass a dict"):
            safeckpt.checkpoint.restore_into(target, {"w": np.ones(3)})
    read_only = np.zeros(3)
    read_only.flags.writeable = False
    with pytest.raises(safeckpt.StateMismatchError, match=r"\['w'\]: the target array is read-only"):
        manager.restore({"w": read_only, "n": 0})
    with pytest.raises(safeckpt.StateMismatchError, match=r"\['w'\]: file has shape \(3,\) float64, "
                       "target has a list"):
        manager.restore({"w": [1, 2, 3], "n": 0})
    with pytest.raises(safeckpt.StateMismatchError, match=r"\['n'\]: file has an int, target has "
                       "shape \\(\\) int64"):
        manager.restore({"w": np.zeros(3), "n": np.zeros((), np.int64)})
    array = np.zeros(3)
    safeckpt.checkpoint.restore_into(array, np.ones(3))
    assert array.tolist() == [1, 1, 1]


def test_load_checkpoint_restores_into_plain_dicts_in_place(tmp_path):
    path = tmp_path / "c.sckpt"
    safeckpt.save_checkpoint(path, model=params(), optimizer={"m": np.ones(2)}, step=3)
    model, opt = params(seed=1), {"m": np.zeros(2), "lr": 0.1}
    with pytest.raises(safeckpt.StateMismatchError) as caught:
        safeckpt.load_checkpoint(path, model=model, optimizer=opt)
    assert "['optimizer']['lr']" in str(caught.value) and not same(model, params())
    del opt["lr"]
    safeckpt.load_checkpoint(path, model=model, optimizer=opt)
    assert same(model, params()) and opt["m"].tolist() == [1, 1]
    with pytest.raises(safeckpt.InvalidValueError, match=r"\['model'\].*in place"):
        safeckpt.load_checkpoint(path, model=3)


def test_restore_into_torch_state_dicts_copies_into_the_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    source, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    manager = safeckpt.CheckpointManager(tmp_path)
    manager.save(1, {"model": source.state_dict()})
    state = target.state_dict()
    assert manager.restore({"model": state}).step == 1
    assert torch.equal(target.weight, source.weight) and torch.equal(target.bias, source.bias)
    assert all(isinstance(t, torch.Tensor) for t in state.values())
    path = tmp_path / "c.sckpt"
    safeckpt.save_checkpoint(path, model=source, step=2)
    other = torch.nn.Linear(3, 2)
    safeckpt.load_checkpoint(path, model=other.state_dict())
    assert torch.equal(other.weight, source.weight)
    wrong = {"weight": torch.zeros(2, 4), "bias": torch.zeros(2, dtype=torch.float64),
             "scale": torch.zeros(1)}
    with pytest.raises(safeckpt.StateMismatchError) as caught:
        safeckpt.load_checkpoint(path, model=wrong)
    message = str(caught.value)
    assert "['model']['weight']: file has shape (2, 3) float32, target has shape (2, 4) float32" in message
    assert "['model']['bias']: file has shape (2,) float32, target has shape (2,) float64" in message
    assert "['model']['scale']" in message and not wrong["weight"].any()
    meta = torch.nn.Linear(3, 2, device="meta").state_dict()
    with pytest.raises(safeckpt.StateMismatchError, match="meta device"):
        safeckpt.load_checkpoint(path, model=meta)


# -- the manager never loses a save in silence, and tells the two kinds of file apart --------------

def test_manager_refuses_saves_that_would_be_lost(tmp_path):
    manager = safeckpt.CheckpointManager(tmp_path, keep_last=2)
    for step in (20, 30):
        manager.save(step, {"w": np.full(2, step)})
    with pytest.raises(safeckpt.InvalidValueError, match=r"step 5 would be deleted at once by "
                       r"retention: keep_last=2 keeps steps \[20, 30\]; nothing was saved"):
        manager.save(5, {"w": np.zeros(2)})
    assert [c.step for c in manager.all()] == [20, 30] and not os.path.exists(manager.path(5))
    with pytest.raises(FileExistsError, match="step 30 exists; pass overwrite=True"):
        manager.save(30, {"w": np.zeros(2)})
    assert manager.load(30).state["w"].tolist() == [30, 30]
    assert manager.save(30, {"w": np.zeros(2)}, overwrite=True).step == 30
    assert manager.load(30).state["w"].tolist() == [0, 0]
    assert manager.save(25, {"w": np.zeros(2)}).step == 25  # newer than 20: kept, 20 goes
    assert [c.step for c in manager.all()] == [25, 30]
    best = safeckpt.CheckpointManager(tmp_path / "best", keep_last=1, keep_best=1, metric="loss")
    for step, loss in [(10, 1.0), (20, 2.0), (5, 0.5)]:  # 5 is older, but the best: kept
        best.save(step, {"w": np.zeros(1)}, metrics={"loss": loss})
    assert [c.step for c in best.all()] == [5, 20]
    with pytest.raises(safeckpt.InvalidValueError, match=r"keep_best=1 by 'loss' keeps \[5\]"):
        best.save(6, {"w": np.zeros(1)}, metrics={"loss": 3.0})


def test_each_kind_of_checkpoint_file_names_the_function_that_loads_it(tmp_path):
    manager = safeckpt.CheckpointManager(tmp_path)
    manager.save(1, {"w": np.ones(2)})
    with pytest.raises(safeckpt.HeaderError, match=r"written by CheckpointManager.save, not "
                       r"save_checkpoint; restore it with CheckpointManager\(directory\).restore"):
        safeckpt.load_checkpoint(manager.path(1))
    safeckpt.save_checkpoint(manager.path(2), model={"w": np.ones(2)}, step=2)
    with pytest.raises(safeckpt.HeaderError, match=r"written by save_checkpoint, not "
                       r"CheckpointManager.save; load it with safeckpt.load_checkpoint\(path"):
        manager.restore({"w": np.zeros(2)}, step=2)
    with pytest.warns(RuntimeWarning, match="step-0000000002.*written by save_checkpoint"):
        assert manager.load().step == 1  # skipped for the one before, as a damaged file is


def test_manager_without_checksums_restores(tmp_path):
    manager = safeckpt.CheckpointManager(tmp_path, checksum=False)
    manager.save(1, {"w": np.ones(2)})
    state = {"w": np.zeros(2)}
    assert manager.restore(state).step == 1 and state["w"].tolist() == [1, 1]
    with pytest.raises(safeckpt.ChecksumError, match="checksum=False"):
        manager.restore(state, step=1, verify=True)


# -- hostile checkpoint files: every problem is a SafeckptError naming the key ---------------------

def forged_checkpoint(path, **changes):
    """A save_checkpoint file built with safeckpt.save, its entries replaced by ``changes``."""
    state = {"model": {"w": np.ones(2)}, "optimizer": None, "scheduler": None, "step": 1,
             "epoch": None, "rng": capture_rng(), "extra": None, "metrics": {}}
    state.update(changes)
    safeckpt.save(state, path, metadata={"format": "safeckpt.checkpoint/1", "step": 1,
                                         "metrics": {}})
    return path


def rng_with(key, index=None, value=None):
    rng = capture_rng()
    if index is None:
        rng[key] = value
    else:
        rng[key] = tuple(value if i == index else v for i, v in enumerate(rng[key]))
    return {"rng": rng}


WORDS = random.getstate()[1]
HOSTILE_CHECKPOINTS = [
    ({"rng": [1, 2]}, r"\['rng'\]: a list is not a map"),
    (rng_with("python", None, ("x",)), r"\['rng'\]\['python'\]: a tuple is not"),
    (rng_with("python", 0, 2), r"\['python'\]\[0\]: version 2 is not 3"),
    (rng_with("python", 1, WORDS[:10]), r"\['python'\]\[1\]: is not 624 ints"),
    (rng_with("python", 1, (-1,) + WORDS[1:]), r"\['python'\]\[1\]: is not 624 ints"),
    (rng_with("python", 1, WORDS[:-1] + (625,)), r"\['python'\]\[1\]: is not 624 ints"),
    (rng_with("python", 1, WORDS[:-1] + ("x",)), r"\['python'\]\[1\]: is not 624 ints"),
    (rng_with("python", 2, "x"), r"\['python'\]\[2\]: gauss 'x' is not None or a float"),
    (rng_with("numpy", None, {"state": 1}), r"\['numpy'\]: a dict is not \('MT19937'"),
    (rng_with("numpy", 0, "PCG64"), r"\['numpy'\]\[0\]: generator 'PCG64' is not 'MT19937'"),
    (rng_with("numpy", 1, np.zeros(624)), r"\['numpy'\]\[1\]: shape \(624,\) float64 is not"),
    (rng_with("numpy", 1, np.zeros(3, np.uint32)), r"\['numpy'\]\[1\]: shape \(3,\) uint32 is not"),
    (rng_with("numpy", 1, [1, 2]), r"\['numpy'\]\[1\]: a list is not shape \(624,\) uint32"),
    (rng_with("numpy", 2, 10**6), r"\['numpy'\]\[2\]: position 1000000 is not in 0..624"),
    (rng_with("numpy", 2, -1), r"\['numpy'\]\[2\]: position -1"),
    (rng_with("numpy", 3, 2), r"\['numpy'\]\[3\]: has_gauss 2 is not 0 or 1"),
    (rng_with("numpy", 4, "x"), r"\['numpy'\]\[4\]: cached gaussian 'x' is not a float"),
    (rng_with("torch", None, np.zeros(4, np.float32)), r"\['torch'\]: shape \(4,\) float32 is not"),
    (rng_with("cuda", None, 3), r"\['cuda'\]: 3 is not a list"),
    (rng_with("cuda", None, [np.zeros(16, np.uint8), "x"]), r"\['cuda'\]\[1\]: 'x' is not a uint8"),
    ({"step": "x"}, r"\['step'\]: 'x' is not None or an int >= 0"),
    ({"step": 2}, r"\['step'\] is 2, but its metadata says 1"),
    ({"epoch": -1}, r"\['epoch'\]: -1 is not None or an int >= 0"),
    ({"epoch": True}, r"\['epoch'\]: True is not None"),
    ({"metrics": [1, 2]}, r"\['metrics'\]: a list is not a map of str to numbers"),
    ({"metrics": {"loss": "low"}}, r"\['metrics'\]: 'loss': 'low' is not a str and a number"),
    ({"metrics": {1: 0.5}}, r"\['metrics'\]: 1: 0.5 is not a str and a number"),
    ({"model": [np.ones(2)]}, r"\['model'\]: file has a list, target has a dict"),
]
if sys.modules.get("torch") is not None or __import__("importlib").util.find_spec("torch"):
    HOSTILE_CHECKPOINTS.append((rng_with("torch", None, np.zeros(10, np.uint8)),
                                r"\['rng'\]\['torch'\]: not a state that torch's CPU generator"))


@pytest.mark.parametrize("changes, message", HOSTILE_CHECKPOINTS)
def test_hostile_checkpoint_entries_raise_a_safeckpt_error_naming_them(tmp_path, changes, message):
    path = forged_checkpoint(tmp_path / "c.sckpt", **changes)
    model = {"w": np.zeros(2)}
    random.seed(3)
    expected = random.random()
    random.seed(3)
    with pytest.raises(safeckpt.SafeckptError, match=message):
        safeckpt.load_checkpoint(path, model=model)
    assert random.random() == expected and not model["w"].any()  # nothing was restored


def test_hostile_checkpoint_layouts_raise_a_safeckpt_error(tmp_path):
    meta = {"format": "safeckpt.checkpoint/1", "step": 1, "metrics": {}}
    for obj, message in [([1, 2], "holds a list, not a dict"), (np.ones(2), "holds shape"),
                         ({"rng": None}, "has no 'model', 'optimizer'")]:
        safeckpt.save(obj, tmp_path / "c.sckpt", metadata=meta)
        with pytest.raises(safeckpt.HeaderError, match=message):
            safeckpt.load_checkpoint(tmp_path / "c.sckpt")
    for metadata, message in [(None, "not a checkpoint: its metadata has no format"),
                              ({**meta, "step": "1"}, r"metadata\['step'\]: '1' is not None"),
                              ({**meta, "metrics": [0.5]}, r"metadata\['metrics'\]: a list")]:
        forged_checkpoint(tmp_path / "c.sckpt")
        safeckpt.save(safeckpt.load(tmp_path / "c.sckpt"), tmp_path / "c.sckpt", metadata=metadata)
        with pytest.raises(safeckpt.HeaderError, match=message):
            safeckpt.load_checkpoint(tmp_path / "c.sckpt")


def test_manager_skips_a_newest_file_that_is_not_its_checkpoint(tmp_path):
    manager = safeckpt.CheckpointManager(tmp_path, keep_last=5, keep_best=1, metric="loss")
    manager.save(1, {"w": np.ones(2)}, metrics={"loss": 1.0})
    meta = {"format": "safeckpt.checkpoint/1", "step": 2, "metrics": {}}
    safeckpt.save({"step": 2, "metrics": {}, "rng": None}, manager.path(2), metadata=meta)
    safeckpt.save({"state": 1, "step": 3, "metrics": {}, "rng": None}, manager.path(3),
                  metadata={**meta, "step": 3, "metrics": [1]})
    safeckpt.save({"state": 1, "step": 4, "metrics": {}, "rng": None}, manager.path(4),
                  metadata={**meta, "step": True})
    safeckpt.save({"state": 1, "step": 6, "metrics": {}, "rng": None}, manager.path(5),
                  metadata={**meta, "step": 5})
    assert [c.step for c in manager.all()] == [1, 2, 5] and manager.best().step == 1  # by metadata
    state = {"w": np.zeros(2)}
    with pytest.warns(RuntimeWarning) as caught:
        assert manager.restore(state).step == 1 and state["w"].tolist() == [1, 1]
    assert [str(w.message).rsplit(".sckpt'", 1)[-1] for w in caught] == [
        "['step'] is 6, but its metadata says 5 [C2]",
        ": metadata['step']: True is not None or an int >= 0 [C1]",
        ": metadata['metrics']: a list is not a map of str to numbers [C1]",
        " is not a checkpoint of CheckpointManager.save: it has no 'state' [C2]"]
    with pytest.raises(safeckpt.HeaderError, match="has no 'state'"):
        manager.restore(state, step=2)


def test_hostile_optimizer_and_scheduler_states_are_refused_before_anything_is_written(tmp_path):
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()  # the optimizer has state
    groups = optimizer.state_dict()["param_groups"]
    cases = [({"optimizer": [1]}, r"\['optimizer'\]: file has a list, not the state dict of an Adam"),
             ({"scheduler": {"optimizer": 1, "step_size": 2}},  # would replace its optimizer
              r"in the file, not in the target \(1\): \['scheduler'\]\['optimizer'\]"),
             ({"optimizer": {"state": {}}}, r"\['optimizer'\]: Adam.load_state_dict\(\) refused the "
              "saved state: KeyError: 'param_groups'"),
             ({"optimizer": {"state": {}, "param_groups": [{**groups[0], "params": [0, 1, 2]}]}},
              r"refused the saved state: ValueError"),
             ({"optimizer": {**optimizer.state_dict(),
                             "param_groups": [{**groups[0], "capturable": np.zeros(2)}]}},
              r"refused the saved state: RuntimeError")]
    for changes, message in cases:
        state = {"model": {"weight": np.ones((2, 3), np.float32), "bias": np.ones(2, np.float32)},
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "step": 1, "epoch": None, "rng": None, "extra": None, "metrics": {}, **changes}
        path = tmp_path / "c.sckpt"
        safeckpt.save(state, path, metadata={"format": "safeckpt.checkpoint/1", "step": 1,
                                             "metrics": {}})
        with pytest.raises(safeckpt.StateMismatchError, match=message):
            safeckpt.load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)
        assert not (model.weight == 1).all() and scheduler.optimizer is optimizer
