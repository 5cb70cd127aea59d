"""safeckpt.jax.load(target=...)/restore: the template's exact pytree back (issue 15, items 2, 3, 6).

Templates: optax states (named tuples inside tuples), flax TrainState, nnx.State (concrete and
abstract), Python scalar leaves; every problem listed in one StateMismatchError; 64-bit tensors
with x64 off cast only with cast_x64=True, reported in one UserWarning.
"""

import warnings

import numpy as np
import pytest

import safeckpt

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
pytest.importorskip("flax")
import safeckpt.jax as sj  # noqa: E402
from flax import nnx  # noqa: E402
from flax.training import train_state  # noqa: E402

jnp = jax.numpy
pytestmark = pytest.mark.usefixtures("backend")


def bits(tree):
    """Each leaf's (dtype, shape, bytes), typed keys as their key data."""
    def one(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return (str(x.dtype), x.shape, np.asarray(jax.random.key_data(x)).tobytes())
        a = np.asarray(x)
        return (str(a.dtype), a.shape, a.tobytes())
    return [one(x) for x in jax.tree_util.tree_leaves(tree)]


def treedef(tree):
    return jax.tree_util.tree_structure(tree)


def adamw():
    return optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 20))


def trained_params_and_state(steps=3):
    params = {"dense": {"kernel": jnp.arange(12, dtype=jnp.float32).reshape(3, 4) / 7,
                        "bias": jnp.ones(4, jnp.bfloat16)}}
    tx = adamw()
    state = tx.init(params)
    for _ in range(steps):
        grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.25), params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def test_optax_state_comes_back_with_its_tuples_and_named_tuples(tmp_path):
    params, opt_state = trained_params_and_state()
    sj.save({"params": params, "opt": opt_state}, tmp_path / "o.sckpt")
    fresh = jax.tree_util.tree_map(jnp.zeros_like, params)
    template = {"params": fresh, "opt": adamw().init(fresh)}
    back = sj.load(tmp_path / "o.sckpt", target=template)
    assert treedef(back) == treedef(template)
    assert type(back["opt"]) is tuple and type(back["opt"][0]) is type(opt_state[0])
    assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(back))
    assert bits(back) == bits({"params": params, "opt": opt_state})
    # the next update runs on what came back, and equals the one on the original state
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    want, _ = adamw().update(grads, opt_state, params)
    got, _ = adamw().update(grads, back["opt"], back["params"])
    assert bits(got) == bits(want)


def test_a_train_state_with_an_int_step_template_takes_the_saved_array(tmp_path):
    params, _ = trained_params_and_state(0)
    state = train_state.TrainState.create(apply_fn=None, params=params, tx=adamw())
    step = jax.jit(lambda s: s.apply_gradients(grads=jax.tree_util.tree_map(jnp.ones_like,
                                                                            s.params)))
    trained = step(step(state))
    assert isinstance(trained.step, jax.Array)  # and the template's step is the int 0
    sj.save({"state": trained, "rng": jax.random.key(7)}, tmp_path / "t.sckpt")
    template = {"state": state, "rng": jax.random.key(0)}
    back = sj.load(tmp_path / "t.sckpt", target=template)
    assert treedef(back) == treedef({"state": trained, "rng": jax.random.key(0)})
    assert type(back["state"]) is train_state.TrainState and back["state"].tx is state.tx
    assert int(back["state"].step) == 2 and back["state"].step.weak_type == trained.step.weak_type
    assert bits(back) == bits({"state": trained, "rng": jax.random.key(7)})
    assert bits(step(back["state"])) == bits(step(trained))


class Model(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(4, 3, rngs=rngs, param_dtype=jnp.bfloat16)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.rngs = rngs


def model_and_optimizer(seed):
    model = Model(nnx.Rngs(seed))
    return model, nnx.Optimizer(model, adamw(), wrt=nnx.Param)


def test_nnx_state_saves_and_restores_through_nnx_update(tmp_path):
    model, optimizer = model_and_optimizer(0)
    model.rngs.default()  # the key and count move on
    sj.save(nnx.state((model, optimizer)), tmp_path / "n.sckpt")
    other, other_opt = model_and_optimizer(5)
    template = nnx.state((other, other_opt))
    back = sj.load(tmp_path / "n.sckpt", target=template)
    assert type(back) is nnx.State and treedef(back) == treedef(template)
    nnx.update((other, other_opt), back)
    assert bits(nnx.state((other, other_opt))) == bits(nnx.state((model, optimizer)))
    assert jax.dtypes.issubdtype(other.rngs.default.key.get_value().dtype, jax.dtypes.prng_key)
    # the file is plain containers: numpy readers see the key data, int keys kept
    with safeckpt.open(tmp_path / "n.sckpt") as f:
        assert sorted(f.tree.keys()) == [0, 1]


def test_an_abstract_nnx_state_is_a_template(tmp_path):
    model, _ = model_and_optimizer(0)
    sj.save(nnx.state(model), tmp_path / "m.sckpt")
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Model(nnx.Rngs(1))))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(abstract))
    back = sj.load(tmp_path / "m.sckpt", target=abstract)
    assert treedef(back) == treedef(abstract)
    assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(back))
    restored = nnx.merge(graphdef, back)
    assert bits(nnx.state(restored)) == bits(nnx.state(model))


def test_python_scalar_leaves_are_checked_and_take_the_files_value(tmp_path):
    saved = {"step": 12, "lr": 0.5, "name": "run", "flag": True, "count": np.int32(3),
             "epoch": jnp.asarray(4, jnp.int32)}
    sj.save(saved, tmp_path / "s.sckpt")
    template = {"step": 0, "lr": 0.0, "name": "", "flag": False, "count": 0, "epoch": 0}
    back = sj.load(tmp_path / "s.sckpt", target=template)
    assert (back["step"], back["lr"], back["name"], back["flag"]) == (12, 0.5, "run", True)
    assert back["count"] == 3 and int(back["epoch"]) == 4  # a numpy scalar, a 0-d int array
    assert isinstance(back["epoch"], jax.Array)

    wrong = {"step": 0.0, "lr": 0, "name": 1, "flag": 0, "count": "", "epoch": False}
    with pytest.raises(safeckpt.StateMismatchError) as info:
        sj.load(tmp_path / "s.sckpt", target=wrong)
    message = str(info.value)
    assert "6 problems" in message
    for part in ("['step']: file has an int, target a float", "['lr']: file has a float, target an int",
                 "['name']: file has a str, target an int", "['flag']: file has a bool, target an int",
                 "['count']: file has an int32, target a str",
                 "['epoch']: file has () int32, target a bool"):
        assert part in message

    sj.save({"step": np.arange(3)}, tmp_path / "a.sckpt")  # an array where the template has an int
    with pytest.raises(safeckpt.StateMismatchError, match=r"\['step'\]: file has \(3,\) int64"):
        sj.load(tmp_path / "a.sckpt", target={"step": 0})


def test_every_mismatch_is_listed_at_once(tmp_path):
    sj.save({"w": jnp.ones((2, 3)), "b": jnp.zeros(3, jnp.bfloat16), "weak": jnp.asarray(0.5),
             "rng": jax.random.key(0, impl="rbg"), "extra": jnp.ones(1), "t": (jnp.ones(1),)},
            tmp_path / "m.sckpt")
    template = {"w": jnp.ones((3, 2)), "b": jnp.zeros(3, jnp.float32),
                "weak": jnp.asarray(0.5, jnp.float32), "rng": jax.random.key(0),
                "missing": jnp.ones(1), "t": (jnp.ones(1), jnp.ones(1))}
    with pytest.raises(safeckpt.StateMismatchError) as info:
        sj.load(tmp_path / "m.sckpt", target=template)
    message = str(info.value)
    assert "6 problems" in message
    assert "['w']: file has (2, 3) float32, target (3, 2) float32" in message
    assert "['b']: file has (3,) bfloat16, target (3,) float32" in message
    assert "['weak']" not in message  # the file's weak type is kept, not compared [R9]
    assert "['rng']: file has () key<rbg>, target () key<fry> (a key of implementation 'rbg')" \
        in message
    assert "missing state['missing']" in message and "unexpected state['extra']" in message
    assert "['t']: file has a tuple, target a tuple of 2 items" in message


def test_restore_fills_a_template_from_a_loaded_tree():
    params, opt_state = trained_params_and_state()
    loaded = safeckpt.jax.to_state({"params": params, "opt": opt_state})
    loaded = jax.tree_util.tree_map(np.asarray, loaded)  # numpy leaves, as safeckpt.load gives
    template = {"params": params, "opt": adamw().init(params)}
    back = sj.restore(template, loaded)
    assert treedef(back) == treedef(template)
    assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(back))
    assert bits(back) == bits({"params": params, "opt": opt_state})


@pytest.fixture
def x64_off():
    """jax_enable_x64 off for the test (a global flag: restored after)."""
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    yield
    jax.config.update("jax_enable_x64", before)


def test_64_bit_leaves_are_cast_only_when_asked_and_reported(tmp_path, x64_off):
    safeckpt.save({"f": np.array([1.5, -2.25]), "i": np.array([7, -8], np.int64),
                   "s": np.float32(1)}, tmp_path / "x.sckpt")
    template = {"f": jax.ShapeDtypeStruct((2,), jnp.float32),
                "i": jax.ShapeDtypeStruct((2,), jnp.int32), "s": np.float32(0)}
    with pytest.raises(safeckpt.StateMismatchError, match=r"\['f'\]: file has \(2,\) float64, "
                       r"target \(2,\) float32 \(64-bit types are off.*cast_x64=True"):
        sj.load(tmp_path / "x.sckpt", target=template)
    with pytest.raises(safeckpt.UnsupportedDtypeError, match="'[fi]' is .*64.*cast_x64=True"):
        sj.load(tmp_path / "x.sckpt")
    for target in (template, None):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            back = sj.load(tmp_path / "x.sckpt", target=target, cast_x64=True)
        cast = [w for w in caught if "cast_x64" in str(w.message)]
        assert len(cast) == 1 and cast[0].category is UserWarning
        assert "2 64-bit tensors" in str(cast[0].message)
        assert "'f' (float64)" in str(cast[0].message) and "'i' (int64)" in str(cast[0].message)
        assert back["f"].dtype == jnp.float32 and back["f"].tolist() == [1.5, -2.25]
        assert back["i"].dtype == jnp.int32 and back["i"].tolist() == [7, -8]


def test_with_x64_on_64_bit_leaves_load_exactly_and_nothing_is_cast(tmp_path):
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        safeckpt.save({"f": np.array([0.1])}, tmp_path / "x.sckpt")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            back = sj.load(tmp_path / "x.sckpt", target={"f": jnp.zeros(1, jnp.float64)},
                           cast_x64=True)
        assert back["f"].dtype == jnp.float64 and np.asarray(back["f"]).tobytes() == \
            np.array([0.1]).tobytes()
    finally:
        jax.config.update("jax_enable_x64", before)


def test_weak_if_the_file_or_the_template_says_weak(tmp_path):
    """[R9]: a weakly typed value (a TrainState's step after a jitted step) restores weak into a
    template that says strong (ShapeDtypeStructs made from shape and dtype), and a strong one
    (a file without weak nodes: safeckpt <= 1.4, numpy, safetensors) weak into a weak template
    (jax.eval_shape, live arrays): arithmetic after a resume promotes as before."""
    sj.save({"lr": jnp.asarray(0.5), "w": jnp.ones(2, jnp.float32),
             "s": jnp.ones(2, jnp.float32)}, tmp_path / "w.sckpt")
    template = {"lr": jax.ShapeDtypeStruct((), jnp.float32),
                "w": jax.ShapeDtypeStruct((2,), jnp.float32, weak_type=True),
                "s": jax.ShapeDtypeStruct((2,), jnp.float32)}
    back = sj.load(tmp_path / "w.sckpt", target=template)
    assert back["lr"].weak_type and back["w"].weak_type and not back["s"].weak_type
    assert (back["lr"] * jnp.ones(1, jnp.bfloat16)).dtype == jnp.bfloat16
    safeckpt.save({"scale": np.asarray(0.5, np.float32)}, tmp_path / "strong.sckpt")
    for load in (lambda t: sj.load(tmp_path / "strong.sckpt", target=t),
                 lambda t: sj.restore(t, safeckpt.load(tmp_path / "strong.sckpt")),
                 lambda t: sj.restore(t, safeckpt.load(tmp_path / "strong.sckpt",
                                                       framework="jax"))):
        back = load({"scale": jnp.asarray(0.25)})  # weak: a Python float jax promoted
        assert back["scale"].weak_type and back["scale"].tolist() == 0.5
        assert (back["scale"] * jnp.ones(1, jnp.bfloat16)).dtype == jnp.bfloat16


FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures" / "compat"  # not hostile ones


def test_a_file_of_safeckpt_1_4_with_an_optax_chain_restores():
    """tests/fixtures/compat/jax_v14_optax_chain.sckpt was written by safeckpt 1.4 (see
    make_jax_v14_optax.py there), which stored the chain's tuple as flax's state dict
    {'0': ..., '1': ...}: a tuple template takes it."""
    path = FIXTURES / "jax_v14_optax_chain.sckpt"
    make = __import__("importlib").util.spec_from_file_location(
        "make_jax_v14_optax", FIXTURES / "make_jax_v14_optax.py")
    module = __import__("importlib").util.module_from_spec(make)
    make.loader.exec_module(module)
    saved = module.state()
    assert isinstance(safeckpt.load(path)["opt"], dict)  # as 1.4 stored it
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    template = {"params": saved["params"], "opt": tx.init(saved["params"]), "step": 0}
    for back in (sj.load(path, target=template), sj.restore(template, safeckpt.load(path))):
        assert treedef(back) == treedef(saved) and back["step"] == 3
        assert bits([back["params"], back["opt"]]) == bits([saved["params"], saved["opt"]])


def test_an_optax_state_inside_a_train_state_restores_into_its_own_template(tmp_path):
    """A tuple inside a TrainState is saved as {'0', '1'} (flax's state dict); a prefix load of
    it into the optax state's own template (a tuple) fits, and the other way round."""
    params, _ = trained_params_and_state()
    tx = optax.chain(optax.clip_by_global_norm(1.0), adamw())
    state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
    state = state.apply_gradients(grads=jax.tree_util.tree_map(jnp.ones_like, params))
    sj.save({"state": state}, tmp_path / "ts.sckpt")
    back = sj.load(tmp_path / "ts.sckpt", prefix=("state", "opt_state"), target=tx.init(params))
    assert treedef(back) == treedef(state.opt_state) and bits(back) == bits(state.opt_state)
    sj.save({"opt": state.opt_state}, tmp_path / "o.sckpt")  # a tuple here
    fresh = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
    back = sj.load(tmp_path / "o.sckpt", prefix="opt", target=fresh.opt_state)
    assert bits(back) == bits(state.opt_state)
    with pytest.raises(safeckpt.StateMismatchError, match=r"file has a dict, target a tuple"):
        sj.restore((1, 2, 3), {"0": 1, "1": 2})  # not '0'..'2': refused


def test_messages_under_a_prefix_name_the_path_in_the_file(tmp_path):
    sj.save({"state": {"params": {"params": {"kernel": jnp.ones(2)}}}}, tmp_path / "p.sckpt")
    template = {"params": {"kernel": jnp.ones(3)}}
    with pytest.raises(safeckpt.StateMismatchError,
                       match=r"state\['state'\]\['params'\]\['params'\]\['kernel'\]: file has \(2,\)"):
        sj.load(tmp_path / "p.sckpt", prefix=("state", "params"), target=template)
    with pytest.raises(safeckpt.StateMismatchError,
                       match=r"state at 'state.params': subtree\['params'\]\['kernel'\]"):
        sj.load(tmp_path / "p.sckpt", prefix="state.params", target=template)


def test_x64_casts_are_reported_as_done_numpy_values_included(tmp_path, x64_off):
    """The cast report lists what is cast: numpy values given to restore() too, never a leaf
    whose numpy template keeps it 64-bit."""
    safeckpt.save({"f": np.array([1.5]), "i": np.array([7], np.int64)}, tmp_path / "x.sckpt")
    template = {"f": jax.ShapeDtypeStruct((1,), jnp.float32),
                "i": jax.ShapeDtypeStruct((1,), jnp.int32)}
    with pytest.warns(UserWarning, match=r"2 64-bit tensors.*\['f'\]\" \(float64\).*\['i'\]\" \(int64\)"):
        back = sj.restore(template, safeckpt.load(tmp_path / "x.sckpt"), cast_x64=True)
    assert back["f"].dtype == jnp.float32 and back["i"].tolist() == [7]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        back = sj.load(tmp_path / "x.sckpt", target={"f": template["f"],
                                                      "i": np.zeros(1, np.int64)}, cast_x64=True)
    assert back["i"].dtype == np.int64 and isinstance(back["i"], np.ndarray)
    messages = [str(w.message) for w in caught if "cast_x64" in str(w.message)]
    assert len(messages) == 1 and "1 64-bit tensors" in messages[0]
    assert "'f'" in messages[0] and "'i'" not in messages[0]


def test_a_0d_array_template_takes_a_files_scalar_its_dtype_holds(tmp_path):
    """A TrainState saved before its first jitted step holds step=0 (a Python int); a template
    from jax.eval_shape says int32 array: the value comes back as a jax array of the template's
    dtype, weak as the template, on its sharding. A value the dtype does not hold exactly, or
    of another kind, is refused."""
    safeckpt.save({"step": 3, "lr": 0.5, "flag": True, "n": np.int64(9), "h": np.float16(0.25)},
                  tmp_path / "s.sckpt")
    cpu = jax.devices()[-1]
    template = {"step": jax.ShapeDtypeStruct((), jnp.int32, weak_type=True),
                "lr": jnp.float32(0), "flag": jnp.bool_(False),
                "n": jax.ShapeDtypeStruct((), jnp.int32, sharding=jax.sharding.SingleDeviceSharding(cpu)),
                "h": jnp.zeros((), jnp.bfloat16)}
    for back in (sj.load(tmp_path / "s.sckpt", target=template),
                 sj.restore(template, safeckpt.load(tmp_path / "s.sckpt"))):
        assert all(isinstance(x, jax.Array) for x in back.values())
        assert [(back[k].dtype, back[k].tolist()) for k in ("step", "lr", "flag", "n", "h")] == [
            (jnp.int32, 3), (jnp.float32, 0.5), (jnp.bool_, True), (jnp.int32, 9),
            (jnp.bfloat16, 0.25)]
        assert back["step"].weak_type and not back["lr"].weak_type
        assert back["n"].devices() == {cpu}
    safeckpt.save({"a": 0.1, "b": 300, "c": 1, "d": -1, "e": 2.0}, tmp_path / "bad.sckpt")
    bad = {"a": jnp.float32(0), "b": jnp.int8(0), "c": jnp.float32(0), "d": jnp.uint8(0),
           "e": jnp.int32(0)}
    with pytest.raises(safeckpt.StateMismatchError, match=r"\(5 problems\)") as info:
        sj.load(tmp_path / "bad.sckpt", target=bad)
    text = str(info.value)
    assert "['a']: file has a float 0.1, which a float32 array does not hold exactly" in text
    assert "['b']: file has an int 300, which a int8" in text
    assert "['c']: file has an int, target () float32" in text
    assert "['d']: file has an int -1, which a uint8" in text


def test_a_key_template_takes_the_key_data_of_a_numpy_load(tmp_path):
    """restore(template, safeckpt.load(path)): a numpy load gives a typed key's uint32 key data
    [R10]; the template says the implementation, so they are wrapped with it."""
    keys = {"a": jax.random.split(jax.random.key(1), 4), "b": jax.random.key(2, impl="rbg")}
    sj.save(keys, tmp_path / "k.sckpt")
    template = {"a": jax.random.split(jax.random.key(0), 4),
                "b": jax.eval_shape(lambda: jax.random.key(0, impl="rbg"))}
    back = sj.restore(template, safeckpt.load(tmp_path / "k.sckpt"))
    assert back["a"].dtype == keys["a"].dtype and back["b"].dtype == keys["b"].dtype
    assert bits(back) == bits(keys)
    assert jax.random.normal(back["b"]).tolist() == jax.random.normal(keys["b"]).tolist()
    with pytest.raises(safeckpt.StateMismatchError, match=r"\['b'\]: file has \(4,\) uint32"):
        sj.restore({"b": jax.random.key(0)},  # threefry: 2 words a key; rbg's data have 4
                   {"b": safeckpt.load(tmp_path / "k.sckpt")["b"]})


def test_an_uncommitted_template_leaf_gives_an_uncommitted_result(tmp_path):
    sj.save({"w": jnp.arange(3.0), "d": jax.device_put(jnp.ones(2), jax.devices()[-1])},
            tmp_path / "u.sckpt")
    template = {"w": jnp.zeros(3), "d": jnp.zeros(2)}  # both on the default device, uncommitted
    for back in (sj.load(tmp_path / "u.sckpt", target=template),
                 sj.restore(template, safeckpt.load(tmp_path / "u.sckpt"))):
        assert not back["w"].committed and not back["d"].committed
        assert back["d"].devices() == template["d"].devices()
    committed = {"w": jax.device_put(jnp.zeros(3), jax.devices()[0]), "d": jnp.zeros(2)}
    assert sj.load(tmp_path / "u.sckpt", target=committed)["w"].committed
