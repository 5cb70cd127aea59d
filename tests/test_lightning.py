"""safeckpt.lightning: the Trainer's checkpoints through SafeckptCheckpointIO, never pickle;
resume bit-identical to an uninterrupted run, ModelCheckpoint's retention, refusals in Lightning's
terms, load_from_checkpoint. Skipped where lightning is not installed."""

import argparse
import importlib
import os
import pathlib
import pickle
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lightning")

import lightning.pytorch as pl  # noqa: E402
from lightning.fabric.utilities.data import AttributeDict  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import safeckpt  # noqa: E402
from safeckpt import format as fmt  # noqa: E402
from safeckpt.lightning import SafeckptCheckpointIO, load_from_checkpoint  # noqa: E402

# Fixed data, no random numbers: every run sees the same batches in the same order.
X = torch.linspace(-1, 1, 64 * 4).reshape(64, 4)
Y = (X * torch.tensor([1.0, -2.0, 3.0, 0.5])).sum(1, keepdim=True)


class Regressor(pl.LightningModule):
    """A small MLP with Adam and a StepLR; keeps every training loss (bit-exact comparisons)."""

    def __init__(self, lr=0.05, hidden=8):
        super().__init__()
        self.save_hyperparameters()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(),
                                           torch.nn.Linear(hidden, 1))
        self.losses = []

    def training_step(self, batch, _):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.detach().clone())
        return loss

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))
        self.log("rank", float(-self.current_epoch))  # each epoch better than the last

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": optimizer,
                "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)}


class Data(pl.LightningDataModule):
    """Batches of X, Y in order; ``token`` is its state (state_dict / load_state_dict)."""

    def __init__(self, batch_size=16):
        super().__init__()
        self.save_hyperparameters()
        self.token = None

    def train_dataloader(self):
        return DataLoader(TensorDataset(X, Y), batch_size=self.hparams.batch_size)

    def val_dataloader(self):
        return DataLoader(TensorDataset(X[:16], Y[:16]), batch_size=16)

    def state_dict(self):
        return {"token": self.token}

    def load_state_dict(self, state):
        self.token = state["token"]


class Counter(Callback):
    """A callback with state: the number of training batches it saw."""

    def __init__(self):
        self.batches = 0

    def on_train_batch_end(self, *args):
        self.batches += 1

    def state_dict(self):
        return {"batches": self.batches}

    def load_state_dict(self, state):
        self.batches = state["batches"]


class Recorder(SafeckptCheckpointIO):
    """The plugin, recording the paths Lightning asks it to remove."""

    def __init__(self):
        super().__init__()
        self.removed = []

    def remove_checkpoint(self, path):
        self.removed.append(os.path.basename(path))
        super().remove_checkpoint(path)


def trainer(root, epochs, *callbacks, io=None):
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, deterministic=True, max_epochs=epochs,
                      num_sanity_val_steps=0, default_root_dir=root, callbacks=list(callbacks),
                      plugins=[io or SafeckptCheckpointIO()])


@pytest.fixture
def no_pickle(monkeypatch):
    """Unpickling, torch.load and torch.save raise for the rest of the test. (pickle.dumps stays:
    Lightning calls it to drop hyper-parameters that could not be pickled, when fit starts.)"""
    def refuse(*args, **kwargs):
        raise AssertionError("pickle, torch.load or torch.save was called")
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    for module in (torch, torch.serialization):
        monkeypatch.setattr(module, "load", refuse)
        monkeypatch.setattr(module, "save", refuse)


def write_checkpoint(tmp_path):
    """A real Lightning checkpoint (module, datamodule state, callbacks) at ``last.ckpt``."""
    data = Data()
    data.token = "first run"
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, 1, checkpoint, Counter()).fit(Regressor(), datamodule=data)
    return checkpoint.last_model_path


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_resume_is_bit_identical_without_pickle(tmp_path, backend, no_pickle, suffix):
    full = Regressor()
    trainer(tmp_path / "full", 4).fit(full, datamodule=Data())

    first, data, counter = Regressor(), Data(), Counter()
    data.token = "first run"
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    checkpoint.FILE_EXTENSION = suffix
    trainer(tmp_path, 2, checkpoint, counter).fit(first, datamodule=data)
    path = checkpoint.last_model_path
    assert path.endswith("last" + suffix)
    with open(path, "rb") as f:  # .ckpt: our format under Lightning's name; else safetensors
        assert (f.read(len(fmt.MAGIC)) == fmt.MAGIC) == (suffix == ".ckpt")

    # lr=1.0 is never used: the optimizer's state in the file sets the learning rate
    second, data2, counter2 = Regressor(lr=1.0), Data(), Counter()
    resumed = trainer(tmp_path, 4, ModelCheckpoint(dirpath=tmp_path / "resumed"), counter2)
    resumed.fit(second, datamodule=data2, ckpt_path=path)

    assert len(first.losses) == len(second.losses) == 8
    assert torch.equal(torch.stack(first.losses + second.losses), torch.stack(full.losses))
    for (name, a), b in zip(second.named_parameters(), full.parameters()):
        assert torch.equal(a, b), name
    scheduler = resumed.lr_scheduler_configs[0].scheduler
    assert scheduler.get_last_lr() == pytest.approx([0.05 * 0.7 ** 4])
    assert resumed.global_step == 16
    assert counter2.batches == 16  # 8 restored + 8 seen
    assert data2.token == "first run"


def test_checkpoint_holds_every_state(tmp_path, no_pickle):
    saved = SafeckptCheckpointIO().load_checkpoint(write_checkpoint(tmp_path))
    assert saved["hyper_parameters"] == {"lr": 0.05, "hidden": 8}
    assert saved["datamodule_hyper_parameters"] == {"batch_size": 16}
    assert saved["Data"] == {"token": "first run"}
    assert saved["callbacks"]["Counter"] == {"batches": 4}
    assert type(saved["state_dict"]) is type(Regressor().state_dict())
    adam = saved["optimizer_states"][0]
    assert set(adam["state"]) == {0, 1, 2, 3} and adam["param_groups"][0]["betas"] == (0.9, 0.999)
    assert saved["lr_schedulers"][0]["last_epoch"] == 1
    assert saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"] == 4
    assert isinstance(saved["state_dict"]["net.0.weight"], torch.Tensor)


def test_model_checkpoint_retention_removes_through_the_plugin(tmp_path, no_pickle):
    io = Recorder()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="rank", mode="min", save_top_k=2,
                                 filename="{epoch}")
    trainer(tmp_path, 4, checkpoint, io=io).fit(Regressor(), datamodule=Data())
    assert io.removed == ["epoch=0.ckpt", "epoch=1.ckpt"]
    assert sorted(os.listdir(tmp_path)) == ["epoch=2.ckpt", "epoch=3.ckpt"]
    assert sorted(map(os.path.basename, checkpoint.best_k_models)) == sorted(os.listdir(tmp_path))
    assert io.load_checkpoint(checkpoint.best_model_path)["epoch"] == 3


def test_load_from_checkpoint_without_pickle(tmp_path, no_pickle):
    path = write_checkpoint(tmp_path)
    trained = SafeckptCheckpointIO().load_checkpoint(path)["state_dict"]
    model = load_from_checkpoint(Regressor, path)
    assert type(model) is Regressor and dict(model.hparams) == {"lr": 0.05, "hidden": 8}
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name]), name
    assert load_from_checkpoint(Regressor, path, lr=0.5).hparams.lr == 0.5
    data = load_from_checkpoint(Data, path)
    assert data.hparams.batch_size == 16 and data.token == "first run"
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_from_checkpoint(Regressor, path, hidden=3)
    (tmp_path / "hparams.yaml").write_text("lr: 0.25\nhidden: 8\n")
    assert load_from_checkpoint(Regressor, path, hparams_file=tmp_path / "hparams.yaml",
                                weights_only=True).hparams.lr == 0.25
    with pytest.raises(ValueError, match="hparams_file"):
        load_from_checkpoint(Regressor, path, hparams_file=tmp_path / "hparams.json")


def test_safetensors_names_load_back_and_checksums_are_checked_where_they_exist(tmp_path):
    io = SafeckptCheckpointIO()
    checkpoint = {"state_dict": {"w": torch.full((64,), 7.0)}, "epoch": 1, "Data": {"token": 2},
                  "pytorch-lightning_version": pl.__version__,
                  "optimizer_states": [{"state": {0: {"step": torch.tensor(3.0)}},
                                        "param_groups": [{"params": [0], "betas": (0.9, 0.99)}]}]}
    io.save_checkpoint(checkpoint, tmp_path / "a.safetensors")
    back = io.load_checkpoint(tmp_path / "a.safetensors")  # it holds no checksums: none checked
    assert back["epoch"] == 1 and back["optimizer_states"] == checkpoint["optimizer_states"]
    assert torch.equal(back["state_dict"]["w"], checkpoint["state_dict"]["w"])
    assert load_from_checkpoint(Data, tmp_path / "a.safetensors").token == 2
    with pytest.raises(safeckpt.ChecksumError, match="no checksums"):
        SafeckptCheckpointIO(verify=True).load_checkpoint(tmp_path / "a.safetensors")

    io.save_checkpoint(checkpoint, tmp_path / "a.ckpt")  # a .sckpt file: checked by default
    data = bytearray((tmp_path / "a.ckpt").read_bytes())
    at = data.index(torch.full((64,), 7.0).numpy().tobytes())
    data[at + 5] ^= 1
    (tmp_path / "a.ckpt").write_bytes(data)
    for load in (io.load_checkpoint, lambda path: load_from_checkpoint(Data, path)):
        with pytest.raises(safeckpt.ChecksumError, match="w"):
            load(tmp_path / "a.ckpt")
    assert SafeckptCheckpointIO(verify=False).load_checkpoint(tmp_path / "a.ckpt")["epoch"] == 1


@pytest.mark.parametrize("checkpoint, words", [
    ({"hyper_parameters": {"lr": np.float64(0.1), "mean": np.array([0.5, 0.25])}},
     ["checkpoint['hyper_parameters']['mean']: a numpy array", "torch.from_numpy(value)",
      "value.tolist()", "save_hyperparameters(ignore=['mean'])"]),
    ({"hyper_parameters": {"scale": np.array(1.5)}},
     ["checkpoint['hyper_parameters']['scale']: a numpy array", "torch.from_numpy"]),
    ({"callbacks": {"Stats": {"history": [1, np.zeros(2, np.int16)]}}},
     ["checkpoint['callbacks']['Stats']['history'][1]: a numpy array",
      "of the callback 'Stats'"]),
    ({"state_dict": {"w": torch.zeros(1)}, "extra": {"table": np.ones((2, 2))}},
     ["checkpoint['extra']['table']: a numpy array", "on_save_checkpoint()"]),
])
def test_numpy_arrays_are_refused_as_they_would_load_back_as_tensors(tmp_path, checkpoint, words):
    io = SafeckptCheckpointIO()
    io.save_checkpoint({"epoch": 1}, tmp_path / "a.ckpt")
    with pytest.raises(safeckpt.InvalidValueError) as info:
        io.save_checkpoint(checkpoint, tmp_path / "a.ckpt")
    for word in words + ["would load back as a torch tensor", "Nothing was written"]:
        assert word in str(info.value)
    assert io.load_checkpoint(tmp_path / "a.ckpt") == {"epoch": 1}  # the old file is intact


def test_numpy_scalars_keep_their_type_and_parameters_come_back_as_tensors(tmp_path):
    io = SafeckptCheckpointIO()
    weight = torch.nn.Parameter(torch.ones(2))
    io.save_checkpoint({"hyper_parameters": {"lr": np.float32(0.5), "n": np.int64(3)},
                        "ema": {"weight": weight}}, tmp_path / "a.ckpt")
    back = io.load_checkpoint(tmp_path / "a.ckpt")
    assert back["hyper_parameters"] == {"lr": 0.5, "n": 3}
    assert [type(v) for v in back["hyper_parameters"].values()] == [np.float32, np.int64]
    # as README says: a Parameter comes back as a plain tensor (same values, no requires_grad)
    assert type(back["ema"]["weight"]) is torch.Tensor and not back["ema"]["weight"].requires_grad
    assert torch.equal(back["ema"]["weight"], weight.detach())


def test_hyper_parameters_attribute_dicts_are_saved_as_dicts(tmp_path):
    io = SafeckptCheckpointIO()
    io.save_checkpoint({"hyper_parameters": {"optim": AttributeDict(lr=0.1, betas=(0.9, 0.99))},
                        "state_dict": {}}, tmp_path / "a.ckpt")
    back = io.load_checkpoint(tmp_path / "a.ckpt")["hyper_parameters"]
    assert back == {"optim": {"lr": 0.1, "betas": (0.9, 0.99)}} and type(back["optim"]) is dict


def test_amp_scaler_state_round_trips(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    state = MixedPrecision("16-mixed", "cpu", scaler).state_dict()
    io = SafeckptCheckpointIO()
    io.save_checkpoint({"MixedPrecision": state}, tmp_path / "a.ckpt")
    fresh = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    fresh.load_state_dict(io.load_checkpoint(tmp_path / "a.ckpt")["MixedPrecision"])
    assert fresh.scaler.get_scale() == 1024.0 and fresh.scaler.get_growth_interval() == 7


class Settings:
    """A class of the user's: only pickle could store one."""


@pytest.mark.parametrize("checkpoint, words", [
    ({"hyper_parameters": {"lr": 0.1, "act": torch.nn.ReLU}},
     ["checkpoint['hyper_parameters']['act']", "save_hyperparameters()",
      "self.save_hyperparameters(ignore=['act'])", "load_from_checkpoint(..., act=...)"]),
    ({"datamodule_hyper_parameters": {"root": pathlib.Path("data")}},
     ["checkpoint['datamodule_hyper_parameters']['root']", "LightningDataModule",
      "ignore=['root']"]),
    ({"hyper_parameters": {}, "hparams_type": Settings},
     ["checkpoint['hparams_type']", "OmegaConf config", "OmegaConf.to_container"]),
    ({"callbacks": {"Counter": {"batches": 1}, "Seen{'k': 1}": {"seen": {1, 2}}}},
     ["checkpoint['callbacks'][\"Seen{'k': 1}\"]['seen']",
      "state_dict() (or on_save_checkpoint()) of the callback \"Seen{'k': 1}\"",
      "return tensors and plain values"]),
    ({"optimizer_states": [{"state": {}, "param_groups": [{"params": [0], "fn": print}]}]},
     ["checkpoint['optimizer_states'][0]['param_groups'][0]['fn']", "an optimizer's state_dict()"]),
    ({"lr_schedulers": [{"lr_lambdas": [{"schedule": Settings()}]}]},
     ["checkpoint['lr_schedulers'][0]", "LambdaLR", "a plain function as lr_lambda"]),
    ({"state_dict": {"net.weight": torch.zeros(1)}, "run_dir": pathlib.Path("/tmp")},
     ["checkpoint['run_dir']", "on_save_checkpoint()", "str(path)"]),
])
def test_unstorable_values_are_refused_in_lightnings_terms(tmp_path, checkpoint, words):
    io = SafeckptCheckpointIO()
    io.save_checkpoint({"epoch": 1}, tmp_path / "a.ckpt")
    with pytest.raises(safeckpt.InvalidValueError) as info:
        io.save_checkpoint(checkpoint, tmp_path / "a.ckpt")
    for word in words + ["cannot save", "Nothing was written"]:
        assert word in str(info.value)
    assert io.load_checkpoint(tmp_path / "a.ckpt") == {"epoch": 1}  # the old file is intact
    assert os.listdir(tmp_path) == ["a.ckpt"]


class WithNamespace(Regressor):
    def __init__(self, config=argparse.Namespace(width=8)):
        super().__init__()
        self.save_hyperparameters()


def test_trainer_refuses_a_namespace_hyper_parameter(tmp_path):
    with pytest.raises(safeckpt.InvalidValueError) as info:
        trainer(tmp_path, 1).fit(WithNamespace(), datamodule=Data())
    message = str(info.value)
    assert "checkpoint['hyper_parameters']['config']: cannot save a argparse.Namespace" in message
    assert "ignore=['config']" in message


def test_a_torch_save_checkpoint_is_refused_with_the_way_to_convert(tmp_path):
    path = str(tmp_path / "old.ckpt")
    torch.save({"state_dict": Regressor().state_dict(), "epoch": 0}, path)
    with pytest.raises(safeckpt.NotSafeckptError, match="safeckpt convert.*ckpt_path"):
        SafeckptCheckpointIO().load_checkpoint(path)
    safeckpt.convert(path, str(tmp_path / "new.sckpt"))
    assert SafeckptCheckpointIO().load_checkpoint(tmp_path / "new.sckpt")["epoch"] == 0
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        SafeckptCheckpointIO().load_checkpoint(tmp_path / "missing.ckpt")


def test_map_location(tmp_path):
    io = SafeckptCheckpointIO()
    io.save_checkpoint({"w": torch.ones(2)}, tmp_path / "a.ckpt")
    for where in ("cpu", torch.device("cpu"), {"cpu": "cpu"}):
        assert io.load_checkpoint(tmp_path / "a.ckpt", map_location=where)["w"].device.type == "cpu"
    with pytest.raises(safeckpt.InvalidValueError, match="meta"):
        io.load_checkpoint(tmp_path / "a.ckpt", map_location="meta")


def test_names_options_and_removal(tmp_path):
    io = SafeckptCheckpointIO()
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint({"epoch": 0}, tmp_path / "a.ckpt", storage_options={"x": 1})
    with pytest.raises(ValueError, match="local files only"):
        io.save_checkpoint({"epoch": 0}, "s3://bucket/a.ckpt")
    with pytest.raises(safeckpt.InvalidValueError, match="does not write .npz"):
        io.save_checkpoint({"epoch": 0}, tmp_path / "a.npz")
    io.save_checkpoint({"w": torch.ones(2)}, tmp_path / "new" / "dir" / "a.safetensors")
    assert safeckpt.load(tmp_path / "new" / "dir" / "a.safetensors")["w"].tolist() == [1, 1]
    io.remove_checkpoint(tmp_path / "new" / "dir" / "a.safetensors")
    io.remove_checkpoint(tmp_path / "new" / "dir" / "a.safetensors")  # gone already: fine
    assert os.listdir(tmp_path / "new" / "dir") == []


def test_the_example_resumes(tmp_path, no_pickle):
    sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "examples"))
    try:
        example = importlib.import_module("lightning_resume")
    finally:
        sys.path.pop(0)
    example.main(str(tmp_path), 1)
    best = example.main(str(tmp_path), 2)  # resumes from last.ckpt: one more epoch
    assert sorted(os.listdir(tmp_path)) == ["epoch=0-step=28.ckpt", "epoch=1-step=56.ckpt",
                                             "last.ckpt"]
    assert best.hparams.hidden == 64
