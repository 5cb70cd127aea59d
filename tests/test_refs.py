"""References between files (incremental checkpoints): FORMAT.md section 11, rules [X1]-[X8],
under both backends. Hostile files are forged from the spec (tests/forge.py), never by safeckpt's
writer."""

import os
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import safeckpt
from safeckpt import format as fmt
from safeckpt import writer
from safeckpt.api import consolidate, save_plan
from safeckpt.errors import RefError
from safeckpt.reader import Reader
from safeckpt.refs import LinkedReader, referrers
from forge import crc32c, forge, refs_map, table_of, u32s

pytestmark = pytest.mark.usefixtures("backend")

W = np.arange(6, dtype=np.float32).reshape(2, 3)  # 24 bytes
E = np.zeros((0, 3), np.int16)  # empty
B = np.arange(5, dtype=np.int16)  # 10 bytes
OWN = np.full(3, 7, np.int64)
SID_A, SID_B = bytes(range(16)), bytes(range(16, 32))
CRC_REFS = 0x1 | 0x4  # TENSOR_CRC | REFS


def target_bytes(tensors=None, save_id=SID_A, **kw):
    """The file referred to: ``w``, the empty ``e`` and ``b``, with a save id (version 1.4)."""
    extra = {} if save_id is None else {"save_id": save_id}
    return forge({"w": W, "e": E, "b": B} if tensors is None else tensors, minor=4,
                 extra={**extra, **kw.pop("extra", {})}, **kw)


def referring_bytes(target, refs=None, *, edit_refs=None, files=None, **kw):
    """A file that stores ``own`` and refers to ``w`` and ``e`` of ``target`` (file a.sckpt)."""
    entries = table_of(target)
    if refs is None:
        refs = [("w", 0, entries["w"]), ("e", 0, entries["e"])]
    mapping = refs_map(files or [("a.sckpt", SID_A, target)], refs)
    if edit_refs is not None:
        edit_refs(mapping)
    extra = {"save_id": SID_B, "refs": mapping, **kw.pop("extra", {})}
    return forge({"own": OWN}, minor=kw.pop("minor", 4), flags=kw.pop("flags", CRC_REFS),
                 extra=extra, **kw)


def write_pair(tmp_path, target=None, referring=None, **kw):
    """Write a.sckpt (the target) and b.sckpt (referring to it); return b.sckpt's path."""
    target = target_bytes() if target is None else target
    (tmp_path / "a.sckpt").write_bytes(target)
    (tmp_path / "b.sckpt").write_bytes(referring_bytes(target, **kw) if referring is None
                                       else referring)
    return tmp_path / "b.sckpt"


def refuse(path_or_data, error, *words, **kw):
    """Opening (and loading) must raise ``error`` with ``words`` in its message."""
    with pytest.raises(error) as info:
        if isinstance(path_or_data, bytes):
            Reader(path_or_data, allow_refs=True, **kw)
        else:
            with safeckpt.open(path_or_data, **kw) as reader:
                reader.load_all()
    message = str(info.value)
    for word in words:
        assert word in message, message
    return info.value


# -- a valid file with references --------------------------------------------------------------

@pytest.mark.parametrize("mmap", [True, False])
def test_forged_file_with_references_opens_and_loads(tmp_path, mmap):
    path = write_pair(tmp_path)
    with safeckpt.open(path, mmap=mmap) as f:
        assert isinstance(f, LinkedReader) and f.version == (1, 4) and f.save_id == SID_B
        assert f.keys() == ["own", "w", "e"]
        assert np.array_equal(f["w"], W) and np.array_equal(f["own"], OWN)
        assert f["e"].shape == (0, 3)
        assert os.path.basename(f.shard_of("w")) == "a.sckpt"
        assert os.path.basename(f.shard_of("own")) == "b.sckpt"
        assert f.info("w").name == "w" and f.info("w").offset == table_of(target_bytes())["w"][0]
        assert f.references() == [("a.sckpt", 2, 24)]
        assert np.array_equal(f.get_slice("w")[1:], W[1:])
        f.verify()
        f.verify(["w"], arrays={"w": W})
        loaded = f.load_all(verify=True)
        assert list(loaded) == ["own", "w", "e"] and np.array_equal(loaded["w"], W)
        assert f.tree["w"].shape == (2, 3)
    assert "closed" in repr(f)


def test_plain_reader_holds_only_own_tensors_and_refuses_without_allow_refs(tmp_path):
    data = referring_bytes(target_bytes())
    with Reader(data, allow_refs=True) as reader:
        assert reader.keys() == ["own"] and reader.refs.names == ["w", "e"]
        assert reader.references() == [("a.sckpt", 2, 24)]
        assert reader.refs.tree is fmt.NO_TREE and list(reader.load()) == ["own"]
    with pytest.raises(RefError, match=r"safeckpt\.open"):
        Reader(data)
    with pytest.raises(RefError, match=r"a\.sckpt"):
        safeckpt.load_bytes(data)


def refuse_opening(data, error, *words):
    with pytest.raises(error) as info:
        Reader(data, allow_refs=True)
    for word in words:
        assert word in str(info.value), str(info.value)


# -- [X1] save_id --------------------------------------------------------------------------------

@pytest.mark.parametrize("save_id", [bytes(15), bytes(17), "0" * 16, 16, [0] * 16])
def test_X1_save_id_is_16_bytes(save_id):
    refuse_opening(target_bytes(save_id=save_id), safeckpt.HeaderError, "save_id", "[X1]")


def test_X1_save_id_and_refs_need_minor_4():
    refuse_opening(forge({"w": W}, minor=3, extra={"save_id": SID_A}), safeckpt.HeaderError,
                   "save_id", "[H8]")
    refuse_opening(referring_bytes(target_bytes(), minor=3), safeckpt.HeaderError, "1.3")
    # a file of a later minor version may hold keys this reader ignores [H8], but not these
    refuse_opening(forge({"w": W}, minor=9, extra={"save_id": b"x"}), safeckpt.HeaderError, "[X1]")
    with Reader(target_bytes()) as reader:
        assert reader.save_id == SID_A and reader.version == (1, 4)


# -- [X2] flag and key ---------------------------------------------------------------------------

def test_X2_flag_and_key_go_together():
    target = target_bytes()
    refuse_opening(forge({"own": OWN}, minor=4, flags=CRC_REFS), safeckpt.HeaderError, "[X2]")
    refuse_opening(referring_bytes(target, flags=0x1), safeckpt.HeaderError, "'refs'", "[X2]")
    refuse_opening(referring_bytes(target, extra={"shards": {}}, flags=CRC_REFS | 0x2),
                   safeckpt.HeaderError, "SHARD_INDEX", "[X2]")
    refuse_opening(referring_bytes(target, extra={"refs": [1]}), safeckpt.HeaderError, "[X2]")


def test_X2_an_older_reader_refuses_the_flag(monkeypatch, backend):
    """REFS is "must understand" [P4]: a reader that does not know the bit refuses the file."""
    data = referring_bytes(target_bytes())
    assert struct.unpack_from("<I", data, 12)[0] == fmt.FLAG_TENSOR_CRC | fmt.FLAG_REFS == 0x5
    if backend == "python":  # a 1.3 reader's known flags
        monkeypatch.setattr(safeckpt._pybackend, "KNOWN_FLAGS",
                            fmt.FLAG_TENSOR_CRC | fmt.FLAG_SHARD_INDEX)
        refuse_opening(data, safeckpt.UnsupportedVersionError, "flag bits", "[P4]")


# -- [X3] the refs map ---------------------------------------------------------------------------

def _set(key, value):
    def edit(mapping):
        mapping[key] = value
    return edit


def _drop(key):
    return lambda mapping: mapping.pop(key)


X3_CASES = {
    "missing key": (_drop("sizes"), "exactly the keys"),
    "unknown key": (_set("extra", 1), "exactly the keys"),
    "files not an array": (_set("files", "a.sckpt"), "refs['files']"),
    "file column not bin": (_set("file", [0, 0]), "refs['file']"),
    "no files": (lambda m: m.update(files=[], save_ids=[], header_crcs=[], sizes=[]), "from 1"),
    "lengths differ": (lambda m: m["sizes"].append(100), "one length"),
    "parent directory": (_set("files", ["../a.sckpt"]), "plain file name"),
    "absolute": (_set("files", ["/etc/a.sckpt"]), "plain file name"),
    "subdirectory": (_set("files", ["d/a.sckpt"]), "plain file name"),
    "backslash": (_set("files", ["C:\\a.sckpt"]), "plain file name"),
    "NUL": (_set("files", ["a\0.sckpt"]), "plain file name"),
    "hidden": (_set("files", [".a.sckpt"]), "plain file name"),
    "not .sckpt": (_set("files", ["a.safetensors"]), "plain file name"),
    "too long": (_set("files", ["a" * 250 + ".sckpt"]), "plain file name"),
    "not a str": (_set("files", [3]), "plain file name"),
    "save id short": (_set("save_ids", [bytes(15)]), "save_id"),
    "header_crc negative": (_set("header_crcs", [-1]), "header_crc"),
    "header_crc over u32": (_set("header_crcs", [1 << 32]), "header_crc"),
    "header_crc a bool": (_set("header_crcs", [True]), "header_crc"),
    "size under 32": (_set("sizes", [31]), "size"),
    "size 2**63": (_set("sizes", [1 << 63]), "size"),
    "file index past k": (_set("file", u32s([0, 1])), "not below"),
    "names empty": (lambda m: m.update(names=[], file=b"", dtypes=b"", ndims=b"", shape=b"",
                                       offsets=b"", nbytes=b"", crc32c=b""), "at least one"),
    "name empty": (_set("names", ["w", ""]), "non-empty"),
    "name not a str": (_set("names", ["w", 5]), "non-empty"),
    "name twice": (_set("names", ["w", "w"]), "twice"),
    "name of an own tensor": (_set("names", ["own", "e"]), "twice"),
    "dtypes short": (_set("dtypes", b"\x0a"), "refs['dtypes']"),
    "offsets long": (lambda m: m.update(offsets=m["offsets"] + bytes(8)), "refs['offsets']"),
    "crc32c short": (lambda m: m.update(crc32c=m["crc32c"][:4]), "refs['crc32c']"),
    "shape short": (lambda m: m.update(shape=m["shape"][:8]), "refs['shape']"),
}


@pytest.mark.parametrize("case", sorted(X3_CASES))
def test_X3_refs_map(case, tmp_path):
    edit, words = X3_CASES[case]
    data = referring_bytes(target_bytes(), edit_refs=edit)
    refuse_opening(data, safeckpt.HeaderError, words)
    (tmp_path / "b.sckpt").write_bytes(data)
    (tmp_path / "a.sckpt").write_bytes(target_bytes())
    refuse(tmp_path / "b.sckpt", safeckpt.HeaderError, words)


def test_X3_same_file_twice_and_a_file_without_reference():
    target = target_bytes()
    w = table_of(target)["w"]
    files = [("a.sckpt", SID_A, target), ("a.sckpt", SID_A, target)]
    refuse_opening(referring_bytes(target, [("w", 0, w), ("e", 1, table_of(target)["e"])],
                                   files=files), safeckpt.HeaderError, "twice", "[X3]")
    files = [("a.sckpt", SID_A, target), ("c.sckpt", SID_A, target)]
    refuse_opening(referring_bytes(target, [("w", 0, w)], files=files), safeckpt.HeaderError,
                   "'c.sckpt' holds no reference", "[X3]")


def test_X4_names_count_against_max_tensors():
    data = referring_bytes(target_bytes())
    with pytest.raises(safeckpt.LimitError, match="max_tensors"):
        Reader(data, allow_refs=True, max_tensors=2)
    Reader(data, allow_refs=True, max_tensors=3).close()


# -- [X4] each reference's entry ------------------------------------------------------------------

def _entry(target, **change):
    offset, nbytes, crc, code, shape = table_of(target)["w"]
    values = {**dict(offset=offset, nbytes=nbytes, crc=crc, code=code, shape=shape), **change}
    return [("w", 0, (values["offset"], values["nbytes"], values["crc"], values["code"],
                      values["shape"]))]


@pytest.mark.parametrize("change, error, words", [
    (dict(code=99), safeckpt.UnsupportedDtypeError, "code 99"),
    (dict(shape=(1,) * 40, nbytes=4), safeckpt.LimitError, "dimensions"),
    (dict(shape=(2, 1 << 63), nbytes=0), safeckpt.LayoutError, "[T3]"),
    (dict(shape=(1 << 62, 4), nbytes=0), safeckpt.LayoutError, "too large"),
    (dict(nbytes=23), safeckpt.LayoutError, "[T5]"),
    (dict(offset=(1 << 64) - 8), safeckpt.LayoutError, "[X4]"),
    (dict(offset=len(target_bytes()) - 23), safeckpt.LayoutError, "[X4]"),
])
def test_X4_reference_entries(tmp_path, change, error, words):
    target = target_bytes()
    data = referring_bytes(target, _entry(target, **change))
    refuse_opening(data, error, words, "reference 'w'")
    refuse(write_pair(tmp_path, target, data), error, words)


def test_X4_reference_entries_screened_among_many():
    """The numpy screen flags exactly what the rules refuse, wherever it is in a long column."""
    target = target_bytes()
    good = _entry(target)[0][2]
    refs = [(f"r{i}", 0, good) for i in range(100)]
    Reader(referring_bytes(target, refs), allow_refs=True).close()
    for bad, error in [((good[0], 23, good[2], good[3], good[4]), safeckpt.LayoutError),
                       ((good[0], 0, good[2], 10, (0, 1 << 60)), None),  # 2**62 bytes if
                       ((good[0], 0, good[2], 1, (1 << 61, 0)), None),  # not for the zero
                       ((good[0], 8, good[2], 1, (1 << 61, 0)), safeckpt.LayoutError),
                       ((good[0], 0, good[2], 10, (0, 1 << 61)), safeckpt.LayoutError)]:
        forged = referring_bytes(target, refs[:57] + [("bad", 0, bad)] + refs[57:])
        if error is None:
            Reader(forged, allow_refs=True).close()
        else:
            refuse_opening(forged, error, "reference 'bad'")


# -- [X5] the files referred to ------------------------------------------------------------------

def test_X5_missing_file_and_directory(tmp_path):
    path = write_pair(tmp_path)
    os.unlink(tmp_path / "a.sckpt")
    with pytest.raises(FileNotFoundError) as info:
        safeckpt.open(path)
    assert info.value.filename == str(tmp_path / "a.sckpt") and "b.sckpt" in str(info.value)
    assert "[X5]" in str(info.value)
    os.mkdir(tmp_path / "a.sckpt")
    with pytest.raises(IsADirectoryError):
        safeckpt.open(path, mmap=False)


@pytest.mark.parametrize("case, words", [
    ("no save_id", "has no save_id"),
    ("another save_id", "has save_id"),
    ("another size", "bytes, not"),
    ("another header_crc", "header_crc"),
    ("no checksums", "no checksums"),
    ("shard index", "not a .sckpt file of tensors"),
    ("itself", "itself"),
])
@pytest.mark.parametrize("mmap", [True, False])
def test_X5_file_is_not_the_one_saved_against(tmp_path, case, words, mmap):
    """Each check of [X5] on the file, everything else matching: the refs map gives the file's
    real size and header_crc (but the one under test)."""
    target, name = target_bytes(), "a.sckpt"
    edit = None
    if case == "no save_id":
        target = target_bytes(save_id=None)
    elif case == "another save_id":
        target = target_bytes(save_id=SID_B[::-1])
    elif case == "another size":
        edit = lambda m: m.update(sizes=[len(target) + 64])  # noqa: E731
    elif case == "another header_crc":
        edit = lambda m: m.update(header_crcs=[m["header_crcs"][0] ^ 1])  # noqa: E731
    elif case == "no checksums":
        target = target_bytes(checksum=False)
    elif case == "shard index":
        target = forge({}, minor=4, flags=0x2, checksum=False,
                       extra={"shards": {}, "save_id": SID_A})
    elif case == "itself":
        name = "b.sckpt"
    entries = table_of(target)
    w = entries["w"][:2] + (entries["w"][2] or 0,) + entries["w"][3:] if entries else None
    refs = [("w", 0, w or (0, 0, 0, 10, (0,)))]
    (tmp_path / "a.sckpt").write_bytes(target)
    referring = referring_bytes(target, refs, files=[(name, SID_A, target)], edit_refs=edit)
    (tmp_path / "b.sckpt").write_bytes(referring)
    with pytest.raises(RefError) as info:
        safeckpt.open(tmp_path / "b.sckpt", mmap=mmap)
    message = str(info.value)
    assert words in message and "[X5]" in message and "b.sckpt" in message, message
    assert name in message.replace("b.sckpt' refers", "")


def test_X5_file_saved_again_since(tmp_path):
    """The same tensors saved again (a new save id and header CRC) no longer match."""
    path = write_pair(tmp_path)
    (tmp_path / "a.sckpt").write_bytes(target_bytes(save_id=bytes(16)))
    refuse(path, RefError, "header_crc", "[X5]")


def test_X5_an_invalid_target_is_refused_by_its_own_rules(tmp_path):
    target = bytearray(target_bytes())
    referring = referring_bytes(bytes(target))
    target[40] ^= 1  # a header bit: [P8]
    (tmp_path / "a.sckpt").write_bytes(bytes(target))
    (tmp_path / "b.sckpt").write_bytes(referring)
    refuse(tmp_path / "b.sckpt", safeckpt.ChecksumError, "a.sckpt", "[P8]")


@pytest.mark.parametrize("change, words", [
    (dict(offset=None), "stores no"),  # into the middle of w
    (dict(code=9, nbytes=12, shape=(6,)), "stores no"),  # another dtype at w's offset
    (dict(shape=(3, 2)), "stores no"),  # another shape
    (dict(crc=0), "stores no"),  # another CRC32C
])
def test_X5_the_entry_in_the_file(tmp_path, change, words):
    target = target_bytes()
    if change.get("offset", 0) is None:
        change["offset"] = table_of(target)["w"][0] + 8
        change["nbytes"], change["shape"] = 16, (4,)
        change["crc"] = crc32c(W.tobytes()[8:24])
    refuse(write_pair(tmp_path, target, referring_bytes(target, _entry(target, **change))),
           RefError, words, "reference 'w'", "[X5]")


def test_X5_empty_tensors_are_found_by_dtype_and_shape(tmp_path):
    """Empty tensors may share an offset with the next tensor: the reference names one of them."""
    target = target_bytes({"e1": np.zeros(0, np.int8), "e2": E, "w": W})
    entries = table_of(target)
    assert entries["e1"][0] == entries["e2"][0] == entries["w"][0]
    refs = [("x", 0, entries["e2"]), ("y", 0, entries["e1"]), ("w", 0, entries["w"])]
    with safeckpt.open(write_pair(tmp_path, target, referring_bytes(target, refs))) as f:
        assert f["x"].shape == (0, 3) and f["y"].dtype == np.int8 and np.array_equal(f["w"], W)
    wrong = [("x", 0, entries["e2"][:4] + ((0, 4),))]
    refuse(write_pair(tmp_path, target, referring_bytes(target, wrong)), RefError, "stores no")


@pytest.mark.parametrize("link", ["hard link", "symlink"])
@pytest.mark.parametrize("mmap", [True, False])
def test_X5_the_file_itself_under_another_name(tmp_path, link, mmap):
    """A file without a save_id that refers to a.sckpt, where a.sckpt is that very file (a hard
    link or a symlink): the same device and inode is the referring file itself [X5]."""
    target = target_bytes()
    b = tmp_path / "b.sckpt"
    b.write_bytes(forge({"own": OWN}, minor=4, flags=CRC_REFS, extra={"refs": refs_map(
        [("a.sckpt", SID_A, target)], [("w", 0, table_of(target)["w"])])}))
    (os.link if link == "hard link" else os.symlink)(b, tmp_path / "a.sckpt")
    refuse(b, RefError, "a.sckpt", "is the referring file itself", "[X5]", mmap=mmap)


def test_X5_no_chains(tmp_path):
    """A reference points at bytes the file stores itself: never at one of its references, and
    the references of a file referred to are never followed."""
    a = target_bytes()
    b = referring_bytes(a)  # stores own, refers to w and e in a
    (tmp_path / "a.sckpt").write_bytes(a)
    (tmp_path / "b.sckpt").write_bytes(b)
    w_in_a = table_of(a)["w"]
    # c refers to 'w' "in b", at w's offset in a: b's own table has nothing there
    chain = forge({"z": B}, minor=4, flags=CRC_REFS, extra={"refs": refs_map(
        [("b.sckpt", SID_B, b)], [("w", 0, w_in_a)])})
    (tmp_path / "c.sckpt").write_bytes(chain)
    refuse(tmp_path / "c.sckpt", RefError, "stores no", "[X5]")
    # d refers to b's own tensor: it opens even once a (which b refers to) is gone
    d = forge({"z": B}, minor=4, flags=CRC_REFS, extra={"refs": refs_map(
        [("b.sckpt", SID_B, b)], [("own", 0, table_of(b)["own"])])})
    (tmp_path / "d.sckpt").write_bytes(d)
    os.unlink(tmp_path / "a.sckpt")
    with safeckpt.open(tmp_path / "d.sckpt") as f:
        assert np.array_equal(f["own"], OWN)
        f.verify()


# -- [X6] the bytes of a reference ----------------------------------------------------------------

def test_X6_corrupt_referenced_bytes(tmp_path):
    target = bytearray(target_bytes())
    path = write_pair(tmp_path, bytes(target))
    offset = table_of(bytes(target))["w"][0]
    target[offset + 5] ^= 0x10
    (tmp_path / "a.sckpt").write_bytes(bytes(target))
    with safeckpt.open(path) as f:  # the tables are valid: it opens; the bytes are checked
        with pytest.raises(safeckpt.ChecksumError, match=r"a\.sckpt.*'w'"):
            f.verify()
        with pytest.raises(safeckpt.ChecksumError, match="a.sckpt"):
            f.load_all(verify=True)
        with pytest.raises(safeckpt.ChecksumError):
            f.raw_bytes("w", verify=True)
        f.verify(["own", "e"])
    with safeckpt.open(path, mmap=False) as f:
        with pytest.raises(safeckpt.ChecksumError, match="a.sckpt"):
            f["w"]  # read into memory: checked by default
        with pytest.raises(safeckpt.ChecksumError):
            safeckpt.load(path, mmap=False)


# -- writing references (Plan, save_plan) ---------------------------------------------------------

def saved_base(tmp_path, tensors=None, name="step-1.sckpt"):
    tensors = {"base": np.arange(100, dtype=np.float32), "lora": np.zeros(4)} if tensors is None \
        else tensors
    save_plan(writer.Plan(tensors, {"step": 1}, 64, True, save_id=fmt.new_save_id()),
              tmp_path / name)
    return tmp_path / name, tensors


@pytest.mark.parametrize("mmap", [True, False])
def test_writer_refs_round_trip_with_tree(tmp_path, mmap):
    path, base = saved_base(tmp_path)
    with safeckpt.open(path, mmap=mmap) as prev:
        loc = prev.location("base")
        assert loc.file == "step-1.sckpt" and loc.nbytes == 400 and loc.save_id == prev.save_id
        raw = prev.raw_bytes("base")
        assert raw.dtype == np.uint8 and raw.ndim == 1 and not raw.flags.writeable
        assert bytes(raw) == base["base"].tobytes()
    state = {"model": {"base": base["base"], "lora": np.ones(4)}, "step": 2, "tied": base["base"]}
    tree, names, arrays = safeckpt.tree.flatten(state)
    plan = writer.Plan(dict(zip(names, arrays)), None, 64, True, tree=tree,
                       refs={"model.base": loc}, save_id=fmt.new_save_id())
    assert plan.names == ["model.lora"] and plan.ref_names == ["model.base"]
    assert plan.minor == 4 and plan.flags == fmt.FLAG_TENSOR_CRC | fmt.FLAG_REFS
    save_plan(plan, tmp_path / "step-2.sckpt")
    # the data section holds lora's 32 bytes only: base's 400 are not written again
    assert os.path.getsize(tmp_path / "step-2.sckpt") == plan.file_size
    assert plan.file_size - fmt.align_up(plan.header_end, 64) == 32
    back = safeckpt.load(tmp_path / "step-2.sckpt", mmap=mmap)
    assert back["step"] == 2 and back["tied"] is back["model"]["base"]
    assert np.array_equal(back["model"]["base"], base["base"]) and list(back["model"]) == [
        "base", "lora"]
    with safeckpt.open(tmp_path / "step-2.sckpt", mmap=mmap) as f:
        # a reference's location is where its bytes are: never the referring file [X7]
        assert f.location("model.base") == loc
        assert f.location("model.lora").file == "step-2.sckpt"
        assert bytes(f.raw_bytes("model.base")) == base["base"].tobytes()
        assert f.has_checksums


def test_writer_flat_order_kept_through_a_tree(tmp_path):
    path, base = saved_base(tmp_path)
    with safeckpt.open(path) as prev:
        refs = {"base": prev.location("base")}
    tensors = {"base": base["base"], "new": np.ones(2)}  # the reference comes first
    save_plan(writer.Plan(tensors, None, 64, True, refs=refs), tmp_path / "s.sckpt")
    with safeckpt.open(tmp_path / "s.sckpt") as f:
        assert f.keys() == ["new", "base"] and list(f.load()) == ["base", "new"]
    tensors = {"new": np.ones(2), "base": base["base"]}  # references last: no tree needed
    plan = writer.Plan(tensors, None, 64, True, refs=refs)
    assert plan.tree is fmt.NO_TREE


def test_writer_versions():
    assert writer.Plan({"w": W}, None, 64, True).minor == 0
    plan = writer.Plan({"w": W}, None, 64, True, save_id=SID_A)
    assert plan.minor == 4 and plan.flags == fmt.FLAG_TENSOR_CRC
    with Reader(writer.plan_bytes(plan)) as reader:
        assert reader.save_id == SID_A and reader.location("w") is None  # bytes: no file name
    with pytest.raises(safeckpt.InvalidValueError, match="save_id"):
        writer.Plan({"w": W}, None, 64, True, save_id=b"short")


def test_writer_refuses_bad_references(tmp_path):
    path, base = saved_base(tmp_path)
    with safeckpt.open(path) as prev:
        loc = prev.location("base")
    tensors = {"base": base["base"], "x": np.ones(3)}
    bad = {
        "checksum": (dict(checksum=False), {"base": loc}, "checksum=True"),
        "unknown": ({}, {"nope": loc}, "not one of the tensors"),
        "nbytes": ({}, {"base": loc._replace(nbytes=8)}, "[X4]"),
        "outside": ({}, {"base": loc._replace(offset=loc.size)}, "[X4]"),
        "file": ({}, {"base": loc._replace(file="../x.sckpt")}, "[X3]"),
        "save id": ({}, {"base": loc._replace(save_id=b"1")}, "[X3]"),
        "crc": ({}, {"base": loc._replace(crc32c=-1)}, "u32"),
        "tuple": ({}, {"base": tuple(loc)}, "Location"),
        "two saves": ({}, {"base": loc, "x": loc._replace(nbytes=24, offset=64,
                                                          header_crc=loc.header_crc ^ 1)},
                      "two saves"),
    }
    for case, (kw, refs, words) in bad.items():
        with pytest.raises(safeckpt.InvalidValueError) as info:
            writer.Plan(tensors, None, 64, kw.get("checksum", True), refs=refs)
        assert words in str(info.value), (case, str(info.value))
    plan = writer.Plan(tensors, None, 64, True, refs={"base": loc})
    with pytest.raises(safeckpt.InvalidValueError, match=r"\.sckpt"):
        save_plan(plan, tmp_path / "x.safetensors")
    with pytest.raises(safeckpt.InvalidValueError, match="itself"):
        save_plan(plan, path)  # would replace the file it refers to
    assert safeckpt.open(path).keys() == ["base", "lora"]


# -- consolidate [X8] -----------------------------------------------------------------------------

def test_consolidate(tmp_path):
    path, base = saved_base(tmp_path)
    with safeckpt.open(path) as prev:
        refs = {"base": prev.location("base")}
    state = {"base": base["base"], "lora": np.ones(4), "step": 5}
    tree, names, arrays = safeckpt.tree.flatten(state)
    save_plan(writer.Plan(dict(zip(names, arrays)), {"m": 1}, 64, True, tree=tree, refs=refs,
                          save_id=fmt.new_save_id()), tmp_path / "step-2.sckpt")
    assert referrers(path) == ["step-2.sckpt"] and referrers(tmp_path / "step-2.sckpt") == []
    consolidate(tmp_path / "step-2.sckpt", tmp_path / "full.sckpt")
    with Reader(tmp_path / "full.sckpt") as full:  # self-contained: a plain reader opens it
        assert full.refs is None and not full.flags & fmt.FLAG_REFS and full.save_id is not None
        assert full.metadata == {"m": 1} and full.keys() == ["lora", "base"]
        out = full.load()
        assert list(out) == ["base", "lora", "step"] and np.array_equal(out["base"], base["base"])
        full.verify()
    with pytest.raises(RefError, match="step-2.sckpt"):
        consolidate(tmp_path / "full.sckpt", path)  # step-2 refers to step-1: never replaced
    assert safeckpt.open(tmp_path / "step-2.sckpt").references() == [("step-1.sckpt", 1, 400)]
    consolidate(tmp_path / "step-2.sckpt", tmp_path / "step-2.sckpt")  # in place: nobody refers
    assert referrers(path) == []
    os.unlink(path)
    assert np.array_equal(safeckpt.load(tmp_path / "step-2.sckpt")["base"], base["base"])


def test_consolidate_checks_the_bytes_it_copies(tmp_path):
    path = write_pair(tmp_path)
    target = bytearray((tmp_path / "a.sckpt").read_bytes())
    target[table_of(bytes(target))["w"][0]] ^= 1
    (tmp_path / "a.sckpt").write_bytes(bytes(target))
    with pytest.raises(safeckpt.ChecksumError):
        consolidate(path, tmp_path / "out.sckpt")
    assert not (tmp_path / "out.sckpt").exists()


# -- round trip (hypothesis) ----------------------------------------------------------------------

DTYPES = [np.float32, np.float64, np.int8, np.uint16, np.int64, np.bool_, np.complex64]


@st.composite
def tensors_and_refs(draw):
    count = draw(st.integers(1, 6))
    tensors = {}
    for i in range(count):
        dtype = draw(st.sampled_from(DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        size = int(np.prod(shape, dtype=np.int64))
        values = draw(st.lists(st.integers(0, 255), min_size=size * np.dtype(dtype).itemsize,
                               max_size=size * np.dtype(dtype).itemsize))
        tensors[f"t{i}.{draw(st.sampled_from(['w', 'b']))}"] = np.frombuffer(
            bytes(values), dtype).reshape(shape)
    referred = draw(st.lists(st.sampled_from(sorted(tensors)), unique=True))
    return tensors, referred, draw(st.booleans())


@settings(max_examples=40)
@given(tensors_and_refs())
def test_hypothesis_round_trip(tmp_path_factory, case):
    tensors, referred, mmap = case
    tmp_path = tmp_path_factory.mktemp("rt")
    base = {name: tensors[name] for name in referred}
    save_plan(writer.Plan({**base, "pad": np.ones(3)}, None, 64, True,
                          save_id=fmt.new_save_id()), tmp_path / "a.sckpt")
    with safeckpt.open(tmp_path / "a.sckpt") as prev:
        refs = {name: prev.location(name) for name in referred}
        for name in referred:
            assert bytes(prev.raw_bytes(name)) == np.ascontiguousarray(tensors[name]).tobytes()
    save_plan(writer.Plan(tensors, {"k": 1}, 64, True, refs=refs, save_id=fmt.new_save_id()),
              tmp_path / "b.sckpt")
    with safeckpt.open(tmp_path / "b.sckpt", mmap=mmap) as f:
        loaded = f.load(verify=True)
        assert list(loaded) == list(tensors)
        for name, array in tensors.items():
            assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape
            assert loaded[name].tobytes() == array.tobytes()
            where = "a.sckpt" if name in referred else "b.sckpt"
            assert os.path.basename(f.shard_of(name)) == where
        f.verify()
        assert sum(count for _, count, _ in f.references()) == len(referred)


def test_header_keys_are_known_to_the_format():
    assert fmt.KEY_MINOR["save_id"] == fmt.KEY_MINOR["refs"] == 4 <= fmt.VERSION_MINOR
    target = target_bytes()
    assert list(fmt.REFS_KEYS) == list(refs_map([("a.sckpt", SID_A, target)],
                                                [("w", 0, table_of(target)["w"])]))


def test_X5_a_file_replaced_while_open_with_pread(tmp_path, monkeypatch):
    """mmap=False keeps few descriptors open: a file closed for room and reopened must be the
    same file [X5]."""
    monkeypatch.setattr(safeckpt.shard, "MAX_OPEN_SHARDS", 1)
    a, c = target_bytes(), target_bytes({"v": B}, save_id=SID_B[::-1])
    (tmp_path / "a.sckpt").write_bytes(a)
    (tmp_path / "c.sckpt").write_bytes(c)
    refs = [("w", 0, table_of(a)["w"]), ("v", 1, table_of(c)["v"])]
    data = referring_bytes(a, refs, files=[("a.sckpt", SID_A, a), ("c.sckpt", SID_B[::-1], c)])
    (tmp_path / "b.sckpt").write_bytes(data)
    with safeckpt.open(tmp_path / "b.sckpt", mmap=False) as f:
        assert np.array_equal(f["v"], B)  # closes a.sckpt's descriptor for room
        os.unlink(tmp_path / "a.sckpt")
        (tmp_path / "a.sckpt").write_bytes(target_bytes(save_id=bytes(16)))
        with pytest.raises(RefError, match=r"a\.sckpt.*replaced.*\[X5\]"):
            f["w"]
