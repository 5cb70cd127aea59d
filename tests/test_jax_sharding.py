"""Templates' shardings and devices are honoured (issue 15, item 4), over the four forced CPU
devices of tests/conftest.py: a NamedSharding over a 2x2 mesh and a single-device template on
cpu:2 give arrays of exactly that sharding, each device reading only its shard's slice."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import safeckpt  # noqa: E402
import safeckpt.jax as sj  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding  # noqa: E402
from safeckpt.jax_convert import JaxLeaf  # noqa: E402

jnp = jax.numpy
pytestmark = pytest.mark.usefixtures("backend")


@pytest.fixture
def mesh():
    devices = jax.devices("cpu")
    if len(devices) < 4:
        pytest.skip("needs 4 CPU devices (XLA_FLAGS set by tests/conftest.py before jax loads)")
    return Mesh(np.array(devices[:4]).reshape(2, 2), ("a", "b"))


def saved(tmp_path):
    tree = {"w": np.arange(64, dtype=np.float32).reshape(8, 8),
            "b": np.arange(8, dtype=np.int32), "rng": jax.random.key(3)}
    sj.save(tree, tmp_path / "s.sckpt")
    return tree


def test_a_named_sharding_template_is_honoured(tmp_path, mesh):
    tree = saved(tmp_path)
    w_sharding = NamedSharding(mesh, PartitionSpec("a", "b"))
    b_sharding = NamedSharding(mesh, PartitionSpec("b"))
    key_sharding = NamedSharding(mesh, PartitionSpec())
    template = {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=w_sharding),
                "b": jax.device_put(jnp.zeros(8, jnp.int32), b_sharding),  # a jax.Array's too
                "rng": jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=key_sharding)}
    back = sj.load(tmp_path / "s.sckpt", target=template)
    assert back["w"].sharding == w_sharding and back["b"].sharding == b_sharding
    assert back["rng"].sharding == key_sharding
    assert np.asarray(back["w"]).tobytes() == tree["w"].tobytes()
    assert np.asarray(back["b"]).tobytes() == tree["b"].tobytes()
    assert np.array_equal(jax.random.key_data(back["rng"]), jax.random.key_data(tree["rng"]))
    for shard in back["w"].addressable_shards:  # each device holds its quarter
        assert shard.data.shape == (4, 4)
        assert np.array_equal(np.asarray(shard.data), tree["w"][shard.index])


def test_a_single_device_template_on_cpu_2_is_honoured(tmp_path, mesh):
    tree = saved(tmp_path)
    cpu2 = jax.devices("cpu")[2]
    template = {"w": jax.device_put(jnp.zeros((8, 8), jnp.float32), cpu2),
                "b": jax.ShapeDtypeStruct((8,), jnp.int32, sharding=SingleDeviceSharding(cpu2)),
                "rng": jax.device_put(jax.random.key(0), cpu2)}
    back = sj.load(tmp_path / "s.sckpt", target=template)
    for leaf in jax.tree_util.tree_leaves(back):
        assert leaf.sharding == SingleDeviceSharding(cpu2) and leaf.devices() == {cpu2}
    assert np.asarray(back["w"]).tobytes() == tree["w"].tobytes()


def test_an_array_saved_on_cpu_2_goes_back_there_without_a_sharding(tmp_path, mesh):
    cpu2 = jax.devices("cpu")[2]
    sj.save({"w": jax.device_put(jnp.arange(4.0), cpu2)}, tmp_path / "d.sckpt")
    back = sj.load(tmp_path / "d.sckpt", target={"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
    assert back["w"].devices() == {cpu2}


class CountingArray(np.ndarray):
    """A numpy array that records every index it is read with (the reads of its bytes)."""

    def __getitem__(self, index):
        self.reads.append(index)
        return np.asarray(self)[index]


def test_each_device_reads_only_its_shard(mesh):
    data = np.arange(64, dtype=np.float32).reshape(8, 8)
    counted = data.view(CountingArray)
    counted.reads = []
    sharding = NamedSharding(mesh, PartitionSpec("a", "b"))
    template = {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=sharding)}
    back = sj.restore_tree(template, {"w": JaxLeaf(counted, "w")})
    assert back["w"].sharding == sharding
    assert np.asarray(back["w"]).tobytes() == data.tobytes()
    wanted = sorted(map(str, sharding.addressable_devices_indices_map((8, 8)).values()))
    assert sorted(map(str, counted.reads)) == wanted  # four quarter slices, nothing whole
    assert all(data[index].size == 16 for index in counted.reads)


def test_load_with_a_sharded_template_reads_only_shard_slices(tmp_path, mesh, monkeypatch):
    """Through safeckpt.jax.load itself (default options: mapped, verify=None): the arrays the
    reader hands out are read only at each device's slice, never whole."""
    tree = saved(tmp_path)
    handed: list = []
    real = safeckpt.Reader.load_indices

    def recording(self, indices, verify=None):
        assert not self.verifies(verify)  # a mapped load checks no CRC (that reads whole tensors)
        arrays = []
        for array in real(self, indices, verify):
            counted = array.view(CountingArray)
            counted.reads = []
            handed.append(counted)
            arrays.append(counted)
        return arrays

    monkeypatch.setattr(safeckpt.Reader, "load_indices", recording)
    sharding = NamedSharding(mesh, PartitionSpec("a", "b"))
    back = sj.load(tmp_path / "s.sckpt", prefix="w",
                   target=jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=sharding))
    assert np.asarray(back).tobytes() == tree["w"].tobytes()
    assert len(handed) == 1
    wanted = sorted(map(str, sharding.addressable_devices_indices_map((8, 8)).values()))
    assert sorted(map(str, handed[0].reads)) == wanted
    assert all(tree["w"][index].size == 16 for index in handed[0].reads)
