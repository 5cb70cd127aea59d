"""The framework adapters on URLs (issue 14): safeckpt.torch.load/load_model, safeckpt.jax.load
and safe_open take ``storage_options=`` and ``fs=`` as safeckpt.open does, and read by ranged
requests (FORMAT.md section 12)."""

import uuid

import numpy as np
import pytest

import safeckpt
from safeckpt.errors import InvalidValueError

from conftest import need

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("backend")]


@pytest.fixture
def mem():
    """A fresh directory in fsspec's memory filesystem: (filesystem, root path)."""
    need("fsspec")
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/adapters-{uuid.uuid4().hex}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


STATE = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([-0.0, np.nan])}


def test_safe_open_by_url_and_by_fs(mem):
    fs, root = mem
    url = f"memory://{root}/m.safetensors"
    safeckpt.save_file(STATE, url)
    with safeckpt.safe_open(url, framework="np", storage_options={}) as f:
        assert sorted(f.keys()) == ["b", "w"]
        assert f.get_slice("w")[1:].tolist() == STATE["w"][1:].tolist()
    with safeckpt.safe_open(f"{root}/m.safetensors", framework="np", fs=fs) as f:
        assert f.get_tensor("b").tobytes() == STATE["b"].tobytes()


def test_safe_open_refuses_storage_options_for_a_local_file(tmp_path):
    path = tmp_path / "m.safetensors"
    safeckpt.save_file(STATE, str(path))
    with pytest.raises(InvalidValueError, match="local path"):
        safeckpt.safe_open(str(path), framework="np", storage_options={"anon": True})


def test_torch_load_and_load_model(mem):
    torch = pytest.importorskip("torch")
    fs, root = mem
    model = torch.nn.Linear(4, 3)
    safeckpt.torch.save_model(model, f"memory://{root}/m.sckpt")
    state = safeckpt.torch.load(f"{root}/m.sckpt", fs=fs)
    assert torch.equal(state["weight"], model.weight.detach())
    fresh = torch.nn.Linear(4, 3)
    report = safeckpt.torch.load_model(fresh, f"memory://{root}/m.sckpt", storage_options={})
    assert not report.missing and not report.unexpected
    assert torch.equal(fresh.bias, model.bias)


def test_jax_load(mem):
    jnp = pytest.importorskip("jax.numpy")
    fs, root = mem
    tree = {"params": {"w": jnp.arange(6, dtype=jnp.float32)}}
    safeckpt.jax.save(tree, f"memory://{root}/p.sckpt")
    loaded = safeckpt.jax.load(f"memory://{root}/p.sckpt", target=tree, storage_options={})
    assert (loaded["params"]["w"] == tree["params"]["w"]).all()
