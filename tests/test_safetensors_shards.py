"""Hugging Face sharded safetensors (safeckpt/safetensors_shards.py, FORMAT.md section 10,
[HF1]-[HF7]): open and load in place, lazily; write what transformers and huggingface_hub write;
both backends."""

import json
import os
import re
import stat

import numpy as np
import pytest

import safeckpt
from safeckpt import format as fmt
from safeckpt import safetensors_shards as hf
from safeckpt import safetensors_writer, shard
from safeckpt.reader import Reader
from safeckpt.tree import same

pytestmark = pytest.mark.usefixtures("backend")
safe_open = pytest.importorskip("safetensors").safe_open
safetensors_numpy = pytest.importorskip("safetensors.numpy")

# 400 bytes each: with max_shard_size=900, two per shard
TENSORS = {f"layers.{i}.weight": np.full((10, 10), i, np.float32) for i in range(5)}
FILES = [f"model-0000{j}-of-00003.safetensors" for j in (1, 2, 3)]


def write_hf(folder, tensors, per_shard=2, metadata=None, shard_metadata=None):
    """Shards and an index as the safetensors package and transformers write them."""
    names = list(tensors)
    groups = [names[i:i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map = {}
    for j, group in enumerate(groups, 1):
        file = f"model-{j:05d}-of-{len(groups):05d}.safetensors"
        safetensors_numpy.save_file({n: tensors[n] for n in group}, str(folder / file),
                                    metadata=shard_metadata or {"format": "pt"})
        weight_map.update(dict.fromkeys(group, file))
    index = folder / "model.safetensors.index.json"
    total = sum(a.nbytes for a in tensors.values())
    index.write_text(json.dumps({"metadata": metadata or {"total_size": total},
                                 "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
    return index


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# -- open: in place, lazily ------------------------------------------------------------------------

@pytest.mark.parametrize("mmap", [True, False])
def test_open_an_index_or_its_directory_lazily(tmp_path, mmap):
    index = write_hf(tmp_path, TENSORS)
    for target in (index, tmp_path, os.fsencode(index)):
        with safeckpt.open(target, mmap=mmap) as f:
            assert isinstance(f, safeckpt.ShardedReader) and f.format == "safetensors"
            assert f.keys() == list(TENSORS) and len(f.shards) == 3  # shard order, each its own order
            assert f.path == str(index) and f.version is None
            assert f.metadata == {"total_size": 2000, "format": "pt"}
            assert f.shard_of("layers.4.weight") == str(tmp_path / FILES[2])
            assert f.info("layers.3.weight").shape == (10, 10)
            assert same_bits(f["layers.3.weight"], TENSORS["layers.3.weight"])
            assert f.get_slice("layers.2.weight")[3:5].tolist() == [[2.0] * 10] * 2
            assert all(same_bits(f.load_all()[k], v) for k, v in TENSORS.items())
            assert same(f.tree.load(), TENSORS) and not f.has_checksums
    assert same(safeckpt.load(tmp_path), TENSORS) and same(safeckpt.load_file(index), TENSORS)


def test_only_the_shards_touched_are_read(tmp_path, monkeypatch):
    write_hf(tmp_path, TENSORS)
    read = []
    original = Reader.load_indices

    def spy(self, indices, verify=None):
        read.append(os.path.basename(self.path))
        return original(self, indices, verify)

    monkeypatch.setattr(Reader, "load_indices", spy)
    with safeckpt.open(tmp_path, mmap=False) as f:
        assert read == []  # opening reads headers only
        f["layers.2.weight"]
        assert read == [FILES[1]]
        safeckpt.load(tmp_path, prefix="layers.4.weight")
    assert read[1:] == [FILES[2]]


def test_every_shard_is_checked_when_the_index_is_opened(tmp_path):
    """[HF4]: a shard that holds another set of tensors than the weight_map maps to it is refused
    at open, before any tensor is handed out, naming the index, the shard and the tensor."""
    index = write_hf(tmp_path, TENSORS)
    safetensors_numpy.save_file({"layers.4.weight": TENSORS["layers.4.weight"],
                                 "stray": np.zeros(1)}, str(tmp_path / FILES[2]))
    with pytest.raises(safeckpt.LayoutError, match=r"model\.safetensors\.index\.json.*"
                       r"model-00003-of-00003\.safetensors.*'stray'.*\[HF4\]"):
        safeckpt.open(index)
    safetensors_numpy.save_file({}, str(tmp_path / FILES[2]))
    with pytest.raises(safeckpt.LayoutError, match=r"does not hold 'layers\.4\.weight'"):
        safeckpt.open(index)
    safeckpt.save_file({"layers.4.weight": TENSORS["layers.4.weight"]}, tmp_path / "x.sckpt")
    os.replace(tmp_path / "x.sckpt", tmp_path / FILES[2])  # a .sckpt file under a shard's name
    with pytest.raises(safeckpt.ShardError, match="not a safetensors file"):
        safeckpt.open(index)
    os.unlink(tmp_path / FILES[2])
    with pytest.raises(FileNotFoundError):
        safeckpt.open(index)


@pytest.mark.parametrize("mmap", [True, False])
def test_HF4_a_missing_shard_or_a_directory_names_the_index_and_the_shard(tmp_path, mmap):
    """[HF4]: a shard that is not there, or a directory under its name, is the OS's error (its
    type, errno and file name kept: the shard), whose message also names the index."""
    index = write_hf(tmp_path, TENSORS)
    os.unlink(tmp_path / FILES[2])
    words = rf"index {re.escape(repr(str(index)))} names \[HF4\]\): '.*{FILES[2]}'"
    with pytest.raises(FileNotFoundError, match=words) as info:
        safeckpt.open(index, mmap=mmap)
    assert info.value.filename == str(tmp_path / FILES[2])
    (tmp_path / FILES[2]).mkdir()
    with pytest.raises(IsADirectoryError, match=words) as info:
        safeckpt.open(tmp_path, mmap=mmap)
    assert info.value.filename == str(tmp_path / FILES[2])


def test_torch_loads_a_huggingface_hub_save_in_place(tmp_path):
    torch = pytest.importorskip("torch")
    hub = pytest.importorskip("huggingface_hub")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    model = model.to(torch.bfloat16)
    hub.save_torch_state_dict(model.state_dict(), tmp_path, max_shard_size=1200)
    assert len(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]) == 4
    other = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    other = other.to(torch.bfloat16)
    safeckpt.torch.load_model(other, tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(other.state_dict()[name].view(torch.int16), tensor.view(torch.int16)), name
    loaded = safeckpt.torch.load(tmp_path / "model.safetensors.index.json")
    assert loaded.keys() == model.state_dict().keys() and loaded["2.bias"].dtype == torch.bfloat16


# -- the index is untrusted input [HF1]-[HF3] -------------------------------------------------------

@pytest.mark.parametrize("text, error, words", [
    ('{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}', safeckpt.HeaderError, "duplicate"),
    ('{"metadata": {"x": NaN}, "weight_map": {"a": "x.safetensors"}}', safeckpt.HeaderError, "NaN"),
    ('{"weight_map": {}}', safeckpt.HeaderError, "non-empty 'weight_map'"),
    ('{"weight_map": ["x.safetensors"]}', safeckpt.HeaderError, "non-empty 'weight_map'"),
    ('[1]', safeckpt.HeaderError, "non-empty 'weight_map'"),
    ('{"weight_map": {"a": "x.safetensors"', safeckpt.HeaderError, "not a JSON index"),
    (b'\xff{"weight_map": {}}', safeckpt.HeaderError, "not a JSON index"),
    ('{"weight_map": {"a": "../x.safetensors"}}', safeckpt.HeaderError, r"\['a'\].*plain file name"),
    ('{"weight_map": {"a": "/etc/x.safetensors"}}', safeckpt.HeaderError, "plain file name"),
    ('{"weight_map": {"a": ".x.safetensors"}}', safeckpt.HeaderError, "plain file name"),
    ('{"weight_map": {"a": 3}}', safeckpt.HeaderError, "plain file name"),
    ('{"weight_map": {"a": "pytorch_model-00001-of-00002.bin"}}', safeckpt.HeaderError,
     "not a \\*.safetensors file"),
    ('{"weight_map": {"": "x.safetensors"}}', safeckpt.HeaderError, "tensor name ''"),
    ('{"weight_map": {"a": "x.safetensors", "a": "x.safetensors"}}', safeckpt.HeaderError,
     r"duplicate JSON key in the index \[HF1\]: 'a'"),
    ('{"metadata": {"n": NaN}, "weight_map": {"a": "x.safetensors"}}', safeckpt.HeaderError,
     r"JSON constant NaN is not allowed in the index \[HF1\]"),
    ('{"metadata": [], "weight_map": {"a": "x.safetensors"}}', safeckpt.HeaderError, "'metadata'"),
    ('{"metadata": {"x": 18446744073709551616}, "weight_map": {"a": "x.safetensors"}}',
     safeckpt.HeaderError, r"metadata\['x'\]"),
    ('{"metadata": {"x": ' + "[" * 100 + "]" * 100 + '}, "weight_map": {"a": "x.safetensors"}}',
     safeckpt.LimitError, "max_depth"),
    ('{"metadata": {"__safeckpt__": "%%%"}, "weight_map": {"a": "x.safetensors"}}',
     safeckpt.HeaderError, "__safeckpt__"),
])
def test_HF1_HF3_a_bad_index_is_refused_naming_it(tmp_path, text, error, words):
    index = tmp_path / "model.safetensors.index.json"
    index.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(error, match=words) as info:
        safeckpt.open(index)
    assert repr(str(index)) in str(info.value)
    with pytest.raises(error, match=words):
        safeckpt.convert(index, tmp_path / "out.sckpt")
    assert not (tmp_path / "out.sckpt").exists()


def test_HF1_HF2_limits_are_checked_before_anything_is_read(tmp_path, monkeypatch):
    index = write_hf(tmp_path, TENSORS)
    size = index.stat().st_size
    with pytest.raises(safeckpt.LimitError, match=f"{size} bytes, more than max_header_size=100"):
        safeckpt.open(index, max_header_size=100)
    with pytest.raises(safeckpt.LimitError, match="names 5 tensors, more than max_tensors=4"):
        safeckpt.open(index, max_tensors=4)
    with safeckpt.open(index, max_header_size=size, max_tensors=5) as f:
        assert len(f) == 5
    fifo = tmp_path / "fifo.safetensors.index.json"
    os.mkfifo(fifo)
    with pytest.raises(safeckpt.HeaderError, match="not a regular file"):  # refused, not waited on
        safeckpt.open(fifo)
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_a_lone_surrogate_in_an_index_is_a_named_mismatch(tmp_path):
    """A lone surrogate in an index's tensor name is no shard's tensor (shard names are valid
    Unicode): the mismatch is named, never a UnicodeEncodeError."""
    safetensors_numpy.save_file({"a": np.zeros(1)}, str(tmp_path / "x.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"a": "x.safetensors", "\\ud800": "x.safetensors"}}')
    with pytest.raises(safeckpt.LayoutError, match="does not hold"):
        safeckpt.open(index)


# -- which checkpoint a directory holds -------------------------------------------------------------

def test_a_directory_holding_several_checkpoints_names_them(tmp_path):
    write_hf(tmp_path, TENSORS)
    safeckpt.save_file({"a": np.zeros(2)}, tmp_path / "ours.sckpt")
    with pytest.raises(ValueError, match=r"several checkpoints \(model\.safetensors\.index\.json, "
                       r"ours\.sckpt\)"):
        safeckpt.open(tmp_path)
    os.unlink(tmp_path / "ours.sckpt")
    (tmp_path / "other.safetensors.index.json").write_text("{}")
    with pytest.raises(ValueError, match="model.safetensors.index.json, other.safetensors.index.json"):
        safeckpt.open(tmp_path)


@pytest.mark.parametrize("index_name", ["model.safetensors.index.json",
                                        "Model.safetensors.index.json"])
def test_an_index_beside_a_plain_safetensors_file_is_not_guessed(tmp_path, index_name):
    """A directory holding an index and a .safetensors file that is not one of its shards (another
    tool's save, a save interrupted before it removed the other, a name that differs in case) is
    refused naming both: safeckpt would open one, transformers may load the other."""
    write_hf(tmp_path, TENSORS)
    os.replace(tmp_path / "model.safetensors.index.json", tmp_path / index_name)
    newer = {"w": np.ones(3, np.float32)}
    safetensors_numpy.save_file(newer, str(tmp_path / "model.safetensors"))
    names = ", ".join(sorted([index_name, "model.safetensors"]))
    with pytest.raises(ValueError, match=rf"several checkpoints \({re.escape(names)}\); open one"):
        safeckpt.open(tmp_path)
    with safeckpt.open(tmp_path / "model.safetensors") as f:  # each opens by its own path
        assert same(f.load_all(), newer)
    with safeckpt.open(tmp_path / index_name) as f:
        assert f.keys() == list(TENSORS)
    safetensors_numpy.save_file(newer, str(tmp_path / "x.safetensors"))
    os.unlink(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=rf"several checkpoints \({re.escape(index_name)}, x"):
        safeckpt.open(tmp_path)


def test_a_directory_with_one_safetensors_file_or_only_shards(tmp_path):
    safeckpt.save_file(TENSORS, tmp_path / "model.safetensors")
    with safeckpt.open(tmp_path) as f:
        assert isinstance(f, Reader) and f.format == "safetensors" and f.keys() == list(TENSORS)
    safeckpt.save_file(TENSORS, tmp_path / "model.fp16.safetensors")
    with pytest.raises(ValueError, match="model.fp16.safetensors, model.safetensors"):
        safeckpt.open(tmp_path)
    (tmp_path / "only").mkdir()
    write_hf(tmp_path / "only", TENSORS)
    os.unlink(tmp_path / "only" / "model.safetensors.index.json")
    with pytest.raises(IsADirectoryError, match=r"only shards \(model-00001-of-00003.safetensors.*no index"):
        safeckpt.open(tmp_path / "only")


# -- save: what transformers and huggingface_hub write [HF6] ----------------------------------------

def test_HF6_save_file_writes_huggingface_shards_and_index(tmp_path):
    path = tmp_path / "model.safetensors"
    safeckpt.save_file(TENSORS, path, max_shard_size=900, metadata={"step": 3, "run": "x"})
    assert sorted(os.listdir(tmp_path)) == FILES + ["model.safetensors.index.json"]
    assert hf.shard_files(path, 3) == FILES and hf.index_of(str(path)).endswith(".safetensors.index.json")
    text = (tmp_path / "model.safetensors.index.json").read_text()
    index = json.loads(text)
    assert text == json.dumps(index, indent=2, sort_keys=True) + "\n"  # as transformers writes it
    assert index["weight_map"] == {f"layers.{i}.weight": FILES[i // 2] for i in range(5)}
    assert index["metadata"]["total_size"] == 2000 and index["metadata"]["run"] == "x"
    for j, file in enumerate(FILES):  # every shard: a safetensors file the real package reads
        assert (tmp_path / file).read_bytes()[:4] != fmt.MAGIC[:4]
        with safe_open(str(tmp_path / file), "np") as f:
            assert f.metadata() == {"format": "pt"}
            assert list(f.keys()) == list(TENSORS)[2 * j:2 * j + 2]
            assert all(same_bits(f.get_tensor(k), TENSORS[k]) for k in f.keys())
    with safeckpt.open(path) as f:  # the name saved to opens the index
        assert f.keys() == list(TENSORS) and f.metadata == {"total_size": 2000, "run": "x",
                                                            "step": 3, "format": "pt"}


def test_HF6_one_shard_is_one_plain_file(tmp_path):
    path = tmp_path / "model.safetensors"
    safeckpt.save_file(TENSORS, path, max_shard_size="5GB", metadata={"format": "np"})
    assert os.listdir(tmp_path) == ["model.safetensors"]
    with safe_open(str(path), "np") as f:
        assert f.metadata() == {"format": "np"}  # the caller's format is kept
    safeckpt.save_file(TENSORS, path, max_shard_size="5GB")
    with safe_open(str(path), "np") as f:
        assert f.metadata() == {"format": "pt"}  # transformers refuses a file with no format


def test_HF6_the_split_is_huggingface_hubs(tmp_path):
    torch = pytest.importorskip("torch")
    hub = pytest.importorskip("huggingface_hub")
    # every tensor within the limit: huggingface_hub gives a larger one a shard of its own ahead
    # of the shard being filled, safeckpt in order [S8]; transformers reads either
    state = {f"h.{i}.w": torch.full((i % 5 + 1, 50), float(i)) for i in range(12)}
    for limit in (1000, "3KB", 10**9):
        split = hub.split_torch_state_dict_into_shards(state, max_shard_size=limit)
        folder = tmp_path / str(limit)
        folder.mkdir()
        safeckpt.save(state, folder / "model.safetensors", max_shard_size=limit)
        assert sorted(os.listdir(folder)) == sorted(split.filename_to_tensors) + (
            ["model.safetensors.index.json"] if split.is_sharded else [])
        if split.is_sharded:
            index = json.loads((folder / "model.safetensors.index.json").read_text())
            assert index["weight_map"] == split.tensor_to_filename
            assert index["metadata"]["total_size"] == split.metadata["total_size"]


def test_huggingface_hub_loads_what_safeckpt_saves(tmp_path):
    torch = pytest.importorskip("torch")
    hub = pytest.importorskip("huggingface_hub")

    def make():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.LayerNorm(64),
                                   torch.nn.Linear(64, 4)).to(torch.float16)

    model = make()
    for limit, files in ((600, 4), (10**9, 1)):
        folder = tmp_path / str(limit)
        folder.mkdir()
        safeckpt.torch.save_model(model, folder / "model.safetensors", max_shard_size=limit)
        assert len(os.listdir(folder)) == files  # 3 shards and the index, or one file
        fresh = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.LayerNorm(64),
                                    torch.nn.Linear(64, 4)).to(torch.float16)
        result = hub.load_torch_model(fresh, folder, strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        for name, tensor in model.state_dict().items():
            assert torch.equal(fresh.state_dict()[name], tensor), name


def test_a_nested_save_keeps_its_tree_in_the_index(tmp_path):
    state = {"model": dict(TENSORS), "step": 7, "betas": (0.9, 0.999), "tied": TENSORS["layers.0.weight"]}
    path = tmp_path / "ckpt.safetensors"
    safeckpt.save(state, path, max_shard_size=900, metadata={"blob": b"\x00"})
    assert sorted(os.listdir(tmp_path)) == [f.replace("model", "ckpt") for f in FILES] + [
        "ckpt.safetensors.index.json"]
    loaded = safeckpt.load(path)
    assert same(loaded, state) and loaded["tied"] is loaded["model"]["layers.0.weight"]
    with safeckpt.open(tmp_path) as f:
        assert f.metadata["blob"] == b"\x00" and f.tree["step"] == 7
        assert same(f.load("model"), TENSORS)


def test_stale_files_of_an_earlier_save_are_removed(tmp_path):
    path = tmp_path / "model.safetensors"
    safeckpt.save_file(TENSORS, path)  # a single file first
    safeckpt.save_file(TENSORS, path, max_shard_size=900)  # transformers would load a stale single
    assert sorted(os.listdir(tmp_path)) == FILES + ["model.safetensors.index.json"]
    safeckpt.save_file(TENSORS, path, max_shard_size=1300)  # 2 shards: the 3 old ones go
    assert sorted(os.listdir(tmp_path)) == ["model-00001-of-00002.safetensors",
                                            "model-00002-of-00002.safetensors",
                                            "model.safetensors.index.json"]
    safeckpt.save_file({"w": np.zeros(2)}, path, max_shard_size=900)
    assert os.listdir(tmp_path) == ["model.safetensors"]
    assert safeckpt.load_file(tmp_path).keys() == {"w"}


@pytest.mark.parametrize("how", ["save_file", "save", "torch", "convert", "one shard"])
def test_HF7_a_plain_save_removes_an_earlier_sharded_save(tmp_path, how):
    """[HF7]: every save to model.safetensors, sharded or not, removes the index and shards that
    an earlier sharded save to that name left: a reader of the directory (and of the name, which
    opens the index when no plain file is there) would otherwise take them for this checkpoint."""
    out = tmp_path / "out"
    out.mkdir()
    path = out / "model.safetensors"
    safeckpt.save_file(TENSORS, path, max_shard_size=900)
    safetensors_numpy.save_file({"x": np.zeros(1)}, str(out / "model-00002-of-00009.safetensors"))
    safetensors_numpy.save_file({"x": np.zeros(1)}, str(out / "other-00001-of-00002.safetensors"))
    newer = {"w": np.ones(3, np.float32)}
    if how == "save_file":
        safeckpt.save_file(newer, path)
    elif how == "save":
        safeckpt.save(newer, path)
    elif how == "torch":
        torch = pytest.importorskip("torch")
        pytest.importorskip("safeckpt.torch").save({"w": torch.ones(3)}, path)
    elif how == "convert":
        safeckpt.save_file(newer, tmp_path / "src.sckpt")
        safeckpt.convert(tmp_path / "src.sckpt", path)
    else:
        safeckpt.save_file(newer, path, max_shard_size="5GB")
    assert sorted(os.listdir(out)) == ["model.safetensors", "other-00001-of-00002.safetensors"]
    with safeckpt.open(out / "model.safetensors") as f:
        assert same(f.load_all(), newer)


def test_shards_are_written_before_the_index(tmp_path, monkeypatch):
    written = []
    original = safetensors_writer.write

    def spy(planned, path, **kw):
        written.append(os.path.basename(path))
        return original(planned, path, **kw)

    monkeypatch.setattr(safetensors_writer, "write", spy)
    path = tmp_path / "model.safetensors"
    safeckpt.save_file(TENSORS, path, max_shard_size=900)
    assert sorted(written) == FILES
    with pytest.raises(safeckpt.UnsupportedDtypeError, match="'bad'"):  # every shard planned first
        safeckpt.save_file({**TENSORS, "bad": np.zeros(1, np.complex128)}, tmp_path / "x.safetensors",
                           max_shard_size=900)
    assert sorted(written) == FILES and not any(n.startswith("x") for n in os.listdir(tmp_path))


def test_refusals_name_the_problem(tmp_path):
    with pytest.raises(safeckpt.InvalidValueError, match="'total_size' is the index's own"):
        safeckpt.save_file(TENSORS, tmp_path / "model.safetensors", max_shard_size=900,
                           metadata={"total_size": 1})
    with pytest.raises(safeckpt.InvalidValueError, match="name it after the model"):
        safeckpt.save_file(TENSORS, tmp_path / "model.safetensors.index.json", max_shard_size=900)
    with pytest.raises(ValueError, match="max_shard_size"):
        safeckpt.save_file(TENSORS, tmp_path / "model.safetensors", max_shard_size="5 parsecs")
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(IsADirectoryError):
        safeckpt.save_file(TENSORS, tmp_path / "d.safetensors", max_shard_size=900)
    assert os.listdir(tmp_path) == ["d.safetensors"]


@pytest.mark.parametrize("src_kind", ["sckpt", "index"])
def test_convert_writes_shards(tmp_path, src_kind):
    src = tmp_path / "src"
    src.mkdir()
    if src_kind == "sckpt":
        safeckpt.save({"model": TENSORS, "step": 3}, src / "m.sckpt")
        source = src / "m.sckpt"
    else:
        source = write_hf(src, TENSORS)
    out = tmp_path / "out"
    out.mkdir()
    assert safeckpt.convert(source, out / "model.safetensors", max_shard_size=900).tensors == 5
    assert sorted(os.listdir(out)) == FILES + ["model.safetensors.index.json"]
    assert same(safeckpt.load(out), safeckpt.load(source))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 2000  # the new files', not the source's
    safeckpt.convert(out, tmp_path / "back.sckpt", max_shard_size=900)  # .sckpt shards too
    with safeckpt.open(tmp_path / "back.sckpt") as f:
        assert len(f.shards) == 3 and same(f.load(), safeckpt.load(source))


def test_a_shard_replaced_while_open_is_refused(tmp_path, monkeypatch):
    """mmap=False keeps few descriptors open: a Hugging Face shard closed for room and written
    again (same layout, other values, maybe the same inode) is refused when reopened [S7]. Its
    modification time is set apart explicitly: file systems stamp times at a coarse tick."""
    monkeypatch.setattr(shard, "MAX_OPEN_SHARDS", 1)
    write_hf(tmp_path, TENSORS)
    with safeckpt.open(tmp_path, mmap=False) as f:
        f["layers.0.weight"], f["layers.4.weight"]  # shard 1 is closed for room
        victim = tmp_path / FILES[0]
        before = victim.stat().st_mtime_ns
        safetensors_numpy.save_file({k: v + 1 for k, v in list(TENSORS.items())[:2]}, str(victim),
                                    metadata={"format": "pt"})
        os.utime(victim, ns=(before + 10**9, before + 10**9))
        with pytest.raises(safeckpt.ShardError, match="model-00001-of-00003.*replaced"):
            f["layers.1.weight"]
        assert same_bits(f["layers.4.weight"], TENSORS["layers.4.weight"])


def test_HF6_packed_float4_tensors_are_sized_by_their_bytes_in_the_file(tmp_path):
    """[ST5] [HF6]: a float4 tensor takes half a byte per element in a .safetensors file, so shards
    are split and total_size counted by that size, not numpy's byte per element."""
    import ml_dtypes
    tensors = {f"q{i}": np.zeros(800, ml_dtypes.float4_e2m1fn) for i in range(4)}  # 400 B each
    path = tmp_path / "model.safetensors"
    safeckpt.save_file(tensors, path, max_shard_size=900)  # two per shard, as 400-byte tensors
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 4 * 400
    assert len(set(index["weight_map"].values())) == 2
    loaded = safeckpt.load(str(tmp_path / "model.safetensors.index.json"))
    assert all(loaded[name].dtype == ml_dtypes.float4_e2m1fn for name in tensors)
