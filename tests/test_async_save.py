"""safeckpt.snapshot and safeckpt.async_save: consistent snapshots into reused buffers, background
writes, errors never lost, flush at exit, max_in_flight, memory.

No test depends on the machine's speed: the background writer is held at a gate (a patched
``api.save_plan``) wherever a test needs a save to be still pending.
"""

import errno
import os
import random
import signal
import subprocess
import sys
import threading
import time
import tracemalloc

import numpy as np
import pytest

import safeckpt
from safeckpt import api, snapshot
from safeckpt.async_save import AsyncSaver, SaveHandle
from safeckpt.errors import InvalidValueError
from safeckpt.snapshot import Snapshotter
from safeckpt.writer import LazyArray

torch = pytest.importorskip("torch")

MiB = 1 << 20


class Gate:
    """Holds every background ``api.save_plan`` until ``open()``; records the paths written."""

    def __init__(self, monkeypatch):
        self.event = threading.Event()
        self.entered = threading.Semaphore(0)
        self.written = []
        real = api.save_plan

        def held(plan, path, **options):
            self.entered.release()
            if not self.event.wait(60):
                raise RuntimeError("test gate never opened")
            real(plan, path, **options)
            self.written.append(os.path.basename(path))

        monkeypatch.setattr(api, "save_plan", held)

    def open(self):
        self.event.set()


@pytest.fixture
def gate(monkeypatch):
    g = Gate(monkeypatch)
    yield g
    g.open()  # never leave a writer thread waiting


def _state(seed=0, n=4, size=1000):
    rng = np.random.default_rng(seed)
    return {"model": {f"w{i}": rng.standard_normal(size).astype(np.float32) for i in range(n)},
            "step": seed}


# -- consistency ----------------------------------------------------------------------------------

def test_snapshot_is_consistent_under_later_in_place_updates(backend, tmp_path, gate):
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    t = torch.arange(6, dtype=torch.bfloat16)
    nested = [np.ones(5, np.int64)]
    state = {"w": w, "t": t, "nested": nested, "step": 7, "lr": np.float32(0.5)}
    expected = safeckpt.load_bytes(api.save_tree_bytes(state))
    with AsyncSaver() as saver:
        handle = saver.save(state, tmp_path / "a.sckpt", metadata={"step": 7})
        gate.entered.acquire()  # the writer has the snapshot and waits: training goes on
        w += 100
        t.add_(5)
        nested[0][:] = -1
        nested.append(np.zeros(3))
        state["step"] = 8
        gate.open()
        handle.result()
    back = safeckpt.load(tmp_path / "a.sckpt")
    assert back["step"] == 7 and len(back["nested"]) == 1 and back["lr"] == np.float32(0.5)
    np.testing.assert_array_equal(back["w"], expected["w"])
    np.testing.assert_array_equal(back["nested"][0], np.ones(5, np.int64))
    assert torch.equal(safeckpt.load(tmp_path / "a.sckpt", framework="torch")["t"],
                       torch.arange(6, dtype=torch.bfloat16))
    with safeckpt.open(tmp_path / "a.sckpt") as f:
        assert f.metadata == {"step": 7}


def test_round_trip_matches_a_blocking_save(backend, tmp_path):
    state = {"a": np.arange(10, dtype=">i4"),  # big-endian: stored little-endian in its buffer
             "b": np.asfortranarray(np.ones((3, 2), np.float64)),
             "c": torch.ones(3, 4).t(), "tied": None, "e": np.zeros((0, 3), np.float16),
             "s": np.array(3.5)}
    state["tied"] = state["c"]
    safeckpt.save(state, tmp_path / "blocking.sckpt")
    with AsyncSaver() as saver:
        saver.save(state, tmp_path / "async.sckpt")
        saver.save(state, tmp_path / "async.safetensors")
    assert ((tmp_path / "async.sckpt").read_bytes()
            == (tmp_path / "blocking.sckpt").read_bytes())
    back = safeckpt.load(tmp_path / "async.sckpt", framework="torch")
    assert back["tied"] is back["c"]
    flat = safeckpt.load_file(tmp_path / "async.safetensors")
    np.testing.assert_array_equal(flat["a"], np.arange(10))


def test_sharded_save(backend, tmp_path):
    state = _state(n=4, size=1000)  # 4000 bytes each: 4 shards of at most 5000 bytes
    with AsyncSaver() as saver:
        saver.save(state, tmp_path / "s.sckpt", max_shard_size=5000)
    with safeckpt.open(tmp_path / "s.sckpt") as f:
        assert len({f.shard_of(name) for name in f.keys()}) == 4
    back = safeckpt.load(tmp_path / "s.sckpt")
    for name, value in state["model"].items():
        np.testing.assert_array_equal(back["model"][name], value)


def test_large_host_arrays_are_copied_in_one_call(backend, monkeypatch):
    """Host arrays (numpy, torch CPU) of _BATCH_MIN bytes or more go to the backend in one
    copy_many call per snapshot (threads share the bytes in C); smaller, strided and big-endian
    ones are copied by numpy. Every copy is exact, and in-place updates after take() returns do
    not reach the snapshot."""
    calls = []
    real = snapshot._backend.copy_many

    def counting(dsts, srcs):
        calls.append(sorted(a.nbytes for a in srcs))
        real(dsts, srcs)

    monkeypatch.setattr(snapshot._backend, "copy_many", counting)
    n = snapshot._BATCH_MIN // 4  # float32 elements in _BATCH_MIN bytes
    rng = np.random.default_rng(5)
    state = {"a": rng.standard_normal(n).astype(np.float32),
             "below": rng.standard_normal(n - 1).astype(np.float32),
             "t": torch.randn(3, n),
             "bf": torch.randn(2 * n).to(torch.bfloat16),
             "strided": rng.standard_normal((n, 2)).astype(np.float32)[:, 0],
             "be": np.arange(n, dtype=">i4"),
             "t_strided": torch.randn(n, 2).t(),
             "empty": np.zeros((0, n), np.float32), "step": 3}
    expected = safeckpt.load_bytes(api.save_tree_bytes(state))
    snapshotter = Snapshotter()
    snap = snapshotter.take(state)
    snap.wait()
    assert calls == [[4 * n, 4 * n, 12 * n]]
    for value in state.values():
        if isinstance(value, np.ndarray):
            value += 1
        elif isinstance(value, torch.Tensor):
            value.add_(1)
    got = dict(zip(snap.names, snap.arrays))
    assert sorted(got) == sorted(expected) and all(got[k].dtype.byteorder != ">" for k in got)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value)
    again = snapshotter.take(state)
    assert calls[1] == calls[0] and all(a is b for a, b in zip(snap.arrays, again.arrays))
    np.testing.assert_array_equal(again.arrays[snap.names.index("a")], state["a"])


# -- steady state: no allocation ------------------------------------------------------------------

def test_snapshotter_reuses_its_buffers():
    snapshotter = Snapshotter()
    state = _state()
    first = snapshotter.take(state).arrays
    state["model"]["w0"] += 1
    second = snapshotter.take(state)
    assert all(a is b for a, b in zip(first, second.arrays))
    np.testing.assert_array_equal(second.arrays[0], state["model"]["w0"])
    # a changed shape gets a new buffer; a name no longer saved gives its buffer up
    state["model"]["w1"] = np.zeros(7, np.float32)
    del state["model"]["w3"]
    third = snapshotter.take(state).arrays
    assert third[0] is first[0] and third[1] is not first[1] and third[2] is first[2]
    assert snapshotter.nbytes == 2 * 4000 + 28


def test_steady_state_saves_allocate_no_tensor_memory(backend, tmp_path):
    state = _state(n=16, size=MiB // 4)  # 16 MiB
    buffers = []
    with AsyncSaver() as saver:
        def job(snap):
            buffers.append([a.__array_interface__["data"][0] for a in snap.arrays])
            api.save_plan(snap.plan(), tmp_path / "c.sckpt")
        saver.submit(state, job).result()  # the first save allocates the buffers
        tracemalloc.start()
        try:
            for step in range(3):
                state["model"]["w0"][0] = step
                saver.submit(state, job).result()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert buffers[1:] == buffers[:1] * 3
    assert peak < MiB, f"steady-state saves allocated {peak} bytes at peak (state: 16 MiB)"
    assert safeckpt.load(tmp_path / "c.sckpt")["model"]["w0"][0] == 2


def test_memory_is_about_one_copy_of_the_state(backend, tmp_path):
    state = _state(n=16, size=MiB // 4)
    state_bytes = 16 * MiB
    tracemalloc.start()
    try:
        with AsyncSaver() as saver:
            saver.save(state, tmp_path / "m.sckpt")
            saver.save(state, tmp_path / "m.sckpt")
            assert saver.buffer_bytes == state_bytes
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.25 * state_bytes, f"peak {peak / MiB:.1f} MiB for a 16 MiB state"


# -- max_in_flight --------------------------------------------------------------------------------

def test_max_in_flight_bounds_the_snapshots_held(tmp_path, gate):
    state = _state()
    saver = AsyncSaver(max_in_flight=2)
    saver.save(state, tmp_path / "0.sckpt")
    state["model"]["w0"][:] = 1
    saver.save(state, tmp_path / "1.sckpt")  # both return while nothing is written
    assert saver.in_flight == 2 and gate.written == []
    state["model"]["w0"][:] = 2
    third = threading.Thread(target=saver.save, args=(state, tmp_path / "2.sckpt"))
    third.start()
    third.join(0.5)
    assert third.is_alive(), "a third save did not wait for a buffer set"
    assert saver.buffer_bytes == 2 * 4 * 4000  # two buffer sets, never three
    gate.open()
    third.join(60)
    saver.close()
    assert gate.written == ["0.sckpt", "1.sckpt", "2.sckpt"]  # in order
    for step in range(3):
        w0 = safeckpt.load(tmp_path / f"{step}.sckpt")["model"]["w0"]
        assert (w0 == step).all() if step else not (w0 == 1).all()


def test_max_in_flight_is_checked():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_in_flight"):
            AsyncSaver(max_in_flight=bad)


# -- errors ---------------------------------------------------------------------------------------

@pytest.fixture
def failing(monkeypatch):
    """``api.save_plan`` fails with ENOSPC for names starting with 'bad'."""
    real = api.save_plan

    def save_plan(plan, path, **options):
        if os.path.basename(path).startswith("bad"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(plan, path, **options)

    monkeypatch.setattr(api, "save_plan", save_plan)


def test_a_background_error_is_raised_at_the_next_save(tmp_path, failing):
    saver = AsyncSaver()
    saver.save(_state(), tmp_path / "bad.sckpt")
    with pytest.raises(OSError, match="No space left") as info:
        saver.save(_state(), tmp_path / "good.sckpt")
    if sys.version_info >= (3, 11):
        assert "bad.sckpt" in "".join(info.value.__notes__)
    assert not (tmp_path / "good.sckpt").exists()  # that save was not taken
    saver.save(_state(), tmp_path / "good.sckpt")  # raised once: the saver goes on
    saver.close()
    assert safeckpt.load(tmp_path / "good.sckpt")["step"] == 0


def test_every_error_is_raised_once_oldest_first(tmp_path, failing, gate):
    saver = AsyncSaver(max_in_flight=3)
    saver.save(_state(), tmp_path / "bad1.sckpt")
    saver.save(_state(), tmp_path / "bad2.sckpt")
    saver.save(_state(), tmp_path / "ok.sckpt")
    gate.open()  # all three were taken before the first failed
    with pytest.raises(OSError, match="bad1"):
        saver.wait()
    with pytest.raises(OSError, match="bad2"):
        saver.close()
    saver.close()  # nothing left to report
    assert (tmp_path / "ok.sckpt").exists()


def test_close_and_context_manager_raise_the_error(tmp_path, failing):
    with pytest.raises(OSError, match="No space left"):
        with AsyncSaver() as saver:
            saver.save(_state(), tmp_path / "bad.sckpt")
    with pytest.raises(ValueError, match="closed"):
        saver.save(_state(), tmp_path / "late.sckpt")


def test_an_error_seen_through_the_handle_is_not_raised_again(tmp_path, failing):
    saver = AsyncSaver()
    handle = saver.save(_state(), tmp_path / "bad.sckpt")
    assert isinstance(handle, SaveHandle)
    with pytest.raises(OSError, match="No space left"):
        handle.result()
    assert handle.done() and "failed" in repr(handle)
    saver.close()  # reported already


def test_a_job_error_and_its_value(tmp_path):
    saver = AsyncSaver()

    def job(snap):
        if snap.names == ["boom"]:
            raise KeyError("boom")
        return snap.nbytes

    assert saver.submit({"x": np.zeros(4)}, job).result() == 32
    saver.submit({"boom": np.zeros(1)}, job)
    with pytest.raises(KeyError, match="boom"):
        saver.wait()
    saver.submit({"x": np.zeros(1)}, lambda snap: saver.wait())  # would wait for itself
    with pytest.raises(RuntimeError, match="own jobs"):
        saver.close()


def test_what_can_be_checked_is_refused_at_save(tmp_path):
    saver = AsyncSaver()
    with pytest.raises(InvalidValueError, match=r"obj\['bad'\]"):
        saver.save({"bad": object()}, tmp_path / "x.sckpt")
    with pytest.raises(InvalidValueError, match=".pt files"):
        saver.save({"w": np.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(InvalidValueError):
        saver.save({"w": np.zeros(1)}, tmp_path / "x.sckpt", metadata={"k": object()})
    with pytest.raises(ValueError, match="size"):
        saver.save({"w": np.zeros(1)}, tmp_path / "x.sckpt", max_shard_size="lots")
    assert saver.in_flight == 0 and saver.buffer_bytes <= 8  # each refused save gave its slot back
    saver.save({"w": np.zeros(1)}, tmp_path / "x.sckpt")
    saver.close()
    assert not [p for p in os.listdir(tmp_path) if p != "x.sckpt"]


def test_check_failure_gives_the_slot_back(tmp_path):
    saver = AsyncSaver()

    def check(snap):
        raise InvalidValueError("no")

    with pytest.raises(InvalidValueError):
        saver.submit({"w": np.zeros(2)}, lambda snap: None, check=check)
    assert saver.in_flight == 0
    assert saver.submit({"w": np.zeros(2)}, lambda snap: "ran").result() == "ran"


# -- interpreter exit ------------------------------------------------------------------------------

_AT_EXIT = """
import sys, threading, numpy as np
import safeckpt
from safeckpt import api
real = api.save_plan
def after_main(plan, path, **options):
    threading.main_thread().join()   # write only once the interpreter is exiting
    if "bad" in str(path):
        raise OSError(28, "No space left on device")
    real(plan, path, **options)
api.save_plan = after_main
saver = safeckpt.AsyncSaver()
saver.save({{"w": np.arange(5.0), "step": 3}}, {path!r})
{more}
print("main done", flush=True)
"""


def test_interpreter_exit_writes_pending_saves(tmp_path):
    path = str(tmp_path / "exit.sckpt")
    script = _AT_EXIT.format(path=path, more="")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "main done\n" and done.stderr == ""
    back = safeckpt.load(path)
    assert back["step"] == 3 and back["w"].tolist() == [0, 1, 2, 3, 4]


def test_an_error_no_one_saw_is_printed_at_exit(tmp_path):
    path = str(tmp_path / "ok.sckpt")
    more = f"saver.save({{'w': np.zeros(1)}}, {str(tmp_path / 'bad.sckpt')!r})"
    script = _AT_EXIT.format(path=path, more=more).replace("Saver()", "Saver(max_in_flight=2)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert os.path.exists(path)
    assert "a background save failed and nothing reported it" in done.stderr
    assert "bad.sckpt" in done.stderr and "No space left" in done.stderr


_CRASH_CHILD = """
import sys, numpy as np, safeckpt
path = sys.argv[1]
state = {"w": np.zeros(1 << 18), "step": 0}
with safeckpt.AsyncSaver() as saver:
    for step in range(1, 1 << 30):
        state["w"][:] = step; state["step"] = step  # in place, while the last save is written
        saver.save(state, path)
        print(step, flush=True)
"""


def test_sigkill_during_async_saves_leaves_a_complete_consistent_file(tmp_path):
    """A child saves in a loop with an AsyncSaver and is SIGKILLed at random moments: the file is
    always a whole save, verified, of one step (w == step), at most one step before the last
    save the child reported (max_in_flight=1: that save's predecessor was written). Bounded by
    work (a fixed number of kills), not by the clock."""
    rng = random.Random(0)
    path = tmp_path / "ckpt.sckpt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] + sys.path)}
    for _ in range(8):
        child = subprocess.Popen([sys.executable, "-c", _CRASH_CHILD, str(path)], env=env,
                                 stdout=subprocess.PIPE, text=True)
        with child.stdout:
            first = child.stdout.readline()
            first += child.stdout.readline()  # a second save returned: the first is written
            time.sleep(rng.uniform(0, 0.03))
            child.send_signal(signal.SIGKILL)
            out = child.stdout.read()
        child.wait()
        done = [int(line) for line in (first + out).split()]
        assert len(done) >= 2, "the child failed before its second save (its stderr is above)"
        with safeckpt.open(path) as f:
            f.verify()
        back = safeckpt.load(path)
        assert done[-1] - 1 <= back["step"] <= done[-1] + 1
        assert (back["w"] == back["step"]).all()


# -- device tensors -------------------------------------------------------------------------------

def test_device_buffers_are_torch_memory_viewed_as_numpy(monkeypatch):
    """The path of tensors on a device, run with CPU tensors standing in for them: a torch buffer
    per tensor (bf16, 0-d, empty, non-contiguous), filled by copy_, seen as numpy, reused."""
    sources = {"bf": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
               "scalar": torch.tensor(2.5, dtype=torch.float64),
               "empty": torch.zeros(0, 4, dtype=torch.int16),
               "strided": torch.arange(12, dtype=torch.int32).reshape(3, 4).t(),
               "flag": torch.tensor([True, False])}
    real = snapshot._tree.flatten

    def flatten(obj, root="obj"):
        tree, names, arrays = real({k: v.numpy() if v.dtype != torch.bfloat16
                                    else v.float().numpy() for k, v in obj.items()}, root=root)
        lazy = []
        for name in names:
            source = obj[name]
            np_dtype = safeckpt.torch_convert._tables()[0][source.dtype][0]
            lazy.append(LazyArray(np_dtype, tuple(source.shape), None, source))
        return tree, names, lazy

    monkeypatch.setattr(snapshot._tree, "flatten", flatten)
    snapshotter = Snapshotter()
    snap = snapshotter.take(sources)
    snap.wait()
    for name, array in zip(snap.names, snap.arrays):
        expected = safeckpt.torch_convert._host_array(sources[name].contiguous(), name)
        assert array.dtype == expected.dtype and array.shape == expected.shape, name
        assert array.flags.c_contiguous
        np.testing.assert_array_equal(array.reshape(-1).view(np.uint8),
                                      expected.reshape(-1).view(np.uint8))
    first = snap.arrays
    sources["bf"].add_(1)
    again = snapshotter.take(sources).arrays
    assert all(a is b for a, b in zip(first, again))
    assert again[0].astype(np.float32).tolist() == [[1, 2, 3], [4, 5, 6]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_go_through_pinned_buffers(backend, tmp_path):
    w = torch.arange(1 << 20, dtype=torch.float32, device="cuda")
    h = torch.ones(3, 5, dtype=torch.bfloat16, device="cuda").t()
    state = {"w": w, "h": h, "cpu": torch.ones(2)}
    snapshotter = Snapshotter()
    snap = snapshotter.take(state)
    w.add_(1)  # queued after the copies on the same stream: not in the snapshot
    snap.wait()
    assert snap.arrays[0][-1] == (1 << 20) - 1
    buffer = snapshotter._buffers["w"]
    assert buffer.tensor.is_pinned()
    with AsyncSaver() as saver:
        saver.save(state, tmp_path / "g.sckpt")
        h.mul_(3)
    back = safeckpt.load(tmp_path / "g.sckpt", framework="torch")
    assert back["w"].device.type == "cuda" and torch.equal(back["w"], w)
    assert torch.equal(back["h"].cpu(), torch.ones(5, 3, dtype=torch.bfloat16))
    again = snapshotter.take(state)
    assert again.arrays[0] is snap.arrays[0]


def test_staged_device_tensors_float4_x2_and_shell_dtypes(backend, tmp_path, monkeypatch):
    """A device tensor of float4_e2m1fn_x2 (an array with twice its last dimension) or of a shell
    dtype (int4, uint1: torch cannot copy them) is snapshotted as its bytes and made an array on
    the host, bit-exact with a blocking save; a shell byte with bits above the width is refused
    at take(), naming the tensor, as the blocking save refuses it. A CPU tensor handed to
    take() as a LazyArray with a source stands in for a CUDA one (kind "torch", no GPU here)."""
    torch = pytest.importorskip("torch")
    from safeckpt import torch_convert
    u8 = torch.arange(24, dtype=torch.uint8)
    state = {"f4": (u8 * 37).reshape(3, 8).view(torch.float4_e2m1fn_x2),
             "i4": (u8 & 15).view(torch.int4), "u1": (u8[:9] & 1).view(torch.uint1)}

    def as_device(obj, root="obj"):
        names = list(obj)
        arrays = [LazyArray(torch_convert._host_array(t, n).dtype,
                            torch_convert._host_array(t, n).shape,
                            lambda t=t, n=n: torch_convert._host_array(t, n), t)
                  for n, t in obj.items()]
        return ["dict", *[x for i, n in enumerate(names) for x in (n, ["tensor", i])]], names, arrays
    monkeypatch.setattr(snapshot._tree, "flatten", as_device)
    snapper = Snapshotter()
    for _ in range(2):  # the second take reuses the buffers
        snap = snapper.take(state)
        snap.wait()
        api.save_plan(snap.plan(), tmp_path / "a.sckpt")
        monkeypatch.undo()
        safeckpt.torch.save(state, tmp_path / "b.sckpt")
        monkeypatch.setattr(snapshot._tree, "flatten", as_device)
        a, b = safeckpt.load(tmp_path / "a.sckpt"), safeckpt.load(tmp_path / "b.sckpt")
        for name in state:
            assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name
        state["f4"].view(torch.uint8).add_(1)
    bad = dict(state, i4=(u8 | 16).view(torch.int4))
    with pytest.raises(InvalidValueError, match=r"i4.*0x1"):
        snapper.take(bad)
