"""benchmarks/gpu_check.sh on a machine without a GPU: every step that needs CUDA says so in one line, the rest
runs, and the JSON holds the figures (a GPU machine runs the same script for real)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def gpu_check(out, *args) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), *args], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r, json.loads((out / "gpu_check.json").read_text())


@pytest.fixture(scope="module")
def no_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the check runs for real there")


@pytest.mark.slow  # the whole script: training, export with variants, bench (CI runs it with the slow set)
def test_without_a_gpu_every_cuda_step_says_so_and_the_rest_runs(no_gpu, data_root, tmp_path):
    r, doc = gpu_check(tmp_path, "--data-dir", str(data_root), "--limit", "1000", "--epochs", "1", "--quick")
    steps = doc["steps"]
    assert doc["environment"]["cuda_available"] is False and doc["data"] == str(data_root)
    assert steps["train_cuda"] == {"status": "skipped", "reason": "no GPU"}
    assert "train_cuda: skipped: no GPU" in r.stdout.splitlines()
    cpu = steps["train_cpu"]
    assert cpu["status"] == "ok" and cpu["epochs"] == 1 and 0.1 < cpu["test_accuracy"] <= 1 and cpu["train_seconds"] > 0
    export = steps["export"]  # the shipped checkpoint, as nothing was trained on CUDA
    assert export["status"] == "ok" and export["checkpoint"].endswith("models/cnn.pt")
    assert export["parity"]["CPUExecutionProvider"]["passed"] and export["cuda_parity"].startswith("skipped: ")
    assert export["accuracy"]["int8"] > 0.98
    predict = steps["predict_cuda"]  # the one-line refusal of --provider cuda
    assert predict["status"] == "refused" and predict["exit"] == 2
    assert predict["refusal"].startswith("error: provider cuda") and "\n" not in predict["refusal"]
    bench = steps["bench"]
    assert bench["status"] == "ok" and bench["cuda"] == "skipped: no GPU"
    assert {row["provider"] for row in bench["rows"]} == {"cpu"}
    assert {row["runtime"] for row in bench["rows"]} >= {"torch", "onnxruntime"}
    assert "bench: CUDA rows skipped: no GPU" in r.stdout.splitlines()


def test_without_mnist_training_is_skipped_with_the_folder_named(tmp_path):
    empty = tmp_path / "data"
    empty.mkdir()
    r, doc = gpu_check(tmp_path / "out", "--data-dir", str(empty), "--budget", "1")  # the later steps: out of time
    for step in ("train_cuda", "train_cpu"):
        assert doc["steps"][step] == {"status": "skipped", "reason": f"no MNIST data at {empty}"}
        assert f"{step}: skipped: no MNIST data at {empty}" in r.stdout.splitlines()
    assert all(doc["steps"][s]["status"] == "skipped" for s in ("export", "predict_cuda", "bench"))
