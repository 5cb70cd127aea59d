"""CheckpointManager (safeckpt/manager.py): the options of issue 13 (keep_period,
save_interval_steps, delete, max_shard_size, integer steps, repr), async saves, incremental saves
and their retention [X8], and crash recovery under SIGKILL with each. The older manager tests
(retention, damaged files, refusals, the plain SIGKILL test) are in tests/test_checkpoint.py."""

import os
import random
import signal
import subprocess
import sys
import threading
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


def test_should_save_is_true_exactly_when_save_writes(tmp_path):
    """As orbax: the first checkpoint whatever the interval, never a step <= the newest (saved,
    or one that retention would refuse); then should_save(s) tells whether save(s) writes."""
    manager = safeckpt.CheckpointManager(tmp_path, keep_last=2, save_interval_steps=10, rng=False)
    assert manager.should_save(5) and manager.save(5, {"w": np.zeros(1)}).step == 5
    assert [manager.should_save(s) for s in (5, 7, 10, 11)] == [False, False, True, False]
    for step in (10, 3, 20, 15, 30, 20, 10, 25, 40, 41, 50):
        expected = manager.should_save(step)
        try:
            written = manager.save(step, {"w": np.full(1, step)}) is not None
        except (FileExistsError, safeckpt.InvalidValueError):
            written = False
        assert written == expected, step
    assert steps_of(manager) == [40, 50]
    assert not manager.should_save(10) and not manager.should_save(40)  # retention / saved
    assert manager.save(41, {}, force=True).step == 41  # force writes any new step
    empty = safeckpt.CheckpointManager(tmp_path / "empty", save_interval_steps=10)
    (tmp_path / "empty" / "step-0000000003.sckpt").write_bytes(b"damaged")
    assert not empty.should_save(3) and empty.should_save(4)  # no checkpoint yet: the first


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


def test_max_in_flight_is_checked_with_or_without_async_save(tmp_path):
    for bad in (0, -1, 1.0, True, "2", None):
        for async_save in (False, True):
            with pytest.raises(ValueError, match=f"max_in_flight={bad!r} must be an int >= 1"):
                safeckpt.CheckpointManager(tmp_path, async_save=async_save, max_in_flight=bad)
    assert safeckpt.CheckpointManager(tmp_path, max_in_flight=2).save(1, {}).step == 1


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


# -- incremental saves -----------------------------------------------------------------------------

def lora_state(step, base=None):
    """A frozen base (the same bytes at every step) and a small adapter that changes."""
    if base is None:
        base = {"w": np.arange(20_000, dtype=np.float32).reshape(100, 200),
                "emb": np.linspace(-1, 1, 5_000), "zero": np.zeros(64)}
    return {"base": base, "lora": np.full((8, 200), step, np.float32), "step": step}


def referred(manager, step):
    with safeckpt.open(manager.path(step)) as f:
        return sorted(f.references())


@pytest.mark.usefixtures("backend")
def test_incremental_refers_to_unchanged_packed_tensors(tmp_path):
    """[X7] with sub-byte codes (FORMAT.md section 4): a frozen int4/float4/float6/uint1 base is
    compared by its packed bytes, not numpy's one byte per element, and referred to in step 2."""
    import ml_dtypes
    rng = np.random.default_rng(0)
    base = {"q4": rng.integers(-8, 8, 4097).astype(ml_dtypes.int4),
            "f4": rng.integers(0, 16, (3, 7), dtype=np.uint8).view(ml_dtypes.float4_e2m1fn),
            "f6": rng.integers(0, 64, 5, dtype=np.uint8).view(ml_dtypes.float6_e2m3fn),
            "u1": rng.integers(0, 2, 9, dtype=np.uint8).view(ml_dtypes.uint1)}
    manager = safeckpt.CheckpointManager(tmp_path, incremental=True, rng=False)
    manager.save(1, {"base": base, "lora": np.ones(4, np.float32)})
    changed = dict(base, u1=base["u1"].copy())
    changed["u1"][0] = ml_dtypes.uint1(1 - int(base["u1"][0]))
    manager.save(2, {"base": changed, "lora": np.full(4, 2, np.float32)})
    stored = sum(safeckpt.writer.stored_nbytes(base[k]) for k in ("q4", "f4", "f6"))
    assert referred(manager, 2) == [("step-0000000001.sckpt", 3, stored)]  # u1 changed: written
    out = manager.load(2, verify=True).state["base"]
    for key, value in changed.items():
        assert out[key].dtype == value.dtype and out[key].tobytes() == value.tobytes(), key


@pytest.mark.usefixtures("backend")
def test_incremental_saves_refer_to_the_file_that_stores_unchanged_bytes(tmp_path):
    manager = safeckpt.CheckpointManager(tmp_path, keep_last=2, incremental=True, rng=False)
    state = lora_state(10)
    manager.save(10, state)
    assert referred(manager, 10) == []  # nothing to refer to yet: a full save
    state["lora"][:] = state["step"] = 20
    manager.save(20, state)
    base_bytes = sum(a.nbytes for a in state["base"].values())
    assert referred(manager, 20) == [("step-0000000010.sckpt", 3, base_bytes)]
    assert os.path.getsize(manager.path(20)) < os.path.getsize(manager.path(10)) - base_bytes + 1000
    state["lora"][:] = state["step"] = 30
    state["base"]["zero"][0] = -0.0  # a different bit pattern, though == 0.0: written again
    manager.save(30, state)
    assert referred(manager, 30) == [("step-0000000010.sckpt", 2, base_bytes - 512)]  # not 20
    assert steps_of(manager) == [10, 20, 30]  # 10 holds bytes that 20 and 30 refer to [X8]
    for step in (10, 20, 30):
        info = manager.load(step, verify=True)
        assert (info.state["lora"] == step).all() and info.state["step"] == step
        assert (info.state["base"]["w"] == state["base"]["w"]).all()
    assert np.signbit(manager.load(30).state["base"]["zero"][0])
    with pytest.raises(safeckpt.InvalidValueError, match=r"cannot delete checkpoint step 10: the "
                       r"checkpoints of steps \[20, 30\] refer to .*safeckpt.consolidate"):
        manager.delete(10)
    with pytest.raises(safeckpt.InvalidValueError, match=r"cannot overwrite checkpoint step 10"):
        manager.save(10, state, overwrite=True)
    assert steps_of(manager) == [10, 20, 30]
    state["base"]["w"] += 1  # the whole base changes: step 40 stores it, 50 refers to 40
    state["lora"][:] = state["step"] = 40
    manager.save(40, state)  # 10 is not kept on its own now, and emb is a third of its bytes:
    assert referred(manager, 40) == [("step-0000000030.sckpt", 1, 512)]  # emb written again
    state["lora"][:] = state["step"] = 50
    manager.save(50, state)  # zero, 512 of 30's 6920 bytes, is written again too
    assert referred(manager, 50) == [("step-0000000040.sckpt", 2, 120_000)]
    assert sorted(os.listdir(tmp_path)) == ["step-0000000030.sckpt", "step-0000000040.sckpt",
                                            "step-0000000050.sckpt"]
    assert steps_of(manager) == [40, 50]  # 30 stays for its bytes, but 10 went: not listed
    with pytest.raises(FileNotFoundError, match="step-0000000010.sckpt"):
        manager.load(30)
    with pytest.raises(safeckpt.InvalidValueError, match=r"steps \[40\] refer"):
        manager.delete(30)
    state["base"]["emb"] *= 2
    state["base"]["zero"][0] = 1.0
    state["lora"][:] = state["step"] = 60
    manager.save(60, state)  # w, most of 40's bytes: referred to although 40 is not kept
    assert referred(manager, 60) == [("step-0000000040.sckpt", 1, 80_000)]
    assert sorted(os.listdir(tmp_path)) == ["step-0000000040.sckpt", "step-0000000050.sckpt",
                                            "step-0000000060.sckpt"]  # nothing kept needs 30
    assert steps_of(manager) == [50, 60]  # 40 stays for its bytes, but has lost 30: not listed
    with pytest.raises(FileNotFoundError, match="step-0000000030.sckpt"):
        manager.load(40)
    with pytest.raises(safeckpt.InvalidValueError, match=r"steps \[50, 60\] refer"):
        manager.delete(40)
    manager.delete(50)
    assert steps_of(manager) == [60]
    state["lora"][:] = state["step"] = 70
    manager.save(70, state)  # refers to 40 (w) and 60
    assert referred(manager, 70) == [("step-0000000040.sckpt", 1, 80_000),
                                     ("step-0000000060.sckpt", 2, 40_512)]
    assert sorted(os.listdir(tmp_path)) == ["step-0000000040.sckpt", "step-0000000060.sckpt",
                                            "step-0000000070.sckpt"]
    assert steps_of(manager) == [60, 70]
    info = manager.load(70, verify=True)
    assert (info.state["base"]["w"] == state["base"]["w"]).all() and info.state["step"] == 70
    assert (info.state["base"]["emb"] == state["base"]["emb"]).all()


def test_a_few_unchanged_bytes_do_not_keep_an_old_file(tmp_path):
    """Full training with incremental=True: everything changes but a 16-byte buffer and an empty
    tensor. Once retention would not keep the first file on its own, the next save writes them
    again rather than keep a whole file for them: never more than keep_last + 1 files."""
    manager = safeckpt.CheckpointManager(tmp_path, keep_last=2, incremental=True, rng=False)
    rng = np.random.default_rng(0)
    for step in range(6):
        manager.save(step, {"w": rng.standard_normal(50_000).astype(np.float32),
                            "mask": np.ones(4, np.float32), "empty": np.zeros(0, np.float32)})
        assert len(os.listdir(tmp_path)) <= 3 and len(manager.all()) <= 3, step
        assert step < 3 or not os.path.exists(manager.path(0)), step
    assert steps_of(manager) == [4, 5]
    assert referred(manager, 5) == [("step-0000000004.sckpt", 2, 16)]
    for step in (4, 5):
        assert manager.load(step, verify=True).state["mask"].tolist() == [1, 1, 1, 1]


def test_a_frozen_base_stays_referred_and_is_written_once(tmp_path):
    """LoRA-like: the base is most of the first file's bytes, so every save refers to it there,
    however old that file is; retention keeps it, and the checkpoint, for those bytes."""
    manager = safeckpt.CheckpointManager(tmp_path, keep_last=2, incremental=True, rng=False)
    state = lora_state(0)
    base_bytes = sum(a.nbytes for a in state["base"].values())
    for step in range(6):
        state["lora"][:] = state["step"] = step
        manager.save(step, state)
        if step:
            assert referred(manager, step) == [("step-0000000000.sckpt", 3, base_bytes)]
    assert steps_of(manager) == [0, 4, 5]  # 0 is listed: kept for the bytes 4 and 5 refer to
    sizes = [os.path.getsize(os.path.join(tmp_path, name)) for name in sorted(os.listdir(tmp_path))]
    assert sizes[0] > base_bytes and max(sizes[1:]) < 10_000
    assert (manager.load(5, verify=True).state["base"]["w"] == state["base"]["w"]).all()


def test_incremental_refuses_to_break_any_listed_checkpoint(tmp_path):
    """Step 3, kept only because step 5 refers to its bytes, refers to step 2: step 2 is not
    overwritten or deleted while all() lists step 3 [X8]."""
    manager = safeckpt.CheckpointManager(tmp_path, keep_last=1, keep_period=2, incremental=True,
                                         rng=False)
    a, b3, a5 = (np.full(1000, v, np.float32) for v in (1, 3, 5))
    manager.save(2, {"a": a, "b": np.full(1000, 2, np.float32)})
    manager.save(3, {"a": a, "b": b3})  # a: in step 2
    manager.save(5, {"a": a5, "b": b3})  # b: in step 3
    assert steps_of(manager) == [2, 3, 5]
    for action, call in [("overwrite", lambda: manager.save(2, {"a": a5, "b": a5}, overwrite=True)),
                         ("delete", lambda: manager.delete(2))]:
        with pytest.raises(safeckpt.InvalidValueError, match=rf"cannot {action} checkpoint step 2: "
                           r"the checkpoints of steps \[3\] refer to"):
            call()
    assert steps_of(manager) == [2, 3, 5]
    for step in (2, 3, 5):
        assert manager.load(step, verify=True).step == step


def test_a_checkpoint_whose_referenced_file_was_replaced_is_not_listed(tmp_path):
    """all() checks each reference's size, header CRC and save id against the file there now:
    a checkpoint that no longer loads is neither listed nor counted by retention [X5]."""
    manager = safeckpt.CheckpointManager(tmp_path / "run", keep_last=2, incremental=True, rng=False)
    for step in (1, 2, 3):
        manager.save(step, lora_state(step))
    assert steps_of(manager) == [1, 2, 3] and referred(manager, 3)[0][0] == "step-0000000001.sckpt"
    other = safeckpt.CheckpointManager(tmp_path / "other", incremental=True, rng=False)
    other.save(1, lora_state(1))  # the same step and tensors, another save
    os.replace(other.path(1), manager.path(1))
    assert steps_of(manager) == [1] and manager.latest().step == 1
    manager.save(4, lora_state(4))  # retention counts 1 and 4; 2 and 3 no longer load: they go
    assert steps_of(manager) == [1, 4]
    assert sorted(os.listdir(tmp_path / "run")) == ["step-0000000001.sckpt",
                                                    "step-0000000004.sckpt"]
    assert manager.load(4, verify=True).state["base"]["w"][1, 0] == 200


def test_restore_raises_when_every_checkpoint_fails_on_a_shared_file(tmp_path):
    """One bit flipped in the base that every checkpoint refers to: each is skipped with a
    warning, then load and restore raise, naming each file and the one they all failed on,
    instead of returning None (which reads as "start from scratch")."""
    manager = safeckpt.CheckpointManager(tmp_path, keep_last=2, incremental=True, rng=False)
    for step in range(3):
        manager.save(step, lora_state(step))
    with safeckpt.open(manager.path(0)) as f:
        offset = f.info("state.base.w").offset
    with open(manager.path(0), "r+b") as f:
        f.seek(offset + 400)
        byte = f.read(1)[0]
        f.seek(offset + 400)
        f.write(bytes([byte ^ 1]))
    target = lora_state(-1, {"w": np.zeros((100, 200), np.float32), "emb": np.zeros(5_000),
                             "zero": np.ones(64)})
    for call in (manager.load, lambda: manager.restore(target)):
        with pytest.warns(RuntimeWarning, match="skipping checkpoint") as caught, \
                pytest.raises(safeckpt.ChecksumError) as info:
            call()
        assert len(caught) == 3
        message = str(info.value)
        assert all(os.path.basename(manager.path(s)) in message for s in range(3)), message
        assert "each failed on 'step-0000000000.sckpt'" in message, message
        assert isinstance(info.value.__cause__, safeckpt.ChecksumError)
    assert (target["base"]["w"] == 0).all() and (target["lora"] == -1).all()  # untouched
    garbage = safeckpt.CheckpointManager(tmp_path / "garbage")
    assert garbage.load() is None  # no checkpoint file at all: start fresh
    (tmp_path / "garbage" / "step-0000000001.sckpt").write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning), pytest.raises(safeckpt.SafeckptError,
                                                     match="no checkpoint .* loads"):
        garbage.restore({})


def test_incremental_refers_only_where_the_bytes_compare_equal(tmp_path, monkeypatch):
    manager = safeckpt.CheckpointManager(tmp_path, incremental=True, rng=False)
    state = lora_state(1)
    manager.save(1, state)
    compared = []

    def never_equal(a, b):  # as if every tensor had changed, whatever its CRC
        compared.append(a.nbytes)
        return False

    monkeypatch.setattr(manager_module._backend, "bytes_equal", never_equal)
    manager.save(2, state)
    assert referred(manager, 2) == [] and sorted(compared) == [512, 6400, 40_000, 80_000]
    monkeypatch.undo()
    changed = {"base": {"w": state["base"]["w"].astype(np.int32),  # same bytes, other dtype
                        "emb": state["base"]["emb"].reshape(50, 100),  # same bytes, other shape
                        "zero": state["base"]["zero"]}, "lora": state["lora"], "step": 3}
    manager.save(3, changed)
    assert referred(manager, 3) == [("step-0000000002.sckpt", 2, 512 + 6400)]
    info = manager.load(3, verify=True)
    assert info.state["base"]["w"].dtype == np.int32 and info.state["base"]["emb"].shape == (50, 100)
    plain = safeckpt.CheckpointManager(tmp_path / "plain", rng=False)
    plain.save(1, state)  # no save_id: an incremental manager cannot refer to it
    again = safeckpt.CheckpointManager(tmp_path / "plain", incremental=True, rng=False)
    again.save(2, state)
    assert referred(again, 2) == [] and again.load(2, verify=True).step == 2
    again.save(3, state)
    assert [r[0] for r in referred(again, 3)] == ["step-0000000002.sckpt"]
    for bad in (dict(checksum=False), dict(max_shard_size="1GB")):
        with pytest.raises(ValueError, match="incremental=True needs checksum=True"):
            safeckpt.CheckpointManager(tmp_path, incremental=True, **bad)


def test_incremental_keeps_the_reader_of_the_file_it_wrote(tmp_path, monkeypatch):
    # the previous file is not reopened while it is the file it was; retention reads no header
    manager = safeckpt.CheckpointManager(tmp_path, incremental=True, rng=False)
    state = lora_state(1)
    manager.save(1, state)
    manager.save(2, state)
    opened = []
    real_open, real_reader = manager_module.api.open, manager_module.Reader

    def spy(kind, real):
        def make(path, **options):
            reader = real(path, **options)
            opened.append((kind, os.path.basename(path), reader))
            return reader
        return make

    monkeypatch.setattr(manager_module.api, "open", spy("open", real_open))
    monkeypatch.setattr(manager_module, "Reader", spy("header", real_reader))
    manager.save(3, state)
    assert [(kind, name) for kind, name, _ in opened] == [("header", "step-0000000003.sckpt")]
    path = manager.path(3)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))  # the file changed: reopened
    del opened[:]
    manager.save(4, state)
    assert ("open", "step-0000000003.sckpt") in [(kind, name) for kind, name, _ in opened]
    held = opened[-1][2]
    assert opened[-1][1] == "step-0000000004.sckpt" and not held.closed
    manager.delete(4)
    assert held.closed
    manager.save(5, state)
    held = opened[-1][2]
    assert opened[-1][1] == "step-0000000005.sckpt" and not held.closed
    manager.close()
    assert held.closed and all(reader.closed for _, _, reader in opened)
    assert manager.load(5, verify=True).step == 5


def test_incremental_async_saves_compare_the_snapshot(tmp_path):
    state = lora_state(0)
    with safeckpt.CheckpointManager(tmp_path, keep_last=2, incremental=True, async_save=True,
                                    rng=False) as manager:
        for step in range(4):
            state["lora"][:] = step
            state["step"] = step
            manager.save(step, state)
            state["lora"][:] = -1  # in place, at once: the snapshot keeps the saved values
            state["base"]["emb"][0] += 0.0  # untouched bytes
        assert "incremental=True" in repr(manager)
    assert [r[0] for r in referred(manager, 3)] == ["step-0000000000.sckpt"]
    assert steps_of(manager) == [0, 2, 3]
    for step in (0, 2, 3):
        info = manager.load(step, verify=True)
        assert (info.state["lora"] == step).all()
        assert (info.state["base"]["emb"] == np.linspace(-1, 1, 5_000)).all()


def test_incremental_compares_a_gpu_tensor_through_one_host_copy(tmp_path):
    """A sync incremental save gets GPU tensors as LazyArrays (tree.flatten): each compared is
    copied to host once, and a changed one is then written from that copy, not fetched again.
    (No GPU here: the LazyArrays are made by hand.)"""
    manager = safeckpt.CheckpointManager(tmp_path, incremental=True, rng=False)
    manager.save(1, {"same": np.arange(10.0), "changed": np.ones(4)})
    with safeckpt.open(manager.path(1)) as f:
        names = f.keys()
    loads = []

    def lazy(array):
        return safeckpt.writer.LazyArray(array.dtype, array.shape,
                                         lambda: loads.append(array.nbytes) or array.copy())

    arrays = [lazy(np.arange(10.0) if "same" in name else np.zeros(4)) for name in names]
    refs = manager._references(2, names, arrays)
    assert sorted(loads) == [32, 80] and [n for n in refs if "same" in n] == list(refs)
    assert all(type(a) is np.ndarray for a in arrays) and len(refs) == 1


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
        if info is None:  # async: killed before its first save was written (the lag below)
            assert done[-1] - lag < 0 and not os.listdir(tmp_path), (done, os.listdir(tmp_path))
            continue
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


@pytest.mark.parametrize("options", [{"incremental": True, "rng": False},
                                     {"incremental": True, "async_save": True, "rng": False}])
def test_crash_recovery_under_sigkill_with_incremental_saves_and_retention(tmp_path, options):
    """As above, each save referring to the first one (the frozen tensor never changes) while
    retention deletes the others: every kill leaves the newest checkpoint whole and referring to
    the first. Without async saves, the directory holds only the kept checkpoints, the first and
    at most one that retention had not yet deleted (every child's first save returns after its
    retention ran); with them, a child may be killed before its first retention, so what kills
    left is counted once a save finishes."""
    for manager in crash_loop(tmp_path, options):
        first = manager.all()[0]
        files = sorted(os.listdir(tmp_path))
        assert files[0] == os.path.basename(first.path)
        assert len(files) <= 4 or options.get("async_save")
        newest = manager.latest()
        if newest.step != first.step:
            with safeckpt.open(newest.path) as f:
                assert f.references() == [(os.path.basename(first.path), 1, 480_000)]
    step = manager.latest().step + 1
    with safeckpt.CheckpointManager(tmp_path, keep_last=2, **options) as manager:
        manager.save(step, {"frozen": np.arange(60_000, dtype=np.int64),
                            "w": np.full(50_000, step, np.int64), "step": step})
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(manager.path(s))
                                            for s in (first.step, step - 1, step)]


# -- review 2: pending saves that fail early, cleanup beside them, the cost of the interval ------

def test_a_save_whose_snapshot_failed_is_not_left_pending(tmp_path, monkeypatch):
    """A background save that fails before the manager's job runs (the snapshot's device copies,
    where a CUDA error surfaces) is reported once and leaves no step pending: that step can be
    saved again, and should_save and repr say nothing is pending."""
    from safeckpt import snapshot
    manager = safeckpt.CheckpointManager(tmp_path, async_save=True, keep_last=2)

    def failed_copies(self):
        raise RuntimeError("device copy failed (simulated)")

    monkeypatch.setattr(snapshot.Snapshot, "wait", failed_copies)
    manager.save(1, {"w": np.ones(4)})
    with pytest.raises(RuntimeError, match="device copy failed"):
        manager.wait()
    monkeypatch.undo()
    assert "pending" not in repr(manager)
    assert manager.should_save(1)
    manager.save(1, {"w": np.ones(4)})
    manager.close()
    assert steps_of(manager) == [1]


def test_cleanup_leaves_the_files_of_a_pending_save(tmp_path, monkeypatch):
    """cleanup() while an async save is pending keeps that save's temporary file and shards (they
    are not a crash's leftovers), and still removes a real leftover."""
    from safeckpt import async_save
    for shards in (None, 64 << 10):
        directory = tmp_path / f"shards{shards}"
        manager = safeckpt.CheckpointManager(directory, async_save=True, max_shard_size=shards)
        leftover = directory / ".step-0000000009.sckpt.0123456789ab.tmp"
        gate = threading.Event()
        real_work = async_save.AsyncSaver._work

        def held_work(self):
            gate.wait(30)  # bounded: the test releases it after its cleanup() calls
            real_work(self)

        monkeypatch.setattr(async_save.AsyncSaver, "_work", held_work)
        manager.save(1, {f"w{i}": np.full(1 << 14, i, np.float32) for i in range(8)})
        # the files the save will write, made now as if it were half done
        made = [directory / ".step-0000000001.sckpt.ba9876543210.tmp"]
        if shards:
            made.append(directory / "step-0000000001-00001-of-00008.sckpt")
        for path in made + [leftover]:
            path.write_bytes(b"x")
        removed = manager.cleanup()
        assert removed == [leftover.name]
        assert all(path.exists() for path in made)
        gate.set()
        manager.wait()
        monkeypatch.undo()
        for path in made:
            path.unlink(missing_ok=True)
        manager.close()
        assert manager.load(1, verify=True).step == 1


def test_an_off_interval_step_costs_no_look_at_the_directory(tmp_path, monkeypatch):
    """With save_interval_steps, should_save and save of an off-interval step (asked at every
    training step) do not list the directory once a checkpoint is known; after delete() of the
    last one, the next step is the first checkpoint again."""
    manager = safeckpt.CheckpointManager(tmp_path, save_interval_steps=10)
    assert manager.save(3, {"w": np.zeros(2)}).step == 3  # the first, whatever its step
    looks = []
    real_listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda *a: looks.append(a) or real_listdir(*a))
    for step in range(4, 10):
        assert manager.should_save(step) is False
        assert manager.save(step, {"w": np.zeros(2)}) is None
    assert looks == []
    monkeypatch.undo()
    fresh = safeckpt.CheckpointManager(tmp_path, save_interval_steps=10)  # finds step 3 once
    assert fresh.save(4, {"w": np.zeros(2)}) is None
    fresh.delete(3)
    assert fresh.should_save(5) and fresh.save(5, {"w": np.zeros(2)}).step == 5
