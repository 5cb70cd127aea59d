"""The JAX adapter (safeckpt/jax.py): pytrees of jax arrays, flax params and optax states."""

import ml_dtypes
import numpy as np
import pytest

import safeckpt

jax = pytest.importorskip("jax")
jnp = jax.numpy
pytestmark = pytest.mark.usefixtures("backend")


def same_leaves(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(la, lb))


def test_a_pytree_of_jax_arrays_round_trips(tmp_path):
    k = jnp.arange(6, dtype=jnp.float32).reshape(2, 3)
    tree = {"params": {"dense": {"kernel": k, "bias": jnp.zeros(3, jnp.bfloat16)}},
            "tied": k, "fp8": jnp.array([0.5, -1], jnp.float8_e4m3fn), "step": 7, "layers": [k, None]}
    safeckpt.save(tree, tmp_path / "t.sckpt")
    back = safeckpt.load(tmp_path / "t.sckpt", framework="jax")
    assert isinstance(back["params"]["dense"]["kernel"], jax.Array)
    assert back["params"]["dense"]["bias"].dtype == jnp.bfloat16
    assert back["step"] == 7 and back["layers"][1] is None
    assert back["tied"] is back["params"]["dense"]["kernel"]  # one jax.Array saved once
    assert same_leaves(back, tree)
    with safeckpt.open(tmp_path / "t.sckpt") as f:  # numpy readers see the same bits
        assert f["fp8"].dtype == ml_dtypes.float8_e4m3fn


def test_64_bit_tensors_are_refused_rather_than_truncated(tmp_path):
    safeckpt.save_file({"big": np.array([2**40], np.int64)}, tmp_path / "i.sckpt")
    if jax.config.jax_enable_x64:
        pytest.skip("jax_enable_x64 is on in this process")
    with pytest.raises(safeckpt.UnsupportedDtypeError, match="'big'.*jax_enable_x64"):
        safeckpt.load(tmp_path / "i.sckpt", framework="jax")


def test_flax_params_and_optax_state_save_and_restore_into_a_target(tmp_path):
    nn = pytest.importorskip("flax.linen")
    optax = pytest.importorskip("optax")
    import safeckpt.jax as sj

    model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 4)))
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    _, opt_state = optimizer.update(grads, opt_state, params)
    sj.save({"params": params, "opt_state": opt_state, "step": 1}, tmp_path / "flax.sckpt")

    fresh = model.init(jax.random.PRNGKey(1), jnp.ones((1, 4)))
    template = {"params": fresh, "opt_state": optimizer.init(fresh), "step": 0}
    restored = sj.load(tmp_path / "flax.sckpt", target=template)
    assert type(restored["opt_state"][0]) is type(opt_state[0])  # optax's named tuple again
    assert same_leaves(restored["params"], params) and same_leaves(restored["opt_state"], opt_state)
    assert restored["step"] == 1

    only = sj.load(tmp_path / "flax.sckpt", prefix="params", target=fresh)
    assert same_leaves(only, params)
    wrong = model.init(jax.random.PRNGKey(0), jnp.ones((1, 5)))  # a kernel of another shape
    with pytest.raises(safeckpt.StateMismatchError, match="kernel.*file has \\(4, 8\\)"):
        sj.load(tmp_path / "flax.sckpt", prefix="params", target=wrong)


def test_load_verifies_what_it_reads_by_default(tmp_path):
    """verify=None (auto) [T10]: mmap=False checks the CRC32C of what it reads; mapped stays lazy."""
    path = tmp_path / "v.sckpt"
    safeckpt.save({"k": np.arange(8, dtype=np.float32)}, path)
    data = bytearray(path.read_bytes())
    with safeckpt.open(path) as f:
        data[f.info("k").offset] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(safeckpt.ChecksumError, match="'k'"):
        safeckpt.jax.load(path, mmap=False)
    with pytest.raises(safeckpt.ChecksumError, match="'k'"):
        safeckpt.jax.load(path, verify=True)
    assert isinstance(safeckpt.jax.load(path)["k"], jax.Array)


def test_to_state_keeps_plain_tuples_and_turns_other_nodes_into_dicts(tmp_path):
    """A chain's tuple of optax states stays a tuple in the file (the manager and sj.load give
    the tuple back); each named tuple is its flax state dict; an nnx.State its pure dict."""
    optax = pytest.importorskip("optax")
    nnx = pytest.importorskip("flax.nnx")
    import safeckpt.jax as sj

    params = {"w": jnp.ones(2)}
    opt_state = optax.adamw(optax.linear_schedule(1e-3, 0.0, 10)).init(params)
    sj.save({"opt": opt_state, "model": nnx.state(nnx.Linear(2, 1, rngs=nnx.Rngs(0)))},
            tmp_path / "s.sckpt")
    back = safeckpt.load(tmp_path / "s.sckpt")
    assert type(back["opt"]) is tuple and len(back["opt"]) == 3
    assert sorted(back["opt"][0]) == ["count", "mu", "nu"] and back["opt"][1] == {}
    assert sorted(back["model"]) == ["bias", "kernel"]
