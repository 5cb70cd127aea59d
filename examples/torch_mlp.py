"""A torch MLP trained on generated data, checkpointed every epoch with model, optimizer, scheduler
and random state; kill it (Ctrl-C, SIGKILL) and run it again, and it resumes where it stopped.

    pip install torch==2.13.0
    python examples/torch_mlp.py [checkpoint directory] [epochs]
"""

import os
import sys
import tempfile

import torch

import safeckpt


def main(directory=None, epochs=20):
    directory = directory or os.path.join(tempfile.gettempdir(), "safeckpt-torch-mlp")
    torch.manual_seed(0)
    x = torch.randn(2048, 8)
    y = torch.sin(2 * x[:, :1]) + x[:, 1:2] * x[:, 2:3]
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.GELU(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler}

    manager = safeckpt.CheckpointManager(directory, keep_last=2, keep_best=1, metric="loss")
    info = manager.restore(state)  # model, optimizer, scheduler and RNG, or None: start fresh
    start = info.step + 1 if info else 0
    print(f"resuming after epoch {info.step}" if info else "starting fresh", f"({directory})")
    for epoch in range(start, epochs):
        model.train()
        total = 0.0
        for idx in torch.randperm(len(x)).split(64):
            loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        scheduler.step()
        manager.save(epoch, state, metrics={"loss": total / len(x)})
        print(f"epoch {epoch:3d}  loss {total / len(x):.5f}  lr {scheduler.get_last_lr()[0]:.2e}")
    print("best:", manager.best())
    return model


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None, int(sys.argv[2]) if len(sys.argv) > 2 else 20)
