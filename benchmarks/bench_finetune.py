"""Fine-tuning the shipped digits model on greek/ (54 training images, 6 classes; 24 test images).

    CNNEDGE_DATA=../shared/data uv run python benchmarks/bench_finetune.py [--seeds 5] [--threads 1]

For each recipe and seed: `cnnedge train --dataset imagefolder:$CNNEDGE_DATA/greek --from models/cnn.pt
--seed S` in this process (the fine-tuning recipe unless the row says otherwise), then test accuracy
(mean, min, and the errors out of 24 per seed), training wall time (the epoch loops) and the CPU time of
the whole run (data loading included, start-up excluded). Rows:
  fine-tune            the default fine-tuning recipe (what `--from` gives)
  fine-tune, frozen    the same with --freeze-backbone (only the new head trains)
  digits recipe        the architecture's MNIST recipe (sgd lr 0.1 one-cycle, batch 128, 3 epochs,
                       5% validation): what `--from` used before it had its own recipe (BatchNorm
                       statistics kept, as in every fine-tuning now)
Then the few-shot baseline for comparison: `cnnedge enroll greek/train` with export/cnn.onnx and
`cnnedge predict greek/test --gallery` (cosine), and the first seed's fine-tuned model exported to ONNX
and run through `cnnedge predict`, which must match the PyTorch accuracy.
The CPU is often shared: say so next to the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cnnedge.train.trainer import TrainConfig, run
from cnnedge.train.zoo import get_arch
from cnnedge.infer.modelinfo import default_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DIGITS_RECIPE = {**get_arch("edgenet").recipe, "backbone_lr_scale": 1.0}


def cli(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "cnnedge", *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"cnnedge {' '.join(map(str, args))} failed: {result.stderr.strip()}")
    return result.stdout


def fine_tune(greek: Path, out: Path, seed: int, freeze: bool = False, hparams: dict | None = None,
              val_fraction: float | None = None) -> dict:
    cpu0 = time.process_time()
    metrics = run(TrainConfig(dataset=f"imagefolder:{greek}", from_checkpoint=str(ROOT / "models/cnn.pt"), out=str(out),
                              seed=seed, freeze_backbone=freeze, plots=False, hparams=hparams or {},
                              val_fraction=val_fraction), command="bench_finetune")
    return {"accuracy": metrics["test_accuracy"], "train_seconds": metrics["train_seconds"],
            "cpu_seconds": time.process_time() - cpu0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="Seeds 0..N-1 per recipe.")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads [default: torch's].")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    greek = Path(os.environ.get("CNNEDGE_DATA", ROOT.parent / "shared/data")) / "greek"
    recipes = {"fine-tune": {}, "fine-tune, frozen": {"freeze": True},
               "digits recipe": {"hparams": DIGITS_RECIPE, "val_fraction": 0.05}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, kwargs in recipes.items():
            runs = [fine_tune(greek, Path(tmp) / f"{name}_{seed}.pt", seed, **kwargs) for seed in range(args.seeds)]
            acc = np.array([r["accuracy"] for r in runs])
            rows.append({"recipe": name, "mean_accuracy": float(acc.mean()), "min_accuracy": float(acc.min()),
                         "errors_per_seed": [round((1 - a) * 24) for a in acc],
                         "train_seconds": float(np.mean([r["train_seconds"] for r in runs])),
                         "cpu_seconds": float(np.mean([r["cpu_seconds"] for r in runs]))})

        gallery = Path(tmp) / "greek.gallery.npz"
        cli("enroll", greek / "train", "--out", gallery, "--model", default_model())
        few_shot = json.loads(cli("predict", greek / "test", "--model", default_model(), "--gallery", gallery,
                                  "--format", "json"))["summary"]["accuracy"]
        onnx = Path(tmp) / "greek.onnx"
        cli("export", Path(tmp) / "fine-tune_0.pt", "--out", onnx)
        exported = json.loads(cli("predict", greek / "test", "--model", onnx, "--format", "json"))["summary"]["accuracy"]

    print(f"\ngreek/test (24 images), seeds 0..{args.seeds - 1}, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'recipe':<20} {'mean':>7} {'min':>7}  {'errors per seed':<18} {'train s':>8} {'CPU s':>7}")
    for r in rows:
        print(f"{r['recipe']:<20} {r['mean_accuracy']:>7.2%} {r['min_accuracy']:>7.2%}  "
              f"{' '.join(map(str, r['errors_per_seed'])):<18} {r['train_seconds']:>8.1f} {r['cpu_seconds']:>7.1f}")
    print(f"{'few-shot (enroll)':<20} {few_shot:>7.2%}")
    print(f"fine-tune seed 0 exported to ONNX, cnnedge predict: {exported:.2%}")


if __name__ == "__main__":
    main()
