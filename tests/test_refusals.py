"""The training commands refuse bad arguments, missing inputs and existing outputs before PyTorch loads: each
refusal is its one line and exit code 2, and the whole series runs in one interpreter that never imports torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import ROOT


def test_refusals_of_train_export_summary_and_inspect_never_import_torch(tmp_path):
    (tmp_path / "exists.onnx").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    model = ROOT / "models" / "cnn.pt"
    x = ("--out", tmp_path / "x.pt")
    refusals = {  # argv -> what the one line names
        ("export", model, "--out", tmp_path / "exists.onnx"): "already exists; pass --force",
        ("export", tmp_path / "nope.pt"): "no such checkpoint file",
        ("export", model, "--calibration-images", "0", "--out", tmp_path / "y.onnx"): "--calibration-images",
        ("train", "--out", model): "already exists; pass --force",
        ("train", "--epochs", "0", *x): "--epochs",
        ("train", "--lr", "-1", *x): "--lr",
        ("train", "--arch", "nope", *x): "unknown architecture 'nope'",
        ("train", "--dataset", "cifar", *x): "unknown dataset 'cifar'",
        ("train", "--data-dir", tmp_path / "empty", *x): "mnist not found",
        ("train", "--resume", "--out", tmp_path / "nope.pt"): "--resume",
        ("train", "--from", tmp_path / "nope.pt", *x): "no such checkpoint file",
        ("train", "--freeze-backbone", *x): "--freeze-backbone needs --from",
        ("summary", "--arch", "nope"): "unknown architecture 'nope'",
        ("inspect", tmp_path / "nope.pt"): "no such checkpoint file",
        ("inspect", model, "--image", tmp_path / "missing.png"): "missing.png",
    }
    code = textwrap.dedent(f"""
        import contextlib, io, sys
        from cnnedge.cli import main
        for argv in {[list(map(str, argv)) for argv in refusals]!r}:
            sys.argv = ["cnnedge", *argv]
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                try:
                    main()
                except SystemExit as e:
                    code = e.code
            print(code, err.getvalue().strip().replace("\\n", " | "))
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "onnx", "onnxscript"))
        print("HEAVY", heavy)
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    *lines, heavy = r.stdout.splitlines()
    assert heavy == "HEAVY []", heavy
    assert len(lines) == len(refusals)
    for line, (argv, fragment) in zip(lines, refusals.items()):
        exit_code, message = line.split(" ", 1)
        assert exit_code == "2" and message.startswith("error: ") and " | " not in message, (argv, line)
        assert fragment in message, (argv, message)
