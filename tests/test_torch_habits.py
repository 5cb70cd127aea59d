"""torch habits that must just work (issue 12): key prefixes of torch.compile and DDP, and the
hints of a load that does not fit; casts; assign=True; map_location functions and int devices;
state dicts restored in place. Skipped where torch is not installed."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import safeckpt  # noqa: E402
import safeckpt.torch as st  # noqa: E402
from safeckpt.tree import same  # noqa: E402
from forge import forge  # noqa: E402


class Net(torch.nn.Module):
    def __init__(self, dtype=torch.float32, tied=True):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4, dtype=dtype)
        self.body = torch.nn.Linear(4, 4, dtype=dtype)
        self.head = torch.nn.Linear(4, 10, bias=False, dtype=dtype)
        if tied:
            self.head.weight = self.embed.weight
        self.register_buffer("count", torch.tensor(7, dtype=torch.int64))

    def forward(self, x):
        return self.head(self.body(self.embed(x)))


def net(seed=0, **kwargs):
    torch.manual_seed(seed)
    return Net(**kwargs)


def values(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- key prefixes: torch.compile's _orig_mod., DDP's module. ---------------------------------------

def test_strip_prefix_loads_compiled_and_data_parallel_models(tmp_path):
    source = net()
    compiled = torch.compile(source)  # compiles at its first call: state_dict() needs none
    wrapped = torch.nn.DataParallel(net(1))
    wrapped.module.load_state_dict(source.state_dict())
    for model, prefix in ((compiled, "_orig_mod."), (wrapped, "module.")):
        path = tmp_path / f"{prefix.strip('._')}.sckpt"
        st.save_model(model, path)
        assert all(key.startswith(prefix) for key in safeckpt.open(path).keys())
        target = net(2)
        with pytest.raises(safeckpt.StateMismatchError) as caught:
            st.load_model(target, path)
        message = str(caught.value)
        assert f"hint: pass strip_prefix={prefix!r}: its keys are the model's with {prefix!r} " \
            "in front" in message, message
        assert "nothing was loaded" in message and not equal(values(target), values(source))
        assert st.load_model(target, path, strip_prefix=prefix) == ([], [], [])
        assert equal(values(target), values(source))
        assert target.head.weight is target.embed.weight
    # and back: a plain file into a wrapped model (its keys have the prefix)
    path = tmp_path / "plain.sckpt"
    st.save_model(source, path)
    target = torch.nn.DataParallel(net(3))
    with pytest.raises(safeckpt.StateMismatchError, match="hint: pass add_prefix='module.'"):
        st.load_model(target, path)
    assert st.load_model(target, path, add_prefix="module.") == ([], [], [])
    assert equal(values(target.module), values(source))


def test_strip_prefix_keeps_other_keys_and_refuses_two_keys_that_become_one(tmp_path):
    state = {"module.body.weight": torch.ones(4, 4), "count": torch.tensor(3),
             "module.extra": torch.zeros(1)}
    path = tmp_path / "mixed.sckpt"
    safeckpt.save(state, path)
    model = net()
    report = st.load_model(model, path, strip_prefix="module.", strict=False)
    assert report.unexpected == ["extra"] and "body.bias" in report.missing
    assert model.body.weight.eq(1).all() and model.count.item() == 3  # 'count' kept as it is
    safeckpt.save({"module.count": torch.tensor(1), "count": torch.tensor(2)}, path)
    with pytest.raises(safeckpt.StateMismatchError,
                       match=r"keys 'module.count' and 'count' both become 'count'"):
        st.load_model(net(), path, strip_prefix="module.", strict=False)
    for bad in ("", b"module.", 3):
        with pytest.raises(safeckpt.InvalidValueError, match=r"strip_prefix=.*non-empty str"):
            st.load_model(net(), tmp_path / "never read.sckpt", strip_prefix=bad)
    with pytest.raises(safeckpt.InvalidValueError, match=r"add_prefix="):
        st.load_state(net(), {}, add_prefix=1)


def test_hint_is_on_the_report_of_a_partial_load(tmp_path):
    """strict=False users see the fix too: report.hint."""
    state = {"module." + k: v for k, v in net(1).state_dict().items() if k != "count"}
    state["count"] = torch.tensor(9)  # fits: the load is partial, not empty
    report = st.load_state(net(), state, strict=False)
    assert report.hint.startswith("pass strip_prefix='module.'")
    assert report.missing and report.unexpected
    assert st.load_state(net(), state, strip_prefix="module.", strict=False).hint == ""


def test_a_checkpoint_suggests_the_prefix_of_its_model(tmp_path):
    """A CheckpointManager file loaded into a model says prefix='state.model' instead of listing
    state, step, metrics, rng as unexpected; save_checkpoint's says prefix='model'."""
    source = net()
    opt = torch.optim.Adam(source.parameters())
    manager = safeckpt.CheckpointManager(tmp_path / "ckpts")
    managed = manager.save(5, {"model": source, "optimizer": opt}).path
    saved = tmp_path / "c.sckpt"
    safeckpt.save_checkpoint(saved, model=source, optimizer=opt, step=5)
    for path, prefix in ((managed, "state.model"), (saved, "model")):
        for strict in (True, False):
            with pytest.raises(safeckpt.StateMismatchError) as caught:
                st.load_model(net(1), path, strict=strict)
            message = str(caught.value)
            assert f"hint: pass prefix={prefix!r}: the model's state is at {prefix!r}" in message
            assert "rng" not in message and "unexpected" not in message, message
        target = net(1)
        assert st.load_model(target, path, prefix=prefix) == ([], [], [])
        assert equal(values(target), values(source))
    nested = safeckpt.load(managed, framework="torch")
    report = st.check_state(net(1), nested)
    assert report.hint.startswith("pass prefix='state.model'")
    assert set(report.unexpected) == {"state", "step", "metrics", "rng"}
    target = net(1)
    assert st.load_state(target, nested, prefix="state.model") == ([], [], [])
    assert st.load_state(target, nested, prefix=("state", "model")) == ([], [], [])
    assert equal(values(target), values(source))
    with pytest.raises(KeyError, match="nothing at 'state.modle'"):
        st.load_state(target, nested, prefix="state.modle")
    # a prefix below the one given, joined to it; and with the DDP prefix as well
    safeckpt.save({"run": {"ema": {"module." + k: v for k, v in source.state_dict().items()}}},
                  saved)
    with pytest.raises(safeckpt.StateMismatchError,
                       match=r"pass prefix='run.ema', strip_prefix='module.'"):
        st.load_model(net(1), saved, prefix="run")


def test_a_prefix_means_the_same_in_a_state_as_in_a_file(tmp_path):
    """load_state and check_state find a prefix in a state in memory as load_model finds it in
    the file of that state: "runs.-1" is the int key -1; a list's -1 only in a tuple."""
    source = torch.nn.Linear(3, 2)
    state = {"runs": {-1: source.state_dict()}, "list": [source.state_dict()]}
    path = tmp_path / "runs.sckpt"
    safeckpt.save(state, path)
    for prefix in ("runs.-1", ("runs", -1), ("list", -1), "list.0"):
        for load in (lambda model: st.load_state(model, state, prefix=prefix),
                     lambda model: st.load_model(model, path, prefix=prefix)):
            model = torch.nn.Linear(3, 2)
            assert load(model) == ([], [], []), prefix
            assert torch.equal(model.weight, source.weight)
        assert st.check_state(torch.nn.Linear(3, 2), state, prefix=prefix) == ([], [], [])
    for load in (lambda: st.load_state(torch.nn.Linear(3, 2), state, prefix="list.-1"),
                 lambda: st.load_model(torch.nn.Linear(3, 2), path, prefix="list.-1")):
        with pytest.raises(KeyError, match="nothing at 'list.-1'"):
            load()


def test_load_report_keeps_its_tuple_and_grows_attributes(tmp_path):
    report = st.check_state(net(), {"body.weight": torch.zeros(4, 4), "x": torch.zeros(1)})
    missing, unexpected, mismatched = report
    assert unexpected == ["x"] and "body.bias" in missing and mismatched == []
    assert report.cast == [] and isinstance(report.hint, str) and "cast=" in repr(report)
    assert st.check_state(net(), net().state_dict()) == ([], [], [])


# -- casts -------------------------------------------------------------------------------------

def test_cast_is_explicit_and_reported(tmp_path):
    """An fp32 file into a bf16 model: without cast the message says cast=True (strict=False no
    longer loads nothing in silence: it raises); with cast=True the values are torch's own cast
    (load_state_dict's copy_), and every cast is listed."""
    source = net()
    path = tmp_path / "fp32.sckpt"
    st.save_model(source, path)
    model = net(1, dtype=torch.bfloat16)
    before = values(model)
    with pytest.raises(safeckpt.StateMismatchError) as caught:
        st.load_model(model, path)
    message = str(caught.value)
    assert ("hint: pass cast=True: 4 tensors differ only in dtype (e.g. embed.weight: float32 in "
            "the file, bfloat16 in the model)") in message
    assert ("body.weight: file has shape (4, 4) float32, model has shape (4, 4) bfloat16; "
            "pass cast=True to cast it") in message
    with pytest.warns(RuntimeWarning, match=r"4 tensors not loaded, as they differ from the "
                      r"model's only in dtype \(embed.weight, .*\); pass cast=True"):
        report = st.load_model(model, path, strict=False)  # loads 'count' only
    assert report.hint.startswith("pass cast=True") and len(report.mismatched) == 4
    assert torch.equal(model.body.weight, before["body.weight"])
    report = st.load_model(model, path, cast=True)
    assert report == ([], [], [])
    assert sorted(report.cast) == [("body.bias", torch.float32, torch.bfloat16),
                                   ("body.weight", torch.float32, torch.bfloat16),
                                   ("embed.weight", torch.float32, torch.bfloat16),
                                   ("head.weight", torch.float32, torch.bfloat16)]
    reference = net(1, dtype=torch.bfloat16)
    reference.load_state_dict(source.state_dict())  # torch casts in copy_
    assert equal(values(model), values(reference))
    assert model.body.weight.dtype == torch.bfloat16 and model.head.weight is model.embed.weight
    # a meta model takes cast tensors in place of its own
    with torch.device("meta"):
        empty = Net(dtype=torch.bfloat16)
    assert st.load_model(empty, path, cast=True) == ([], [], [])
    assert equal(values(empty), values(reference)) and empty.head.weight is empty.embed.weight


def test_casts_that_change_values_are_refused(tmp_path):
    """cast=True casts within a kind or up (bool < int < float < complex); float to int, complex
    to real, and ints narrowed below their values are refused, naming the key."""
    model = torch.nn.Module()
    model.register_buffer("i", torch.zeros(3, dtype=torch.int8))
    model.register_buffer("f", torch.zeros(2, dtype=torch.float16))
    fits = {"i": torch.tensor([-128, 0, 127], dtype=torch.int64),
            "f": torch.tensor([1, 2], dtype=torch.int32)}
    assert st.load_state(model, fits, cast=True).cast == [("i", torch.int64, torch.int8),
                                                          ("f", torch.int32, torch.float16)]
    assert model.i.tolist() == [-128, 0, 127] and model.f.tolist() == [1, 2]
    for state, words in [({"i": torch.tensor([1, 2, 300])}, "i: .*not cast: its values 1..300 do "
                          "not fit int8"),
                         ({"i": torch.ones(3, dtype=torch.float32)}, "i: .*not cast: float32 to "
                          "int8 goes down the kinds"),
                         ({"f": torch.ones(2, dtype=torch.complex64)}, "f: .*not cast: complex64 "
                          "to float16"),
                         ({"i": torch.tensor([0, 1, 2], dtype=torch.uint64)}, None)]:
        if words is None:
            st.load_state(model, state, cast=True, strict=False)
            assert model.i.tolist() == [0, 1, 2]
            continue
        before = model.i.clone()
        with pytest.raises(safeckpt.StateMismatchError, match=words):
            st.load_state(model, state, cast=True, strict=False)
        assert torch.equal(model.i, before)


def test_casts_that_overflow_or_are_inexact_are_refused(tmp_path):
    """cast=True refuses, as it refuses ints narrowed below their values, a float narrowed where
    a finite value would become inf or nan, and an int cast to a float that does not hold it
    exactly; rounding a float is a cast, inf and nan stay what they are."""
    model = torch.nn.Module()
    for name, dtype in (("h", torch.float16), ("b", torch.bfloat16), ("f", torch.float32),
                        ("d", torch.float64), ("e", torch.float8_e4m3fn), ("c", torch.complex64)):
        model.register_buffer(name, torch.zeros(3, dtype=dtype))
    fits = {"h": torch.tensor([65519, float("inf"), float("nan")], dtype=torch.float64),
            "b": torch.tensor([1.1, -3e38, 1e-3]),  # rounded
            "f": torch.tensor([2**24, -2**24, 3]),
            "d": torch.tensor([2**53, -2**53, 2**60]),  # 2**60 is a float64 too
            "e": torch.tensor([448.0, -448.0, 0.1]),
            "c": torch.tensor([1e30, 2.0, 3.0], dtype=torch.float64)}
    report = st.load_state(model, fits, cast=True)
    assert [key for key, _, _ in report.cast] == ["h", "b", "f", "d", "e", "c"]
    for key, value in fits.items():
        assert same(getattr(model, key), value.to(getattr(model, key).dtype)), key
    largest_int64 = torch.iinfo(torch.int64).max
    for key, value, words in [
            ("h", torch.tensor([1.0, 1e10, 2.0], dtype=torch.float64), r"its value "
             r"10000000000.0 overflows float16, whose largest finite value is 65504"),
            ("h", torch.tensor([65520.0, 65519.0, 7e4], dtype=torch.float64),  # 65519 rounds
             r"its value 65520.0 \(and 1 more value\) overflows float16"),
            ("b", torch.tensor([torch.finfo(torch.float32).max, 0, 0]), "its value "
             r"3.4028234663852886e\+38 overflows bfloat16"),
            ("e", torch.tensor([1000.0, 0, 0]), "its value 1000.0 overflows float8_e4m3fn, "
             "whose largest finite value is 448"),  # nan, or 448 (saturated), by torch version
            ("c", torch.tensor([0, 1e300j, 0], dtype=torch.complex128), r"its value 1e\+300 "
             "overflows complex64"),
            ("f", torch.tensor([2**24 + 1, 2**24 + 3, 1]), r"its value 16777217 \(and 1 more "
             r"value\) would become 16777216.0 in float32, which holds every int up to 16777216 "
             "exactly"),
            ("d", torch.tensor([2**53 + 1, 0, 0]), "its value 9007199254740993 would become "
             "9007199254740992.0 in float64"),
            ("d", torch.tensor([largest_int64, 0, 0]), f"its value {largest_int64} would become "
             r"9.223372036854776e\+18"),
            ("h", torch.tensor([1, 70000, 2], dtype=torch.int32), "its value 70000 would "
             "become inf in float16"),
            ("h", torch.tensor([2049, 1, 2]), "its value 2049 would become 2048.0"),
            ("f", torch.tensor([2**64 - 1, 0, 0], dtype=torch.uint64), "its value "
             r"18446744073709551615 would become 1.8446744073709552e\+19 in float32")]:
        before = getattr(model, key).clone()
        with pytest.raises(safeckpt.StateMismatchError, match=f"{key}: .*not cast: {words}"):
            st.load_state(model, {key: value}, cast=True, strict=False)
        assert same(getattr(model, key), before)


# -- assign=True -------------------------------------------------------------------------------

def test_assign_takes_the_files_tensors_without_a_copy(tmp_path):
    """assign=True as torch's load_state_dict(assign=True): the module holds the file's tensors
    (views of the load's mapping, not copies into its own memory), requires_grad as the module
    had it, ties kept; the views are writable and the file does not change."""
    source = net()
    path = tmp_path / "m.sckpt"
    st.save_model(source, path)
    model = net(1)
    model.body.weight.requires_grad_(False)
    own = {t.data_ptr() for t in model.state_dict().values()}
    assert st.load_model(model, path, assign=True) == ([], [], [])
    assert equal(values(model), values(source))
    assert not own & {t.data_ptr() for t in model.state_dict().values()}
    with safeckpt.open(path) as f:  # one mapping: the tensors lie as far apart as in the file
        offsets = {name: f.info(name).offset for name in f.keys()}
    base = model.embed.weight.data_ptr() - offsets["embed.weight"]
    assert all(model.state_dict()[k].data_ptr() - base == offset for k, offset in offsets.items())
    assert isinstance(model.body.weight, torch.nn.Parameter)
    assert not model.body.weight.requires_grad and model.body.bias.requires_grad
    reference = net(1)
    reference.body.weight.requires_grad_(False)
    reference.load_state_dict(st.load(path), assign=True)
    assert [(n, p.requires_grad) for n, p in reference.named_parameters(remove_duplicate=False)] \
        == [(n, p.requires_grad) for n, p in model.named_parameters(remove_duplicate=False)]
    assert model.head.weight is model.embed.weight  # torch's assign unties them; this keeps ties
    model(torch.tensor([1, 2])).sum().backward()  # trains
    with torch.no_grad():
        model.body.bias += 1
    assert torch.equal(st.load(path)["body.bias"], source.body.bias)  # the file is untouched


def test_assign_keeps_an_untied_model_untied(tmp_path):
    source = net()
    path = tmp_path / "m.sckpt"
    st.save_model(source, path)  # the tied weight is stored once
    model = net(1, tied=False)
    st.load_model(model, path, assign=True)
    assert model.head.weight is not model.embed.weight
    with torch.no_grad():
        model.head.weight += 1
    assert torch.equal(model.embed.weight, source.embed.weight)


def test_tied_keys_given_different_values_are_a_mismatch(tmp_path):
    """A file of the untied model holds different values for keys that the model ties (one
    tensor): copy and assign alike raise under strict and, with strict=False, report both keys
    and leave the tied tensor as it was (neither value dropped in silence); equal values load."""
    source = net(tied=False)
    with torch.no_grad():
        source.head.weight.fill_(7)
    path = tmp_path / "untied.sckpt"
    st.save_model(source, path)
    for assign in (False, True):
        model = net(1)
        before = values(model)
        with pytest.raises(safeckpt.StateMismatchError, match=r"embed.weight: .*tied in the model "
                           "to head.weight, whose values here differ"):
            st.load_model(model, path, assign=assign)
        assert equal(values(model), before)
        report = st.load_model(model, path, assign=assign, strict=False)
        assert sorted(key for key, _, _ in report.mismatched) == ["embed.weight", "head.weight"]
        assert model.head.weight is model.embed.weight
        assert torch.equal(model.embed.weight, before["embed.weight"])
        assert torch.equal(model.body.weight, source.body.weight)  # the rest is loaded
    tied_state = net(1).state_dict()  # one tensor's memory under both keys
    with pytest.raises(safeckpt.StateMismatchError, match="head.weight: .*tied in the model"):
        st.load_model(tied_state, path)
    report = st.check_state(net(1), st.load(path))
    assert sorted(key for key, _, _ in report.mismatched) == ["embed.weight", "head.weight"]
    with torch.no_grad():
        source.head.weight.copy_(source.embed.weight)  # equal values, two tensors in the file
    st.save_model(source, path)
    for assign in (False, True):
        model = net(1)
        assert st.load_model(model, path, assign=assign) == ([], [], [])
        assert model.head.weight is model.embed.weight
        assert torch.equal(model.embed.weight, source.embed.weight)


# -- map_location functions and int devices ----------------------------------------------------

def saved_on_cuda(tmp_path):
    path = tmp_path / "m.sckpt"
    path.write_bytes(forge({"w": np.ones(3, np.float32), "v": np.zeros(2, np.float32)}, minor=1,
                           extra={"tree": ["dict", "w", ["tensor", 0, "cuda:0"],
                                           "v", ["tensor", 1], "t", ["ref", 1]]}))
    return path


def test_map_location_function_is_called_as_torch_load_calls_it(tmp_path):
    path = saved_on_cuda(tmp_path)
    calls = []

    def keep(storage, location):
        calls.append((type(storage), storage.device.type, storage.nbytes(), location))
        return storage

    back = st.load(path, map_location=keep)
    assert sorted(calls) == [(torch.UntypedStorage, "cpu", 8, "cpu"),
                             (torch.UntypedStorage, "cpu", 12, "cuda:0")]  # a tied tensor once
    assert back["w"].device.type == "cpu" and back["w"].tolist() == [1, 1, 1]
    assert back["t"] is back["v"]
    with safeckpt.open(path) as f:
        viewed = f.load(framework="torch", map_location=lambda storage, location: storage)
        start = f._mapping.address
        assert start <= viewed["w"].data_ptr() < start + f.size  # the storage given: zero-copy
    for through in (lambda: safeckpt.load(path, framework="torch", map_location=keep),
                    lambda: safeckpt.open(path).load(framework="torch", map_location=keep)):
        assert through()["w"].tolist() == [1, 1, 1]
    # another storage, a tensor, or None (where it was saved) as torch.load takes them
    copied = st.load(path, map_location=lambda storage, location: storage.clone())
    assert copied["w"].tolist() == [1, 1, 1] and copied["v"].dtype == torch.float32
    as_tensor = st.load(path, map_location=lambda s, loc: torch.full((3,), 5.0)
                        if loc == "cuda:0" else None)
    assert as_tensor["w"].tolist() == [5, 5, 5] and as_tensor["v"].tolist() == [0, 0]
    if not torch.cuda.is_available():
        with pytest.raises(safeckpt.InvalidValueError, match=r"tensor 'w' was saved from "
                           r"'cuda:0'.*not available.*map_location"):
            st.load(path, map_location=lambda storage, location: None)
    for bad, words in [(lambda s, loc: "cpu", r"map_location\('cpu'\) for tensor 'v' returned "
                        "str, not a storage, a tensor or None"),
                       (lambda s, loc: torch.zeros(2, 2), r"returned a tensor of shape \(2, 2\)"),
                       (lambda s, loc: torch.UntypedStorage(1), "returned a storage of 1 bytes")]:
        with pytest.raises(safeckpt.InvalidValueError, match=words):
            st.load(tmp_path / "m.sckpt", map_location=bad, prefix="v")
    with pytest.raises(safeckpt.InvalidValueError, match="device=<function.*not a device"):
        st.load(path, device=keep)


def _saved_checkpoints(tmp_path):
    """A model and its Adam state after one step, saved by save_checkpoint (to the returned path)
    and by a CheckpointManager (step 1)."""
    model = net()
    opt = torch.optim.Adam(model.parameters())
    model(torch.tensor([1])).sum().backward()
    opt.step()
    path = tmp_path / "c.sckpt"
    safeckpt.save_checkpoint(path, model=model, optimizer=opt, step=1)
    manager = safeckpt.CheckpointManager(tmp_path / "m")
    manager.save(1, {"model": model, "optimizer": opt})
    return model, opt, path, manager


def test_map_location_function_in_checkpoint_restores(tmp_path):
    """load_checkpoint and CheckpointManager.restore take a map_location function too (it moves
    the state given to torch objects, e.g. an optimizer's)."""
    model, opt, path, manager = _saved_checkpoints(tmp_path)
    for restore in (lambda m, o, f: safeckpt.load_checkpoint(path, model=m, optimizer=o,
                                                             map_location=f),
                    lambda m, o, f: manager.restore({"model": m, "optimizer": o},
                                                    map_location=f)):
        target = net(1)
        target_opt = torch.optim.Adam(target.parameters())
        locations = []
        restore(target, target_opt, lambda storage, loc: locations.append(loc) or storage)
        assert locations and set(locations) == {"cpu"}
        assert equal(values(target), values(model))
        assert same(target_opt.state_dict(), opt.state_dict())


def test_a_map_location_function_error_in_a_restore_names_the_tensor(tmp_path):
    """A map_location function that returns what torch.load would not take, in a restore: the
    message names the target and the tensor's key below it, not a generic 'tensor'."""
    model, opt, path, manager = _saved_checkpoints(tmp_path)
    bad = lambda storage, location: 5  # noqa: E731
    target = net(1)
    for restore, where in [
            (lambda: safeckpt.load_checkpoint(path, model=target, map_location=bad),
             r"\['model'\]"),
            (lambda: manager.restore({"model": target}, map_location=bad),
             r"\['state'\]\['model'\]")]:
        with pytest.raises(safeckpt.InvalidValueError, match=where + r": map_location\('cpu'\) "
                           r"for tensor 'count' returned int"):
            restore()
    with pytest.raises(safeckpt.InvalidValueError, match=r"\['optimizer'\]: map_location\('cpu'\) "
                       r"for tensor 'state.0.(step|exp_avg)' returned int"):
        safeckpt.load_checkpoint(path, optimizer=torch.optim.Adam(target.parameters()),
                                 map_location=bad)
    assert equal(values(target), values(net(1)))


def test_int_map_location_is_an_accelerator_device(tmp_path):
    """map_location=0 as device=0 and safetensors' device=0: device 0 of the accelerator
    (torch.load raises TypeError on an int); a clear error where there is none."""
    path = tmp_path / "d.sckpt"
    safeckpt.save({"w": torch.ones(3)}, path)
    calls = [lambda: st.load(path, map_location=0), lambda: st.load(path, device=0),
             lambda: st.load(path, map_location={"cpu": 0}),
             lambda: safeckpt.load(path, framework="torch", map_location=0)]
    for call in calls:
        if torch.accelerator.is_available():
            assert call()["w"].device == torch.device(torch.accelerator.current_accelerator(), 0)
        else:
            with pytest.raises(safeckpt.InvalidValueError,
                               match=r"=0: an int is a device of the accelerator .*no accelerator"):
                call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_map_location_function_and_assign_on_cuda(tmp_path):
    path = tmp_path / "m.sckpt"
    source = net()
    st.save_model(source, path)
    back = st.load(path, map_location=lambda storage, loc: storage.cuda(0))
    assert all(t.device.type == "cuda" for t in back.values())
    assert torch.equal(back["body.weight"].cpu(), source.body.weight)
    model = net(1).cuda()
    assert st.load_model(model, path, assign=True) == ([], [], [])
    assert model.body.weight.device.type == "cuda" and model.head.weight is model.embed.weight
    assert equal({k: v.cpu() for k, v in values(model).items()}, values(source))


# -- plain state dicts: copied into, never rebound ---------------------------------------------

def test_load_model_into_a_state_dict_copies_in_place(tmp_path):
    source = net()
    path = tmp_path / "m.sckpt"
    st.save_model(source, path)
    model = net(1)
    sd = model.state_dict()
    ptrs = {k: v.data_ptr() for k, v in sd.items()}
    assert st.load_model(sd, path) == ([], [], [])
    assert {k: v.data_ptr() for k, v in sd.items()} == ptrs
    assert equal(values(model), values(source))  # the model's own tensors changed
    half = {k: v.to(torch.float16) for k, v in net(2).state_dict().items()}
    report = st.load_state(half, source.state_dict(), cast=True)
    assert len(report.cast) == 5 and torch.equal(half["body.weight"],
                                                 source.body.weight.to(torch.float16))
    with pytest.raises(safeckpt.InvalidValueError, match="assign=True replaces a module's"):
        st.load_model(sd, path, assign=True)
    meta = net(1).to("meta").state_dict()
    with pytest.raises(safeckpt.StateMismatchError, match=r"body.weight: .*the dict's tensor is on "
                       "the meta device"):
        st.load_model(meta, path)
    with pytest.raises(safeckpt.StateMismatchError, match=r"count: .*not a tensor"):
        st.load_model({**sd, "count": 3}, path)


@pytest.mark.parametrize("how", ["load_checkpoint", "restore", "restore_whole", "restore_into"])
def test_every_restore_path_copies_into_a_state_dict(tmp_path, how):
    """Restoring into model.state_dict() and an optimizer's state_dict() writes into their
    tensors (data_ptr unchanged, the model and the optimizer see the values): no dict entry is
    rebound."""
    source = net()
    source_opt = torch.optim.SGD(source.parameters(), lr=0.1, momentum=0.9)
    source(torch.tensor([1, 2])).sum().backward()
    source_opt.step()
    model = net(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.tensor([3])).sum().backward()
    opt.step()
    sd, osd = model.state_dict(), opt.state_dict()
    tensors = [*sd.values(), *(t for s in osd["state"].values() for t in s.values())]
    ptrs = [t.data_ptr() for t in tensors]
    path = tmp_path / "c.sckpt"
    manager = safeckpt.CheckpointManager(tmp_path / "m")
    if how == "load_checkpoint":
        safeckpt.save_checkpoint(path, model=source, optimizer=source_opt, step=1)
        safeckpt.load_checkpoint(path, model=sd, optimizer=osd)
    elif how == "restore":
        manager.save(1, {"model": source, "optimizer": source_opt})
        manager.restore({"model": sd, "optimizer": osd})
    elif how == "restore_whole":
        manager.save(1, source.state_dict())
        manager.restore(sd)
    else:
        safeckpt.save({"model": source.state_dict()}, path)
        safeckpt.checkpoint.restore_into({"model": sd}, safeckpt.load(path))
    assert [t.data_ptr() for t in tensors] == ptrs
    assert equal(values(model), values(source))
    if how in ("load_checkpoint", "restore"):
        for i, param in enumerate(model.parameters()):
            assert torch.equal(opt.state[param]["momentum_buffer"],
                               source_opt.state_dict()["state"][i]["momentum_buffer"])


@pytest.mark.parametrize("how", ["load_checkpoint", "restore"])
def test_an_optimizers_state_dict_is_refused_before_anything_is_written(tmp_path, how):
    """An optimizer's state_dict() is a copy built on each call: its lr, or the state of an
    optimizer that never stepped, would change in the copy only. Refused before anything is
    written (the model's state dict beside it included), saying to pass the optimizer."""
    source = net()
    source_opt = torch.optim.Adam(source.parameters(), lr=0.5)
    source(torch.tensor([1, 2])).sum().backward()
    source_opt.step()
    path = tmp_path / "c.sckpt"
    manager = safeckpt.CheckpointManager(tmp_path / "m")
    if how == "load_checkpoint":
        safeckpt.save_checkpoint(path, model=source, optimizer=source_opt, step=1)

        def restore(model_state, optimizer):
            return safeckpt.load_checkpoint(path, model=model_state, optimizer=optimizer)
    else:
        manager.save(1, {"model": source, "optimizer": source_opt})

        def restore(model_state, optimizer):
            return manager.restore({"model": model_state, "optimizer": optimizer})
    model = net(1)
    fresh = torch.optim.Adam(model.parameters(), lr=0.1)  # never stepped: no state yet
    before = values(model)
    with pytest.raises(safeckpt.InvalidValueError, match=r"\['optimizer'\] is an optimizer's "
                       r"state_dict\(\), a dict that torch builds anew on each call: only its "
                       r"tensors can be restored in place, and \['optimizer'\]\['state'\], "
                       r"\['optimizer'\]\['param_groups'\]\[0\]\['lr'\] would change in that "
                       r"dict only, not in the optimizer; pass the optimizer itself"):
        restore(model.state_dict(), fresh.state_dict())
    assert equal(values(model), before) and fresh.param_groups[0]["lr"] == 0.1 and not fresh.state
    model(torch.tensor([3])).sum().backward()
    stepped = torch.optim.Adam(model.parameters(), lr=0.1)
    stepped.step()  # its state tensors could be written in place; its lr could not
    moments = [s["exp_avg"].clone() for s in stepped.state.values()]
    before = values(model)
    with pytest.raises(safeckpt.InvalidValueError, match=r"\['optimizer'\]\['param_groups'\]"
                       r"\[0\]\['lr'\] would change"):
        restore(model.state_dict(), stepped.state_dict())
    assert equal(values(model), before) and stepped.param_groups[0]["lr"] == 0.1
    assert all(torch.equal(s["exp_avg"], m) for s, m in zip(stepped.state.values(), moments))
    restore(model.state_dict(), stepped)  # the optimizer itself
    assert stepped.param_groups[0]["lr"] == 0.5 and equal(values(model), values(source))
    assert same(stepped.state_dict(), source_opt.state_dict())


def test_a_schedulers_state_dict_is_refused_too(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 1)
    opt.step()
    scheduler.step()
    path = tmp_path / "c.sckpt"
    safeckpt.save_checkpoint(path, model=model, optimizer=opt, scheduler=scheduler, step=1)
    target = torch.optim.lr_scheduler.StepLR(torch.optim.SGD(model.parameters(), lr=0.1), 1)
    with pytest.raises(safeckpt.InvalidValueError, match=r"\['scheduler'\] is an LR scheduler's "
                       r"state_dict\(\).*\['scheduler'\]\['last_epoch'\].*pass the scheduler"):
        safeckpt.load_checkpoint(path, scheduler=target.state_dict())
    assert target.last_epoch == 0
    safeckpt.load_checkpoint(path, scheduler=target)
    assert target.last_epoch == 1
