"""Start-up and refusal times of the `cnnedge` command, in the base install a device gets.

    uv run python benchmarks/bench_startup.py            # builds the wheel into a fresh venv under build/
    uv run python benchmarks/bench_startup.py --venv DIR  # or times an existing install

Builds the wheel, installs it with its base dependencies alone (no torch) into a new virtual environment,
then times whole processes from a folder outside the repository, median of --runs:

- `cnnedge predict one.png` (goal <= 0.5 s): the one-shot cold start a script pays per image;
- `cnnedge --help`, and refusals that must cost no more than that (goal <= 0.3 s): a usage error, an
  existing output without --force, a missing checkpoint, a missing model.

The repository's own venv (with torch) is timed for the same refusals of the training commands, since
those are where an eager `import torch` used to cost seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sh(*args, cwd=ROOT) -> str:
    return subprocess.run([str(a) for a in args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def build_venv(folder: Path) -> Path:
    uv = shutil.which("uv") or sys.exit("uv is needed to build the wheel")
    sh(uv, "build", "--wheel", "--out-dir", folder / "dist", "--no-create-gitignore")
    constraints = folder / "constraints.txt"
    constraints.write_text(sh(uv, "export", "--no-dev", "--no-emit-project", "--no-hashes", "--frozen"))
    sh(uv, "venv", folder / "venv", "--python", sys.executable)
    sh(uv, "pip", "install", "--python", folder / "venv" / "bin" / "python", next((folder / "dist").glob("*.whl")),
       "--constraint", constraints)
    return folder / "venv"


def timed(cmd: list, cwd: Path, runs: int, expect: int | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    seconds, code = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, env=env)
        seconds.append(time.perf_counter() - t0)
        code = r.returncode
        if expect is not None and code != expect:
            raise SystemExit(f"{cmd}: exit {code}, expected {expect}: {r.stderr[-300:]}")
    return {"command": " ".join(str(c) for c in cmd[1:]), "median_s": round(statistics.median(seconds), 3),
            "min_s": round(min(seconds), 3), "exit": code}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", type=Path, help="an existing base install to time (default: build one)")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cnnedge-startup-") as tmp:
        tmp = Path(tmp)
        venv = args.venv or build_venv(tmp)
        exe = venv / "bin" / "cnnedge"
        work = tmp / "work"
        work.mkdir()
        shutil.copy(ROOT / "samples" / "3" / "04_pen_photo.jpg", work / "one.jpg")
        (work / "exists.onnx").write_bytes(b"")
        base = [
            timed([exe, "predict", "one.jpg"], work, args.runs, 0),
            timed([exe, "--help"], work, args.runs, 0),
            timed([exe, "predict", "one.jpg", "--topk", "abc"], work, args.runs, 2),
            timed([exe, "predict", "missing.png"], work, args.runs, 2),
            timed([exe, "predict", "one.jpg", "--model", "nope.onnx"], work, args.runs, 2),
            timed([exe, "train"], work, args.runs, 2),
        ]
        repo = ROOT / ".venv" / "bin" / "cnnedge"
        full = [
            timed([repo, "--help"], ROOT, args.runs, 0),
            timed([repo, "export", "models/cnn.pt"], ROOT, args.runs, 2),  # export/cnn.onnx exists, no --force
            timed([repo, "export", "nope.pt"], ROOT, args.runs, 2),
            timed([repo, "train", "--epochs", "0"], ROOT, args.runs, 2),
            timed([repo, "summary", "--arch", "nope"], ROOT, args.runs, 2),
        ] if repo.exists() else []
    print(json.dumps({"load_average": os.getloadavg()[0], "base_install": base, "repo_venv": full}, indent=2))


if __name__ == "__main__":
    main()
