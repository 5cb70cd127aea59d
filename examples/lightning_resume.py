"""A LightningModule trained on generated data with every checkpoint written by safeckpt (no
pickle); stop it (Ctrl-C) and run it again, and Trainer.fit resumes from last.ckpt. At the end the
best checkpoint is loaded back into a new module, again without pickle.

    pip install torch==2.13.0 lightning==2.6.6
    python examples/lightning_resume.py [checkpoint directory] [epochs]
"""

import os
import sys
import tempfile

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from safeckpt.lightning import SafeckptCheckpointIO, load_from_checkpoint


class Regressor(pl.LightningModule):
    def __init__(self, lr=3e-3, hidden=64):
        super().__init__()
        self.save_hyperparameters()  # plain values only: safeckpt refuses what needs pickle
        self.net = torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.GELU(),
                                       torch.nn.Linear(hidden, 1))

    def training_step(self, batch, _):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_epoch=True)
        return loss

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=20)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def main(directory=None, epochs=20):
    directory = directory or os.path.join(tempfile.gettempdir(), "safeckpt-lightning")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 8, generator=generator)
    y = torch.sin(2 * x[:, :1]) + x[:, 1:2] * x[:, 2:3]
    train = DataLoader(TensorDataset(x[:1792], y[:1792]), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(x[1792:], y[1792:]), batch_size=256)

    checkpoints = ModelCheckpoint(dirpath=directory, monitor="val_loss", save_top_k=2,
                                  save_last=True)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                         plugins=[SafeckptCheckpointIO()], callbacks=[checkpoints])
    last = os.path.join(directory, "last.ckpt")
    print("resuming from" if os.path.exists(last) else "starting fresh in", directory)
    trainer.fit(Regressor(), train, val, ckpt_path=last if os.path.exists(last) else None)

    best = load_from_checkpoint(Regressor, checkpoints.best_model_path)
    print("best:", checkpoints.best_model_path, "hparams:", dict(best.hparams))
    return best


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None, int(sys.argv[2]) if len(sys.argv) > 2 else 20)
