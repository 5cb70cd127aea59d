"""CheckpointManager (safeckpt/manager.py): the options of issue 13 (keep_period,
save_interval_steps, delete, max_shard_size, integer steps, repr), async saves, incremental saves
and their retention [X8], and crash recovery under SIGKILL with each. The older manager tests
(retention, damaged files, refusals, the plain SIGKILL test) are in tests/test_checkpoint.py."""

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import safeckpt
from safeckpt import manager as manager_module

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] + sys.path)}


def steps_of(manager):
    return [c.step for c in manager.all()]


# -- options ---------------------------------------------------------------------------------------

def test_keep_period_keeps_every_multiple_forever(tmp_path):
    manager = safeckpt.CheckpointManager(tmp_path, keep_last=2, keep_period=10)
    for step in range(0, 35, 5):
        manager.save(step, {"w": np.full(2, step)})
    assert steps_of(manager) == [0, 10, 20, 25, 30]
    with pytest.raises(safeckpt.InvalidValueError, match=r"step 7 would be deleted at once.*"
                       r"keep_period=10 keeps its multiples"):
        manager.save(7, {"w": np.zeros(2)})
    assert manager.save(40, {"w": np.zeros(2)}).step == 40  # an old multiple is kept, 25 goes
    assert steps_of(manager) == [0, 10, 20, 30, 40]
    with pytest.raises(ValueError, match="keep_period=0 must be an int >= 1"):
        safeckpt.CheckpointManager(tmp_path, keep_period=0)


def test_save_interval_steps_and_should_save(tmp_path):
    manager = safeckpt.CheckpointManager(tmp_path, keep_last=10, save_interval_steps=5)
    saved = [step for step in range(12) if manager.save(step, {"w": np.full(1, step)})]
    assert saved == [0, 5, 10] and steps_of(manager) == [0, 5, 10]
    assert manager.save(11, {"w": np.zeros(1)}) is None and not os.path.exists(manager.path(11))
    assert manager.save(11, {"w": np.zeros(1)}, force=True).step == 11
    assert [manager.should_save(s) for s in (10, 11, 15, 16)] == [False, False, True, False]
    free = safeckpt.CheckpointManager(tmp_path / "free")
    assert free.should_save(3) and free.save(3, {}).step == 3 and not free.should_save(3)
    with pytest.raises(ValueError, match="save_interval_steps=1.5 must be an int >= 1"):
        safeckpt.CheckpointManager(tmp_path, save_interval_steps=1.5)


def test_delete_removes_a_checkpoint_and_refuses_a_missing_one(tmp_path):
    manager = safeckpt.CheckpointManager(tmp_path, keep_last=5)
    for step in (1, 2, 3):
        manager.save(step, {"w": np.full(2, step)})
    manager.delete(np.int64(2))
    assert steps_of(manager) == [1, 3] and not os.path.exists(manager.path(2))
    with pytest.raises(FileNotFoundError, match="there is no checkpoint step 2"):
        manager.delete(2)
    (tmp_path / "step-0000000009.sckpt").write_bytes(b"damaged")  # not a checkpoint, but named so
    manager.delete(9)
    assert sorted(os.listdir(tmp_path)) == ["step-0000000001.sckpt", "step-0000000003.sckpt"]
    manager.save(2, {"w": np.full(2, 7)})  # a deleted step may be saved again
    assert manager.load(2).state["w"].tolist() == [7, 7]


def test_numpy_and_torch_integer_steps_and_refused_steps(tmp_path):
    manager = safeckpt.CheckpointManager(tmp_path, keep_last=10)
    for step in (np.int64(1), np.uint8(2), np.array(3), np.int32(4)):
        assert type(manager.save(step, {"w": np.ones(1)}).step) is int
    assert steps_of(manager) == [1, 2, 3, 4] and manager.path(np.int16(4)) == manager.path(4)
    assert manager.load(np.int64(3)).step == 3
    for bad, why in [(True, "not bool"), (np.bool_(True), "not bool"), (2.0, "not float"),
                     (np.float32(2), "not float32"), (-1, "between 0 and"), (np.int64(-3), "between 0 and"),
                     (np.arange(2), "not ndarray"), ("5", "not str"), (None, "not NoneType"),
                     (10 ** 20, "between 0 and")]:
        with pytest.raises(safeckpt.InvalidValueError, match=why):
            manager.save(bad, {"w": np.ones(1)})
    torch = pytest.importorskip("torch")
    assert manager.save(torch.tensor(5), {"w": np.ones(1)}).step == 5
    assert manager.should_save(torch.tensor(6, dtype=torch.int32))
    for bad in (torch.tensor(True), torch.tensor(5.0), torch.tensor([5])):
        with pytest.raises(safeckpt.InvalidValueError, match="must be an int"):
            manager.save(bad, {"w": np.ones(1)})


def test_reprs_name_the_directory_and_the_options(tmp_path):
    manager = safeckpt.CheckpointManager(tmp_path, keep_last=2, keep_best=1, metric="loss",
                                         keep_period=100, max_shard_size="1MB", checksum=False)
    assert repr(manager) == (f"CheckpointManager({str(tmp_path)!r}, keep_last=2, keep_best=1, "
                             "metric='loss', mode='min', keep_period=100, max_shard_size='1MB', "
                             "checksum=False)")
    assert repr(safeckpt.CheckpointManager(tmp_path)) == (
        f"CheckpointManager({str(tmp_path)!r}, keep_last=3)")
    record = manager.save(1, {"w": np.ones(1)}, metrics={"loss": 0.5})
    assert repr(record) == f"Checkpoint(step=1, path={manager.path(1)!r}, metrics={{'loss': 0.5}})"
    with safeckpt.CheckpointManager(tmp_path / "a", async_save=True, max_in_flight=2) as asynchronous:
        assert repr(asynchronous).endswith("keep_last=3, async_save=True, max_in_flight=2)")
    assert repr(asynchronous).endswith("(closed)")


@pytest.mark.usefixtures("backend")
def test_max_shard_size_writes_shards_that_retention_and_cleanup_remove(tmp_path):
    manager = safeckpt.CheckpointManager(tmp_path, keep_last=2, max_shard_size=1000, rng=False)
    for step in (1, 2, 3):
        manager.save(step, {"a": np.full(100, step), "b": np.full(100, -step), "c": np.zeros(1)})
    names = sorted(os.listdir(tmp_path))
    assert names == ["step-0000000002-00001-of-00002.sckpt", "step-0000000002-00002-of-00002.sckpt",
                     "step-0000000002.sckpt", "step-0000000003-00001-of-00002.sckpt",
                     "step-0000000003-00002-of-00002.sckpt", "step-0000000003.sckpt"]
    assert steps_of(manager) == [2, 3]
    info = manager.load(verify=True)
    assert info.step == 3 and info.state["b"].tolist() == [-3] * 100
    manager.delete(3)
    assert sorted(os.listdir(tmp_path)) == names[:3]
    state = {"a": np.zeros(100, np.int64), "b": np.zeros(100, np.int64), "c": np.ones(1)}
    assert manager.restore(state).step == 2 and state["a"][0] == 2
    # a sharded save killed before its index: shards and temporary files without an index
    (tmp_path / "step-0000000004-00001-of-00002.sckpt").write_bytes(b"shard 1")
    (tmp_path / ".step-0000000004-00002-of-00002.sckpt.0123456789ab.tmp").write_bytes(b"half")
    assert sorted(safeckpt.CheckpointManager(tmp_path).cleanup()) == []  # __init__ did it
    assert sorted(os.listdir(tmp_path)) == names[:3]
    with pytest.raises(ValueError):
        safeckpt.CheckpointManager(tmp_path, max_shard_size="lots")


# -- async saves -----------------------------------------------------------------------------------

@pytest.mark.usefixtures("backend")
def test_async_save_writes_the_state_as_it_was_when_save_returned(tmp_path):
    state = {"w": np.zeros(10_000), "b": [np.arange(3)]}
    with safeckpt.CheckpointManager(tmp_path, keep_last=2, async_save=True) as manager:
        for step in range(5):
            state["w"][:] = step
            state["b"][0] += 1
            record = manager.save(step, state, metrics={"loss": float(step)})
            assert record.step == step
            state["w"][:] = -1  # training goes on in place at once
        assert not manager.should_save(4)  # pending or written: it has a checkpoint
        with pytest.raises(FileExistsError, match="step 4 exists"):
            manager.save(4, state)
    assert steps_of(manager) == [3, 4]
    info = manager.load(verify=True)
    assert info.step == 4 and (info.state["w"] == 4).all() and info.state["b"][0].tolist() == [5, 6, 7]
    assert manager.load(3).state["b"][0].tolist() == [4, 5, 6]
    with pytest.raises(ValueError, match="is closed"):
        manager.save(5, state)
    assert manager.restore({"w": np.zeros(10_000), "b": [np.zeros(3, np.int64)]}).step == 4


def test_async_save_checks_retention_and_values_before_it_returns(tmp_path):
    with safeckpt.CheckpointManager(tmp_path, keep_last=2, async_save=True) as manager:
        manager.save(20, {"w": np.ones(2)})
        manager.save(30, {"w": np.ones(2)})  # both may still be pending: they count
        with pytest.raises(safeckpt.InvalidValueError, match=r"step 10 would be deleted at once"):
            manager.save(10, {"w": np.ones(2)})
        with pytest.raises(safeckpt.InvalidValueError, match=r"checkpoint\['state'\]\['bad'\]"):
            manager.save(40, {"bad": object()})
        manager.save(30, {"w": np.zeros(2)}, overwrite=True)
    assert steps_of(manager) == [20, 30] and manager.load(30).state["w"].tolist() == [0, 0]


def test_an_async_error_is_raised_by_the_next_call_never_lost(tmp_path, monkeypatch):
    manager = safeckpt.CheckpointManager(tmp_path, async_save=True)
    real = safeckpt.api.save_plan

    def failing(plan, path, **kw):
        if "0000000002" in os.fspath(path):
            raise OSError(28, "No space left on device", os.fspath(path))
        return real(plan, path, **kw)

    monkeypatch.setattr(manager_module.api, "save_plan", failing)
    manager.save(1, {"w": np.ones(2)})
    manager.save(2, {"w": np.ones(2)})
    with pytest.raises(OSError, match="No space left"):
        manager.wait()
    manager.wait()  # each error is raised once
    assert manager.should_save(2)  # the failed step is not pending any more
    manager.save(3, {"w": np.full(2, 3)})
    manager.save(2, {"w": np.ones(2)})  # fails again in the background
    with pytest.raises(OSError, match="No space left"):
        manager.save(4, {"w": np.ones(2)})  # the error comes first; this save is not taken
    manager.close()
    assert steps_of(manager) == [1, 3]


# -- crash recovery --------------------------------------------------------------------------------

CRASH_CHILD = r"""
import sys
import numpy as np, safeckpt
options = eval(sys.argv[2])
manager = safeckpt.CheckpointManager(sys.argv[1], keep_last=2, **options)
latest = manager.latest()
step = latest.step + 1 if latest else 0
frozen = np.arange(60_000, dtype=np.int64)  # never changes: referred to by incremental saves
state = {"frozen": frozen, "w": np.full(50_000, step, np.int64), "step": step}
while True:
    state["w"][:] = step
    state["step"] = step
    manager.save(step, state)  # async: returns once the save before it is written
    print(step, flush=True)
    step += 1
"""


def crash_loop(tmp_path, options, kills=20):
    """A child saves in a loop and is SIGKILLed at random moments. After each kill the newest
    complete checkpoint loads, verifies (every byte, references included), and is the last save
    the child reported or the one in flight; with async saves, a save returns once the one before
    it is written, so the one before the last reported may be the newest. Bounded by work (a
    fixed number of kills), not by the clock."""
    lag = 1 if options.get("async_save") else 0
    rng = random.Random(0)
    last_done = -1
    for _ in range(kills):
        child = subprocess.Popen([sys.executable, "-c", CRASH_CHILD, str(tmp_path), repr(options)],
                                 env=ENV, stdout=subprocess.PIPE, text=True)
        with child.stdout:
            first = child.stdout.readline()  # one save done: it is running (else it failed)
            time.sleep(rng.uniform(0, 0.03))
            child.send_signal(signal.SIGKILL)
            out = child.stdout.read()
        child.wait()
        done = [int(line) for line in (first + out).split()]
        assert done, "the child failed before its first save (its stderr is above)"
        assert done == list(range(last_done + 1, last_done + 1 + len(done)))
        manager = safeckpt.CheckpointManager(tmp_path, keep_last=2, **options)
        assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
        info = manager.load(verify=True)
        assert done[-1] - lag <= info.step <= done[-1] + 1  # reported, or saved, not reported
        assert info.state["step"] == info.step and (info.state["w"] == info.step).all()
        assert (info.state["frozen"] == np.arange(60_000)).all()
        with safeckpt.open(manager.path(info.step)) as f:  # `safeckpt verify`: every byte
            f.verify()
        last_done = info.step
        yield manager


def test_crash_recovery_under_sigkill_with_async_saves(tmp_path):
    for manager in crash_loop(tmp_path, {"async_save": True}):
        assert len(manager.all()) <= 3  # keep_last, plus one if killed before retention ran
