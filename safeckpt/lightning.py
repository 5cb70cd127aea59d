"""PyTorch Lightning without pickle: ``Trainer(plugins=[SafeckptCheckpointIO()])``.

:class:`SafeckptCheckpointIO` is a Lightning ``CheckpointIO``: every checkpoint the Trainer writes
(``ModelCheckpoint``, ``Trainer.save_checkpoint``, ``OnExceptionCheckpoint``) is a .sckpt file,
and every checkpoint it reads (``Trainer.fit(ckpt_path=...)``, ``validate``/``test``/``predict``
with ``ckpt_path``) is read without pickle. A Lightning checkpoint is a nested dict of tensors and
plain values (the module's ``state_dict``, the optimizers' and LR schedulers' states, the loops'
progress, the callbacks' states, the hyper-parameters, a datamodule's state), which
:func:`safeckpt.save` stores as it is. A value only pickle could hold is refused before anything
is written, with the Lightning feature that put it there and the way around it; so is a numpy
array, which would come back as a torch tensor (the file does not record which it was). Tensors
come back as plain torch tensors: an ``nn.Parameter`` as a tensor of the same values, as
``state_dict()`` gives them.

``LightningModule.load_from_checkpoint`` calls ``torch.load`` itself and never reaches the
plugin; :func:`load_from_checkpoint` here does the same job on a safeckpt file.

Needs the ``lightning`` package (``pip install "safeckpt[lightning]"``); tested with 2.6.6.

Example:
    >>> import lightning.pytorch as pl                                     # doctest: +SKIP
    >>> from safeckpt.lightning import SafeckptCheckpointIO, load_from_checkpoint
    >>> trainer = pl.Trainer(plugins=[SafeckptCheckpointIO()])             # doctest: +SKIP
    >>> trainer.fit(model, ckpt_path="checkpoints/last.ckpt")              # doctest: +SKIP
    >>> model = load_from_checkpoint(MyModule, "checkpoints/last.ckpt")    # doctest: +SKIP
"""

from __future__ import annotations

import collections
import os
from typing import Any, Dict, Optional, Tuple

import numpy as np

try:
    from lightning.fabric.plugins import CheckpointIO
    from lightning.fabric.utilities.data import AttributeDict
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.core.saving import (_load_state, load_hparams_from_tags_csv,
                                               load_hparams_from_yaml)
    from lightning.pytorch.utilities.migration.utils import _pl_migrate_checkpoint
except ModuleNotFoundError as exc:
    if exc.name != "lightning":
        raise
    raise ModuleNotFoundError("safeckpt.lightning needs the lightning package: "
                              "pip install 'safeckpt[lightning]'", name=exc.name) from exc

from . import api, filekind, torch_convert
from . import format as fmt
from . import writer as _writer
from .errors import InvalidValueError, NotSafeckptError, SafeckptError

__all__ = ["SafeckptCheckpointIO", "load_from_checkpoint"]

# Where each key of a Lightning checkpoint comes from (lightning/pytorch/trainer/connectors/
# checkpoint_connector.py, dump_checkpoint) and the way around a value safeckpt cannot store there.
# "{name}" is the key below it: a hyper-parameter's name, a callback's state key.
_SAVED_ARGS = "the {}'s save_hyperparameters(), which saves the arguments of __init__"
_IGNORE = ("leave it out with self.save_hyperparameters(ignore=[{name!r}]) and pass it again when "
           "loading (load_from_checkpoint(..., {name}=...)), or pass it to __init__ as a plain "
           "value (str, number, list, dict) instead")
_OMEGACONF = ("save_hyperparameters() of an OmegaConf config, which saves the config's class",
              "pass a plain dict instead: "
              "self.save_hyperparameters(OmegaConf.to_container(config, resolve=True))")
_SOURCES: Dict[str, Tuple[str, str]] = {
    LightningModule.CHECKPOINT_HYPER_PARAMS_KEY: (_SAVED_ARGS.format("LightningModule"), _IGNORE),
    LightningDataModule.CHECKPOINT_HYPER_PARAMS_KEY: (_SAVED_ARGS.format("LightningDataModule"),
                                                      _IGNORE),
    LightningModule.CHECKPOINT_HYPER_PARAMS_TYPE: _OMEGACONF,
    LightningDataModule.CHECKPOINT_HYPER_PARAMS_TYPE: _OMEGACONF,
    "callbacks": (
        "the state_dict() (or on_save_checkpoint()) of the callback {name!r}",
        "make that callback's state_dict() return tensors and plain values (str, numbers, lists, "
        "dicts)"),
    "optimizer_states": (
        "an optimizer's state_dict()",
        "keep tensors and plain values in the optimizer's state and param_groups"),
    "lr_schedulers": (
        "an LR scheduler's state_dict() (a LambdaLR whose lr_lambda is a callable object saves "
        "that object's __dict__)",
        "use a plain function as lr_lambda, or keep only plain values in the scheduler's state"),
    "loops": (
        "the loops' state (a stateful dataloader's state_dict())",
        "make the dataloader's state_dict() return tensors and plain values"),
    "state_dict": (
        "the LightningModule's state_dict() (a module's get_extra_state())",
        "return tensors and plain values from get_extra_state()"),
}
_OTHER = ("on_save_checkpoint() of the LightningModule or of a callback, the "
          "LightningDataModule's state_dict() or the precision plugin's state",
          "put tensors and plain values (str, numbers, lists, dicts) there, e.g. str(path) for a "
          "path or an object's state_dict() for the object")


class SafeckptCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` that writes and reads .sckpt files: never pickle.

    Parameters:
        verify: ``None`` (default) checks the CRC32C of every tensor read when the file has
            checksums (a .sckpt file; a resume reads every byte anyway), ``True`` always (a
            safetensors file, which holds none, is then refused), ``False`` never.
        limits: ``max_header_size``, ``max_tensors``, ``max_ndim``, ``max_depth`` for reading,
            as :func:`safeckpt.open` takes them; raise them only for checkpoints you trust.

    Files keep the names Lightning gives them (``epoch=3-step=400.ckpt``, ``last.ckpt``): a name
    that ``torch.save`` files usually have (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) gets a .sckpt
    file, any other name the format :func:`safeckpt.save` chooses by it (``*.safetensors``
    writes safetensors, without checksums). Reading tells the formats apart by their first bytes,
    never by the name.

    Example:
        >>> trainer = pl.Trainer(plugins=[SafeckptCheckpointIO()],         # doctest: +SKIP
        ...                      callbacks=[ModelCheckpoint(monitor="val_loss", save_top_k=2)])
    """

    def __init__(self, *, verify: Optional[bool] = None, **limits: Any) -> None:
        self.verify = verify
        self.limits = limits

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: Any,
                        storage_options: Optional[Any] = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically (a crash leaves the old file or the new one).

        Parameters:
            checkpoint: the dict Lightning builds (``Trainer.save_checkpoint``). Lightning's
                ``AttributeDict`` hyper-parameters are saved as dicts (Lightning itself hands them
                to ``__init__`` as such).
            path: a local path; missing directories are created, as Lightning's own plugin does.
            storage_options: must be None, as for Lightning's ``TorchCheckpointIO``.

        Raises:
            InvalidValueError: a value only pickle could hold, or a numpy array, which would
                load back as a torch tensor (save ``torch.from_numpy(value)`` or
                ``value.tolist()``); the message names its key, the Lightning feature that put
                it there and the way around it. Nothing is written.
            UnsupportedDtypeError, LimitError: an unstorable dtype, too deep a nesting; told
                the same way.
            TypeError: ``storage_options`` was given.

        Example:
            >>> SafeckptCheckpointIO().save_checkpoint(checkpoint, "a.ckpt")  # doctest: +SKIP
        """
        if storage_options is not None:
            raise TypeError("Trainer.save_checkpoint(..., storage_options=...) is not supported "
                            f"by {type(self).__name__}; leave it None")
        path = _local(path)
        plan = _plan(checkpoint)
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        if filekind.kind_of(path) == "torch":
            _writer.write_plan(plan, path, atomic=True)
        else:
            api.save_plan(plan, path, atomic=True)

    def load_checkpoint(self, path: Any, map_location: Any = "cpu",
                        weights_only: Optional[bool] = None) -> Dict[str, Any]:
        """Read a checkpoint written by :meth:`save_checkpoint` (or any safeckpt file of a dict).

        Parameters:
            path: a local path.
            map_location: where tensors go, as :func:`safeckpt.torch.load` takes it; by default
                the CPU, as Lightning's ``TorchCheckpointIO`` does (Lightning then copies the
                states to the model's device).
            weights_only: accepted for Lightning's sake and unused: nothing is ever unpickled.

        Returns:
            The checkpoint dict, with plain torch tensors (views of the file's private mapping;
            an ``nn.Parameter`` saved comes back as a tensor without ``requires_grad``).

        Raises:
            FileNotFoundError: no file at ``path``.
            NotSafeckptError: a file of another format (a ``torch.save`` checkpoint of Lightning's
                default plugin): the message says how to convert it.
            ChecksumError: a tensor whose bytes do not match their CRC32C (or ``verify=True``
                and a file without checksums).
            SafeckptError: a damaged or hostile file, naming the problem.

        Example:
            >>> ckpt = SafeckptCheckpointIO().load_checkpoint("last.ckpt")     # doctest: +SKIP
        """
        return _load(_local(path), map_location, self.verify, self.limits)

    def remove_checkpoint(self, path: Any) -> None:
        """Delete the checkpoint file at ``path`` (``ModelCheckpoint``'s retention), if any.

        Example:
            >>> SafeckptCheckpointIO().remove_checkpoint("epoch=0-step=10.ckpt")  # doctest: +SKIP
        """
        try:
            os.remove(_local(path))
        except FileNotFoundError:
            pass


def load_from_checkpoint(cls: Any, path: Any, *, map_location: Any = "cpu",
                         hparams_file: Any = None, strict: Optional[bool] = None,
                         weights_only: Optional[bool] = None,
                         verify: Optional[bool] = None, **kwargs: Any) -> Any:
    """``cls.load_from_checkpoint(path)`` for a checkpoint written by :class:`SafeckptCheckpointIO`.

    The class is built from the checkpoint's hyper-parameters and ``kwargs`` (which win), then
    loads the weights, exactly as Lightning's ``load_from_checkpoint`` does: this calls
    Lightning's own ``_load_state`` with the checkpoint read here instead of by ``torch.load``.

    Parameters:
        cls: a LightningModule or LightningDataModule subclass.
        path: a local path.
        map_location: where tensors go, as :func:`safeckpt.torch.load` takes it; default the CPU
            (Lightning's own default puts them back on the GPU they came from, when there is one:
            pass ``map_location="cuda"`` for that). The module ends on the weights' device.
        hparams_file: a ``.yaml``/``.yml`` or ``.csv`` file of hyper-parameters to use instead
            of the saved ones, and ``strict``: as for Lightning's ``load_from_checkpoint``.
        weights_only: accepted for Lightning's sake and unused: nothing is ever unpickled.
        verify: as for :class:`SafeckptCheckpointIO`: by default check the CRC32C of every
            tensor when the file has checksums.
        kwargs: arguments of ``cls.__init__``, over the saved hyper-parameters.

    Returns:
        The new module or datamodule.

    Raises:
        NotSafeckptError, SafeckptError: as :meth:`SafeckptCheckpointIO.load_checkpoint`.
        ValueError: ``hparams_file`` is neither .yaml, .yml nor .csv.
        RuntimeError: the weights do not fit the module (from torch's ``load_state_dict``).

    Example:
        >>> model = load_from_checkpoint(MyModule, "last.ckpt", lr=1e-4)       # doctest: +SKIP
    """
    path = _local(path)
    checkpoint = _pl_migrate_checkpoint(_load(path, map_location, verify, {}), checkpoint_path=path)
    if hparams_file is not None:
        extension = os.fsdecode(hparams_file).rsplit(".", 1)[-1].lower()
        if extension not in ("yaml", "yml", "csv"):
            raise ValueError(f"hparams_file={hparams_file!r}: a .yaml, .yml or .csv file, please")
        checkpoint[cls.CHECKPOINT_HYPER_PARAMS_KEY] = (
            load_hparams_from_tags_csv(hparams_file) if extension == "csv"
            else load_hparams_from_yaml(hparams_file))
    checkpoint.setdefault(cls.CHECKPOINT_HYPER_PARAMS_KEY, {}).update(kwargs)
    if issubclass(cls, LightningDataModule):
        return _load_state(cls, checkpoint, **kwargs)
    module = _load_state(cls, checkpoint, strict=strict, **kwargs)
    weights = [v for v in checkpoint["state_dict"].values() if torch_convert.is_tensor(v)]
    return module.to(weights[0].device) if weights else module


def _local(path: Any) -> str:
    """``path`` as a str; a URL (``s3://...``, which Lightning's own plugin hands to fsspec) is
    refused, as this plugin reads and writes local files only."""
    text = os.fsdecode(path)
    if "://" in text:
        raise ValueError(f"{text!r}: SafeckptCheckpointIO reads and writes local files only; "
                         "point the checkpoint directory at a local (or mounted) path")
    return text


def _load(path: str, map_location: Any, verify: Optional[bool], limits: Dict[str, Any]
          ) -> Dict[str, Any]:
    """The checkpoint dict in the file at ``path``, read without pickle; ``verify=None``
    checks the CRC32Cs when the file has them."""
    torch_convert.check_map_location(map_location, "map_location")
    try:
        reader = api.open(path, **limits)
    except NotSafeckptError as exc:
        raise NotSafeckptError(f"{exc}. A checkpoint saved without SafeckptCheckpointIO (by "
                               "torch.save) is read only once converted; pass the converted "
                               "file as ckpt_path") from exc
    with reader:
        checkpoint = reader.load(framework="torch", map_location=map_location,
                                 verify=reader.has_checksums if verify is None else verify)
    if type(checkpoint) is not dict:
        raise SafeckptError(f"{path!r}: holds a {type(checkpoint).__name__}, not a Lightning "
                            "checkpoint (a dict)")
    return checkpoint


def _plan(checkpoint: Dict[str, Any]) -> Any:
    """The write plan of a Lightning checkpoint (``AttributeDict`` saved as dict), or the error
    of its first unstorable value, told in Lightning's terms."""
    checkpoint = {key: _plain(value, 0) for key, value in checkpoint.items()}
    try:
        return _checked_plan(checkpoint, "checkpoint")
    except SafeckptError as exc:
        key, name = _culprit(checkpoint)
        if key is None:
            raise
        what, fix = _SOURCES.get(key, _OTHER)
        raise type(exc)(f"{exc}\nIn a Lightning checkpoint it comes from "
                        f"{what.format(name=name)}; {fix.format(name=name)}. Nothing was "
                        "written.") from exc


def _plain(value: Any, level: int) -> Any:
    """``value`` with every ``AttributeDict`` in it made a dict (containers copied on the way;
    the tree's own depth limit stops the walk)."""
    if level > fmt.MAX_DEPTH:
        return value
    if isinstance(value, AttributeDict):
        value = dict(value)
    if type(value) is dict:
        return {key: _plain(item, level + 1) for key, item in value.items()}
    if type(value) is list or type(value) is tuple:
        return type(value)(_plain(item, level + 1) for item in value)
    return value


def _culprit(checkpoint: Dict[str, Any]) -> Tuple[Optional[str], Any]:
    """``(top-level key, key below it)`` of the first value that cannot be saved: a
    hyper-parameter's name, a callback's state key (or None); ``(None, None)`` if none."""
    for key, value in checkpoint.items():
        if _fails(value):
            if type(value) is dict:
                for name, item in value.items():
                    if _fails(item):
                        return key, name
            return key, None
    return None, None


def _fails(value: Any) -> bool:
    """Whether :func:`_checked_plan` refuses ``value``."""
    try:
        _checked_plan(value, "obj")
    except SafeckptError:
        return True
    return False


def _checked_plan(value: Any, root: str) -> Any:
    """:func:`safeckpt.api.plan` of ``value``, a numpy array in it refused: the file does not
    record whether a tensor was numpy's or torch's, and the plugin loads torch tensors."""
    path = _numpy_array_in(value, (), 0)
    if path is not None:
        raise InvalidValueError(
            f"{fmt.path_of(root, path)}: a numpy array would load back as a torch tensor (a "
            "safeckpt file does not record whether a tensor was numpy's or torch's); save "
            "torch.from_numpy(value) to get a tensor back, or value.tolist() for plain numbers")
    return api.plan(value, root=root)


def _numpy_array_in(value: Any, path: Tuple[Any, ...], level: int) -> Optional[Tuple[Any, ...]]:
    """The path of the first numpy array in ``value`` (numpy scalars load back as they were),
    or None; containers are walked as :func:`safeckpt.tree.flatten` walks them, to the same
    depth (it refuses deeper nesting itself)."""
    if isinstance(value, np.ndarray):
        return path
    if level > fmt.MAX_DEPTH:
        return None
    if type(value) is dict or type(value) is collections.OrderedDict:
        items: Any = value.items()
    elif type(value) is list or type(value) is tuple:
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _numpy_array_in(item, path + (key,), level + 1)
        if found is not None:
            return found
    return None
