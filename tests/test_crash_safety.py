"""Crash safety: SIGKILL never leaves a half-written file, and `--resume` picks up the last completed epoch;
SIGTERM abandons the epoch in progress, keeps the last checkpoint and says so.

Each kill lands at a moment the child itself announces (a line it prints where it stops, or a line it
prints anyway), never after a sleep: a busy machine moves the moment, not the outcome. The long loops of
kills are `slow` tests."""

from __future__ import annotations

import hashlib
import json
import os
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
from conftest import ROOT, assert_one_line_error, cli

EPOCHS = 60
# The Greek letters (54 real photos): epochs of a fraction of a second, so a run is mostly checkpoint writes
# and the kills land everywhere: in training, mid-write, in the final report.
TRAIN = ("--epochs", str(EPOCHS), "--batch-size", "4", "--no-plots", "--seed", "3")
ENV = {"COLUMNS": "200", "OMP_NUM_THREADS": "1"}  # one thread: small batches, and the cores are shared


def start(*args: str) -> subprocess.Popen:
    """`python -m cnnedge ARGS` in the background, stdout line by line."""
    return subprocess.Popen([sys.executable, "-m", "cnnedge", *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **ENV})


# `python -m cnnedge ARGS` that stops, and says so, just before it publishes NAME for the COUNT-th time: its
# temp file is complete and synced, the rename not yet done (every checkpoint and export goes through publish).
STOPPING = """
import os, sys, time
from cnnedge import atomic
import cnnedge.train.export as export
from cnnedge.cli import main

name, count = sys.argv[1], int(sys.argv[2])
publish, seen = atomic.publish, []


def stopping(tmp, path, *args, **kwargs):
    if os.path.basename(path) == name:
        seen.append(path)
        if len(seen) == count:
            print(f"publishing {name}", flush=True)
            time.sleep(600)
    return publish(tmp, path, *args, **kwargs)


atomic.publish = export.publish = stopping
sys.argv = ["cnnedge", *sys.argv[3:]]
main()
"""


def start_stopping(name: str, count: int, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", STOPPING, name, str(count), *map(str, args)], cwd=ROOT, text=True,
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


# ------------------------------------------------------------------------------------------- atomic


WRITER = """
import os, sys, time
from cnnedge import atomic
target, size, moment = sys.argv[1], int(sys.argv[2]), sys.argv[3]
atomic.write_bytes(target, b"a" * size)  # the old version


def stop(*args):  # say where this writer is, then wait there for the SIGKILL
    print(moment, flush=True)
    time.sleep(600)


if moment == "half written":
    with atomic.atomic_write(target) as f:
        f.write(b"b" * (size // 2))
        f.flush()
        stop()
elif moment == "written, not renamed":
    os.replace = stop
    atomic.write_bytes(target, b"b" * size)
elif moment == "renamed, folder not synced":
    atomic._fsync_dir = stop
    atomic.write_bytes(target, b"b" * size)
"""


@pytest.mark.parametrize(("moment", "left", "temps"), [
    ("half written", b"a", 1), ("written, not renamed", b"a", 1), ("renamed, folder not synced", b"b", 0)])
def test_sigkill_mid_write_leaves_the_old_or_the_new_file_never_a_mix(tmp_path, moment, left, temps):
    target, size = tmp_path / "blob.bin", 4 << 20
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(size), moment], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == moment + "\n"
    kill(proc)
    assert target.read_bytes() == left * size  # whole, one version
    assert len(temp_files(tmp_path)) == temps  # a killed writer's temp file stays until the next writer

    # The next cnnedge process that writes into the folder removes what killed writers left behind.
    subprocess.run([sys.executable, "-c", "from cnnedge.atomic import write_text; import sys; write_text(sys.argv[1], 'x')",
                    str(tmp_path / "other.txt")], cwd=ROOT, check=True)
    assert temp_files(tmp_path) == []
    assert target.read_bytes() == left * size


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


def check_partial(partial: Path, history_before: list) -> dict:
    checkpoint = load_checkpoint(partial)  # never half-written, whatever the moment of the kill
    epoch, history = checkpoint["epoch"], checkpoint["history"]
    assert [h["epoch"] for h in history] == list(range(1, epoch + 1))
    assert history[:len(history_before)] == history_before  # continued, not restarted
    assert not checkpoint["complete"] and "optimizer_state" in checkpoint
    return checkpoint


def check_finished(out: Path, epochs: int, history_before: list) -> None:
    final = load_checkpoint(out)
    assert final["complete"] and final["epoch"] == epochs
    assert [h["epoch"] for h in final["history"]] == list(range(1, epochs + 1))
    assert final["history"][:len(history_before)] == history_before
    metrics = json.loads(out.with_name("cnn.metrics.json").read_text())
    assert metrics["history"] == final["history"] and metrics["report_split"] == "test"
    assert temp_files(out.parent) == []  # what the killed runs left behind was cleaned by the last one
    assert not out.with_name("cnn.partial.pt").exists()  # the finished model replaced the run's own epoch file


def test_sigkill_mid_checkpoint_then_resume_continues_from_the_last_completed_epoch(tmp_path, greek_dir):
    out, partial, epochs = tmp_path / "cnn.pt", tmp_path / "cnn.partial.pt", 6
    train = ("train", "--dataset", f"imagefolder:{greek_dir}", *TRAIN, "--epochs", str(epochs), "--out", out)
    # Killed while writing epoch 2's checkpoint: the file still holds epoch 1, whole.
    proc = start_stopping("cnn.partial.pt", 2, *train)
    read_until(proc, "publishing ")
    kill(proc)
    assert len(temp_files(tmp_path)) == 1 and not out.exists()
    history = check_partial(partial, [])["history"]
    assert len(history) == 1

    # Resumed from epoch 1, then killed as it reports epoch 4 (just before, or while, saving it).
    proc = start("train", "--out", out, "--resume")
    lines = read_until(proc, "epoch 4/")
    assert f": 1 of {epochs} epochs done" in "".join(lines), lines
    kill(proc)
    checkpoint = check_partial(partial, history)
    assert checkpoint["epoch"] in (3, 4), checkpoint["epoch"]

    result = cli("train", "--out", out, "--resume")  # to the end (in this process: nothing more to prove)
    assert result.returncode == 0, result.stderr
    assert f": {checkpoint['epoch']} of {epochs} epochs done" in result.stdout
    check_finished(out, epochs, checkpoint["history"])


@pytest.mark.slow
def test_sigkill_loop_during_training_then_resume_continues_from_the_last_completed_epoch(tmp_path, greek_dir):
    """Four kills of one 60-epoch run at moments its output names: as it reports an epoch, and in the
    middle of writing a checkpoint, alternately; then resumed to the end."""
    out, partial = tmp_path / "cnn.pt", tmp_path / "cnn.partial.pt"
    train = ("train", "--dataset", f"imagefolder:{greek_dir}", *TRAIN, "--out", out)
    done_before, history_before = 0, []
    for attempt in range(4):
        resume = ("train", "--out", out, "--resume")
        if attempt % 2:  # the (done_before + 3)-th write of the checkpoint since this run started
            proc = start_stopping("cnn.partial.pt", 3, *(resume if partial.exists() else train))
            lines = read_until(proc, "publishing ")
        else:
            proc = start(*(resume if partial.exists() else train))
            lines = read_until(proc, f"epoch {done_before + 3}/")
        assert lines, proc.communicate()[1]
        if done_before:
            assert f": {done_before} of {EPOCHS} epochs done" in "".join(lines)  # resumed where the file says
        kill(proc)
        assert not out.exists()  # --out only ever holds the finished model
        checkpoint = check_partial(partial, history_before)
        assert checkpoint["epoch"] >= done_before + 2
        done_before, history_before = checkpoint["epoch"], checkpoint["history"]

    proc = start("train", "--out", out, "--resume")
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert f": {done_before} of {EPOCHS} epochs done" in stdout
    check_finished(out, EPOCHS, history_before)


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


EXPORT_FILES = ("cnn.onnx", "cnn.fp16.onnx", "cnn.json")  # the order export publishes them in, report last


def export_args(tmp_path: Path, out: Path) -> tuple:
    # An empty --data-dir: parity on generated inputs, which keeps the run short.
    return ("export", ROOT / "models" / "cnn.pt", "--out", out, "--quantize", "fp16", "--force", "--data-dir", tmp_path)


def test_sigkill_during_export_leaves_each_file_complete_or_absent(tmp_path):
    out = tmp_path / "out" / "cnn.onnx"
    args = export_args(tmp_path, out)
    # Killed as it publishes its first model: every file is staged, none published.
    proc = start_stopping("cnn.onnx", 1, *args)
    read_until(proc, "publishing ")
    kill(proc)
    assert check_export(out) == set() and len(temp_files(out.parent)) == 3

    assert cli(*args).returncode == 0  # then a whole export (in this process: nothing more to prove)
    assert check_export(out) == set(EXPORT_FILES) and temp_files(out.parent) == []  # it cleaned up the kill's


@pytest.mark.slow
@pytest.mark.parametrize("stop", EXPORT_FILES)
def test_sigkill_before_each_rename_of_a_rerun_leaves_a_set_its_readers_accept_or_refuse(tmp_path, stop):
    """Killed between two renames of a rerun: new models beside the old report, which their readers refuse."""
    out = tmp_path / "out" / "cnn.onnx"
    args = export_args(tmp_path, out)
    assert cli(*args).returncode == 0
    proc = start_stopping(stop, 1, *args)
    read_until(proc, "publishing ")
    kill(proc)
    assert check_export(out) == set(EXPORT_FILES)
    proc = start(*args)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert check_export(out) == set(EXPORT_FILES) and temp_files(out.parent) == []
