"""Training speed and accuracy: the whole `cnnedge train` process, quiet and on a busy machine, and the default
recipe against seed 004's.

    CNNEDGE_DATA=../shared/data uv run python benchmarks/bench_train.py --process [--runs 3] [--busy 2]
    CNNEDGE_DATA=../shared/data uv run python benchmarks/bench_train.py --to-accuracy 0.99
    CNNEDGE_DATA=../shared/data uv run python benchmarks/bench_train.py [--long] [--baseline-epochs 4]

--process: `cnnedge train` (the default recipe) as a user runs it, a new process each time, timed from the
outside (wall), with where its time went from its metrics JSON (data loading, set-up, epochs, test, plots;
the rest is start-up: interpreter, imports, checkpoints, tables) and the CPU threads it chose. With --busy K,
each run is repeated with K other processes spinning on the cores from a second before it starts until it
ends (killed then, and after --busy-limit seconds at most), the quiet and busy runs taking turns, so that
the busy/quiet ratio is measured side by side. Also prints how many cores other processes left free
during each run (cnnedge.threads), since this machine's load is not ours to control.

--to-accuracy A: one in-process run of the default recipe that measures the test accuracy after every epoch
(outside the timed epochs) and reports the training time until it first reaches A.

Default: cnnedge's default recipe against seed 004 (its network, Adam 1e-3, batch 256, a torchvision
DataLoader over torchvision.datasets.MNIST with per-sample PIL decoding), training time and test accuracy.
--long adds the longer recipe (12 epochs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cnnedge import threads  # noqa: E402  (before torch: it measures from here)

SPIN = "import time\nend = time.monotonic() + {limit}\nwhile time.monotonic() < end:\n    pass\n"


# ------------------------------------------------------------------------------- the whole process


def train_process(folder: Path, busy: int, limit: float, extra: list[str]) -> dict:
    """One `cnnedge train` process (wall time from outside), with `busy` spinning processes around it."""
    out = folder / f"cnn-{time.monotonic_ns()}.pt"
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN.format(limit=limit)]) for _ in range(busy)]
    try:
        if spinners:
            time.sleep(1.0)  # the load is there before the run starts, as on a busy machine
        threads.free_cores()
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "cnnedge", "train", "--out", str(out), *extra], cwd=ROOT,
                           capture_output=True, text=True)
        wall = time.perf_counter() - t0
        free = threads.free_cores()
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    if r.returncode != 0:
        raise SystemExit(f"cnnedge train failed ({r.returncode}): {r.stderr[-500:]}")
    m = json.loads(out.with_name(out.stem + ".metrics.json").read_text())
    seconds = m.get("seconds", {})
    return {"busy_processes": busy, "wall_s": wall, "test_accuracy": m["test_accuracy"],
            "threads": [h.get("threads") for h in m["history"]], "seconds": seconds,
            "start_up_and_rest_s": wall - sum(seconds.values()),
            "free_cores": free}  # what other processes (the spinners among them) left free during the run


def show_process(row: dict) -> str:
    s = row["seconds"]
    phases = ", ".join(f"{k} {v:.2f}" for k, v in s.items())
    load = f"{row['busy_processes']} spinning" if row["busy_processes"] else "no added load"
    return (f"  {load}: {row['wall_s']:6.1f} s wall, test {100 * row['test_accuracy']:.2f}%,"
            f" threads {row['threads']}; {phases}, start-up and the rest {row['start_up_and_rest_s']:.2f} s;"
            f" cores other processes left free {row['free_cores']:.2f}")


def process_benchmark(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="cnnedge-bench-train-") as tmp:
        for i in range(args.runs):
            for busy in ([0, args.busy] if args.busy else [0]):
                rows.append(train_process(Path(tmp), busy, args.busy_limit, args.train_args))
                print(f"run {i + 1}:{show_process(rows[-1])[1:]}", flush=True)
    quiet = [r["wall_s"] for r in rows if not r["busy_processes"]]
    print(f"\ncnnedge train {' '.join(args.train_args)}: median of {len(quiet)} runs without added load "
          f"{statistics.median(quiet):.1f} s wall")
    if args.busy:
        busy = [r["wall_s"] for r in rows if r["busy_processes"]]
        ratios = [b / q for q, b in zip(quiet, busy)]
        print(f"with {args.busy} spinning processes: median {statistics.median(busy):.1f} s wall, busy/unloaded "
              f"{', '.join(f'{x:.2f}' for x in ratios)} (median {statistics.median(ratios):.2f}x; goal <= 2.5x)")
    return rows


# ------------------------------------------------------------------------------- time to an accuracy


def time_to_accuracy(target: float) -> dict:
    """The default recipe in this process, the test accuracy after each epoch measured outside its timing."""
    import torch

    from cnnedge.train import trainer
    from cnnedge.train.checkpoint import model_from_checkpoint
    from cnnedge.train.data import load_data

    test = load_data("mnist")
    reached = []
    save = trainer.save_checkpoint

    def measuring_save(path, checkpoint, **options):
        save(path, checkpoint, **options)
        if checkpoint["complete"]:
            return
        model = model_from_checkpoint(checkpoint).to(memory_format=torch.channels_last)
        mean = torch.tensor(checkpoint["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(checkpoint["std"]).view(1, -1, 1, 1)
        with torch.inference_mode():
            correct = sum(int((model(((x - mean) / std).contiguous(memory_format=torch.channels_last)).argmax(1) == y).sum())
                          for x, y in zip(test.x_test.split(1000), test.y_test.split(1000)))
        reached.append((checkpoint["epoch"], correct / len(test.y_test)))

    trainer.save_checkpoint = measuring_save
    try:
        with tempfile.TemporaryDirectory() as tmp:
            metrics = trainer.run(trainer.TrainConfig(out=str(Path(tmp) / "cnn.pt"), plots=False), command="cnnedge train")
    finally:
        trainer.save_checkpoint = save
    elapsed = 0.0
    rows = []
    for h, (epoch, accuracy) in zip(metrics["history"], reached):
        elapsed += h["seconds"]
        rows.append({"epoch": epoch, "train_seconds": elapsed, "test_accuracy": accuracy, "threads": h["threads"]})
        print(f"  epoch {epoch}: {elapsed:5.1f} s of training ({h['threads']} threads), test {100 * accuracy:.2f}%")
    first = next((r for r in rows if r["test_accuracy"] >= target), None)
    print(f"{100 * target:.1f}% reached after {first['train_seconds']:.1f} s of training (epoch {first['epoch']})" if first
          else f"{100 * target:.1f}% not reached in {len(rows)} epochs")
    return {"target": target, "epochs": rows, "reached": first}


# ------------------------------------------------------------------------------- against seed 004


def cnnedge_recipe(epochs: int | None, folder: Path) -> dict:
    from cnnedge.train.trainer import TrainConfig, run

    out = folder / f"cnn_{epochs or 'default'}.pt"
    metrics = run(TrainConfig(out=str(out), plots=False, hparams={"epochs": epochs}),
                  command=f"cnnedge train{f' --epochs {epochs}' if epochs else ''}")
    return {"recipe": f"cnnedge train{f' --epochs {epochs}' if epochs else ''}", "epochs": metrics["epochs"],
            "train_seconds": metrics["train_seconds"], "test_accuracy": metrics["test_accuracy"]}


def seed004_recipe(epochs: int, root: Path) -> dict:
    """Seed 004 as written: per-sample PIL -> ToTensor -> Normalize through a DataLoader, Adam, batch 256."""
    import torch
    import torch.nn.functional as F
    import torchvision
    from torch.utils.data import DataLoader
    from torchvision import transforms

    from cnnedge.train.zoo import build_model

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


def recipes_benchmark(args) -> list[dict]:
    import torch

    from cnnedge.infer.files import resolve_data_dir

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
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--process", action="store_true", help="time whole `cnnedge train` processes")
    parser.add_argument("--runs", type=int, default=3, help="--process: runs (each quiet, and busy with --busy)")
    parser.add_argument("--busy", type=int, default=0, metavar="K", help="--process: also with K spinning processes")
    parser.add_argument("--busy-limit", type=float, default=900, help="seconds a spinning process lives at most")
    parser.add_argument("--to-accuracy", type=float, metavar="A", help="training time until test accuracy A")
    parser.add_argument("--long", action="store_true", help="also run the 12-epoch recipe")
    parser.add_argument("--baseline-epochs", type=int, default=4)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("train_args", nargs="*", help="--process: extra `cnnedge train` options (after --)")
    args = parser.parse_args()
    print(f"{threads.usable_cores()} usable cores, load average {os.getloadavg()[0]:.2f}", flush=True)
    if args.process:
        result = process_benchmark(args)
    elif args.to_accuracy:
        result = time_to_accuracy(args.to_accuracy)
    else:
        result = recipes_benchmark(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
