"""safeckpt.dcp: torch.distributed.checkpoint without pickle, in real multi-process gloo jobs."""

import os
import pickle

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402

import safeckpt  # noqa: E402
from safeckpt import format as fmt  # noqa: E402
from safeckpt.dcp import METADATA_FILE, SafeckptReader, SafeckptWriter  # noqa: E402
from safeckpt.tree import same  # noqa: E402

import dcp_jobs  # noqa: E402


FAILED = (CheckpointException, Exception)  # CheckpointException is a BaseException


def failure(info):
    """The text of an exception and, for DCP's CheckpointException, of each rank's failure."""
    failures = getattr(info.value, "failures", {})
    return " ".join([str(info.value)] + [f"{type(e).__name__}: {e}" for e in failures.values()])


def load_whole(path, reader=None):
    """Load a DCP checkpoint in this process (no process group) into full, plain tensors."""
    state = dcp_jobs.reference(seed=1)  # other values, the same structure
    dcp.load(state, storage_reader=reader or SafeckptReader(path, verify=True))
    return state


def test_save_2_ranks_load_4_ranks_and_1(tmp_path):
    dcp_jobs.run(2, "save", tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["data-00000.sckpt", "data-00001.sckpt", METADATA_FILE]
    with safeckpt.open(tmp_path / "data-00000.sckpt") as f:  # rank 0 holds the first rows only
        assert f.info("model.0.weight").shape == (20, 24)
    dcp_jobs.run(4, "load", tmp_path)  # resharded over 4 ranks, compared with the reference
    assert same(load_whole(tmp_path), dcp_jobs.reference())  # and into one process


def test_save_4_ranks_load_2_ranks(tmp_path):
    dcp_jobs.run(4, "save", tmp_path)
    assert len(os.listdir(tmp_path)) == 5
    dcp_jobs.run(2, "load", tmp_path)


def test_default_metadata_is_a_pickle_and_ours_is_not(tmp_path):
    state = dcp_jobs.reference()
    dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp_path / "torch"))
    torch_metadata = (tmp_path / "torch" / ".metadata").read_bytes()
    assert torch_metadata[:1] == b"\x80"  # pickle's PROTO opcode
    dcp.save(state, storage_writer=SafeckptWriter(tmp_path / "ours"))
    for name in os.listdir(tmp_path / "ours"):
        data = (tmp_path / "ours" / name).read_bytes()
        assert data.startswith(fmt.MAGIC) and b"\x80\x04\x95" not in data, name
    with safeckpt.open(tmp_path / "ours" / METADATA_FILE) as f:
        assert not f.keys()  # plain values only
        assert f.tree["state_dict_metadata"]["model.0.weight"]["dtype"] == "float32"


def test_our_reader_never_unpickles(tmp_path, monkeypatch):
    state = dcp_jobs.reference()
    dcp.save(state, storage_writer=SafeckptWriter(tmp_path / "ours"))
    dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp_path / "torch"))

    def refuse(*args, **kwargs):
        raise AssertionError("pickle was called")

    class Refused(pickle.Unpickler):
        def __init__(self, *args, **kwargs):
            refuse()

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, Refused if name == "Unpickler" else refuse)
    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(FAILED) as info:  # the patch bites torch's reader
        load_whole(tmp_path / "torch", dcp.FileSystemReader(tmp_path / "torch"))
    assert "pickle was called" in failure(info)
    assert same(load_whole(tmp_path / "ours"), state)


def test_plain_values_kept_and_other_objects_refused(tmp_path):
    state = {"w": torch.arange(6.0), "cfg": {"name": "run", "betas": (0.9, 0.99), "n": None}}
    dcp.save(state, storage_writer=SafeckptWriter(tmp_path / "a"))
    back = {"w": torch.zeros(6), "cfg": {"name": "", "betas": (0.0, 0.0), "n": 1}}
    dcp.load(back, storage_reader=SafeckptReader(tmp_path / "a"))
    assert same(back, state)

    class Scheduler:
        pass

    with pytest.raises(FAILED) as info:
        dcp.save({"w": torch.ones(2), "sched": Scheduler()},
                 storage_writer=SafeckptWriter(tmp_path / "b"))
    assert "InvalidValueError: obj['sched']: cannot save a" in failure(info)
    assert "never pickles" in failure(info)
    assert METADATA_FILE not in os.listdir(tmp_path / "b")  # no metadata: not a checkpoint


def tamper(path, edit):
    """Rewrite metadata.sckpt with ``edit(metadata)`` applied to its plain values."""
    value = safeckpt.load(path / METADATA_FILE)
    edit(value)
    safeckpt.save(value, path / METADATA_FILE)


def entry(value):
    return value["state_dict_metadata"]["model.0.weight"]


@pytest.mark.parametrize("edit, words", [
    (lambda v: v.update(extra=1), ["keys must be"]),
    (lambda v: v.update(format="pickle"), ["format"]),
    (lambda v: entry(v).update(dtype="object"), ["dtype 'object'"]),
    (lambda v: entry(v).update(size=[40, -1]), ["size[1]", "-1"]),
    (lambda v: entry(v).update(size=[1] * 40), ["max_ndim"]),
    (lambda v: entry(v)["chunks"][0].__setitem__(1, [41, 24]), ["reach past the size"]),
    (lambda v: entry(v).update(requires_grad=1), ["requires_grad", "a bool"]),
    (lambda v: v["storage"][0].__setitem__(3, "../data-00000.sckpt"), ["plain name"]),
    (lambda v: v["storage"][0].__setitem__(3, "/etc/passwd"), ["plain name"]),
    (lambda v: v["storage"][0].__setitem__(0, "nope"), ["'nope' is not an item"]),
    (lambda v: v["storage"].append(list(v["storage"][0])), ["stored twice"]),
    (lambda v: v["storage"].pop(0), ["nothing stores 'model.0.weight'"]),
    (lambda v: v["storage"][0].__setitem__(1, [1, 0]), ["no chunk"]),
    (lambda v: v.update(storage_meta={"checkpoint_id": 1}), ["storage_meta"]),
])
def test_hostile_metadata_refused(tmp_path, edit, words):
    dcp.save(dcp_jobs.reference(), storage_writer=SafeckptWriter(tmp_path))
    tamper(tmp_path, edit)
    with pytest.raises((safeckpt.HeaderError, safeckpt.LimitError)) as info:
        SafeckptReader(tmp_path).read_metadata()
    for word in words:
        assert word in str(info.value)


def test_data_file_that_does_not_match_the_metadata(tmp_path):
    dcp.save(dcp_jobs.reference(), storage_writer=SafeckptWriter(tmp_path))
    tamper(tmp_path, lambda v: entry(v).update(dtype="float64"))
    with pytest.raises(FAILED) as info:
        load_whole(tmp_path)
    assert "HeaderError" in failure(info) and "is not the torch.float64 chunk" in failure(info)
    os.unlink(tmp_path / METADATA_FILE)  # as after a crash before finish(): not a checkpoint
    with pytest.raises(FAILED) as info:
        load_whole(tmp_path)
    assert "metadata.sckpt" in failure(info)
