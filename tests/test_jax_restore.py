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


def test_weak_type_comes_back_as_saved_whatever_the_template_says(tmp_path):
    """[R9]: a weakly typed value (a TrainState's step after a jitted step) restores weak into a
    template that says strong (ShapeDtypeStructs made from shape and dtype), and a strong one
    strong into a weak template: the file's weak type is the value's, so arithmetic after a
    resume promotes as before."""
    sj.save({"lr": jnp.asarray(0.5), "w": jnp.ones(2, jnp.float32)}, tmp_path / "w.sckpt")
    template = {"lr": jax.ShapeDtypeStruct((), jnp.float32),
                "w": jax.ShapeDtypeStruct((2,), jnp.float32, weak_type=True)}
    back = sj.load(tmp_path / "w.sckpt", target=template)
    assert back["lr"].weak_type and not back["w"].weak_type
    assert (back["lr"] * jnp.ones(1, jnp.bfloat16)).dtype == jnp.bfloat16
