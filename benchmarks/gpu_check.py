"""The project on a GPU machine, from the working tree, in a few minutes: train, export, predict and bench on CUDA.

    benchmarks/gpu_check.sh OUT [--data-dir DIR] [--budget SECONDS] [--limit N --epochs N --quick]

Runs `python3 -m cnnedge` with the machine's own python3 and PYTHONPATH at the working tree (no install, no
uv: what such a machine has is its python3 with PyTorch), each step a subprocess with its own share of the
time budget (default 460 s, under the 8 minutes a GPU loan allows), and writes OUT/gpu_check.json:

1. environment: python, torch (CUDA build, device), onnxruntime (version, providers), OpenCV;
2. `train --device cuda` and `train --device cpu` of the default recipe: wall time, training time, test
   accuracy (skipped without MNIST at DIR, or without a CUDA device for the cuda run);
3. `export` of the CUDA-trained checkpoint (else the shipped models/cnn.pt) with fp16 and int8: parity on
   onnxruntime's CUDA provider beside the CPU one, as export measures it (skipped where onnxruntime has
   no CUDA provider, or no torch.cuda to compare with);
4. `predict --provider cuda` on samples/: the accuracy and the provider really used, or its one-line refusal;
5. `bench --providers cpu,cuda`: PyTorch eager and onnxruntime rows on both, where each loads.

Every step that cannot run says why in one line ("skipped: no GPU", "skipped: no MNIST data at DIR");
a step that fails keeps its exit code and the last line of its error. The JSON is written after every step,
so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MNIST = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def environment() -> dict:
    env = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
        if env["cuda_available"]:
            env["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        env["torch"] = None
        env["cuda_available"] = False
    try:
        import onnxruntime as ort

        env["onnxruntime"] = ort.__version__
        env["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        env["onnxruntime"], env["onnxruntime_providers"] = None, []
    try:
        import cv2

        env["opencv"] = cv2.__version__
    except ImportError:
        env["opencv"] = None
    env["modules"] = {m: importlib.util.find_spec(m) is not None
                      for m in ("torchvision", "onnx", "onnxscript", "matplotlib", "typer", "rich")}
    return env


class Check:
    """The steps, their time budget, and the JSON they fill in."""

    def __init__(self, out: Path, budget: float):
        self.out, self.deadline = out, time.monotonic() + budget
        self.doc = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "root": str(ROOT), "steps": {}}
        self.work = out / "work"
        self.work.mkdir(parents=True, exist_ok=True)

    def save(self) -> None:
        path = self.out / "gpu_check.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.doc, indent=2) + "\n")
        tmp.replace(path)

    def skip(self, step: str, why: str) -> None:
        print(f"{step}: skipped: {why}", flush=True)
        self.doc["steps"][step] = {"status": "skipped", "reason": why}
        self.save()

    def run(self, step: str, args: list[str], share: float) -> tuple[dict, subprocess.CompletedProcess | None]:
        """`python3 -m cnnedge ARGS`, allowed `share` of the time left; the step's record and the process."""
        left = self.deadline - time.monotonic()
        if left < 20:
            self.skip(step, f"time budget spent ({left:.0f} s left)")
            return self.doc["steps"][step], None
        cmd = [sys.executable, "-m", "cnnedge", *args]
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        record = {"command": "cnnedge " + " ".join(args)}
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(20, share * left))
        except subprocess.TimeoutExpired:
            record.update(status="failed", reason=f"timed out after {time.perf_counter() - t0:.0f} s")
            r = None
        else:
            record["exit"] = r.returncode
            if r.returncode == 0:
                record["status"] = "ok"
            else:
                lines = [line for line in r.stderr.splitlines() if line.strip()]
                record.update(status="failed", reason=lines[-1] if lines else f"exit {r.returncode}")
        record["wall_s"] = round(time.perf_counter() - t0, 2)
        print(f"{step}: {record['status']} in {record['wall_s']} s" + (f": {record['reason']}" if "reason" in record else ""),
              flush=True)
        self.doc["steps"][step] = record
        self.save()
        return record, r


def train(check: Check, device: str, data: Path, args) -> Path | None:
    step = f"train_{device}"
    out = check.work / f"cnn_{device}.pt"
    extra = [*(["--limit", str(args.limit)] if args.limit else []), *(["--epochs", str(args.epochs)] if args.epochs else [])]
    record, r = check.run(step, ["train", "--device", device, "--data-dir", str(data), "--out", str(out), "--no-plots",
                                 *extra], 0.3)
    if record["status"] != "ok":
        return None
    m = json.loads(out.with_name(out.stem + ".metrics.json").read_text())
    record.update(test_accuracy=m["test_accuracy"], train_seconds=round(m["train_seconds"], 2),
                  epochs=m["epochs"], seconds=m.get("seconds"), threads=[h.get("threads") for h in m["history"]])
    check.save()
    return out


def export(check: Check, checkpoint: Path, data: Path | None, env: dict) -> Path | None:
    missing = [m for m in ("onnx", "onnxscript") if not env["modules"].get(m)]
    if missing:
        check.skip("export", f"{', '.join(missing)} not installed (torch's ONNX exporter needs them)")
        return None
    out = check.work / "cnn.onnx"
    quantize = ["--quantize", "fp16", *(["--quantize", "int8"] if data is not None else [])]  # int8 calibrates on MNIST
    record, r = check.run("export", ["export", str(checkpoint), "--out", str(out), "--force", *quantize,
                                     *(["--data-dir", str(data)] if data is not None else [])], 0.45)
    if record["status"] != "ok":
        return None
    report = json.loads(out.with_suffix(".json").read_text())
    parity = report["parity"]["providers"]
    record["checkpoint"] = str(checkpoint)
    record["parity"] = parity
    record["accuracy"] = report.get("accuracy")
    if "CUDAExecutionProvider" not in parity:
        why = ("no GPU" if not env["cuda_available"] else
               f"onnxruntime {env['onnxruntime']} has no CUDA provider ({', '.join(env['onnxruntime_providers'])})"
               if "CUDAExecutionProvider" not in env["onnxruntime_providers"] else "the CUDA provider did not load")
        record["cuda_parity"] = f"skipped: {why}"
        print(f"export: CUDA parity skipped: {why}", flush=True)
    check.save()
    return out


def predict(check: Check, model: Path | None, env: dict) -> None:
    model_args = ["--model", str(model)] if model is not None else []
    record, r = check.run("predict_cuda", ["predict", "samples", "--provider", "cuda", "--format", "json", *model_args], 0.2)
    if record["status"] == "ok":
        doc = json.loads(r.stdout)
        record.update(provider=doc.get("provider"), accuracy=doc["summary"].get("accuracy"), images=doc["summary"]["images"])
    elif r is not None and r.returncode == 2:  # the one-line refusal is the answer where CUDA cannot run
        record.update(status="refused", refusal=record.pop("reason"))
        print(f"predict_cuda: refused, as it should be{' (no GPU)' if not env['cuda_available'] else ''}", flush=True)
    check.save()


def bench(check: Check, model: Path | None, checkpoint: Path, data: Path | None, env: dict, quick: bool) -> None:
    providers = "cpu,cuda" if env["cuda_available"] or "CUDAExecutionProvider" in env["onnxruntime_providers"] else "cpu"
    timing = (["--batch-sizes", "1,64", "--warmup", "2", "--repeat", "3", "--min-time", "0.05", "--test-images", "500"]
              if quick else ["--repeat", "10", "--min-time", "0.3", "--test-images", "2000"])
    args = ["bench", "--providers", providers, "--checkpoint", str(checkpoint), "--format", "json", *timing,
            "--images", "0", "--photos", "0",
            *(["--model", str(model)] if model is not None else []), *(["--data-dir", str(data)] if data is not None else [])]
    record, r = check.run("bench", args, 0.9)
    if record["status"] != "ok":
        return
    doc = json.loads(r.stdout)
    record["rows"] = [{k: row[k] for k in ("runtime", "provider", "precision", "batch", "latency_ms_p50",
                                            "images_per_second", "accuracy", "speedup_vs_torch")} for row in doc["rows"]]
    record["notes"] = doc["notes"]
    record["threads"] = doc["threads"]
    record["peak_gflops"] = doc["peak_gflops"]
    if not env["cuda_available"]:
        record["cuda"] = "skipped: no GPU"
        print("bench: CUDA rows skipped: no GPU", flush=True)
    elif not any(row["provider"] == "cuda" and row["runtime"] == "torch" for row in doc["rows"]):
        record["cuda"] = "no PyTorch CUDA rows: " + "; ".join(n for n in doc["notes"] if "cuda" in n)
    check.save()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="folder for gpu_check.json (and the models it trains, under work/)")
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("CNNEDGE_DATA", ROOT.parent / "shared" / "data")),
                    help="dataset root with MNIST/raw [default: $CNNEDGE_DATA, else ../shared/data]")
    ap.add_argument("--limit", type=int, help="train on the first N images (tests)")
    ap.add_argument("--epochs", type=int, help="epochs instead of the recipe's (tests)")
    ap.add_argument("--budget", type=float, default=460, help="seconds for every step together")
    ap.add_argument("--quick", action="store_true", help="bench: two batch sizes, a few calls (tests)")
    args = ap.parse_args()
    check = Check(args.out, args.budget)
    env = check.doc["environment"] = environment()
    check.save()
    print(f"python {env['python']}, torch {env['torch']} (CUDA {env.get('torch_cuda')}, "
          f"{env.get('gpu') or 'no GPU'}), onnxruntime {env['onnxruntime']} {env['onnxruntime_providers']}", flush=True)

    data = args.data_dir if all((args.data_dir / "MNIST" / "raw" / n).is_file() for n in MNIST) else None
    check.doc["data"] = str(args.data_dir) if data else f"no MNIST data at {args.data_dir}"
    trained = None
    if env["torch"] is None:
        check.skip("train_cuda", "torch not installed")
        check.skip("train_cpu", "torch not installed")
    elif data is None:
        check.skip("train_cuda", f"no MNIST data at {args.data_dir}")
        check.skip("train_cpu", f"no MNIST data at {args.data_dir}")
    else:
        if env["cuda_available"]:
            trained = train(check, "cuda", data, args)
        else:
            check.skip("train_cuda", "no GPU")
        train(check, "cpu", data, args)  # the CPU figure beside it
    checkpoint = trained or ROOT / "models" / "cnn.pt"
    model = export(check, checkpoint, data, env) if env["torch"] is not None else check.skip("export", "torch not installed")
    predict(check, model, env)
    bench(check, model, checkpoint, data, env, args.quick)
    check.doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    check.save()
    print(f"wrote {args.out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
