"""`cnnedge sweep` against its goals, and why its trials run in-process.

    CNNEDGE_DATA=../shared/data uv run python benchmarks/bench_sweep.py [--subprocess]

Runs the issue's sweep (2 epochs values x 2 batch sizes, --limit 4000) as a user would, in a fresh process,
and reports from its sweep.json:
- the whole command's wall time (goal: under 2 minutes; it includes interpreter start, the torch import,
  four trainings and the plots);
- the sweep's own overhead per trial: the process's time minus the time spent inside the trainer
  (tables, result files, bookkeeping; goal <= 1 s);
- what each in-process trial costs beyond its epochs (`wall - train`): the dataset decode, the final test
  evaluation, the checkpoint writes. `cnnedge train` itself pays these too.
--subprocess also runs each trial's reproduce command as its own `cnnedge train` process: the extra
wall time per trial is what a sweep of subprocesses would pay (interpreter start and the torch import).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ["--epochs", "1,2", "--batch-size", "64,256", "--limit", "4000"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subprocess", action="store_true", help="also time each trial as its own process")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sweep"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cnnedge", "sweep", *SWEEP, "--out", str(out)], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        command_seconds = time.perf_counter() - start
        doc = json.loads((out / "sweep.json").read_text())
        trials = doc["trials"]
        result = {
            "command": "cnnedge sweep " + " ".join(SWEEP),
            "command_seconds": round(command_seconds, 2),
            "sweep_seconds": round(doc["seconds"], 2),
            "sweep_overhead_seconds_per_trial": round(doc["overhead_seconds_per_trial"], 4),
            "trials": [{"trial": t["trial"], "train_seconds": round(t["train_seconds"], 2),
                        "wall_seconds": round(t["wall_seconds"], 2),
                        "beyond_epochs_seconds": round(t["wall_seconds"] - t["train_seconds"], 2)} for t in trials],
        }
        # The first trial also pays for the torchvision and dataset imports; the others show the steady cost.
        steady = [t["wall_seconds"] - t["train_seconds"] for t in trials[1:]]
        result["beyond_epochs_seconds_median_after_first"] = round(statistics.median(steady), 3)
        if args.subprocess:
            extra = []
            for t in trials:
                argv = shlex.split(t["command"])[1:]
                argv[argv.index("--out") + 1] = str(Path(tmp) / f"{t['trial']}.pt")
                begin = time.perf_counter()
                subprocess.run([sys.executable, "-m", "cnnedge", *argv, "--no-plots"], cwd=ROOT, check=True,
                               stdout=subprocess.DEVNULL)
                wall = time.perf_counter() - begin
                metrics = json.loads((Path(tmp) / f"{t['trial']}.metrics.json").read_text())
                extra.append(round(wall - metrics["train_seconds"], 2))
            result["subprocess_beyond_epochs_seconds"] = extra
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
