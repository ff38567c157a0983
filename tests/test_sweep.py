"""`cnnedge sweep` on the real MNIST files: every result file agrees with the trials' own metrics, the best
trial's command reproduces it, reruns skip and resume, Ctrl-C and SIGKILL keep what finished, and two
processes share one Optuna study in SQLite."""

from __future__ import annotations

import csv
import json
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import pytest
from typer.testing import CliRunner

from cnnedge.cli import app, main
from cnnedge.train.sweep import Range, TrainOption, parse_seeds, parse_values
from conftest import assert_one_line_error, run_cli, start_paused_at_epoch

GRID = ("--epochs", "1,2", "--batch-size", "64", "--batch-size", "256", "--limit", "4000")


def invoke(*args) -> str:
    result = CliRunner().invoke(app, ["sweep", *map(str, args)])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def table_rows(output: str) -> list[list[str]]:
    """The cells of the rich table rows in `output`."""
    return [[c.strip() for c in line.split("│")[1:-1]] for line in output.splitlines() if line.startswith("│")]


def metrics_of(row: dict, out: Path) -> dict:
    return json.loads((out / "trials" / row["trial"] / "cnn.metrics.json").read_text())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Trials take the cores other processes leave free at each epoch; a result reproduces with the same
    thread count, so these runs use one (OMP_NUM_THREADS), whatever else the machine is doing."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def grid_sweep(one_thread, tmp_path_factory, data_root):
    """The issue's goal: 2 epochs values x 2 batch sizes with --limit 4000."""
    out = tmp_path_factory.mktemp("sweep") / "s"
    output = invoke(*GRID, "--out", out)
    return out, output


def test_results_agree_with_the_trials_metrics_files(grid_sweep):
    out, output = grid_sweep
    doc = json.loads((out / "sweep.json").read_text())
    rows = doc["trials"]
    assert doc["swept"] == ["epochs", "batch_size"] and doc["fixed"] == {"limit": 4000}
    assert sorted((r["epochs"], r["batch_size"]) for r in rows) == [(1, 64), (1, 256), (2, 64), (2, 256)]
    for row in rows:
        metrics = metrics_of(row, out)
        history = metrics["history"]
        assert row["status"] == "done" and row["report_split"] == "test"
        assert row["test_accuracy"] == metrics["test_accuracy"] and row["test_loss"] == metrics["test_loss"]
        assert row["val_accuracy"] == history[-1]["val_accuracy"] and row["val_loss"] == history[-1]["val_loss"]
        assert row["best_val_accuracy"] == max(h["val_accuracy"] for h in history)
        assert row["epochs_run"] == len(history) == row["epochs"]
        assert row["train_seconds"] == metrics["train_seconds"] and row["wall_seconds"] >= row["train_seconds"]
        assert row["parameters"] == metrics["parameters"] == 98_554  # edgenet
        assert row["command"] == metrics["command"]
        assert f"--epochs {row['epochs']} --batch-size {row['batch_size']} --limit 4000 --seed 0" in row["command"]
        assert Path(row["checkpoint"]).is_file()
        # The printed table carries the same figures: # | epochs | batch-size | status | epoch | val | test | loss | s
        cells = next(c for c in table_rows(output) if c[1:3] == [str(row["epochs"]), str(row["batch_size"])])
        assert cells[3:8] == ["done", f"{row['epochs']}/{row['epochs']}", f"{100 * history[-1]['val_accuracy']:.2f}%",
                              f"{100 * metrics['test_accuracy']:.2f}%", f"{metrics['test_loss']:.4f}"]

    with open(out / "sweep.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["trial"] for r in table] == [r["trial"] for r in rows]
    for got, row in zip(table, rows):
        assert float(got["test_accuracy"]) == row["test_accuracy"] and float(got["test_loss"]) == row["test_loss"]
        assert int(got["epochs"]) == row["epochs"] and int(got["batch_size"]) == row["batch_size"]
        assert got["command"] == row["command"] and int(got["parameters"]) == row["parameters"]

    # The plots draw exactly these numbers (sweep.json records what each PNG shows).
    by_point = {(r["epochs"], r["batch_size"]): metrics_of(r, out) for r in rows}
    lines = doc["plots"]["test_vs_epochs.png"]["lines"]
    assert [line["label"] for line in lines] == ["batch-size=64", "batch-size=256"]
    for line, bs in zip(lines, (64, 256)):
        assert line["x"] == [1, 2]
        assert line["accuracy"] == [by_point[(e, bs)]["test_accuracy"] for e in (1, 2)]
        assert line["loss"] == [by_point[(e, bs)]["test_loss"] for e in (1, 2)]
    heatmap = doc["plots"]["heatmap_epochs_batch_size.png"]
    assert heatmap["y_values"] == [1, 2] and heatmap["x_values"] == [64, 256]
    assert heatmap["accuracy"] == [[by_point[(e, b)]["test_accuracy"] for b in (64, 256)] for e in (1, 2)]
    for name in ("test_vs_epochs.png", "test_vs_batch_size.png", "heatmap_epochs_batch_size.png"):
        image = cv2.imread(str(out / name))
        assert image is not None and image.shape[0] >= 200 and image.shape[1] >= 250, name

    best = max(rows, key=lambda r: r["val_accuracy"])
    assert doc["best"]["trial"] == best["trial"]
    assert f"reproduce: {best['command']}" in output
    assert doc["ran"] == 4 and doc["overhead_seconds_per_trial"] >= 0


def test_best_command_reproduces_the_trial(grid_sweep, tmp_path):
    out, _ = grid_sweep
    doc = json.loads((out / "sweep.json").read_text())
    argv = doc["best"]["command"].split()
    assert argv[:2] == ["cnnedge", "train"]
    again = tmp_path / "again.pt"
    argv[argv.index("--out") + 1] = str(again)
    result = CliRunner().invoke(app, argv[1:])
    assert result.exit_code == 0, result.output
    reproduced = json.loads(again.with_name("again.metrics.json").read_text())
    original = metrics_of(next(r for r in doc["trials"] if r["trial"] == doc["best"]["trial"]), out)
    assert reproduced["test_accuracy"] == original["test_accuracy"]
    assert [h["train_loss"] for h in reproduced["history"]] == [h["train_loss"] for h in original["history"]]


def test_rerun_skips_done_trials_then_keep_best_and_other_options_are_refused(grid_sweep):
    out, _ = grid_sweep
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("trials/*/cnn.metrics.json")}
    output = invoke(*GRID, "--out", out, "--keep", "best")
    assert "4 trials done; 0 ran here" in output
    assert {p: p.stat().st_mtime_ns for p in out.glob("trials/*/cnn.metrics.json")} == stamps  # nothing retrained
    doc = json.loads((out / "sweep.json").read_text())
    kept = sorted(p.parent.name for p in out.glob("trials/*/cnn.pt"))
    assert kept == [doc["best"]["trial"]]  # --keep best: one checkpoint, every metrics file
    assert len(stamps) == 4 and [r["checkpoint"] is not None for r in doc["trials"]].count(True) == 1

    result = run_cli("sweep", "--epochs", "1,2", "--batch-size", "64,256", "--limit", "3000", "--out", out)
    assert_one_line_error(result, 2, "was run with other options", "use another --out")


def test_on_epoch_hook_sees_every_epoch_and_can_stop_the_run(tmp_path, data_root):
    from cnnedge.train.checkpoint import load_checkpoint
    from cnnedge.train.trainer import TrainConfig, run

    seen = []

    def stop_after_two(h):
        seen.append(h)
        if h["epoch"] == 2:
            raise RuntimeError("stop")

    out = tmp_path / "hook.pt"
    with pytest.raises(RuntimeError, match="stop"):
        run(TrainConfig(out=str(out), limit=600, plots=False, hparams=dict(epochs=3)), "test", stop_after_two)
    assert [h["epoch"] for h in seen] == [1, 2] and all(h["val_accuracy"] is not None for h in seen)
    saved = load_checkpoint(tmp_path / "hook.partial.pt")  # a run in progress keeps its epochs there
    assert saved["epoch"] == 2 and not saved["complete"]  # the epoch was checkpointed before the hook ran
    assert not out.exists()


@pytest.mark.parametrize("how", ["ctrl-c", "sigkill"])
def test_interrupted_sweep_keeps_finished_trials_and_rerun_resumes(tmp_path, data_root, how):
    out = tmp_path / "s"
    # Paused at the 4th epoch of the sweep, the second trial's second: its first is checkpointed.
    proc, _ = start_paused_at_epoch(4, "sweep", "--epochs", "2", "--batch-size", "32,64", "--limit", "2000", "--out", out)
    second = out / "trials" / "batch-size-64_seed-0"
    assert (second / "cnn.partial.pt").is_file()
    proc.send_signal(signal.SIGINT if how == "ctrl-c" else signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    first = out / "trials" / "batch-size-32_seed-0" / "cnn.metrics.json"
    assert first.is_file() and not (second / "cnn.metrics.json").exists()
    rows = json.loads((out / "sweep.json").read_text())["trials"]  # complete JSON, written after trial one
    assert [r["trial"] for r in rows] == ["batch-size-32_seed-0"]
    if how == "ctrl-c":
        lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("warning: ")]
        assert proc.returncode == 130 and len(lines) == 1 and "Traceback" not in stderr, stderr
        assert "sweep interrupted" in lines[0] and "1 trial(s) finished" in lines[0] and "rerun" in lines[0]
    else:
        assert proc.returncode == -signal.SIGKILL
    before = first.read_text()

    output = invoke("--epochs", "2", "--batch-size", "32,64", "--limit", "2000", "--out", out)
    assert "2 trials done; 1 ran here" in output
    assert first.read_text() == before  # skipped, not retrained
    resumed = json.loads((second / "cnn.metrics.json").read_text())
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]  # epoch 1 from the checkpoint, then epoch 2
    assert not list(out.rglob(".*.tmp*"))  # no temp file left behind by the killed writer


@pytest.mark.slow
def test_two_processes_share_one_sqlite_study(tmp_path, data_root):
    optuna = pytest.importorskip("optuna")
    db = tmp_path / "study.db"
    search = ["--search", "tpe", "--trials", "6", "--storage", f"sqlite:///{db}", "--study", "shared",
              "--lr", "0.02..0.2:log", "--batch-size", "32,64", "--epochs", "2", "--limit", "1500"]
    # Two workers on one machine: a thread each (docs/sweep.md), else they fight over the cores. Each waits in
    # its first trial until both have one, so both take part however late a busy machine starts the second.
    go = tmp_path / "go"
    procs = {name: start_paused_at_epoch(1, "sweep", *search, "--out", tmp_path / name, env={"OMP_NUM_THREADS": "1"},
                                         go=go)[0]
             for name in ("a", "b")}
    go.touch()
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, (name, stdout, stderr)

    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{db}")
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == len(study.trials)  # nothing left running
    states = optuna.trial.TrialState
    assert 6 <= sum(t.state in (states.COMPLETE, states.PRUNED) for t in finished) <= 7  # each stops at 6; one may overshoot
    local = {name: {int(p.name.split("-")[1]) for p in (tmp_path / name / "trials").iterdir()} for name in procs}
    assert local["a"] and local["b"], local  # both processes trained
    assert not local["a"] & local["b"] and local["a"] | local["b"] == {t.number for t in study.trials}
    for t in study.trials:
        if t.state == states.COMPLETE:
            assert 0.02 <= t.params["lr"] <= 0.2 and t.params["batch_size"] in (32, 64)
            assert t.value == t.user_attrs["row"]["val_accuracy"]
    docs = [json.loads((tmp_path / name / "sweep.json").read_text()) for name in procs]
    assert max(len(d["trials"]) for d in docs) == len(study.trials)  # the last to finish lists every trial
    last = max(docs, key=lambda d: len(d["trials"]))
    best = next(r for r in last["trials"] if r["trial"] == last["best"]["trial"])
    assert best["objective"] == study.best_value


# ------------------------------------------------------------------------------ parsing (torch-free)


def test_values_lists_ranges_and_choices():
    epochs = TrainOption("epochs", "--epochs", int | None)
    assert parse_values(epochs, ["1,2", "4", "2"]) == [1, 2, 4]
    assert parse_values(epochs, ["500..2000:500"])[0].grid_values("--epochs") == [500, 1000, 1500, 2000]
    lr = TrainOption("lr", "--lr", float | None)
    assert parse_values(lr, ["1e-4..0.1:log"]) == [Range(1e-4, 0.1, None, True, False)]
    assert parse_values(lr, ["0.1..0.3:0.1"])[0].grid_values("--lr") == [0.1, 0.2, 0.3]
    augment = TrainOption("augment", "--augment/--no-augment", bool | None)
    assert parse_values(augment, ["true,off"]) == [True, False]
    assert augment.argv(True) == ["--augment"] and augment.argv(False) == ["--no-augment"]
    from typing import Literal

    optimizer = TrainOption("optimizer", "--optimizer", Literal["sgd", "adam"] | None)
    assert parse_values(optimizer, ["sgd,adam"]) == ["sgd", "adam"]
    assert parse_seeds("0..3") == [0, 1, 2, 3] and parse_seeds("5,1") == [5, 1]


def main_in_process(monkeypatch, capsys, *args) -> SimpleNamespace:
    """The console-script entry point without a new interpreter: its exit code and one-line messages."""
    monkeypatch.setattr(sys, "argv", ["cnnedge", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        main()
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=exit_.value.code, stdout=captured.out, stderr=captured.err)


def test_bad_sweeps_are_one_line_errors_before_any_training(tmp_path, monkeypatch, capsys):
    out = tmp_path / "s"
    # The real entry point, in a fresh interpreter: a usage error costs no torch import.
    result = run_cli("sweep", "--epochs", "1,x", "--out", out)
    assert_one_line_error(result, 2, "--epochs: 'x' is not an integer")
    cases = [
        (["--epochs", "1,x"], "--epochs: 'x' is not an integer"),
        (["--optimizer", "sgd,lion"], "'lion' is not one of: sgd, adam, adamw, rmsprop"),
        (["--lr", "0.01..0.1"], "a float range needs a step in a grid"),
        (["--lr", "1e-3..0.1:log"], "a :log range is sampled by --search tpe"),
        (["--epochs", "3..1"], "runs downwards"),
        (["--trials", "5"], "--trials is for --search tpe"),
        (["--search", "tpe", "--lr", "0.01,0.1"], "--search tpe needs --trials N"),
        (["--search", "tpe", "--trials", "3", "--epochs", "2"], "needs an option to search"),
        (["--search", "tpe", "--trials", "3", "--lr", "0.01,0.1", "--seeds", "0,1"], "one --seeds value"),
        (["--augment", "maybe"], "'maybe' is neither true nor false"),
        (["--epochs", "0,1"], "--epochs 0: must be a whole number of at least 1"),
    ]
    for args, message in cases:
        assert_one_line_error(main_in_process(monkeypatch, capsys, "sweep", *args, "--out", out), 2, message)
    assert not out.exists()  # refused before anything was written
