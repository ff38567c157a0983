"""Start-up and refusal times of the `cnnedge` command, in the base install a device gets, and where they go.

    uv run python benchmarks/bench_startup.py            # builds the wheel into a fresh venv under build/
    uv run python benchmarks/bench_startup.py --venv DIR  # or times an existing install
    uv run python benchmarks/bench_startup.py --no-bytecode  # the venv without .pyc files (uv's default)

Builds the wheel, installs it with its base dependencies alone (no torch) into a new virtual environment,
with bytecode compiled as pip compiles it (`uv pip install` does not unless asked: with
PYTHONDONTWRITEBYTECODE set, as in many containers, every process then compiles every module it imports
again), then times whole processes from a folder outside the repository, median of --runs:

- `cnnedge predict one.jpg` (goal <= 0.5 s): the one-shot cold start a script pays per image, with where
  its time goes: the imports that cost most (python -X importtime) and a perf_counter breakdown of the
  same work in one process (interpreter, CLI, the predict module, onnxruntime, the session, the image,
  the network, the table);
- `cnnedge --help`, and refusals that must cost no more than that (goal <= 0.3 s): a usage error, an
  existing output without --force, a missing checkpoint, model, input or dataset, an unknown architecture.

The repository's own venv (with torch) is timed for the refusals of the training commands, since those
are where an eager `import torch` used to cost seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The cold start of `cnnedge predict one.jpg`, step by step, as cli.predict and predict.run do it.
BREAKDOWN = r"""
import sys, time
t = [time.perf_counter()]
import cnnedge.cli  # typer, the command definitions
t.append(time.perf_counter())
from cnnedge.infer.predict import run, render_table, summarise  # cv2, numpy: the inputs are checked first
t.append(time.perf_counter())
import onnxruntime  # noqa: F401
t.append(time.perf_counter())
from cnnedge.infer.predictor import Predictor
predictor = Predictor(None, "auto")  # the shipped model's session
t.append(time.perf_counter())
from cnnedge.infer.files import read_image
image = read_image(sys.argv[1])
prepared = predictor.preprocess(image)
t.append(time.perf_counter())
predictions = list(predictor.predict_iter([sys.argv[1]]))
t.append(time.perf_counter())
import contextlib, io
with contextlib.redirect_stdout(io.StringIO()):
    render_table(predictions, summarise(predictions, predictor.class_names, 0.01), "m", "cpu", 3)
t.append(time.perf_counter())
names = ["import cnnedge.cli (typer)", "import the predict command (cv2, numpy)", "import onnxruntime",
         "Predictor: preprocessing, runtime, the model", "read and preprocess the image", "predict_iter (again: pool, network)",
         "render the table (rich)"]
print({n: round(b - a, 4) for n, a, b in zip(names, t, t[1:])})
"""


def sh(*args, cwd=ROOT) -> str:
    return subprocess.run([str(a) for a in args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def build_venv(folder: Path, bytecode: bool) -> Path:
    uv = shutil.which("uv") or sys.exit("uv is needed to build the wheel")
    sh(uv, "build", "--wheel", "--out-dir", folder / "dist", "--no-create-gitignore")
    constraints = folder / "constraints.txt"
    constraints.write_text(sh(uv, "export", "--no-dev", "--no-emit-project", "--no-hashes", "--frozen"))
    sh(uv, "venv", folder / "venv", "--python", sys.executable)
    sh(uv, "pip", "install", "--python", folder / "venv" / "bin" / "python", next((folder / "dist").glob("*.whl")),
       "--constraint", constraints, *(["--compile-bytecode"] if bytecode else []))
    return folder / "venv"


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}


def timed(cmd: list, cwd: Path, runs: int, expect: int | None = None) -> dict:
    seconds, code = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, env=clean_env())
        seconds.append(time.perf_counter() - t0)
        code = r.returncode
        if expect is not None and code != expect:
            raise SystemExit(f"{cmd}: exit {code}, expected {expect}: {r.stderr[-300:]}")
    return {"command": " ".join(str(c) for c in cmd[1:]), "median_s": round(statistics.median(seconds), 3),
            "min_s": round(min(seconds), 3), "exit": code}


def import_profile(python: Path, args: list, cwd: Path, top: int = 12) -> list[str]:
    """The imports with the largest cumulative time in one run of `python -X importtime -m cnnedge ARGS`."""
    r = subprocess.run([str(python), "-X", "importtime", "-m", "cnnedge", *map(str, args)], cwd=cwd,
                       capture_output=True, text=True, env=clean_env())
    rows = []
    for line in r.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if m and len(m.group(2)) <= 3:  # top-level imports and their direct children
            rows.append((int(m.group(1)), m.group(3)))
    return [f"{name} {us / 1e3:.0f} ms" for us, name in sorted(rows, reverse=True)[:top]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", type=Path, help="an existing base install to time (default: build one)")
    ap.add_argument("--no-bytecode", action="store_true", help="build the venv without compiling bytecode")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cnnedge-startup-") as tmp:
        tmp = Path(tmp)
        venv = args.venv or build_venv(tmp, not args.no_bytecode)
        exe, python = venv / "bin" / "cnnedge", venv / "bin" / "python"
        work = tmp / "work"
        work.mkdir()
        shutil.copy(ROOT / "samples" / "3" / "04_pen_photo.jpg", work / "one.jpg")
        (work / "exists.onnx").write_bytes(b"")
        (work / "empty").mkdir()
        base = [
            timed([exe, "predict", "one.jpg"], work, args.runs, 0),
            timed([exe, "--help"], work, args.runs, 0),
            timed([exe, "predict", "one.jpg", "--topk", "abc"], work, args.runs, 2),
            timed([exe, "predict", "missing.png"], work, args.runs, 2),
            timed([exe, "predict", "one.jpg", "--model", "nope.onnx"], work, args.runs, 2),
            timed([exe, "info", "nope.onnx"], work, args.runs, 2),
            timed([exe, "train"], work, args.runs, 2),
        ]
        profile = {
            "imports": import_profile(python, ["predict", "one.jpg"], work),
            "breakdown_s": json.loads(subprocess.run([str(python), "-c", BREAKDOWN, "one.jpg"], cwd=work, env=clean_env(),
                                                     capture_output=True, text=True, check=True).stdout.replace("'", '"')),
        }
        repo = ROOT / ".venv" / "bin" / "cnnedge"
        data = ["--data-dir", str(work / "empty")]
        full = [
            timed([repo, "--help"], ROOT, args.runs, 0),
            timed([repo, "export", "models/cnn.pt", "--out", work / "exists.onnx"], ROOT, args.runs, 2),
            timed([repo, "export", "models/cnn.pt"], ROOT, args.runs, 2),  # export/cnn.onnx exists, no --force
            timed([repo, "export", "nope.pt"], ROOT, args.runs, 2),
            timed([repo, "train", "--epochs", "0"], ROOT, args.runs, 2),
            timed([repo, "train", "--arch", "nope"], ROOT, args.runs, 2),
            timed([repo, "train", *data, "--out", work / "x.pt"], ROOT, args.runs, 2),  # no MNIST there
            timed([repo, "train", "--resume", "--out", work / "nope.pt"], ROOT, args.runs, 2),
            timed([repo, "train", "--from", "nope.pt", "--out", work / "x.pt"], ROOT, args.runs, 2),
            timed([repo, "summary", "--arch", "nope"], ROOT, args.runs, 2),
            timed([repo, "inspect", "nope.pt"], ROOT, args.runs, 2),
            timed([repo, "inspect", "models/cnn.pt", "--image", work / "missing.png"], ROOT, args.runs, 2),
        ] if repo.exists() else []
    print(json.dumps({"load_average": os.getloadavg()[0], "bytecode": not args.no_bytecode if args.venv is None else None,
                      "base_install": base, "predict_profile": profile, "repo_venv": full}, indent=2))


if __name__ == "__main__":
    main()
