"""safeckpt.dcp on remote storage (issue 14, FORMAT.md section 12): SafeckptWriter and
SafeckptReader on fsspec URLs and filesystems; memory:// in this process, moto's S3 server for the
multi-process jobs (memory:// is one process's)."""

import uuid

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)
pytest.importorskip("fsspec")

import torch.distributed.checkpoint as dcp  # noqa: E402
from fsspec.implementations.memory import MemoryFileSystem  # noqa: E402
from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402
from torch.distributed.checkpoint.metadata import MetadataIndex  # noqa: E402
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem  # noqa: E402

import safeckpt  # noqa: E402
from safeckpt.dcp import (DATA_FILE, METADATA_FILE, SafeckptReader,  # noqa: E402
                          SafeckptWriter)
from safeckpt.errors import ObjectChangedError  # noqa: E402
from safeckpt.tree import same  # noqa: E402

import dcp_jobs  # noqa: E402

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("backend")]

FAILED = (CheckpointException, Exception)  # CheckpointException is a BaseException
ROWS, COLS = 1024, 1024  # "big": 4 MiB of float32, more than a coalescing gap [RS6] on each side


def failure(info):
    """The text of an exception and, for DCP's CheckpointException, of each rank's failure."""
    failures = getattr(info.value, "failures", {})
    return " ".join([str(info.value)] + [f"{type(e).__name__}: {e}" for e in failures.values()])


class Recording(MemoryFileSystem):
    """memory:// that records each ranged read ``(path, start, end)`` and each object written,
    and can replace an object's bytes when a read first reaches a given offset."""

    cachable = False  # an instance of its own per test (fsspec caches filesystem instances)

    def __init__(self):
        super().__init__()
        self.reads, self.written = [], []
        self.replace = None  # (path, from offset, new bytes): swapped in before that read

    def cat_file(self, path, start=None, end=None, **kwargs):
        path = self._strip_protocol(path)
        if self.replace and self.replace[0] == path and (start or 0) >= self.replace[1]:
            self.pipe_file(path, self.replace[2])
            self.replace = None
        self.reads.append((path, start, end))
        return super().cat_file(path, start, end, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        if "w" in mode:
            self.written.append(self._strip_protocol(path).rsplit("/", 1)[-1])
        return super()._open(path, mode, **kwargs)

    def pipe_file(self, path, value, **kwargs):
        self.written.append(self._strip_protocol(path).rsplit("/", 1)[-1])
        return super().pipe_file(path, value, **kwargs)


@pytest.fixture
def mem():
    """A fresh Recording filesystem and a directory of this test's own in it (removed after)."""
    fs = Recording()
    root = f"/h5-{uuid.uuid4().hex}"
    yield fs, root + "/ckpt"
    if fs.exists(root):
        fs.rm(root, recursive=True)


def big_state():
    return {"big": torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS),
            "small": torch.arange(6, dtype=torch.int64), "cfg": {"lr": 0.1, "name": "run"}}


# -- save and load: URLs, fs objects, the metadata last ------------------------------------------

def test_round_trip_through_a_memory_url():
    url = f"memory://h5-{uuid.uuid4().hex}/step-1"
    state = dcp_jobs.reference()
    try:
        dcp.save(state, storage_writer=SafeckptWriter(url))
        fs = MemoryFileSystem()
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(url, detail=False))
        assert names == [DATA_FILE.format(0), METADATA_FILE]
        assert SafeckptReader.validate_checkpoint_id(url)
        assert SafeckptWriter.validate_checkpoint_id(url)
        back = dcp_jobs.reference(seed=1)
        dcp.load(back, storage_reader=SafeckptReader(url))
        assert same(back, state)
        # the object is the .sckpt file a local save writes: safeckpt.open reads it by URL
        with safeckpt.open(url + "/" + METADATA_FILE) as f:
            assert not f.keys()
    finally:
        MemoryFileSystem().rm(url.split("/step-1")[0], recursive=True)
    assert not SafeckptReader.validate_checkpoint_id(url)


def test_fs_object_and_checkpoint_id(mem):
    """fs= takes a path inside the filesystem; dcp.save(checkpoint_id=...) moves the writer there,
    and the metadata is the last object written, after every data file."""
    fs, path = mem
    state = big_state()
    dcp.save(state, checkpoint_id=path + "-b", storage_writer=SafeckptWriter(path, fs=fs))
    assert fs.written[-1] == METADATA_FILE and DATA_FILE.format(0) in fs.written
    assert not fs.exists(path) and fs.exists(path + "-b/" + METADATA_FILE)
    back = {"big": torch.zeros(ROWS, COLS), "small": torch.zeros(6, dtype=torch.int64),
            "cfg": {"lr": 0.0, "name": ""}}
    dcp.load(back, storage_reader=SafeckptReader(path + "-b", fs=fs))
    assert same(back, state)


def test_storage_options_with_a_local_path_refused(tmp_path):
    for cls in (SafeckptWriter, SafeckptReader):
        with pytest.raises(safeckpt.InvalidValueError, match="local path"):
            cls(tmp_path, storage_options={"anon": True})


def test_a_failed_save_leaves_no_metadata_and_removes_an_earlier_one(mem):
    """The metadata of an earlier save to the same place is removed before any rank writes, so
    a failed save leaves no metadata naming a mix of old and new data files: a reader refuses."""
    fs, path = mem
    dcp.save(big_state(), storage_writer=SafeckptWriter(path, fs=fs))
    assert fs.exists(path + "/" + METADATA_FILE)

    class Scheduler:
        pass

    with pytest.raises(FAILED) as info:
        dcp.save({**big_state(), "sched": Scheduler()}, storage_writer=SafeckptWriter(path, fs=fs))
    assert "cannot save a" in failure(info)
    assert not fs.exists(path + "/" + METADATA_FILE)
    with pytest.raises(FAILED) as info:
        dcp.load(big_state(), storage_reader=SafeckptReader(path, fs=fs))
    assert METADATA_FILE in failure(info)


def test_data_file_smaller_than_the_metadata_says_refused(mem):
    """The data files' sizes come from one listing of the directory, before DCP plans."""
    fs, path = mem
    dcp.save(big_state(), storage_writer=SafeckptWriter(path, fs=fs))
    fs.pipe_file(f"{path}/{DATA_FILE.format(0)}", safeckpt.save_bytes({"x": np.zeros(1)}))
    with pytest.raises(safeckpt.HeaderError, match=r"'data-00000.sckpt' is \d+ bytes"):
        SafeckptReader(path, fs=fs).read_metadata()
    fs.rm(f"{path}/{DATA_FILE.format(0)}")
    with pytest.raises(FileNotFoundError, match="no such object") as info:
        SafeckptReader(path, fs=fs).read_metadata()
    assert info.value.filename.endswith(f"ckpt/{DATA_FILE.format(0)}")


# -- what a load fetches --------------------------------------------------------------------------

class Planner:
    """The two calls of a LoadPlanner that read_data makes for tensors, into ``targets``."""

    def __init__(self, targets):
        self.targets = targets
        self.committed = []

    def resolve_tensor(self, item):
        tensor = self.targets[item.dest_index.fqn]
        for dim, (offset, length) in enumerate(zip(item.dest_offsets, item.lengths)):
            tensor = tensor.narrow(dim, offset, length)
        return tensor

    def commit_tensor(self, item, tensor):
        self.committed.append(item.dest_index.fqn)


def read_part(reader, fqn, offsets, lengths):
    """What a resharded load's rank asks of the stored chunk of ``fqn`` (saved whole, at 0):
    the part at ``offsets`` of ``lengths``, read by read_data into a fresh tensor."""
    metadata = reader.read_metadata()
    reader.set_up_storage_reader(metadata, True)
    target = torch.full(lengths, -1.0)
    item = ReadItem(type=LoadItemType.TENSOR, dest_index=MetadataIndex(fqn, [0] * len(offsets)),
                    dest_offsets=torch.Size([0] * len(offsets)),
                    storage_index=MetadataIndex(fqn, [0] * len(offsets)),
                    storage_offsets=torch.Size(offsets), lengths=torch.Size(lengths))
    planner = Planner({fqn: target})
    reader.read_data(LoadPlan([item]), planner).wait()
    assert planner.committed == [fqn]
    return target


def tensor_reads(fs, path, name):
    """The tensor's bytes [start, end) in the data file, and a function that gives the ranged
    reads of the data file since then that reached into them, less those from byte 0: opening's
    prefix and header [RS1] and their re-read [RS4]."""
    data = f"{path}/{DATA_FILE.format(0)}"
    with safeckpt.open(data, fs=fs) as f:
        info = f.info(name)
    start, end = info.offset, info.offset + info.nbytes
    fs.reads.clear()
    return start, end, lambda: [(s, e) for p, s, e in fs.reads
                                if p == data and s and s < end and e > start]


def header_reads(fs, path):
    """The reads of the data file from byte 0 (see tensor_reads)."""
    return sum(p == f"{path}/{DATA_FILE.format(0)}" and not s for p, s, _ in fs.reads)


def test_resharded_read_fetches_only_the_rows_it_needs(mem):
    """A part of a stored chunk (rows 256..511 of 1024) is fetched alone: no byte of the tensor
    outside it [RS6], and its values are right. verify=True fetches (and checks) the whole chunk."""
    fs, path = mem
    dcp.save(big_state(), storage_writer=SafeckptWriter(path, fs=fs))
    start, end, reads = tensor_reads(fs, path, "big")
    row = COLS * 4
    part = read_part(SafeckptReader(path, fs=fs), "big", [256, 0], [256, COLS])
    assert torch.equal(part, big_state()["big"][256:512])
    fetched = reads()
    assert fetched and all(start + 256 * row <= s and e <= start + 512 * row for s, e in fetched)
    assert sum(e - s for s, e in fetched) == 256 * row
    assert header_reads(fs, path) == 2  # opening, and the header again after the part [RS4]

    fs.reads.clear()
    read_part(SafeckptReader(path, fs=fs, verify=True), "big", [256, 0], [256, COLS])
    assert min(s for s, _ in reads()) <= start and max(e for _, e in reads()) >= end


def test_resharded_read_of_columns_and_of_nothing(mem):
    """A part that is not whole rows is fetched from its first element to its last; an empty
    part fetches nothing of the tensor."""
    fs, path = mem
    dcp.save(big_state(), storage_writer=SafeckptWriter(path, fs=fs))
    start, end, reads = tensor_reads(fs, path, "big")
    row = COLS * 4
    part = read_part(SafeckptReader(path, fs=fs), "big", [10, 100], [3, 8])
    assert torch.equal(part, big_state()["big"][10:13, 100:108])
    assert all(start + 10 * row + 400 <= s and e <= start + 12 * row + 432 for s, e in reads())
    reads_before = len(reads())
    empty = read_part(SafeckptReader(path, fs=fs), "big", [5, 0], [0, COLS])
    assert empty.shape == (0, COLS) and len(reads()) == reads_before


def test_object_replaced_during_a_resharded_read(mem):
    """The bytes of a part cannot be checked against the tensor's CRC32C, so the data file's
    header is fetched again after them [RS4]: an object replaced in between is
    ObjectChangedError, never a mix. A whole chunk is checked by its CRC32C (ChecksumError)."""
    fs, path = mem
    dcp.save(big_state(), storage_writer=SafeckptWriter(path, fs=fs))
    data = f"{path}/{DATA_FILE.format(0)}"
    with safeckpt.open(data, fs=fs) as f:
        offset = f.info("big").offset
    other = big_state()
    other["big"] += 1  # the same layout, other bytes and CRCs
    dcp.save(other, storage_writer=SafeckptWriter(path + "-other", fs=fs))
    replacement = fs.cat_file(f"{path}-other/{DATA_FILE.format(0)}")
    assert len(replacement) == fs.size(data)

    fs.replace = (data, offset, replacement)
    with pytest.raises(ObjectChangedError, match=r"data-00000.sckpt'?: the object changed"):
        read_part(SafeckptReader(path, fs=fs), "big", [256, 0], [256, COLS])

    dcp.save(big_state(), storage_writer=SafeckptWriter(path, fs=fs))  # the original again
    fs.replace = (data, offset, replacement)
    with pytest.raises(safeckpt.ChecksumError, match="'big'"):
        read_part(SafeckptReader(path, fs=fs, verify=True), "big", [256, 0], [256, COLS])


# -- multi-process jobs on S3 (moto's server on 127.0.0.1) ---------------------------------------

def test_save_2_ranks_load_4_ranks_on_s3(s3, backend, monkeypatch):
    """Real gloo jobs on an s3:// URL. The children reach moto's server through botocore's
    AWS_ENDPOINT_URL_S3 (the rest of the environment is the fixture's), with no storage_options,
    and use this test's backend."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.server.endpoint)
    monkeypatch.setenv("SAFECKPT_BACKEND", backend)
    url = s3.url("run/step-100")
    dcp_jobs.run(2, "save", url)
    keys = sorted(key.rsplit("/", 1)[-1] for key in s3.fs.ls(url, detail=False))
    assert keys == [DATA_FILE.format(0), DATA_FILE.format(1), METADATA_FILE]
    dcp_jobs.run(4, "load", url)  # resharded over 4 ranks, compared with the reference
    state = dcp_jobs.reference(seed=1)
    dcp.load(state, storage_reader=SafeckptReader(url, storage_options=s3.storage_options))
    assert same(state, dcp_jobs.reference())
