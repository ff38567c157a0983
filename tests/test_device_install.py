"""The base install on a device: the wheel with its base dependencies alone, in a fresh virtual environment,
used from a folder outside the repository. No PyTorch; the shipped model travels inside the package.

These build and install for real (uv from the package registry's cache), so they run once per session."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, assert_one_line_error
from test_webcam import render_clip, write_video

UV = shutil.which("uv")
pytestmark = pytest.mark.skipif(UV is None, reason="uv is not installed (the README says how to get it)")


def uv(*args: str, cwd: Path = ROOT, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run([UV, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "VIRTUAL_ENV": "", **(env or {})})
    assert r.returncode == 0, r.stderr[-2000:]
    return r


@pytest.fixture(scope="module")
def device(tmp_path_factory) -> tuple[Path, Path]:
    """(the installed `cnnedge` executable, a working folder outside the repo with a copy of samples/)."""
    root = tmp_path_factory.mktemp("device")
    uv("build", "--wheel", "--out-dir", str(root / "dist"), "--no-create-gitignore")
    wheel = next((root / "dist").glob("cnnedge-*.whl"))
    # The locked versions of the base dependencies (no extras, no dev group): what `pip install cnnedge` takes.
    constraints = root / "constraints.txt"
    constraints.write_text(uv("export", "--no-dev", "--no-emit-project", "--no-hashes", "--frozen").stdout)
    uv("venv", str(root / "venv"), "--python", sys.executable, "--seed")
    python = root / "venv" / "bin" / "python"
    uv("pip", "install", "--python", str(python), str(wheel), "--constraint", str(constraints))
    work = root / "work"
    shutil.copytree(ROOT / "samples", work / "samples", ignore=shutil.ignore_patterns("*.py"))
    return root / "venv" / "bin" / "cnnedge", work


def run(exe: Path, *args, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(exe), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_the_wheel_carries_the_shipped_model_and_no_torch(device):
    exe, work = device
    python = exe.with_name("python")
    r = subprocess.run([str(python), "-c", "import torch"], capture_output=True, text=True, cwd=work)
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr
    located = subprocess.run([str(python), "-c", "from cnnedge.infer.modelinfo import default_model; print(default_model())"],
                             capture_output=True, text=True, cwd=work)
    path = Path(located.stdout.strip())
    assert path.is_file() and "site-packages" in path.parts and ROOT not in path.parents
    assert path.read_bytes() == (ROOT / "export" / "cnn.onnx").read_bytes()
    info = run(exe, "info", "--format", "json", cwd=work)
    assert info.returncode == 0, info.stderr
    doc = json.loads(info.stdout)
    assert doc["shipped"] and doc["path"] == str(path) and doc["classes"] == [str(d) for d in range(10)]


def test_predict_enroll_and_gallery_from_another_folder(device):
    exe, work = device
    r = run(exe, "predict", "samples/", "--format", "json", cwd=work)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)["summary"]
    assert summary["images"] == 22 and summary["accuracy"] == 1.0
    # Few-shot: enroll three of the sample classes, then classify the same folders through the gallery.
    classes = work / "three"
    for d in ("1", "4", "7"):
        shutil.copytree(work / "samples" / d, classes / d)
    assert run(exe, "enroll", classes, "--out", work / "g.npz", cwd=work).returncode == 0
    g = run(exe, "predict", classes, "--gallery", work / "g.npz", "--format", "json", cwd=work)
    assert g.returncode == 0, g.stderr
    doc = json.loads(g.stdout)
    assert doc["metric"] == "cosine" and doc["summary"]["accuracy"] == 1.0


def test_webcam_on_a_video_file(device):
    exe, work = device
    frames, labels = render_clip([3, 7], 6)
    write_video(work / "clip.avi", frames, fourcc="MJPG")
    r = run(exe, "webcam", "--source", "clip.avi", "--no-window", "--format", "json", "--smooth", "1", cwd=work)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert lines[-1]["summary"]["frames"] == len(frames)
    assert [d["label"] for d in lines[:-1]] == labels


def test_training_commands_name_the_extra_in_one_line(device):
    exe, work = device
    for command in (["train"], ["export", "model.pt"], ["summary"], ["inspect", "model.pt"]):
        r = run(exe, *command, cwd=work)
        assert_one_line_error(r, 2, f"`cnnedge {command[0]}` needs torch", 'pip install "cnnedge[train]"')
    assert run(exe, "--help", cwd=work).returncode == 0


@pytest.mark.parametrize("platform", ["aarch64-unknown-linux-gnu", "aarch64-apple-darwin"])
def test_the_base_install_resolves_without_torch_on_arm(platform, tmp_path):
    # Raspberry Pi OS 64-bit and Jetson; Apple silicon on macOS 14 (onnxruntime's oldest arm64 wheel tag).
    r = uv("pip", "compile", str(ROOT / "pyproject.toml"), "--python-platform", platform, "--python-version", "3.11",
           "--no-header", "--no-annotate", "-o", str(tmp_path / "req.txt"), timeout=300,
           env={"MACOSX_DEPLOYMENT_TARGET": "14.0"})
    pins = {line.split("==")[0] for line in (tmp_path / "req.txt").read_text().splitlines() if "==" in line}
    assert {"onnxruntime", "opencv-python", "numpy", "typer", "rich"} <= pins, r.stderr
    assert not pins & {"torch", "torchvision", "onnxruntime-gpu", "onnx", "matplotlib"}
