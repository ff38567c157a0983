"""Crash safety: SIGKILL at random moments never leaves a half-written file, and `--resume` picks up the
last completed epoch; SIGTERM abandons the epoch in progress, keeps the last checkpoint and says so."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from cnnedge.errors import CnnedgeError
from cnnedge.train.checkpoint import load_checkpoint
from cnnedge.infer.modelinfo import ModelInfo
from cnnedge.infer.runtime import Runtime
from conftest import ROOT, assert_one_line_error

EPOCHS = 60
# The Greek letters (54 real photos): epochs of a fraction of a second, so a run is mostly checkpoint writes
# and the kills land everywhere: in training, mid-write, in the final report.
TRAIN = ("--epochs", str(EPOCHS), "--batch-size", "4", "--no-plots", "--seed", "3")
ENV = {"COLUMNS": "200", "OMP_NUM_THREADS": "1"}  # one thread: small batches, and the cores are shared


def start(*args: str) -> subprocess.Popen:
    """`python -m cnnedge ARGS` in the background, stdout line by line."""
    return subprocess.Popen([sys.executable, "-m", "cnnedge", *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **ENV})


def read_until(proc: subprocess.Popen, prefix: str) -> list[str]:
    """stdout lines up to and including the first that starts with `prefix` (all of them if it never comes)."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(prefix):
            break
    return lines


def kill(proc: subprocess.Popen) -> str:
    proc.kill()  # SIGKILL: no handler, no cleanup, no flush
    out, _ = proc.communicate(timeout=60)
    return out


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and ".tmp" in p.name)


def wait_for_a_write(proc: subprocess.Popen, folder: Path, timeout: float = 10) -> None:
    """Return as soon as `proc` has a temp file open in `folder` (its name carries the writer's pid)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if any(f".{proc.pid}." in name for name in temp_files(folder)):
            return
        time.sleep(0.0002)


# ------------------------------------------------------------------------------------------- atomic


WRITER = """
import sys
from cnnedge.atomic import write_bytes
target, size = sys.argv[1], int(sys.argv[2])
write_bytes(target, b"a" * size)
print("ready", flush=True)
i = 0
while True:
    i += 1
    write_bytes(target, (b"a" if i % 2 == 0 else b"b") * size)
"""


def test_sigkill_mid_write_leaves_the_old_or_the_new_file_never_a_mix(tmp_path):
    target, size = tmp_path / "blob.bin", 4 << 20
    rng = random.Random(0)
    left_behind = 0
    for _ in range(15):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(size)], cwd=ROOT,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0, 0.05))
        kill(proc)
        data = target.read_bytes()
        assert data in (b"a" * size, b"b" * size)  # whole, one version, whatever the moment of the kill
        left_behind += len(temp_files(tmp_path))
    assert left_behind > 0  # the kills did land in the middle of writes (the writer does nothing else)

    # The next cnnedge process that writes into the folder removes what killed writers left behind.
    subprocess.run([sys.executable, "-c", "from cnnedge.atomic import write_text; import sys; write_text(sys.argv[1], 'x')",
                    str(tmp_path / "other.txt")], cwd=ROOT, check=True)
    assert temp_files(tmp_path) == []
    assert target.read_bytes() in (b"a" * size, b"b" * size)


def test_sweep_removes_only_temp_files_of_writers_that_are_gone(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)
    names = {
        f".cnn.pt.cnnedge.{dead}.k2j4x_9a.tmp": False,  # its writer was killed: removed
        f".clip.mp4.cnnedge.{dead}.abcdefgh.tmp.mp4": False,  # a video temp (the writer needs the extension)
        f".cnn.pt.cnnedge.{os.getpid()}.abcdefgh.tmp": True,  # a writer that is still running (this test)
        ".notes.txt": True, "cnn.pt.tmp": True, f".cnn.pt.{dead}.tmp": True,  # not our pattern: never touched
        # Files of the user's that merely look like temp files are never touched either (issue 14):
        ".thesis.2024.draft.tmp": True, f".cnn.pt.{dead}.k2j4x_9a.tmp": True,  # no cnnedge marker
        f".clip.mp4.cnnedge.{dead}.abcdefgh.tmp.txt": True,  # not the target's own suffix
        f".cnn.pt.cnnedge.{dead}.abcdefghij.tmp": True,  # not mkstemp's 8 characters
        f"cnn.pt.cnnedge.{dead}.abcdefgh.tmp": True,  # not hidden
    }
    for name in names:
        (tmp_path / name).write_text("x")
    os.mkdir(tmp_path / f".dir.cnnedge.{dead}.abcdefgh.tmp")  # a folder: never removed
    names[f".dir.cnnedge.{dead}.abcdefgh.tmp"] = True
    subprocess.run([sys.executable, "-c", "from cnnedge.atomic import write_text; import sys; write_text(sys.argv[1], 'x')",
                    str(tmp_path / "cnn.json")], cwd=ROOT, check=True)
    for name, kept in names.items():
        assert (tmp_path / name).exists() == kept, name


def test_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    from cnnedge.atomic import atomic_path, write_text

    target = tmp_path / "report.json"
    write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target, suffix=".json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "old" and temp_files(tmp_path) == []


# ------------------------------------------------------------------------------------------- train


def test_sigkill_during_training_then_resume_continues_from_the_last_completed_epoch(tmp_path, greek_dir):
    out, partial = tmp_path / "cnn.pt", tmp_path / "cnn.partial.pt"  # the epochs go to partial until the end
    train = ("train", "--dataset", f"imagefolder:{greek_dir}", *TRAIN, "--out", out)
    rng = random.Random(1)
    done_before, history_before = 0, []
    for attempt in range(4):
        proc = start("train", "--out", out, "--resume") if partial.exists() else start(*train)
        lines = read_until(proc, "training ")
        assert lines and lines[-1].startswith("training "), (lines, proc.communicate()[1])
        if done_before:
            assert f": {done_before} of {EPOCHS} epochs done" in "".join(lines)  # resumed where the file says
        time.sleep(rng.uniform(0, 2))
        if attempt % 2:
            wait_for_a_write(proc, tmp_path)  # and kill it in the middle of writing a checkpoint
        kill(proc)
        if out.exists():  # the run reached its end before the kill: --out only ever holds the finished model
            assert load_checkpoint(out)["complete"] and load_checkpoint(out)["epoch"] == EPOCHS
            break
        if not partial.exists():
            continue
        checkpoint = load_checkpoint(partial)  # never half-written, whatever the moment of the kill
        epoch, history = checkpoint["epoch"], checkpoint["history"]
        assert [h["epoch"] for h in history] == list(range(1, epoch + 1))
        assert epoch >= done_before
        assert history[:len(history_before)] == history_before  # continued, not restarted
        assert not checkpoint["complete"] and "optimizer_state" in checkpoint
        done_before, history_before = epoch, history

    # Finish: resume (or start, if no kill ever left an epoch) and run to the end. A run killed after it wrote
    # --out but before it removed its partial file is resumed too, and ends with the same --out.
    if partial.exists() or not out.exists():
        proc = start("train", "--out", out, "--resume") if partial.exists() else start(*train)
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr
        if done_before:
            assert f": {done_before} of {EPOCHS} epochs done" in stdout
    final = load_checkpoint(out)
    assert final["complete"] and final["epoch"] == EPOCHS
    assert [h["epoch"] for h in final["history"]] == list(range(1, EPOCHS + 1))
    assert final["history"][:len(history_before)] == history_before
    metrics = json.loads(out.with_name("cnn.metrics.json").read_text())
    assert metrics["history"] == final["history"] and metrics["report_split"] == "test"
    assert temp_files(tmp_path) == []  # what the killed runs left behind was cleaned by the last one
    assert not partial.exists()  # the finished model replaced the run's own epoch file


def test_sigterm_abandons_the_epoch_in_progress_and_keeps_the_last_checkpoint(tmp_path, greek_dir):
    out, partial = tmp_path / "cnn.pt", tmp_path / "cnn.partial.pt"
    proc = start("train", "--dataset", f"imagefolder:{greek_dir}", *TRAIN, "--out", out)
    read_until(proc, "training ")
    while not partial.exists() and proc.poll() is None:  # the first epoch's checkpoint
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert_one_line_error(result, 143, "interrupted during epoch", "--resume")
    m = re.search(r"interrupted during epoch (\d+): (.+) keeps epoch (\d+); continue with `cnnedge train --out (.+) --resume`", stderr)
    assert m and m[2] == str(partial) and m[4] == str(out) and int(m[1]) == int(m[3]) + 1, stderr
    assert not out.exists()
    saved = load_checkpoint(partial)  # the epoch the message names, complete on disk
    assert saved["epoch"] == int(m[3]) >= 1 and not saved["complete"] and len(saved["history"]) == saved["epoch"]
    assert temp_files(tmp_path) == []  # the abandoned epoch left nothing, not even a temp file


def test_a_signal_during_a_checkpoint_write_waits_for_the_write():
    from cnnedge.train.trainer import Interrupted, interruptible

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    steps = []
    with pytest.raises(Interrupted) as e:
        with interruptible() as hold:
            with hold():  # as train wraps save_checkpoint
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)
                steps.append("checkpoint written")
            steps.append("next epoch")
    assert steps == ["checkpoint written"] and e.value.signum == signal.SIGTERM
    with pytest.raises(Interrupted) as e:  # anywhere else, at once
        with interruptible():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
            steps.append("never")
    assert steps == ["checkpoint written"] and e.value.signum == signal.SIGINT
    assert {s: signal.getsignal(s) for s in before} == before  # the usual handlers are back


# ------------------------------------------------------------------------------------------ export


def check_export(out: Path) -> set[str]:
    """Each of the export's files is absent or complete and valid; the report, written last, implies the models,
    and a model it does not vouch for (a kill between two renames of a rerun) is refused by its readers."""
    present = set()
    for name in ("cnn.onnx", "cnn.fp16.onnx"):
        path = out.with_name(name)
        if path.exists():
            onnx.checker.check_model(str(path))  # raises on a truncated or corrupt file
            props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
            ModelInfo.from_props(props, source=str(path))
            present.add(name)
    report = out.with_name("cnn.json")
    if report.exists():
        files = json.loads(report.read_text())["files"]
        assert set(files) == {"fp32", "fp16"}
        assert present == {"cnn.onnx", "cnn.fp16.onnx"}
        present.add("cnn.json")
        for entry in files.values():
            path = Path(entry["path"])
            if hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:  # a new model, the old report
                with pytest.raises(CnnedgeError, match="a partial or mixed export") as e:
                    Runtime(path, "cpu")
                assert e.value.code == 3
    return present


def test_sigkill_during_export_leaves_each_file_complete_or_absent(tmp_path):
    out = tmp_path / "out" / "cnn.onnx"
    # An empty --data-dir: parity on generated inputs, which keeps the run short.
    args = ("export", ROOT / "models" / "cnn.pt", "--out", out, "--quantize", "fp16", "--force",
            "--data-dir", tmp_path)
    out.parent.mkdir()
    proc = start(*args)
    wait_for_a_write(proc, out.parent, timeout=300)
    kill(proc)  # in the middle of writing the first model: no file at all, or only whole ones
    check_export(out)
    rng = random.Random(0)
    for _ in range(3):  # then at random moments of a rerun (imports, checks, parity, writes)
        proc = start(*args)
        time.sleep(rng.uniform(1.0, 12.0))
        kill(proc)
        check_export(out)

    proc = start(*args)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert check_export(out) == {"cnn.onnx", "cnn.fp16.onnx", "cnn.json"}
    assert temp_files(out.parent) == []
