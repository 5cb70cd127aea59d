"""The torch adapter (safeckpt/torch.py): dtypes, zero-copy, devices, tied weights, models,
optimizers, and bit-exact resume in a new process. Skipped where torch is not installed."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import safeckpt  # noqa: E402
import safeckpt.torch as st  # noqa: E402
from safeckpt.tree import same  # noqa: E402
from forge import forge  # noqa: E402

DTYPES = [torch.bool, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16,
          torch.uint32, torch.uint64, torch.float16, torch.float32, torch.float64, torch.bfloat16,
          torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64, torch.complex128]


def random_tensor(dtype, shape=(3, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 256, (int(np.prod(shape)) * dtype.itemsize,), generator=g, dtype=torch.uint8)
    if dtype == torch.bool:
        return (bits[:int(np.prod(shape))] & 1).bool().reshape(shape)
    return bits.view(dtype).reshape(shape)


def bits(t):
    return st.export(t.cpu(), "t")[0].tobytes()


def test_all_dtypes_round_trip_bit_exact(tmp_path):
    obj = {str(dt): random_tensor(dt, seed=i) for i, dt in enumerate(DTYPES)}
    obj["transposed_bf16"] = random_tensor(torch.bfloat16, (4, 6)).t()
    obj["param"] = torch.nn.Parameter(torch.randn(2, 2))
    obj["conj"] = torch.randn(3, dtype=torch.complex64).conj()
    obj["scalar"], obj["empty"] = torch.tensor(3.5), torch.zeros(0, 4)
    path = tmp_path / "d.sckpt"
    safeckpt.save(obj, path)
    back = st.load(path)
    for key, value in obj.items():
        got = back[key]
        assert type(got) is torch.Tensor and got.dtype == value.dtype and got.shape == value.shape, key
        assert bits(got) == bits(value.resolve_conj()), key
    assert not back["param"].requires_grad
    assert same(back, {k: v.detach().resolve_conj() for k, v in obj.items()})
    # and numpy users read the same file
    assert safeckpt.load(path)["torch.bfloat16"].dtype.name == "bfloat16"


def test_cpu_tensors_are_written_from_their_own_memory():
    t = torch.randn(4, 4).to(torch.bfloat16)
    array, device, _ = st.export(t, "t")
    assert device is None and array.__array_interface__["data"][0] == t.data_ptr()


def test_load_is_zero_copy_from_the_mapping(tmp_path):
    path = tmp_path / "z.sckpt"
    safeckpt.save({"w": torch.randn(256, 256), "b": torch.randn(8).to(torch.bfloat16)}, path)
    with safeckpt.open(path) as f:
        back = f.load(framework="torch")
        start = f._mapping.address
        for t in back.values():
            assert start <= t.data_ptr() < start + f.size
    back["w"] += 1  # a private mapping: writable, and the file never changes
    assert torch.equal(st.load(path)["w"] + 1, back["w"])


def test_unsupported_tensors_are_refused_naming_the_path(tmp_path):
    # complex32 is code 33 since version 1.5; torch's 3-bit shell dtype has no code
    with pytest.raises(safeckpt.UnsupportedDtypeError, match=r"obj\['q'\].*uint3"):
        safeckpt.save({"q": torch.zeros(2, dtype=torch.uint8).view(torch.uint3)}, tmp_path / "x.sckpt")
    with pytest.raises(safeckpt.InvalidValueError, match=r"obj\['s'\].*to_dense"):
        safeckpt.save({"s": torch.zeros(2, 2).to_sparse()}, tmp_path / "x.sckpt")
    with pytest.raises(safeckpt.InvalidValueError, match=r"obj\['m'\].*state_dict"):
        safeckpt.save({"m": torch.nn.Linear(2, 2)}, tmp_path / "x.sckpt")


def test_tensor_kinds_without_plain_memory_are_refused_naming_the_path(tmp_path):
    """Item 13: a tensor with no plain dense memory is refused with its path and the fix, never
    with torch's "Internal error ... please file an issue" (nested tensors) or a bare RuntimeError
    (zero tensors, fake tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    parts = [torch.zeros(2, 4), torch.zeros(3, 4)]
    kinds = {
        "nested": (torch.nested.nested_tensor(parts), "nested tensor.*unbind"),
        "jagged": (torch.nested.nested_tensor(parts, layout=torch.jagged), "nested tensor.*unbind"),
        "param": (torch.nn.Parameter(torch.nested.nested_tensor(parts)), "nested tensor"),
        "sparse": (torch.eye(2).to_sparse_csr(), "sparse_csr.*to_dense"),
        "mkldnn": (torch.zeros(2, 2).to_mkldnn(), "mkldnn.*to_dense"),
        "quantized": (torch.quantize_per_tensor(torch.zeros(2), 0.1, 0, torch.qint8), "dequantize"),
        "meta": (torch.zeros(2, device="meta"), "meta device holds no data"),
        "zero": (torch._efficientzerotensor(3), r"no plain memory.*clone\(\)"),
        "fake": (FakeTensorMode().from_tensor(torch.zeros(2)), "FakeTensor.*own dispatch"),
    }
    for key, (tensor, words) in kinds.items():
        with pytest.raises(safeckpt.InvalidValueError, match=rf"obj\['a'\]\['{key}'\].*{words}"):
            safeckpt.save({"a": {key: tensor}}, tmp_path / "x.sckpt")
    assert not os.path.exists(tmp_path / "x.sckpt")


def test_map_location(tmp_path):
    data = forge({"w": np.ones(3, np.float32), "v": np.zeros(2, np.float32)}, minor=1,
                 extra={"tree": ["dict", "w", ["tensor", 0, "cuda:0"], "v", ["tensor", 1]]})
    path = tmp_path / "m.sckpt"
    path.write_bytes(data)
    if not torch.cuda.is_available():
        with pytest.raises(safeckpt.InvalidValueError,
                           match=r"tensor 'w' was saved from 'cuda:0'.*not available.*map_location"):
            st.load(path)
    for where in ["cpu", torch.device("cpu"), {"cuda:0": "cpu"}, {torch.device("cuda:0"): "cpu"}]:
        back = st.load(path, map_location=where)
        assert back["w"].device.type == "cpu" and back["w"].tolist() == [1, 1, 1]
    with pytest.raises(TypeError, match="map_location=3.5"):
        st.load(path, map_location=3.5)


BAD_DEVICES = ["foo", "", "CPU", "cpu:99999999999", "cpu:1", "cuda:-1", "cuda:128", "privateuseone",
               "hpu", "lazy", 1.5, True, [0], -1]


def test_bad_devices_are_refused_up_front_naming_them(tmp_path):
    """R5: every map_location and device= is checked by one helper before anything is read; a
    bad one raises InvalidValueError (a ValueError) naming it and what is accepted, never
    torch's RuntimeError or ModuleNotFoundError."""
    path = tmp_path / "d.sckpt"
    safeckpt.save({"w": torch.ones(3)}, path)
    for bad in BAD_DEVICES + (["cuda", "cuda:0"] if not torch.cuda.is_available() else []):
        shown = re.escape(repr(bad))
        for call, what in [(lambda: st.load(path, map_location=bad), "map_location"),
                           (lambda: st.load(path, device=bad), "device"),
                           (lambda: st.load(path, map_location={"cpu": bad}), r"map_location\['cpu'\]"),
                           (lambda: safeckpt.load(path, framework="torch", device=bad), "map_location"),
                           (lambda: safeckpt.open(path).load(framework="torch", map_location=bad),
                            "map_location")]:
            with pytest.raises(safeckpt.InvalidValueError, match=rf"{what}={shown}: .*'cpu', 'cuda'"):
                call()
    with pytest.raises(safeckpt.InvalidValueError, match=r"'meta'.*holds no data.*info"):
        st.load(path, device="meta")


def test_int_device_is_an_accelerator_index(tmp_path):
    """Item 13: device=0 means device 0 of the accelerator (cuda:0), as torch takes it."""
    path = tmp_path / "d.sckpt"
    safeckpt.save({"w": torch.ones(3)}, path)
    if torch.accelerator.is_available():
        assert st.load(path, device=0)["w"].device == torch.device(0)
    else:
        with pytest.raises(safeckpt.InvalidValueError, match=r"device=0: .*no accelerator.*'cpu'"):
            st.load(path, device=0)
    assert st.load(path, map_location={"cpu": "cpu"})["w"].tolist() == [1, 1, 1]


@pytest.mark.parametrize("saved", ["foo", "privateuseone", "meta", "cpu:99999999999", "cuda:-1",
                                   "cpu:7"])
def test_saved_devices_in_a_hostile_file_give_a_safeckpt_error(tmp_path, saved):
    """R5: a tensor's saved device comes from the file [R3]; one that torch cannot use here is
    named with the tensor and the way out (map_location), and a remapped one is never used."""
    path = tmp_path / "h.sckpt"
    path.write_bytes(forge({"w": np.ones(3, np.float32)}, minor=1,
                           extra={"tree": ["dict", "w", ["tensor", 0, saved]]}))
    with pytest.raises(safeckpt.InvalidValueError,
                       match=rf"tensor 'w' was saved from {re.escape(repr(saved))}.*map_location"):
        st.load(path)
    for where in ["cpu", {saved: "cpu"}]:
        assert st.load(path, map_location=where)["w"].tolist() == [1, 1, 1]


def test_every_format_dtype_loads_into_torch_or_is_named(tmp_path):
    """Every dtype code of the format (FORMAT.md section 4) becomes its torch dtype bit for bit;
    a dtype torch lacks would raise UnsupportedDtypeError naming the tensor, not a KeyError."""
    from safeckpt.dtypes import DTYPES as FORMAT_DTYPES
    # codes 0-18; those of version 1.5 (19-34) are tests/test_torch_dtypes.py's
    arrays = {name: np.zeros(3, dtype) for code, name, dtype in FORMAT_DTYPES if code < 19}
    path = tmp_path / "all.sckpt"
    safeckpt.save_file(arrays, path)
    back = st.load(path)
    for name, array in arrays.items():
        assert str(back[name].dtype) == f"torch.{name}" and bits(back[name]) == array.tobytes()


def test_device_puts_every_tensor_on_one_device(tmp_path):
    """device= as safetensors takes it: map_location=device, torch only, not with both."""
    path = tmp_path / "d.sckpt"
    safeckpt.save({"w": torch.ones(3), "n": {"b": torch.zeros(2, dtype=torch.bfloat16)}}, path)
    back = st.load(path, device="cpu")
    assert back["w"].device.type == "cpu" and back["n"]["b"].dtype == torch.bfloat16
    assert safeckpt.load(path, framework="torch", device="cpu")["w"].tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="device= needs framework='torch'"):
        safeckpt.load(path, device="cpu")
    with pytest.raises(ValueError, match="no map_location"):
        st.load(path, device="cpu", map_location="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(safeckpt.InvalidValueError, match="device='cuda': CUDA is not available"):
            st.load(path, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors(tmp_path):
    obj = {"w": torch.randn(64, 64, device="cuda"), "b": torch.randn(3).to("cuda", torch.bfloat16)}
    path = tmp_path / "c.sckpt"
    safeckpt.save(obj, path)
    back = st.load(path)
    assert back["w"].device == obj["w"].device and torch.equal(back["w"], obj["w"])
    assert st.load(path, map_location="cpu")["b"].device.type == "cpu"


def staged_case(tmp_path, checksum=True, **options):
    """A file of every dtype and awkward sizes (0-d, zero-size, odd lengths), and its tensors."""
    obj = {str(dt): random_tensor(dt, (7, 3), seed=i) for i, dt in enumerate(DTYPES)}
    obj.update({"scalar": torch.tensor(2.5), "empty": torch.zeros(0, 5, dtype=torch.bfloat16),
                "odd": random_tensor(torch.uint8, (13,)), "big": random_tensor(torch.float32, (300,))})
    path = tmp_path / "staged.sckpt"
    safeckpt.save(obj, path, checksum=checksum, **options)
    return obj, path


@pytest.mark.parametrize("staging_bytes", [1, 7, 64, 1000, 1 << 20])
@pytest.mark.parametrize("mmap", [True, False])
def test_device_tensors_through_staging_buffers(tmp_path, backend, staging_bytes, mmap):
    """The staged copy behind map_location="cuda", run on the CPU: pieces that split tensors
    across buffers and buffers shared by several tensors give back every byte, dtype and shape."""
    obj, path = staged_case(tmp_path)
    with safeckpt.open(path, mmap=mmap) as f:
        indices = list(range(len(f)))
        back = st.device_tensors(f, indices, torch.device("cpu"), verify=True,
                                 staging_bytes=staging_bytes)
        names = f.keys()
    for i, name in zip(indices, names):
        got, want = back[i], obj[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert bits(got) == bits(want), name


def test_device_tensors_refuse_a_big_endian_host(tmp_path, monkeypatch):
    """The staging buffers copy a file's little-endian bytes to the device as they are: on a
    big-endian host (dtypes.BIG_ENDIAN_HOST forces its path) that would be wrong values, so it
    is refused, and the same load to the CPU (swapped into host order) still works."""
    from safeckpt import dtypes
    obj, path = staged_case(tmp_path)
    monkeypatch.setattr(dtypes, "BIG_ENDIAN_HOST", True)
    with safeckpt.open(path) as f, pytest.raises(RuntimeError, match="big-endian"):
        st.device_tensors(f, [0], torch.device("cpu"))
    assert st.load(path, map_location="cpu").keys() == obj.keys()


def test_device_tensors_verify_from_the_staged_bytes(tmp_path, backend):
    """[T10] with verify: a flipped data byte is caught, naming the tensor; a file saved without
    checksums has nothing to verify."""
    obj, path = staged_case(tmp_path)
    with safeckpt.open(path) as f:
        info = f.info("big")
    data = bytearray(path.read_bytes())
    data[info.offset + 700] ^= 0x10
    path.write_bytes(data)
    with safeckpt.open(path, mmap=False) as f:
        everything = list(range(len(f)))
        st.device_tensors(f, everything, torch.device("cpu"), verify=False, staging_bytes=100)
        with pytest.raises(safeckpt.ChecksumError, match=r"tensor 'big'"):
            st.device_tensors(f, everything, torch.device("cpu"), verify=True, staging_bytes=100)
    _, plain = staged_case(tmp_path, checksum=False)
    with safeckpt.open(plain) as f, pytest.raises(safeckpt.ChecksumError, match="checksum=False"):
        st.device_tensors(f, [0], torch.device("cpu"), verify=True)


def test_device_tensors_from_shards(tmp_path, backend):
    """A sharded checkpoint stages each tensor from the shard that holds it."""
    obj, path = staged_case(tmp_path, max_shard_size=800)
    with safeckpt.open(path) as f:
        assert len(f.shards) > 2
        back = st.device_tensors(f, list(range(len(f))), torch.device("cpu"), verify=True,
                                 staging_bytes=333)
        assert {name: bits(back[i]) for i, name in enumerate(f.keys())} == {
            name: bits(t) for name, t in obj.items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_load_through_pinned_buffers(tmp_path):
    """map_location="cuda" copies through pinned buffers; the result equals the CPU load."""
    obj, path = staged_case(tmp_path)
    for mmap in (True, False):
        back = st.load(path, device="cuda", mmap=mmap, verify=True)
        for name, want in obj.items():
            assert back[name].device.type == "cuda" and bits(back[name]) == bits(want), name


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=50, dim=8, tied=True):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.body = torch.nn.Linear(dim, dim)
        self.norm = torch.nn.LayerNorm(dim)
        self.lm_head = torch.nn.Linear(dim, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("count", torch.tensor(7, dtype=torch.int64))


def test_tied_weights_are_stored_once_and_come_back_shared(tmp_path):
    model = TinyLM()
    path = tmp_path / "lm.sckpt"
    st.save_model(model, path)
    keys = safeckpt.open(path).keys()
    assert "embed.weight" in keys and "lm_head.weight" not in keys
    state = st.load(path)
    assert list(state) == list(model.state_dict())  # an OrderedDict, in order
    assert state["lm_head.weight"] is state["embed.weight"]
    fresh = TinyLM()
    assert st.load_model(fresh, path) == ([], [], [])
    assert fresh.lm_head.weight is fresh.embed.weight
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_load_model_strict_lists_everything_and_touches_nothing(tmp_path):
    path = tmp_path / "lm.sckpt"
    state = TinyLM(vocab=50).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["norm.bias"]
    state["count"] = torch.tensor(7, dtype=torch.int32)
    safeckpt.save(state, path)
    model = TinyLM(vocab=60)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(safeckpt.StateMismatchError) as info:
        st.load_model(model, path)
    message = str(info.value)
    for word in ["missing keys (1): norm.bias", "unexpected keys (1): extra.weight",
                 "embed.weight: file has shape (50, 8) float32, model has shape (60, 8) float32",
                 "lm_head.weight", "count: file has shape () int32, model has shape () int64",
                 "nothing was loaded", "strict=False"]:
        assert word in message, (word, message)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    report = st.load_model(model, path, strict=False)
    assert report.missing == ["norm.bias"] and report.unexpected == ["extra.weight"]
    assert sorted(m[0] for m in report.mismatched) == ["count", "embed.weight", "lm_head.weight"]
    assert torch.equal(model.body.weight, state["body.weight"])
    assert torch.equal(model.norm.bias, before["norm.bias"])


def test_load_model_that_would_load_nothing_raises(tmp_path):
    """Item 4: strict=False loads what fits and returns the rest in its report, but a load that
    fits nothing (every dtype wrong, or no key in common) raises instead of a silent no-op."""
    path = tmp_path / "half.sckpt"
    safeckpt.save({k: v.to(torch.float16) for k, v in TinyLM().state_dict().items()}, path)
    model = TinyLM()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(safeckpt.StateMismatchError, match=r"(?s)nothing was loaded.*embed.weight: "
                       r"file has shape \(50, 8\) float16, model has shape \(50, 8\) float32"):
        st.load_model(model, path, strict=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    safeckpt.save({"other": torch.zeros(2)}, path)
    with pytest.raises(safeckpt.StateMismatchError,
                       match=r"(?s)nothing was loaded.*unexpected keys \(1\): other"):
        st.load_model(model, path, strict=False)


def test_load_model_materialises_a_meta_model(tmp_path):
    """Item 4: a model built on the meta device has no memory to copy into, which torch's
    load_state_dict makes a silent no-op; load_model gives it the file's tensors (torch's
    assign=True), keeping tied weights tied and requires_grad as the model has it."""
    model = TinyLM()
    path = tmp_path / "lm.sckpt"
    st.save_model(model, path)
    with torch.device("meta"):
        empty = TinyLM()
    assert st.load_model(empty, path) == ([], [], [])
    assert not any(t.is_meta for t in empty.state_dict().values())
    assert same(empty.state_dict(), model.state_dict())
    assert empty.lm_head.weight is empty.embed.weight
    assert isinstance(empty.embed.weight, torch.nn.Parameter) and empty.embed.weight.requires_grad
    with torch.device("meta"):
        untied = TinyLM(tied=False)
    st.load_model(untied, path)  # the file's one tensor goes to two parameters: never aliased
    with torch.no_grad():
        untied.lm_head.weight += 1
    assert torch.equal(untied.embed.weight, model.embed.weight)
    state = model.state_dict()
    del state["norm.bias"]
    safeckpt.save(state, path)
    with torch.device("meta"):
        partial = TinyLM()
    with pytest.raises(safeckpt.StateMismatchError, match=r"norm.bias.*meta device"):
        st.load_model(partial, path, strict=False)
    assert partial.body.weight.is_meta  # refused before anything was touched


def test_load_model_accepts_tied_keys_that_safetensors_dropped(tmp_path):
    """Item 10: safetensors' save_model stores a tied weight under one of its names; a key that
    is missing from the file but shares its memory in the model with a key that is present
    loads with it, as safetensors' load_model accepts it. An untied model still misses it."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = TinyLM()
    path = tmp_path / "lm.safetensors"
    safetensors_torch.save_model(model, str(path))
    keys = safeckpt.open(path).keys()
    assert ("embed.weight" in keys) != ("lm_head.weight" in keys)
    fresh = TinyLM()
    assert st.load_model(fresh, path) == ([], [], [])
    assert fresh.lm_head.weight is fresh.embed.weight
    assert torch.equal(fresh.embed.weight, model.embed.weight)
    dropped = "lm_head.weight" if "embed.weight" in keys else "embed.weight"
    with pytest.raises(safeckpt.StateMismatchError, match=rf"missing keys \(1\): {dropped}"):
        st.load_model(TinyLM(tied=False), path)


def test_load_model_names_keys_that_are_not_str(tmp_path):
    """R5: a file whose state dict has an int key (the tree allows int keys [R4]) is reported with
    that key, in a StateMismatchError, not a TypeError from joining the names."""
    state = dict(TinyLM().state_dict())
    state[3] = torch.zeros(1)
    path = tmp_path / "int.sckpt"
    safeckpt.save(state, path)
    with pytest.raises(safeckpt.StateMismatchError, match=r"unexpected keys \(1\): 3\b"):
        st.load_model(TinyLM(), path)
    assert st.load_model(TinyLM(), path, strict=False).unexpected == [3]


def corrupt(path, name, at=0):
    """Flip one bit of tensor ``name``'s data in the file."""
    with safeckpt.open(path) as f:
        offset = f.info(name).offset
    data = bytearray(path.read_bytes())
    data[offset + at] ^= 0x10
    path.write_bytes(data)


def test_verify_by_default_where_the_bytes_are_copied(tmp_path, backend):
    """Item 15: verify=None (the default) checks CRC32C where the bytes are copied anyway
    (mmap=False, staging to a device, load_model); a zero-copy mapped load stays lazy; False
    never checks; a file without checksums loads under the default."""
    obj, path = staged_case(tmp_path)
    corrupt(path, "big", 700)
    assert bits(st.load(path)["odd"]) == bits(obj["odd"])  # mapped: lazy
    st.load(path, mmap=False, verify=False)
    with pytest.raises(safeckpt.ChecksumError, match="tensor 'big'"):
        st.load(path, mmap=False)
    with safeckpt.open(path) as f, pytest.raises(safeckpt.ChecksumError, match="tensor 'big'"):
        st.device_tensors(f, list(range(len(f))), torch.device("cpu"))
    _, plain = staged_case(tmp_path, checksum=False)
    st.load(plain, mmap=False)
    with safeckpt.open(plain) as f:
        st.device_tensors(f, [0], torch.device("cpu"))
    model_path = tmp_path / "lm.sckpt"
    st.save_model(TinyLM(), model_path)
    corrupt(model_path, "body.weight")
    with pytest.raises(safeckpt.ChecksumError, match="tensor 'body.weight'"):
        st.load_model(TinyLM(), model_path)
    st.load_model(TinyLM(), model_path, verify=False)
    st.save_model(TinyLM(), model_path, checksum=False)
    st.load_model(TinyLM(), model_path)


def trained_optimizer(kind, steps=3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
           "adam": lambda p: torch.optim.Adam(p, lr=1e-3, betas=(0.8, 0.95), amsgrad=True),
           "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1)}[kind](model.parameters())
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_optimizer_state_dict_round_trips_exactly(tmp_path, kind):
    model, opt = trained_optimizer(kind)
    path = tmp_path / "o.sckpt"
    saved = opt.state_dict()
    safeckpt.save(saved, path)
    back = st.load(path)
    assert same(back, saved)
    assert list(back["state"]) == [0, 1, 2, 3] and type(back["param_groups"][0]["params"][0]) is int
    if kind != "sgd":
        assert type(back["param_groups"][0]["betas"]) is tuple
        assert back["state"][0]["step"].dtype == torch.float32 and back["state"][0]["step"].ndim == 0
    assert back["param_groups"][0]["foreach"] is None
    fresh = torch.optim.SGD(model.parameters(), lr=0.5) if kind == "sgd" else type(opt)(model.parameters())
    fresh.load_state_dict(back)
    assert same(fresh.state_dict(), saved)


RESUME = r"""
import hashlib, json, random, sys
import numpy as np, torch, safeckpt
torch.set_num_threads(1)

def build(kind, seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.2), torch.nn.Tanh(),
                                torch.nn.Linear(16, 1))
    if kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, 3, gamma=0.5)

def step(model, opt, sched):
    x = torch.randn(16, 8)  # every generator is used: torch, numpy and python's
    y = x.sum(1, keepdim=True) + torch.from_numpy(np.random.standard_normal((16, 1)).astype("f4"))
    loss = ((model(x) - y - random.random()) ** 2).mean()
    opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    return loss.item()

mode, directory, k, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
out = {}
for kind in ["sgd", "adam"]:
    path = f"{directory}/{kind}.sckpt"
    if mode == "full":
        random.seed(1); np.random.seed(1)
        model, opt, sched = build(kind, 0)
        losses = []
        for i in range(n):
            if i == k:
                safeckpt.save_checkpoint(path, model=model, optimizer=opt, scheduler=sched, step=k)
            losses.append(step(model, opt, sched))
        losses = losses[k:]
    else:
        model, opt, sched = build(kind, 99)  # other weights and generators: all must be restored
        info = safeckpt.load_checkpoint(path, model=model, optimizer=opt, scheduler=sched)
        losses = [step(model, opt, sched) for _ in range(info.step, n)]
    weights = b"".join(t.numpy().tobytes() for t in model.state_dict().values())
    out[kind] = {"losses": [float(v).hex() for v in losses],
                 "weights": hashlib.sha256(weights).hexdigest()}
print(json.dumps(out))
"""


def run_resume(mode, directory, k=4, n=9):
    result = subprocess.run([sys.executable, "-c", RESUME, mode, str(directory), str(k), str(n)],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONHASHSEED": "0"})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_resume_in_a_new_process_is_bit_exact(tmp_path):
    """Train to k, checkpoint, go on to n; a new process loads the checkpoint and trains k..n:
    the losses and final weights are bit-identical (SGD with momentum and Adam, with dropout
    and all three random generators in play)."""
    full = run_resume("full", tmp_path)
    resumed = run_resume("resume", tmp_path)
    for kind in ["sgd", "adam"]:
        assert len(full[kind]["losses"]) == 5
        assert resumed[kind] == full[kind], kind
