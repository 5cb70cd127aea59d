"""Conversions (safeckpt/interop.py): safetensors, sharded safetensors, npz/npy, torch; both backends."""

import argparse
import collections
import json

import numpy as np
import pytest

import safeckpt
from safeckpt import safetensors_format as sft

pytestmark = pytest.mark.usefixtures("backend")


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_a_real_safetensors_model_converts_bit_for_bit(tmp_path):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.LayerNorm(16),
                                torch.nn.Linear(16, 50))
    model[2].weight = model[0].weight  # tied, as in language models: safetensors drops the copy
    model = model.to(torch.bfloat16)
    src, dst, back = tmp_path / "model.safetensors", tmp_path / "model.sckpt", tmp_path / "b.safetensors"
    st_torch.save_model(model, str(src), metadata={"format": "pt"})
    expected = st_torch.load_file(str(src))
    assert safeckpt.convert(src, dst).tensors == len(expected)
    loaded = safeckpt.load_file(dst, verify=True)
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        got = safeckpt.torch.from_numpy(loaded[name])
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert torch.equal(got.view(torch.int16), tensor.view(torch.int16)), name
    from safetensors import safe_open
    with safe_open(str(src), "pt") as f:
        metadata = f.metadata()  # save_model records the dropped tied name: {'2.weight': '0.weight'}
    with safeckpt.open(dst) as f:
        assert f.metadata == metadata and metadata["format"] == "pt" and f.has_checksums
    safeckpt.convert(dst, back)  # and back: the safetensors package reads it, same bits
    again = st_torch.load_file(str(back))
    assert all(torch.equal(again[k].view(torch.int16), v.view(torch.int16)) for k, v in expected.items())


def write_sharded(tmp_path, tensors, per_shard=2, metadata=None):
    names = list(tensors)
    groups = [names[i:i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map = {}
    for j, group in enumerate(groups, 1):
        file = f"model-{j:05d}-of-{len(groups):05d}.safetensors"
        sft.save_file({n: tensors[n] for n in group}, tmp_path / file, metadata={"format": "np"})
        weight_map.update({n: file for n in group})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": metadata or {"total_size": 1}, "weight_map":
                                 dict(sorted(weight_map.items()))}))
    return index


TENSORS = {f"layers.{i}.weight": np.full((3, i + 1), i, np.float32) for i in range(5)}


def test_a_sharded_safetensors_model_converts_as_a_whole(tmp_path):
    index = write_sharded(tmp_path, TENSORS)
    safeckpt.convert(index, tmp_path / "all.sckpt")
    with safeckpt.open(tmp_path / "all.sckpt") as f:
        assert f.keys() == list(TENSORS)  # shard order, not the index's sorted order
        assert all(same_bits(f[k], v) for k, v in TENSORS.items())
        assert f.metadata == {"total_size": 1, "format": "np"}


def test_a_sharded_index_is_checked(tmp_path):
    index = write_sharded(tmp_path, TENSORS)
    data = json.loads(index.read_text())
    data["weight_map"]["layers.0.weight"] = "../model-00001-of-00003.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(safeckpt.HeaderError, match="plain file name"):
        safeckpt.convert(index, tmp_path / "x.sckpt")
    data["weight_map"]["layers.0.weight"] = "model-00002-of-00003.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(safeckpt.LayoutError, match="layers.0.weight"):
        safeckpt.convert(index, tmp_path / "x.sckpt")
    index.write_text('{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}')
    with pytest.raises(safeckpt.HeaderError, match="duplicate"):
        safeckpt.convert(index, tmp_path / "x.sckpt")
    index.write_text('{"weight_map": {"a": "missing.safetensors"}}')
    with pytest.raises(FileNotFoundError):
        safeckpt.convert(index, tmp_path / "x.sckpt")
    assert not (tmp_path / "x.sckpt").exists()


def test_npz_and_npy_convert_without_pickle(tmp_path):
    arrays = {"a": np.arange(6, dtype=">i4").reshape(2, 3), "b": np.asfortranarray(np.eye(3)),
              "c": np.array(True)}
    np.savez(tmp_path / "x.npz", **arrays)
    np.savez_compressed(tmp_path / "z.npz", **arrays)
    for src in ("x.npz", "z.npz"):
        safeckpt.convert(tmp_path / src, tmp_path / "x.sckpt")
        loaded = safeckpt.load_file(tmp_path / "x.sckpt")
        assert loaded.keys() == arrays.keys()
        assert all(np.array_equal(loaded[k], v) and loaded[k].dtype == v.dtype.newbyteorder("<")
                   for k, v in arrays.items())
    np.save(tmp_path / "one.npy", arrays["a"])
    safeckpt.convert(tmp_path / "one.npy", tmp_path / "one.safetensors")
    assert np.array_equal(safeckpt.load(tmp_path / "one.safetensors"), arrays["a"])
    np.save(tmp_path / "obj.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "obj.npz", ok=np.zeros(2), bad=np.array([None, 1], dtype=object))
    for src in ("obj.npy", "obj.npz"):
        with pytest.raises(safeckpt.PickleRequiredError, match="allow_pickle=False"):
            safeckpt.convert(tmp_path / src, tmp_path / "o.sckpt")
    assert not (tmp_path / "o.sckpt").exists()


def test_torch_files_load_with_weights_only_and_never_fall_back(tmp_path):
    torch = pytest.importorskip("torch")
    state = {"model": collections.OrderedDict(w=torch.arange(6.0).reshape(2, 3),
                                              h=torch.ones(2, dtype=torch.bfloat16)),
             "epoch": 4, "betas": (0.9, 0.999)}
    torch.save(state, tmp_path / "ckpt.pt")
    torch.save(state["model"], tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    safeckpt.convert(tmp_path / "ckpt.pt", tmp_path / "ckpt.sckpt")
    back = safeckpt.torch.load(tmp_path / "ckpt.sckpt")
    assert safeckpt.tree.same(back, state)
    safeckpt.convert(tmp_path / "legacy.bin", tmp_path / "legacy.sckpt")
    assert safeckpt.tree.same(safeckpt.torch.load(tmp_path / "legacy.sckpt"), state["model"])

    torch.save({"w": torch.ones(2), "args": argparse.Namespace(lr=1)}, tmp_path / "evil.pt")
    with pytest.raises(safeckpt.PickleRequiredError, match="argparse.Namespace.*never falls back"):
        safeckpt.convert(tmp_path / "evil.pt", tmp_path / "evil.sckpt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(safeckpt.HeaderError, match="torch cannot read"):
        safeckpt.convert(tmp_path / "junk.pt", tmp_path / "junk.sckpt")
    assert not (tmp_path / "evil.sckpt").exists() and not (tmp_path / "junk.sckpt").exists()


def test_convert_reports_progress_and_refuses_unknown_outputs(tmp_path):
    safeckpt.save_file({"a": np.zeros(100), "b": np.ones(50, np.float32)}, tmp_path / "s.sckpt")
    seen = []
    safeckpt.convert(tmp_path / "s.sckpt", tmp_path / "t.safetensors",
                     progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (0, 1000) and seen[-1] == (1000, 1000)
    with pytest.raises(ValueError, match=r"\*\.sckpt or \*\.safetensors"):
        safeckpt.convert(tmp_path / "s.sckpt", tmp_path / "t.txt")
    safeckpt.save_file({"z": np.zeros(2, np.complex128)}, tmp_path / "c.sckpt")
    with pytest.raises(safeckpt.UnsupportedDtypeError, match="'z'"):
        safeckpt.convert(tmp_path / "c.sckpt", tmp_path / "c.safetensors")
