"""CheckpointManager with JAX pytrees (issue 15, item 3): optax states, flax TrainState and
nnx.State saved with no conversion, and restore(jax_template) giving back the template's
treedef with jax arrays (info.state), on the template's shardings."""

import warnings

import numpy as np
import pytest

import safeckpt

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
pytest.importorskip("flax")
from flax import nnx  # noqa: E402
from flax.training import train_state  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

jnp = jax.numpy
pytestmark = pytest.mark.usefixtures("backend")


def bits(tree):
    def one(x):
        if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        a = np.asarray(x)
        return (str(a.dtype), a.shape, a.tobytes())
    return [one(x) for x in jax.tree_util.tree_leaves(tree)]


def new_train_state():
    params = {"dense": {"kernel": jnp.linspace(-1, 1, 12, dtype=jnp.float32).reshape(3, 4),
                        "bias": jnp.zeros(4, jnp.bfloat16)}}
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 20))
    return train_state.TrainState.create(apply_fn=None, params=params, tx=tx)


@jax.jit
def train_step(state, key):
    key, noise = jax.random.split(key)
    grads = jax.tree_util.tree_map(
        lambda p: jax.random.normal(noise, p.shape, jnp.float32).astype(p.dtype), state.params)
    return state.apply_gradients(grads=grads), key


def test_train_state_and_key_resume_through_the_manager(tmp_path):
    state, key = new_train_state(), jax.random.key(0)
    with safeckpt.CheckpointManager(tmp_path, keep_last=2) as manager:
        assert manager.restore({"state": state, "rng": key}) is None  # nothing yet
        for step in range(3):
            state, key = train_step(state, key)
            manager.save(step, {"state": state, "rng": key}, metrics={"loss": 0.5})
    template = {"state": new_train_state(), "rng": jax.random.key(9)}
    info = safeckpt.CheckpointManager(tmp_path).restore(template)
    assert info.step == 2
    back = info.state
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(template)
    assert type(back["state"].opt_state) is tuple  # optax's tuples, not dicts keyed '0', '1'
    assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(back))
    assert bits(back) == bits({"state": state, "rng": key})
    # the next (jitted) optax update runs on it and equals the unbroken run's
    assert bits(train_step(back["state"], back["rng"])) == bits(train_step(state, key))


class Model(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(4, 2, rngs=rngs)
        self.rngs = rngs


def make(seed):
    model = Model(nnx.Rngs(seed))
    return model, nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)


def nnx_step(model, optimizer):
    x = jax.random.normal(model.rngs.default(), (3, 4))
    grads = nnx.grad(lambda m: (m.dense(x) ** 2).mean())(model)
    optimizer.update(model, grads)


def test_nnx_state_resumes_through_the_manager(tmp_path):
    model, optimizer = make(0)
    manager = safeckpt.CheckpointManager(tmp_path)
    nnx_step(model, optimizer)
    manager.save(1, nnx.state((model, optimizer)))
    other, other_opt = make(4)
    info = manager.restore(nnx.state((other, other_opt)))
    assert type(info.state) is nnx.State
    nnx.update((other, other_opt), info.state)
    assert bits(nnx.state((other, other_opt))) == bits(nnx.state((model, optimizer)))
    nnx_step(model, optimizer)
    nnx_step(other, other_opt)
    assert bits(nnx.state((other, other_opt))) == bits(nnx.state((model, optimizer)))


def test_a_sharded_template_through_the_manager(tmp_path):
    devices = jax.devices("cpu")
    if len(devices) < 4:
        pytest.skip("needs 4 CPU devices (tests/conftest.py)")
    sharding = NamedSharding(Mesh(np.array(devices[:4]).reshape(2, 2), ("a", "b")),
                             PartitionSpec("a", "b"))
    w = jax.device_put(jnp.arange(16.0).reshape(4, 4), sharding)
    manager = safeckpt.CheckpointManager(tmp_path)
    manager.save(0, {"w": w})
    info = manager.restore({"w": jax.ShapeDtypeStruct((4, 4), jnp.float32, sharding=sharding)})
    assert info.state["w"].sharding == sharding and bits(info.state) == bits({"w": w})


def test_a_damaged_newest_checkpoint_is_skipped_for_a_jax_template(tmp_path):
    manager = safeckpt.CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2):
        manager.save(step, {"w": jnp.full(8, float(step), jnp.float32)})
    newest = manager.path(2)
    data = bytearray(open(newest, "rb").read())
    with safeckpt.open(newest) as f:
        data[f.info("state.w").offset] ^= 0xFF  # a tensor byte: its CRC32C no longer matches
    open(newest, "wb").write(bytes(data))
    with pytest.warns(RuntimeWarning, match="skipping checkpoint"):
        info = manager.restore({"w": jnp.zeros(8)})
    assert info.step == 1 and np.asarray(info.state["w"]).tolist() == [1.0] * 8


def test_a_mismatch_is_refused_and_jax_templates_take_no_torch_options(tmp_path):
    manager = safeckpt.CheckpointManager(tmp_path)
    manager.save(0, {"w": jnp.ones(3)})
    with pytest.raises(safeckpt.StateMismatchError, match=r"\['state'\]\['w'\]: file has \(3,\)"):
        manager.restore({"w": jnp.ones(4)})
    with pytest.raises(ValueError, match="map_location"):
        manager.restore({"w": jnp.ones(3)}, map_location="cpu")


def test_numpy_targets_are_still_restored_in_place(tmp_path):
    manager = safeckpt.CheckpointManager(tmp_path)
    manager.save(0, {"w": np.arange(3.0)})
    target = {"w": np.zeros(3)}
    info = manager.restore(target)
    assert target["w"].tolist() == [0.0, 1.0, 2.0] and isinstance(info.state["w"], np.ndarray)
    assert not safeckpt.jax.is_jax_tree(target) and safeckpt.jax.is_jax_tree({"w": jnp.ones(1)})


def test_a_remote_manager_restores_a_jax_template():
    pytest.importorskip("fsspec")
    url = f"memory://h4-jax-{np.random.default_rng().integers(1 << 62)}"
    state = new_train_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        manager = safeckpt.CheckpointManager(url)
    manager.save(3, {"state": state})
    template = {"state": new_train_state()}
    info = safeckpt.CheckpointManager(url).restore(template)
    assert jax.tree_util.tree_structure(info.state) == jax.tree_util.tree_structure(template)
    assert info.step == 3 and type(info.state["state"]) is train_state.TrainState
    assert bits(info.state) == bits({"state": state})


def test_64_bit_leaves_cast_through_the_manager_only_when_asked_and_reported(tmp_path):
    """Issue item 6: a checkpoint saved with x64 on resumes with x64 off through the manager
    only with cast_x64=True, which names the cast tensors in one UserWarning."""
    import jax
    import jax.numpy as jnp
    before = jax.config.jax_enable_x64
    try:
        jax.config.update("jax_enable_x64", True)
        with safeckpt.CheckpointManager(tmp_path) as manager:
            manager.save(1, {"w": jnp.arange(3, dtype=jnp.float64), "n": jnp.ones(2, jnp.float32)})
        jax.config.update("jax_enable_x64", False)
        template = {"w": jnp.zeros(3, jnp.float32), "n": jnp.zeros(2, jnp.float32)}
        manager = safeckpt.CheckpointManager(tmp_path)
        with pytest.raises(safeckpt.StateMismatchError, match="cast_x64=True"):
            manager.restore(template)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            info = manager.restore(template, cast_x64=True)
        cast = [w for w in caught if "cast_x64" in str(w.message)]
        assert len(cast) == 1 and "'state.w' (float64)" in str(cast[0].message)
        assert info.state["w"].dtype == jnp.float32 and info.state["w"].tolist() == [0, 1, 2]
        with pytest.raises(ValueError, match="cast_x64=True is for a JAX template"):
            manager.restore({"w": np.zeros(3)}, cast_x64=True)
    finally:
        jax.config.update("jax_enable_x64", before)
