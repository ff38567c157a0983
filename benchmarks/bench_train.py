"""Training speed and accuracy: cnnedge's default recipe against seed 004's recipe, side by side.

    CNNEDGE_DATA=../shared/data uv run python benchmarks/bench_train.py [--long] [--baseline-epochs 4]

cnnedge: `cnnedge train` defaults (edgenet, one-cycle SGD, in-memory tensors, batch augmentation).
Seed 004: its network (keras_mnist_cnn), Adam 1e-3, batch 256, a torchvision DataLoader over
torchvision.datasets.MNIST with ToTensor + Normalize (per-sample PIL decoding), as the seed trains it.
Both report training wall time (the epoch loops) and accuracy on the official 10,000-image test set.
--long adds the longer recipe (12 epochs), whose goal is >= 99.3%.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader
from torchvision import transforms

from cnnedge.train.data import resolve_data_dir
from cnnedge.train.trainer import TrainConfig, run
from cnnedge.train.zoo import build_model


def cnnedge_recipe(epochs: int | None, folder: Path) -> dict:
    out = folder / f"cnn_{epochs or 'default'}.pt"
    metrics = run(TrainConfig(out=str(out), plots=False, hparams={"epochs": epochs}),
                  command=f"cnnedge train{f' --epochs {epochs}' if epochs else ''}")
    return {"recipe": f"cnnedge train{f' --epochs {epochs}' if epochs else ''}", "epochs": metrics["epochs"],
            "train_seconds": metrics["train_seconds"], "test_accuracy": metrics["test_accuracy"]}


def seed004_recipe(epochs: int, root: Path) -> dict:
    """Seed 004 as written: per-sample PIL -> ToTensor -> Normalize through a DataLoader, Adam, batch 256."""
    torch.manual_seed(0)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    train = torchvision.datasets.MNIST(str(root), train=True, transform=tf)
    test = torchvision.datasets.MNIST(str(root), train=False, transform=tf)
    loader = DataLoader(train, batch_size=256, shuffle=True)
    model = build_model("keras_mnist_cnn")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    epoch_seconds = []
    for _ in range(epochs):
        model.train()
        t0 = time.perf_counter()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        epoch_seconds.append(time.perf_counter() - t0)
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(test, batch_size=1000):
            correct += (model(x).argmax(1) == y).sum().item()
    return {"recipe": "seed 004 (keras_mnist_cnn, Adam 1e-3, batch 256, DataLoader)", "epochs": epochs,
            "train_seconds": sum(epoch_seconds), "seconds_per_epoch": sum(epoch_seconds) / epochs,
            "test_accuracy": correct / len(test)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long", action="store_true", help="also run the 12-epoch recipe")
    parser.add_argument("--baseline-epochs", type=int, default=4)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    root = resolve_data_dir(None)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, data {root}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(cnnedge_recipe(None, Path(tmp)))
        if args.long:
            rows.append(cnnedge_recipe(12, Path(tmp)))
    rows.append(seed004_recipe(args.baseline_epochs, root))
    print(f"\n{'recipe':64} {'epochs':>6} {'train s':>8} {'test acc':>9}")
    for r in rows:
        print(f"{r['recipe']:64} {r['epochs']:>6} {r['train_seconds']:>8.1f} {100 * r['test_accuracy']:>8.2f}%")
    ours, seed = rows[0], rows[-1]
    print(f"\ndefault recipe: {seed['train_seconds'] / ours['train_seconds']:.1f}x less training time than seed 004, "
          f"{100 * (ours['test_accuracy'] - seed['test_accuracy']):+.2f} points of test accuracy")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
