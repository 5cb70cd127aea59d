"""CheckpointManager in a remote directory (issue 14, FORMAT.md [RS8]): data objects first, the
commit object last; only committed checkpoints are listed and restored; uncommitted data is
removed by cleanup(); broken commit objects are refused; a writer killed mid-upload to a real S3
server (moto on 127.0.0.1) leaves the previous checkpoint the newest.

Each test runs on fsspec's memory:// and on S3 (the ``s3`` fixture), and, where it reads or
writes tensors, under both backends.
"""

import contextlib
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings

import numpy as np
import pytest

import safeckpt
from safeckpt import manager as manager_module
from safeckpt import remote as remote_module
from safeckpt.errors import CommitError, InvalidValueError, LimitError

pytestmark = pytest.mark.timeout(300)

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] + sys.path)}
LINE_WAIT = 240.0  # seconds a child may take to print its next line: far above any real run


def name(step, suffix=""):
    return f"step-{step:010d}.sckpt{suffix}"


class Place:
    """A remote directory of the test's own: ``url`` and ``options`` for CheckpointManager, and
    ``fs``/``root`` to look inside it directly."""

    def __init__(self, kind, url, options, fs, root):
        self.kind, self.url, self.options, self.fs, self.root = kind, url, options, fs, root

    def manager(self, **kw):
        return safeckpt.CheckpointManager(self.url, storage_options=self.options, **kw)

    def names(self):
        self.fs.invalidate_cache()
        try:
            return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))
        except FileNotFoundError:
            return []

    def get(self, file):
        return self.fs.cat_file(f"{self.root}/{file}")

    def put(self, file, data):
        self.fs.pipe_file(f"{self.root}/{file}", data)
        self.fs.invalidate_cache()

    def rm(self, file):
        self.fs.rm(f"{self.root}/{file}")
        self.fs.invalidate_cache()


@pytest.fixture(params=["memory", "s3"])
def place(request):
    """A fresh remote directory on memory:// or on the S3 server."""
    if request.param == "memory":
        import fsspec
        fs = fsspec.filesystem("memory")
        root = f"/t-{uuid.uuid4().hex[:12]}"
        yield Place("memory", f"memory://{root}", None, fs, root)
        if fs.exists(root):
            fs.rm(root, recursive=True)
    else:
        s3 = request.getfixturevalue("s3")
        yield Place("s3", s3.url("run"), s3.storage_options, s3.fs, f"{s3.name}/run")


def state(step, n=1000):
    return {"w": np.full(n, step, np.float32), "b": np.arange(n // 10, dtype=np.int64) + step,
            "step": step}


def restored_step(manager):
    target = state(-1)
    info = manager.restore(target)
    assert info is not None
    assert (target["w"] == info.step).all() and (target["b"] == np.arange(100) + info.step).all()
    return info.step


# -- saving, listing, retention --------------------------------------------------------------------

@pytest.mark.usefixtures("backend")
def test_saves_commit_last_and_retention_deletes_commit_and_data(place):
    manager = place.manager(keep_last=2, keep_best=1, metric="loss")
    losses = {1: 0.5, 2: 0.1, 3: 0.7, 4: 0.9, 5: 0.8}
    for step, loss in losses.items():
        manager.save(step, state(step), metrics={"loss": loss})
    kept = [2, 4, 5]  # the best (2) and the two newest
    assert [c.step for c in manager.all()] == kept
    assert place.names() == sorted(name(s, x) for s in kept for x in ("", ".commit"))
    assert manager.best().step == 2 and manager.latest().step == 5
    assert manager.latest().path == manager.path(5) and manager.path(5).endswith("/" + name(5))
    commit = json.loads(place.get(name(5, ".commit")))
    data = place.get(name(5))
    assert commit == {"safeckpt_commit": 1, "step": 5, "metrics": {"loss": 0.8},
                      "files": {name(5): {"size": len(data),
                                          "header_crc": int.from_bytes(data[28:32], "little")}}}
    assert restored_step(manager) == 5
    assert manager.load(2).state["w"][0] == 2
    fresh = place.manager(keep_last=2, keep_best=1, metric="loss")  # lists what is there
    assert [c.step for c in fresh.all()] == kept and fresh.best().step == 2
    fresh.delete(4)
    assert place.names() == sorted(name(s, x) for s in (2, 5) for x in ("", ".commit"))
    with pytest.raises(FileNotFoundError, match="no checkpoint step 4"):
        fresh.delete(4)


def test_listing_reads_commit_objects_never_data(s3):
    """all()/latest()/best() read the commit objects (and the data objects' sizes), never a
    byte of a data object [RS8]."""
    manager = safeckpt.CheckpointManager(s3.url("run"), storage_options=s3.storage_options,
                                         keep_last=3, keep_best=1, metric="loss")
    for step in range(3):
        manager.save(step, state(step, 50_000), metrics={"loss": float(step)})
    s3.traffic.reset()
    assert [c.step for c in manager.all()] == [0, 1, 2] and manager.best().step == 0
    gets = [r.path for r in s3.traffic.log if r.method == "GET"]
    assert gets and all(path.endswith(".commit") or path.rstrip("/").endswith("/" + s3.name)
                        for path in gets), gets
    assert s3.traffic.bytes_by_method["GET"] < 10_000  # three small commit objects and a listing


@pytest.mark.usefixtures("backend")
def test_async_saves_write_data_then_commit_in_the_background(place, monkeypatch):
    order = []
    real_commit = manager_module._RemoteDir.commit

    def commit(self, step, metrics, file):
        order.append((step, file in place.names(), name(step, ".commit") in place.names()))
        real_commit(self, step, metrics, file)

    monkeypatch.setattr(manager_module._RemoteDir, "commit", commit)
    with place.manager(keep_last=2, async_save=True, max_in_flight=2) as manager:
        for step in range(4):
            manager.save(step, state(step))
    # each commit written after its data, before its own commit existed, in the order of saves
    assert order == [(step, True, False) for step in range(4)]
    assert [c.step for c in manager.all()] == [2, 3]
    assert restored_step(manager) == 3


@pytest.mark.usefixtures("backend")
def test_sharded_checkpoints_commit_the_index_and_every_shard(place):
    manager = place.manager(keep_last=1, max_shard_size=4000, rng=False)
    for step in (1, 2):
        manager.save(step, {f"t{i}": np.full(1000, step * 10 + i, np.float32) for i in range(3)})
    shards = [f"step-0000000002-0000{j}-of-00003.sckpt" for j in (1, 2, 3)]
    assert place.names() == sorted([name(2), name(2, ".commit"), *shards])  # step 1 all gone
    files = json.loads(place.get(name(2, ".commit")))["files"]
    assert sorted(files) == sorted([name(2), *shards])
    for file, entry in files.items():
        data = place.get(file)
        assert entry == {"size": len(data), "header_crc": int.from_bytes(data[28:32], "little")}
    assert manager.load().state["t2"][0] == 22


def test_incremental_is_refused_in_a_remote_directory(place):
    with pytest.raises(InvalidValueError, match="incremental=True is not available in a remote"):
        place.manager(incremental=True)
    assert place.names() == []


def test_storage_options_with_a_local_directory_are_refused(tmp_path):
    with pytest.raises(InvalidValueError, match="storage_options"):
        safeckpt.CheckpointManager(tmp_path, storage_options={"anon": True})


# -- unfinished saves ------------------------------------------------------------------------------

@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("shards", [None, 4000])
def test_an_uncommitted_save_is_ignored_then_removed_by_cleanup(place, shards):
    """Data objects without a commit object (a writer that died before its commit) are not a
    checkpoint: latest(), all() and restore() skip them, should_save and save refuse nothing
    for them, and cleanup() (also run when a manager is made) removes them [RS8]."""
    manager = place.manager(keep_last=3, max_shard_size=shards, rng=False)
    for step in (1, 2):
        manager.save(step, state(step))
    place.rm(name(2, ".commit"))  # as if the writer died just before it
    data = [n for n in place.names() if n.startswith("step-0000000002")]
    assert len(data) == (3 if shards else 1)  # with shards: w's, b's and the index
    assert manager.latest().step == 1 and [c.step for c in manager.all()] == [1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even tried: an unfinished save is no checkpoint
        assert restored_step(manager) == 1
    assert sorted(manager.cleanup()) == data
    assert not [n for n in place.names() if n.startswith("step-0000000002")]
    assert manager.should_save(2)
    manager.save(2, state(2))  # the step is free again
    assert restored_step(manager) == 2


def test_a_starting_manager_removes_only_what_is_surely_unfinished(place):
    """At start, as locally: shards whose index is missing go [S9]; a whole checkpoint file
    without a commit object (copied there without a manager?) is kept and named in a warning,
    never restored [RS8]; cleanup() called by the user removes it."""
    manager = place.manager()
    manager.save(1, state(1))
    place.put(name(2), place.get(name(1)))  # data of step 2, no commit object
    place.put("step-0000000003-00001-of-00002.sckpt", b"partial")
    place.put("notes.txt", b"not ours")
    with pytest.warns(RuntimeWarning, match=r"without a commit object \(step-0000000002\.sckpt\)"):
        manager = place.manager()
    assert place.names() == ["notes.txt", name(1), name(1, ".commit"), name(2)]
    assert restored_step(manager) == 1
    with pytest.raises(FileExistsError, match="without a commit object"):
        manager.save(2, state(2))
    assert manager.cleanup() == [name(2)]
    assert place.names() == ["notes.txt", name(1), name(1, ".commit")]


def test_checkpoints_copied_without_a_manager_are_kept_and_restore_raises(place):
    """A directory of checkpoints uploaded from a local manager (no commit objects): a manager
    there deletes nothing, and restore() raises rather than start fresh in silence [RS8]."""
    with tempfile.TemporaryDirectory() as local:
        for step in (1, 2):
            safeckpt.CheckpointManager(local).save(step, state(step))
        for file in sorted(os.listdir(local)):
            with open(os.path.join(local, file), "rb") as f:
                place.put(file, f.read())
    with pytest.warns(RuntimeWarning, match="without a commit object"):
        manager = place.manager()
    assert manager.latest() is None and place.names() == [name(1), name(2)]
    with pytest.raises(safeckpt.CommitError, match=r"no commit object.*step-0000000001\.sckpt"):
        manager.restore({"model": {"w": np.zeros(1)}})
    assert place.names() == [name(1), name(2)]


def test_a_refused_overwrite_keeps_the_checkpoint_it_would_replace(place):
    """Every check of the new state runs before the old commit object is removed: a save
    refused there leaves the old checkpoint listed and whole [RS8]."""
    manager = place.manager()
    manager.save(1, state(1))
    bad = {"model": {"w": np.zeros((1,) * 33)}}  # more dimensions than a file holds
    with pytest.raises(safeckpt.SafeckptError):
        manager.save(1, bad, overwrite=True)
    assert [c.step for c in place.manager().all()] == [1]
    assert restored_step(place.manager()) == 1


def test_a_commit_object_over_the_limit_is_refused_before_any_data(place):
    """Metrics too large for a commit object are refused before the upload (LimitError):
    nothing is written, and the step is free for a retry [RS8]."""
    manager = place.manager()
    metrics = {f"metric_{i:05d}": float(i) for i in range(4000)}
    with pytest.raises(safeckpt.LimitError, match="nothing was written"):
        manager.save(1, state(1), metrics=metrics)
    assert place.names() == []
    manager.save(1, state(1), metrics={"loss": 1.0})
    assert [c.step for c in manager.all()] == [1]


def test_cleanup_leaves_the_objects_of_a_pending_async_save(place, monkeypatch):
    from safeckpt import async_save
    manager = place.manager(async_save=True, max_shard_size=4000, rng=False)
    gate = threading.Event()
    real_work = async_save.AsyncSaver._work

    def held_work(self):
        gate.wait(60)  # bounded: the test releases it after cleanup()
        real_work(self)

    monkeypatch.setattr(async_save.AsyncSaver, "_work", held_work)
    manager.save(1, {f"t{i}": np.full(1000, i, np.float32) for i in range(3)})
    place.put("step-0000000001-00001-of-00003.sckpt", b"as if written")  # the pending save's
    place.put("step-0000000009-00001-of-00003.sckpt", b"a crash's")
    assert manager.cleanup() == ["step-0000000009-00001-of-00003.sckpt"]
    gate.set()
    manager.close()
    assert manager.load(1, verify=True).step == 1


@pytest.mark.parametrize("async_save", [False, True])
def test_a_failed_upload_leaves_no_object_and_the_previous_checkpoint(place, monkeypatch,
                                                                      async_save):
    """An error during the data upload aborts it: no commit object is written, the previous
    checkpoint stays the newest, and on S3 no partial object is visible [RS7, RS8] (fsspec's
    memory:// shows an object while it is written: cleanup() removes it)."""
    manager = place.manager(async_save=async_save)
    manager.save(1, state(1))
    manager.wait()
    before = place.names()
    real_open_write = remote_module.RemotePath.open_write

    class Failing:
        def __init__(self, out):
            self.out, self.calls = out, 0

        def write(self, data):
            self.calls += 1
            if self.calls > 1:  # the header went out; the tensors fail
                raise OSError(28, "No space left on device (simulated)")
            return self.out.write(data)

        def __getattr__(self, attr):
            return getattr(self.out, attr)

    @contextlib.contextmanager
    def open_write(self):
        with real_open_write(self) as out:
            yield Failing(out)

    monkeypatch.setattr(remote_module.RemotePath, "open_write", open_write)
    with pytest.raises(OSError, match="No space left"):
        manager.save(2, state(2, 100_000))
        manager.wait()
    monkeypatch.undo()
    if place.kind == "s3":
        assert place.names() == before
    assert manager.latest().step == 1 and restored_step(manager) == 1
    manager.cleanup()
    assert place.names() == before


def test_overwrite_removes_the_commit_before_writing_data(place, monkeypatch):
    manager = place.manager()
    manager.save(1, state(1))
    with pytest.raises(FileExistsError):
        manager.save(1, state(2))
    seen = []
    real = manager_module.api.save_plan

    def save_plan(plan, path, **kw):
        seen.append(name(1, ".commit") in place.names())
        return real(plan, path, **kw)

    monkeypatch.setattr(manager_module.api, "save_plan", save_plan)
    manager.save(1, {**state(1), "w": np.full(1000, 7, np.float32)}, overwrite=True)
    assert seen == [False]
    assert manager.load(1).state["w"][0] == 7


def test_delete_removes_the_commit_object_first(place, monkeypatch):
    manager = place.manager(keep_last=1, max_shard_size=4000, rng=False)
    manager.save(1, {f"t{i}": np.full(1000, i, np.float32) for i in range(2)})
    removed = []
    real = remote_module.RemotePath.remove

    def remove(self):
        removed.append(self.name)
        real(self)

    monkeypatch.setattr(remote_module.RemotePath, "remove", remove)
    manager.save(2, {f"t{i}": np.full(1000, i, np.float32) for i in range(2)})  # retention
    assert [n for n in removed if n.startswith("step-0000000001")] == [
        name(1, ".commit"), name(1), "step-0000000001-00001-of-00002.sckpt",
        "step-0000000001-00002-of-00002.sckpt"]
    removed.clear()
    manager.delete(2)
    assert removed[0] == name(2, ".commit") and len(removed) == 4
    assert place.names() == []


# -- broken commit objects -------------------------------------------------------------------------

def good_commit(place, step):
    return json.loads(place.get(name(step, ".commit")))


def broken_commits(place):
    """(why, bytes of step 2's commit object, error type, words of its message)."""
    good = good_commit(place, 2)
    size = good["files"][name(2)]["size"]

    def with_(**changes):
        return json.dumps({**good, **changes}).encode()

    return [
        ("over the limit", b" " * (64 << 10) + json.dumps(good).encode(), LimitError,
         "more than the 65536"),
        ("not JSON", b'{"safeckpt_commit": 1, "step": 2,', CommitError, "not UTF-8 JSON"),
        ("not UTF-8", json.dumps(good).encode().replace(b"{", b"\xff{", 1), CommitError,
         "not UTF-8 JSON"),
        ("a key twice", b'{"step": 2, ' + json.dumps(good).encode()[1:], CommitError,
         "duplicate"),
        ("a missing key", json.dumps({k: v for k, v in good.items() if k != "metrics"}).encode(),
         CommitError, "exactly the keys"),
        ("a newer version", with_(safeckpt_commit=2), CommitError, "this safeckpt reads 1"),
        ("another step", with_(step=3), CommitError, "says step 3, but is named for step 2"),
        ("bad metrics", with_(metrics={"loss": "low"}), CommitError, "not a str and a number"),
        ("another step's file", with_(files={**good["files"], name(1): good_commit(
            place, 1)["files"][name(1)]}), CommitError, "names 'step-0000000001.sckpt'"),
        ("a path outside", with_(files={**good["files"], "../x.sckpt": {
            "size": 64, "header_crc": 0}}), CommitError, "names '../x.sckpt'"),
        ("no checkpoint file", with_(files={}), CommitError, "naming 'step-0000000002.sckpt'"),
        ("a wrong size", with_(files={name(2): {**good["files"][name(2)], "size": size + 4}}),
         CommitError, f"is {size} bytes, but its commit object says {size + 4}"),
        ("a size that is not an int", with_(files={name(2): {
            **good["files"][name(2)], "size": float(size)}}), CommitError, "an int in 32"),
        ("a wrong header_crc", with_(files={name(2): {
            **good["files"][name(2)], "header_crc": good["files"][name(2)]["header_crc"] ^ 1}}),
         CommitError, "but its commit object says"),
    ]


@pytest.mark.usefixtures("backend")
def test_a_broken_commit_object_is_not_a_checkpoint(place):
    """Each way a commit object can break [RS8]: that checkpoint is not listed; restore() warns
    why and restores the one before; load(step) raises the named error."""
    manager = place.manager(keep_last=3)
    for step in (1, 2):
        manager.save(step, state(step))
    good = place.get(name(2, ".commit"))
    for why, data, error, words in broken_commits(place):
        place.put(name(2, ".commit"), data)
        listed = [c.step for c in manager.all()]
        # a wrong header_crc is seen only when the file is opened (listing reads no data)
        assert listed == ([1, 2] if why == "a wrong header_crc" else [1]), why
        with pytest.warns(RuntimeWarning, match="skipping checkpoint .*step-0000000002") as w:
            assert restored_step(manager) == 1, why
        assert any(words in str(x.message) for x in w), (why, [str(x.message) for x in w])
        with pytest.raises(error, match=words.replace("(", r"\(").replace("[", r"\[")):
            manager.load(2)
        place.put(name(2, ".commit"), good)
        assert restored_step(manager) == 2


def test_a_data_object_replaced_after_its_commit_is_refused_at_restore(place):
    """The same size but another save: listed (sizes match), refused when opened by its
    header_crc, and restore falls back to the previous checkpoint [RS8]."""
    manager = place.manager(keep_last=3)
    for step in (1, 2):
        manager.save(step, state(step))
    other = Place(place.kind, place.url.rstrip("/") + "-other", place.options, place.fs,
                  place.root + "-other")
    other.manager().save(2, {**state(2), "w": np.full(1000, 9, np.float32)})
    replacement = other.get(name(2))
    assert len(replacement) == len(place.get(name(2))) and replacement != place.get(name(2))
    place.put(name(2), replacement)
    assert [c.step for c in manager.all()] == [1, 2]
    with pytest.raises(CommitError, match="header_crc .* not the save that was committed"):
        manager.load(2)
    with pytest.warns(RuntimeWarning, match="not the save that was committed"):
        assert restored_step(manager) == 1


def test_only_broken_commit_objects_raise_instead_of_starting_fresh(place):
    """A directory whose commit objects all fail does not look empty: restore raises (as a
    directory of damaged local files does), naming them; a checkpoint file without any commit
    object raises too (never "start fresh" while files are there), until cleanup() removes it."""
    manager = place.manager()
    manager.save(1, state(1))
    place.put(name(1, ".commit"), b"garbage")
    with pytest.warns(RuntimeWarning):
        with pytest.raises(CommitError, match="no checkpoint in .* loads"):
            manager.restore(state(0))
    place.rm(name(1, ".commit"))
    with pytest.raises(CommitError, match="no commit object"):
        manager.restore(state(0))
    assert manager.cleanup() == [name(1)]
    assert manager.restore(state(0)) is None


# -- a writer killed mid-upload --------------------------------------------------------------------

KILL_CHILD = r"""
import contextlib, json, sys, time
import numpy as np, safeckpt
from safeckpt import manager as manager_module, remote
url, options, mode, blocked = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]


def stop_here(what):  # tell the parent, then wait to be killed (it kills at once)
    print(what, flush=True)
    time.sleep(600)
    sys.exit("not killed")


class Gate:  # the upload of object `blocked` stops once 6 MiB went out: a 5 MiB part is up
    def __init__(self, out, name):
        self.out, self.name, self.written = out, name, 0

    def write(self, data):
        n = self.out.write(data)
        self.written += memoryview(data).nbytes
        if self.name == blocked and self.written >= 6 << 20:
            stop_here("uploading " + self.name)
        return n

    def __getattr__(self, attr):
        return getattr(self.out, attr)


real_open_write = remote.RemotePath.open_write


@contextlib.contextmanager
def open_write(self):
    with real_open_write(self) as out:
        yield Gate(out, self.name)


real_commit = manager_module._RemoteDir.commit


def commit(self, step, metrics, name):
    if step == 2 and mode == "before-commit":
        stop_here("committing " + name)
    real_commit(self, step, metrics, name)


remote.RemotePath.open_write = open_write
manager_module._RemoteDir.commit = commit
manager = safeckpt.CheckpointManager(url, storage_options=options, keep_last=1, rng=False,
                                     async_save=mode == "async",
                                     max_shard_size=(9 << 20) if mode == "shard" else None)
for step in (1, 2):  # 24 MiB each: three tensors of 8 MiB (one per shard in mode "shard")
    manager.save(step, {f"w{i}": np.full(2 << 20, step, np.float32) for i in range(3)})
    manager.wait()
    print(f"saved {step}", flush=True)
"""


def lines_of(child):
    """A queue of the child's output lines ('' at its end), read by a thread of its own."""
    lines = queue.Queue()

    def read():
        for line in child.stdout:
            lines.put(line.strip())
        lines.put("")

    threading.Thread(target=read, daemon=True).start()
    return lines


@pytest.mark.parametrize("mode, blocked", [
    ("file", name(2)),  # its one data object, a part of it uploaded
    ("async", name(2)),  # the same, in the background thread of an async save
    ("shard", "step-0000000002-00002-of-00003.sckpt"),  # shard 2 uploading, shard 1 written
    ("before-commit", "-"),  # every data object complete, the commit object not written
])
def test_a_writer_killed_mid_upload_leaves_the_previous_checkpoint_newest(s3, mode, blocked):
    """The issue's test: a writer SIGKILLed during its upload to the S3 server leaves step 1 the
    newest checkpoint, whole and restorable; the next manager removes the objects the killed save
    completed (an unfinished multipart upload is never an object). The child stops itself at the
    kill point and says so, so the kill lands there whatever the machine's speed."""
    options = {**s3.storage_options, "default_block_size": 5 << 20}  # S3's smallest part
    url = s3.url("run")
    child = subprocess.Popen([sys.executable, "-c", KILL_CHILD, url, json.dumps(options), mode,
                              blocked], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        lines = lines_of(child)
        assert lines.get(timeout=LINE_WAIT) == "saved 1"
        stopped = lines.get(timeout=LINE_WAIT)  # bounded far above any run: never reached
        assert stopped == (f"uploading {blocked}" if mode != "before-commit"
                           else f"committing {name(2)}"), stopped
        if mode != "before-commit":  # in flight on the server: a multipart upload, no object
            uploads = s3.fs.call_s3("list_multipart_uploads", Bucket=s3.name).get("Uploads", [])
            assert f"run/{blocked}" in [u["Key"] for u in uploads]
        if mode == "shard":  # shards upload in parallel: wait for shard 1 (not held) to be whole
            shard = f"{s3.name}/run/step-0000000002-00001-of-00003.sckpt"
            deadline = time.monotonic() + LINE_WAIT
            while not (s3.fs.invalidate_cache() or s3.fs.exists(shard)):
                assert time.monotonic() < deadline, "shard 1 was never written"
                time.sleep(0.05)
    finally:
        child.kill()
        child.wait(60)
    s3.fs.invalidate_cache()
    left = sorted(p.rsplit("/", 1)[-1] for p in s3.fs.ls(f"{s3.name}/run", detail=False))
    assert name(1, ".commit") in left and name(2, ".commit") not in left
    assert blocked not in left  # an unfinished upload is no object
    completed = {"file": [], "async": [], "shard": ["step-0000000002-00001-of-00003.sckpt"],
                 "before-commit": [name(2)]}[mode]
    assert set(completed) <= set(left)  # the kill came after these were written
    with (pytest.warns(RuntimeWarning, match="without a commit object") if mode == "before-commit"
          else contextlib.nullcontext()):  # a whole file is kept at start: maybe copied there
        manager = safeckpt.CheckpointManager(url, storage_options=s3.storage_options, keep_last=1)
    assert manager.latest().step == 1 and [c.step for c in manager.all()] == [1]
    info = manager.load(verify=True)
    manager.cleanup()
    assert info.step == 1 and all((info.state[f"w{i}"] == 1).all() for i in range(3))
    s3.fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in s3.fs.ls(f"{s3.name}/run", detail=False)) == (
        sorted([name(1), name(1, ".commit")] + (
            [f"step-0000000001-0000{j}-of-00003.sckpt" for j in (1, 2, 3)]
            if mode == "shard" else [])))  # what the killed save completed: removed by cleanup
    manager.save(2, {"w": np.full(10, 2, np.float32)})  # and saving goes on
    assert manager.latest().step == 2
