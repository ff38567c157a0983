"""Untrusted files: a .pt that would run a command when unpickled, files that are no checkpoint, files too
large, ONNX models whose external weights lie outside their folder. Each is refused in one line with exit
code 2, and nothing in it runs or is read."""

from __future__ import annotations

import json
import os
import shlex
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx.external_data_helper import set_external_data

from cnnedge.train import checkpoint as ckpt
from cnnedge.errors import CnnedgeError
from cnnedge.infer.backend import MAX_MODEL_BYTES
from conftest import MODEL, ROOT, assert_one_line_error, cli, run_cli

SHIPPED_PT = ROOT / "models" / "cnn.pt"

SAMPLE = ROOT / "samples" / "0" / "00_mnist_like.png"


class RunsACommand:
    """Unpickling this runs `touch marker` (pickle calls os.system with the command)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    """A real cnnedge checkpoint with a payload: everything else about it is right."""
    torch.save({**ckpt.load_checkpoint(SHIPPED_PT), "payload": RunsACommand(marker)}, path)
    return path


@pytest.fixture(scope="module")
def malicious(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("malicious")
    return malicious_checkpoint(folder / "cnn.pt", folder / "PWNED"), folder / "PWNED"


def checkpoint_command(command: str, path, tmp_path) -> tuple:
    """The CLI arguments of each command that reads a checkpoint, on `path`."""
    return {
        "train --resume": ("train", "--out", path, "--resume"),
        "train --from": ("train", "--from", path, "--out", tmp_path / "fine-tuned.pt"),
        "export": ("export", path, "--out", tmp_path / "cnn.onnx"),
        "inspect": ("inspect", path, "--out", tmp_path / "inspect"),
    }[command]


@pytest.mark.parametrize("command", ["train --resume", "train --from", "export", "inspect"])
def test_a_pickle_that_runs_a_command_is_refused_and_never_runs(malicious, tmp_path, command):
    path, marker = malicious
    result = cli(*checkpoint_command(command, path, tmp_path))
    assert_one_line_error(result, 2, str(path), "refused to unpickle posix.system", "possibly malicious")
    assert not marker.exists()
    assert list(tmp_path.iterdir()) == []  # and nothing was written


def test_the_malicious_checkpoint_really_is_one(tmp_path):
    """The payload above is live: an unsafe torch.load runs it. (So the refusals above mean something.)"""
    path, marker = malicious_checkpoint(tmp_path / "cnn.pt", tmp_path / "PWNED"), tmp_path / "PWNED"
    with pytest.raises(CnnedgeError, match="refused to unpickle posix.system"):
        ckpt.load_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)
    assert marker.exists()


def not_checkpoints(folder: Path) -> dict[str, Path]:
    files = {
        "random bytes": np.random.default_rng(0).bytes(4096),
        "a text file": "arch: edgenet\nstate_dict: trust me\n",
        "an empty file": b"",
        "half of a real checkpoint": SHIPPED_PT.read_bytes()[: SHIPPED_PT.stat().st_size // 2],
    }
    paths = {}
    for what, data in files.items():
        paths[what] = folder / f"{what.replace(' ', '_')}.pt"
        paths[what].write_bytes(data) if isinstance(data, bytes) else paths[what].write_text(data)
    for what, obj in {"a plain tensor": torch.zeros(3), "a bare state_dict": ckpt.load_checkpoint(SHIPPED_PT)["state_dict"],
                      "a dict without our keys": {"format": "cnnedge.checkpoint", "epoch": 3}}.items():
        paths[what] = folder / f"{what.replace(' ', '_')}.pt"
        torch.save(obj, paths[what])
    with zipfile.ZipFile(folder / "zip.pt", "w") as z:
        z.writestr("archive/data.pkl", b"not a pickle")
    paths["a zip that is no torch file"] = folder / "zip.pt"
    return paths


def test_files_that_are_no_checkpoint_are_refused_in_one_line(tmp_path):
    for what, path in not_checkpoints(tmp_path).items():
        with pytest.raises(CnnedgeError) as e:
            ckpt.load_checkpoint(path)
        message = str(e.value)
        assert message.startswith(f"{path}: ") and "\n" not in message and len(message) < 400, (what, message)
        assert "not a cnnedge checkpoint" in message or "incomplete cnnedge checkpoint" in message, (what, message)
        assert e.value.code == 2


@pytest.mark.parametrize("what, command", [("random bytes", "export"), ("a text file", "inspect"),
                                           ("a plain tensor", "train --from"), ("a dict without our keys", "train --resume")])
def test_files_that_are_no_checkpoint_through_the_cli(tmp_path, what, command):
    path = not_checkpoints(tmp_path)[what]
    assert_one_line_error(cli(*checkpoint_command(command, path, tmp_path)), 2, str(path), "cnnedge checkpoint")
    assert not (tmp_path / "fine-tuned.pt").exists() and not (tmp_path / "cnn.onnx").exists()
    assert not (tmp_path / "inspect").exists()


# ----------------------------------------------------------------------------------------------- sizes


def test_an_oversized_checkpoint_is_refused_before_reading(tmp_path):
    huge = tmp_path / "huge.pt"
    with open(huge, "wb") as f:
        f.truncate(ckpt.MAX_CHECKPOINT_BYTES + 1)  # sparse: no real 512 MiB written
    assert_one_line_error(cli("inspect", huge, "--out", tmp_path / "inspect"), 2, str(huge),
                          f"over the {ckpt.MAX_CHECKPOINT_BYTES:,}-byte checkpoint limit")


def test_a_checkpoint_that_unpacks_beyond_the_limit_is_refused(tmp_path, monkeypatch):
    """A .pt is a zip, and torch reads deflated records too: a small file can unpack to gigabytes.
    Shown at a 1 MiB limit with 4 MiB of zeros that deflate to a few KiB."""
    plain = tmp_path / "plain.pt"
    torch.save({**ckpt.load_checkpoint(SHIPPED_PT), "padding": torch.zeros(2**20)}, plain)
    deflated = tmp_path / "deflated.pt"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    assert deflated.stat().st_size < 2**20 < 4 * 2**20 < sum(i.file_size for i in zipfile.ZipFile(deflated).infolist())
    assert ckpt.load_checkpoint(deflated)["padding"].numel() == 2**20  # torch does unpack it all

    monkeypatch.setattr(ckpt, "MAX_CHECKPOINT_BYTES", 2**20)
    with pytest.raises(CnnedgeError, match=r"refused: it unpacks to [\d,]+ bytes, over the 1,048,576-byte"):
        ckpt.load_checkpoint(deflated)


def test_an_oversized_model_is_refused_before_loading(tmp_path):
    huge = tmp_path / "huge.onnx"
    with open(huge, "wb") as f:
        f.truncate(MAX_MODEL_BYTES + 1)  # sparse
    assert_one_line_error(run_cli("predict", SAMPLE, "--model", huge), 2, str(huge),
                          f"over the {MAX_MODEL_BYTES:,}-byte model limit")


# ------------------------------------------------------------------------------- ONNX external data


def with_external_weights(model_dir: Path, location: str) -> tuple[Path, bytes]:
    """The shipped model with its largest weight tensor moved to an external file at `location`."""
    model = onnx.load(str(MODEL))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    raw = tensor.raw_data
    set_external_data(tensor, location=location, offset=0, length=len(raw))
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / "cnn.onnx"
    path.write_bytes(model.SerializeToString())
    return path, raw


def predict_json(model: Path) -> dict:
    result = run_cli("predict", SAMPLE, "--model", model, "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["results"][0]


def test_external_weights_inside_the_model_folder_are_used(tmp_path):
    """The control: external data as such is fine, and really read, when it stays in the model's folder."""
    path, raw = with_external_weights(tmp_path / "model", "weights/cnn.bin")
    (tmp_path / "model" / "weights").mkdir()
    (tmp_path / "model" / "weights" / "cnn.bin").write_bytes(raw)
    assert predict_json(path)["topk"] == predict_json(MODEL)["topk"]


@pytest.mark.parametrize("how", ["../ in the location", "an absolute location", "a symlink leading out"])
def test_external_weights_outside_the_model_folder_are_refused_and_never_read(tmp_path, how):
    outside = tmp_path / "secret.bin"
    os.mkfifo(outside)  # opening this for reading would block until the test times out: proof it is never read
    location = {"../ in the location": "../secret.bin", "an absolute location": str(outside),
                "a symlink leading out": "weights.bin"}[how]
    path, _ = with_external_weights(tmp_path / "model", location)
    if how == "a symlink leading out":
        (tmp_path / "model" / "weights.bin").symlink_to(outside)
    result = run_cli("predict", SAMPLE, "--model", path, timeout=120)
    assert_one_line_error(result, 2, str(path), "refused: its weights point at a file outside the model's folder")
