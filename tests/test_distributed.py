"""Multi-process training through torchrun: DistributedDataParallel with gloo on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cnnedge.train.checkpoint import load_checkpoint, model_from_checkpoint
from conftest import ROOT


@pytest.mark.slow  # two training processes: CI runs it with the slow set
def test_torchrun_two_cpu_processes(tmp_path, data_root):
    out = tmp_path / "ddp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           "-m", "cnnedge", "train", "--limit", "6000", "--epochs", "2", "--batch-size", "64", "--no-plots",
           "--out", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "x 2 processes" in result.stdout
    assert result.stdout.count("epoch 1/2 ") == 1  # rank 0 alone logs
    checkpoint = load_checkpoint(out)  # the same format as a single-process run
    assert checkpoint["complete"] and checkpoint["processes"] == 2
    assert not any(key.startswith("module.") for key in checkpoint["state_dict"])
    model_from_checkpoint(checkpoint)
    metrics = json.loads(out.with_name("ddp.metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.95, metrics["test_accuracy"]
    assert len(metrics["history"]) == 2
