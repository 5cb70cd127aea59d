"""safeckpt.dcp: torch.distributed.checkpoint without pickle, in real multi-process gloo jobs."""

import json
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys  # noqa: E402

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
    (lambda v: entry(v).update(dtype=["float32"]), ["['model.0.weight'].dtype", "a str"]),
    (lambda v: entry(v).update(memory_format={"a": 1}), ["memory_format", "a str"]),
    (lambda v: entry(v).update(kind=[1]), ["['model.0.weight'].kind", "a str"]),
    (lambda v: entry(v).update(size=[40, -1]), ["size[1]", "-1"]),
    (lambda v: entry(v).update(size=[1] * 40), ["max_ndim"]),
    (lambda v: entry(v)["chunks"][0].__setitem__(1, [41, 24]), ["reach past the size"]),
    (lambda v: entry(v).update(size=[40, 2**40]), ["chunks hold 960", "43980465111040", "cover"]),
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
    tamper(tmp_path, lambda v: entry(v).update(dtype="int32"))  # the same size: read_data sees it
    with pytest.raises(FAILED) as info:
        load_whole(tmp_path)
    assert "HeaderError" in failure(info) and "is not the torch.int32 chunk" in failure(info)
    os.unlink(tmp_path / METADATA_FILE)  # as after a crash before finish(): not a checkpoint
    with pytest.raises(FAILED) as info:
        load_whole(tmp_path)
    assert "metadata.sckpt" in failure(info)


# -- planner data, every field's type, and the cost of reading (issue 10: R5, R6) ------------------

def small_state():
    """Every kind of item: tensors (2-D, scalar, in a list) and plain values in a nested dict."""
    return {"w": torch.arange(6.0).reshape(2, 3), "s": torch.tensor(2.0),
            "l": [torch.ones(2), torch.zeros(1)], "cfg": {"lr": 0.1, "name": None, "ids": [1, 2]}}


def saved_small(path):
    dcp.save(small_state(), storage_writer=SafeckptWriter(path))
    return path


def rename(value, old, new, planner_path):
    """Rename item ``old`` of the metadata ``new`` everywhere, with ``planner_path``."""
    items = value["state_dict_metadata"]
    items[new] = items.pop(old)
    for stored in value["storage"]:
        if stored[0] == old:
            stored[0] = new
    del value["planner_data"][old]
    value["planner_data"][new] = planner_path


def test_load_without_a_template_rebuilds_the_state(tmp_path):
    """torch's own template-free load (dcp_to_torch_save uses it) builds the state dict from
    planner_data: it round-trips, a subset included."""
    saved_small(tmp_path)
    reader = SafeckptReader(os.fsencode(tmp_path))  # a bytes path names the directory
    assert SafeckptReader.validate_checkpoint_id(os.fsencode(tmp_path))
    assert same(_load_state_dict_from_keys(storage_reader=reader), small_state())
    assert same(_load_state_dict_from_keys(keys={"l"}, storage_reader=SafeckptReader(tmp_path)),
                {"l": small_state()["l"]})


def test_planner_data_with_a_gap_refused_at_save(tmp_path):
    """An empty dict in a list leaves a gap in the indices (("g", 1) and no ("g", 0)); torch cannot
    load that back (with a template or without), so the save says so instead of writing it."""
    with pytest.raises(FAILED) as info:
        dcp.save({"g": [{}, torch.ones(2)]}, storage_writer=SafeckptWriter(tmp_path))
    assert "InvalidValueError" in failure(info) and "the list 'g' uses 1 of the indices 0..1" in failure(info)
    assert METADATA_FILE not in os.listdir(tmp_path)


@pytest.mark.parametrize("edit, error, words", [
    # the red team's file: a list padded to the index (14 s, 802 MiB), or to 2**40 (MemoryError)
    (lambda v: rename(v, "l.1", "l.1000000", ("l", 10**6)), safeckpt.HeaderError,
     ["planner_data", "the list 'l' uses 2 of the indices 0..1000000"]),
    (lambda v: rename(v, "l.1", f"l.{2**40}", ("l", 2**40)), safeckpt.HeaderError,
     ["planner_data", "0..1099511627776", "pad it with 1099511627775 empty slots"]),
    (lambda v: v["planner_data"].update(w=("w", 10**6)), safeckpt.HeaderError,
     ["planner_data['w']", "('w', 1000000)", "does not spell its name 'w'"]),
    (lambda v: v.update(planner_data=["w"]), safeckpt.HeaderError, ["planner_data", "a dict or None"]),
    (lambda v: v["planner_data"].pop("s"), safeckpt.HeaderError, ["planner_data", "missing ['s']"]),
    (lambda v: v["planner_data"].update(x=("x",)), safeckpt.HeaderError, ["unknown ['x']"]),
    (lambda v: v["planner_data"].update(w="w"), safeckpt.HeaderError,
     ["planner_data['w']", "a non-empty list"]),
    (lambda v: v["planner_data"].update(w=()), safeckpt.HeaderError, ["a non-empty list"]),
    (lambda v: v["planner_data"].update({"cfg.lr": ("cfg", None)}), safeckpt.HeaderError,
     ["planner_data['cfg.lr'][1]", "None"]),
    (lambda v: v["planner_data"].update({"l.0": ("l", False)}), safeckpt.HeaderError,
     ["planner_data['l.0'][1]", "False"]),
    (lambda v: rename(v, "l.1", "l.-1", ("l", -1)), safeckpt.HeaderError, ["[1]", "-1"]),
    (lambda v: rename(v, "w", "0", (0,)), safeckpt.HeaderError,
     ["planner_data['0'][0]", "starts with a key"]),
    (lambda v: rename(v, "cfg.lr", "l.lr", ("l", "lr")), safeckpt.HeaderError,
     ["planner_data['l.lr']", "'l' holds both str keys and int indices"]),
    (lambda v: rename(v, "cfg.lr", "w.x", ("w", "x")), safeckpt.HeaderError,
     ["planner_data['w.x']", "'w' is the value of another item"]),
    (lambda v: rename(v, "w", "cfg", ("cfg",)), safeckpt.HeaderError,
     ["planner_data['cfg']", "also holds other items"]),
    (lambda v: rename(v, "w", ".".join(["w"] * 70), ("w",) * 70), safeckpt.LimitError,
     ["70 keys deep", "max_depth=64"]),
])
def test_R6_planner_data_checked_against_the_state_dict(tmp_path, edit, error, words):
    """planner_data (each item's path in the nested state dict) is checked before torch's planner
    sees it: the path spells the item's name, the paths form one tree, lists have no more slots
    than the paths have keys and indices (so memory is bounded by the file)."""
    saved_small(tmp_path)
    tamper(tmp_path, edit)
    with pytest.raises(error) as info:
        SafeckptReader(tmp_path).read_metadata()
    for word in words:
        assert word in str(info.value)


def test_tensor_larger_than_its_data_file_refused(tmp_path):
    """A tensor's chunks must fit in the data files that store them, before torch allocates it."""
    saved_small(tmp_path)

    def grow(value):
        item = value["state_dict_metadata"]["w"]
        item["size"] = [2, 2**38]
        item["chunks"] = [[[0, 0], [2, 2**38]]]
    tamper(tmp_path, grow)
    with pytest.raises(safeckpt.HeaderError, match=r"'data-00000.sckpt' .* 2199023255\d+ bytes"):
        SafeckptReader(tmp_path).read_metadata()


MUTANTS = [None, True, -1, 2**64 - 1, 1.5, "x", b"x", [], ["x", 1], (1,), {}, {1: "x"},
           {"kind": "bytes"}, np.float32(1)]


def _paths(value, path=()):
    """Every path to a value in a tree of dicts, lists and tuples, the root first."""
    yield path
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, path + (key,))
    elif isinstance(value, (list, tuple)):
        for i, child in enumerate(value):
            yield from _paths(child, path + (i,))


def _replaced(value, path, new, key=False):
    """A copy of ``value`` with the value at ``path`` (or, with ``key``, its dict key) ``new``."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        if key and not rest:
            return {(new if k == head else k): v for k, v in value.items()}
        return {k: _replaced(v, rest, new, key) if k == head else v for k, v in value.items()}
    items = [_replaced(v, rest, new, key) if i == head else v for i, v in enumerate(value)]
    return type(value)(items)


def test_R5_every_field_of_every_type(tmp_path):
    """Every value (and dict key) of a real metadata.sckpt replaced by a value of every other
    type: read_metadata raises a SafeckptError or gives metadata that torch's template-free load
    takes (or refuses with a SafeckptError); no TypeError, KeyError or IndexError escapes."""
    saved_small(tmp_path)
    original = safeckpt.load(tmp_path / METADATA_FILE)
    tried = decoded = 0
    for path in list(_paths(original)):
        mutants = [(new, False) for new in MUTANTS]
        if path and isinstance(path[-1], str):
            mutants += [(1, True), ("", True)]
        for new, key in mutants:
            value = _replaced(original, path, new, key)
            if same(value, original):
                continue
            safeckpt.save(value, tmp_path / METADATA_FILE, atomic=False)  # no fsync: fast
            tried += 1
            where = f"{'key' if key else 'value'} at {path!r} := {new!r}"
            try:
                SafeckptReader(tmp_path).read_metadata()
            except safeckpt.SafeckptError:
                continue
            except Exception as exc:
                raise AssertionError(f"{where}: {type(exc).__name__}: {exc}") from exc
            decoded += 1
            try:
                _load_state_dict_from_keys(storage_reader=SafeckptReader(tmp_path))
            except CheckpointException as exc:
                errors = [e[0] if isinstance(e, tuple) else e for e in exc.failures.values()]
                bad = [e for e in errors if not isinstance(e, safeckpt.SafeckptError)]
                assert not bad, f"{where}: {bad}"
    assert tried > 1500 and 0 < decoded < tried / 10, (tried, decoded)


# -- the cost of reading: memory and time per input byte -----------------------------------------

def forge_dcp(directory, items):
    """A DCP checkpoint written directly: ``items`` is [(fqn, planner path, value)], a value is a
    tensor or a plain value; one data file, one chunk per tensor."""
    directory.mkdir()
    entries, storage, planner_data, values = {}, [], {}, {}
    for fqn, path, value in items:
        if isinstance(value, torch.Tensor):
            size = list(value.shape)
            entries[fqn] = {"kind": "tensor", "dtype": str(value.dtype).split(".")[-1],
                            "requires_grad": False, "memory_format": "contiguous",
                            "pin_memory": False, "size": size, "chunks": [[[0] * len(size), size]]}
            storage.append([fqn, [0] * len(size), 0, "data-00000.sckpt", fqn])
        else:
            entries[fqn] = {"kind": "bytes"}
            storage.append([fqn, None, None, "data-00000.sckpt", fqn])
        planner_data[fqn] = path
        values[fqn] = value
    safeckpt.save(values, directory / "data-00000.sckpt")
    safeckpt.save({"format": "safeckpt.dcp", "version": 1, "dcp_version": "1.0.0",
                   "state_dict_metadata": entries, "storage": storage,
                   "planner_data": planner_data, "storage_meta": None}, directory / METADATA_FILE)


# Shapes that pack the most objects into each metadata byte; n items each.
DCP_SHAPES = {
    "scalars": lambda n: [(f"t{i}", (f"t{i}",), torch.tensor(float(i))) for i in range(n)],
    "values": lambda n: [(f"v{i}", (f"v{i}",), i) for i in range(n)],
    "one-list": lambda n: [(f"l.{i}", ("l", i), torch.tensor(1.0)) for i in range(n)],
    "deep": lambda n: [(f"d{i}" + ".a" * 63, (f"d{i}",) + ("a",) * 63, 0) for i in range(n // 8)],
}
DCP_MEMORY_PER_BYTE = 64  # SECURITY.md: the largest figure measured below (40), with room
DCP_TIME_RATIO = 24  # 8x the items: linear ~8x the CPU time, quadratic ~64x

_COST = textwrap.dedent("""
    import ctypes, gc, json, sys, time, warnings
    warnings.simplefilter("ignore")
    import torch
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
    from safeckpt.dcp import SafeckptReader

    def read(path):  # the DCP read entry point: read_metadata, then the template-free load
        return _load_state_dict_from_keys(storage_reader=SafeckptReader(path))

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

    def cpu(path):  # the collector's cost grows with the whole heap (torch's too): not counted
        best = float("inf")
        gc.disable()
        for _ in range(2):
            start = time.process_time()
            read(path)
            best = min(best, time.process_time() - start)
        gc.enable()
        return best

    tiny, small, large = sys.argv[1:]
    read(tiny)  # lazy imports and first-use caches
    ctypes.CDLL(None).malloc_trim(0)  # give freed memory back, so that reusing it counts
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak RSS (VmHWM) starts again from the RSS now
    before = status("VmRSS:")
    state = read(large)
    peak = status("VmHWM:")
    del state
    print(json.dumps({"memory": peak - before, "small": cpu(small), "large": cpu(large)}))
""")


@pytest.mark.cost
def test_read_cost_per_input_byte(tmp_path):
    """read_metadata + the template-free load (which allocates what the metadata describes), on
    each shape, in a fresh process: peak memory (VmHWM, reset before the load) per metadata byte
    below DCP_MEMORY_PER_BYTE, and 8x the items costs less than DCP_TIME_RATIO x the CPU time."""
    if not sys.platform.startswith("linux"):
        pytest.skip("peak memory is read from /proc/self (Linux)")
    n = 4000
    forge_dcp(tmp_path / "tiny", DCP_SHAPES["scalars"](8))
    report = []
    for shape, build in DCP_SHAPES.items():
        for size, count in (("small", n // 8), ("large", n)):
            forge_dcp(tmp_path / f"{shape}-{size}", build(count))
        out = subprocess.run([sys.executable, "-c", _COST, str(tmp_path / "tiny"),
                              str(tmp_path / f"{shape}-small"), str(tmp_path / f"{shape}-large")],
                             capture_output=True, text=True, check=True)
        cost = json.loads(out.stdout)
        size = (tmp_path / f"{shape}-large" / METADATA_FILE).stat().st_size
        report.append((shape, cost["memory"] / size, cost["large"] / max(cost["small"], 1e-3)))
    print("\n".join(f"{shape}: {memory:.1f} bytes of memory per metadata byte, 8x the items: "
                    f"{time:.1f}x the CPU time" for shape, memory, time in report))
    for shape, memory, time in report:
        assert memory <= DCP_MEMORY_PER_BYTE and time <= DCP_TIME_RATIO, report


def test_float4_x2_is_refused_before_anything_is_written(tmp_path):
    """A torch.float4_e2m1fn_x2 tensor, which the DCP metadata cannot name, is refused by the
    writer's prepare_local_plan, naming the tensor and what to do, before any file (not even
    the directory) is written."""
    x = torch.arange(8, dtype=torch.uint8).reshape(2, 4).view(torch.float4_e2m1fn_x2)
    path = tmp_path / "ckpt"
    with pytest.raises((safeckpt.InvalidValueError, CheckpointException),
                       match=r"(?s)'x'.*float4_e2m1fn_x2.*safeckpt\.torch\.save"):
        dcp.save({"x": x, "y": torch.ones(3)}, storage_writer=SafeckptWriter(path))
    assert not path.exists()
