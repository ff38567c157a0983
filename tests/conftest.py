"""Shared fixtures. Real data comes from $CNNEDGE_DATA (../shared/data in CI); tests that need it
skip without it, except when CNNEDGE_REQUIRE_DATA=1 (CI), where missing data is a failure."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

import pytest

from cnnedge.infer.modelinfo import default_model

ROOT = Path(__file__).resolve().parents[1]
MODEL = default_model()  # the shipped model (export/cnn.onnx in the repo)
if os.environ.get("CNNEDGE_DATA"):
    # Subprocesses and tests that change directory must see the same folder.
    os.environ["CNNEDGE_DATA"] = str(Path(os.environ["CNNEDGE_DATA"]).resolve())


def _data_path(relative: str) -> Path:
    root = os.environ.get("CNNEDGE_DATA")
    path = Path(root) / relative if root else None
    if path is None or not path.exists():
        reason = f"real data {relative!r} not found (set CNNEDGE_DATA to ../shared/data)"
        if os.environ.get("CNNEDGE_REQUIRE_DATA") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The folder holding MNIST/raw in torchvision's layout."""
    _data_path("MNIST/raw/t10k-images-idx3-ubyte")
    return Path(os.environ["CNNEDGE_DATA"])


@pytest.fixture(scope="session")
def greek_dir() -> Path:
    return _data_path("greek")


@pytest.fixture(scope="session")
def handwritten_dir() -> Path:
    return _data_path("handwritten_digits")


class Export(NamedTuple):
    path: Path  # the fp32 model; cnn.fp16.onnx, cnn.int8.onnx and cnn.json beside it
    report: dict
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def fresh_export(tmp_path_factory, data_root) -> Export:
    """models/cnn.pt exported once per session with both variants by this tree's exporter, as a user would
    (`cnnedge export models/cnn.pt --quantize fp16 --quantize int8 --threads 1`, in this process). The shipped export/
    files are only re-exported at a release, so tests of what the exporter writes use this."""
    from cnnedge import cli

    out = tmp_path_factory.mktemp("fresh-export") / "cnn.onnx"
    stdout, stderr = io.StringIO(), io.StringIO()
    argv = ["cnnedge", "export", str(ROOT / "models" / "cnn.pt"), "--out", str(out), "--quantize", "fp16", "--quantize", "int8",
            "--threads", "1"]  # one thread: its parity figures are reproducible (test_export)
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        mp.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as exit_:
            cli.main()
    assert exit_.value.code in (0, None), stderr.getvalue()
    return Export(out, json.loads(out.with_suffix(".json").read_text()), stdout.getvalue(), stderr.getvalue())


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m cnnedge ARGS` as a user would, capturing text output."""
    return subprocess.run(
        [sys.executable, "-m", "cnnedge", *map(str, args)],
        cwd=cwd or ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout,
    )


def cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """`cnnedge ARGS` in this process, through the real entry point (cnnedge.cli.main), captured as a subprocess
    would see it (exit code, stdout, stderr) without paying an interpreter start and torch's import each time.
    Use `run_cli` where the process itself matters (signals, what gets imported, native output)."""
    from cnnedge.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_cwd, saved_env = sys.argv, os.getcwd(), dict(os.environ)
    torch = sys.modules.get("torch")  # train and export set torch's thread count; the next test gets it back
    saved_threads = torch.get_num_threads() if torch is not None else None
    sys.argv = ["cnnedge", *map(str, args)]
    os.environ.update({k: v for k, v in (env or {}).items()})
    os.chdir(cwd or ROOT)
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        if saved_threads is not None:
            torch.set_num_threads(saved_threads)
    return subprocess.CompletedProcess(["cnnedge", *map(str, args)], code, out.getvalue(), err.getvalue())


# A short real training run: enough for every claim about what `cnnedge train` writes and reproduces.
# One thread: the results depend on the thread count. The ≥98% claim of a full epoch is a slow test.
SMALL_TRAIN = ("--limit", "2000", "--epochs", "2", "--threads", "1", "--seed", "1")


@pytest.fixture(scope="session")
def small_model(tmp_path_factory, data_root) -> tuple[Path, subprocess.CompletedProcess]:
    """`cnnedge train SMALL_TRAIN` once per session, in this process, with its plots: (checkpoint, result)."""
    out = tmp_path_factory.mktemp("small-model") / "small.pt"
    result = cli("train", *SMALL_TRAIN, "--out", out)
    assert result.returncode == 0, result.stderr
    return out, result


# `python -m cnnedge ARGS` whose N-th epoch of training (counted across a sweep's trials) prints "epoch N
# started" and waits there (until the file GO exists, if one is named), so a signal the test sends on that
# line lands in that epoch however slowly a busy machine runs: never a sleep that might be too short or long.
_PAUSED = """
import os, sys, time
import cnnedge.train.trainer as trainer
from cnnedge.cli import main

pause_at, go, train_epoch, calls = int(sys.argv[1]), sys.argv[2], trainer.train_epoch, []

def announced(*args, **kwargs):
    calls.append(None)
    if len(calls) == pause_at:
        print(f"epoch {pause_at} started", flush=True)
        end = time.monotonic() + 600
        while time.monotonic() < end and not (go and os.path.exists(go)):
            time.sleep(0.01)
    return train_epoch(*args, **kwargs)

trainer.train_epoch = announced
sys.argv = ["cnnedge", *sys.argv[3:]]
main()
"""


def start_paused_at_epoch(epoch: int, *args: str, env: dict | None = None,
                          go: Path | None = None) -> tuple[subprocess.Popen, list[str]]:
    """Start `cnnedge ARGS` (see _PAUSED) and read its stdout up to "epoch N started": (process, lines read).
    It waits there for a signal, or until the file `go` exists."""
    proc = subprocess.Popen([sys.executable, "-c", _PAUSED, str(epoch), str(go or ""), *map(str, args)], cwd=ROOT,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f"epoch {epoch} started"):
            return proc, lines
    proc.wait()
    pytest.fail(f"cnnedge ended (exit {proc.returncode}) before epoch {epoch}: {proc.stderr.read()[-2000:]}")


def run_torch_free(*commands: list[str]) -> subprocess.CompletedProcess:
    """Run cnnedge commands in one fresh interpreter, as the CLI would, and fail unless every command
    succeeded without importing torch or torchvision (an edge device has neither)."""
    code = textwrap.dedent(f"""
        import sys
        from cnnedge.cli import main
        for argv in {[list(map(str, c)) for c in commands]!r}:
            sys.argv = ["cnnedge", *argv]
            try:
                main()
            except SystemExit as e:
                assert e.code in (0, None), e.code
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision"))
        print("HEAVY", heavy, file=sys.stderr)
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stderr, r.stderr
    return r


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    """A user error: the documented exit code, one line on stderr naming the problem, no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def small_disk(tmp_path):
    """Folders on a tmpfs of the given size, a full disk on demand: `small_disk(kib)` -> the mounted folder
    (`read_only=True`: a read-only file system). Mounting needs root (CI runs as root); elsewhere the test
    skips and says why."""
    mounted = []

    def mount(kib: int, read_only: bool = False) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        options = f"size={kib}k" + (",ro" if read_only else "")
        try:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                               capture_output=True, text=True)
        except FileNotFoundError:
            pytest.skip("no mount command here to make a small tmpfs (a full disk)")
        if r.returncode != 0:
            pytest.skip(f"cannot mount a {kib} KiB tmpfs to fill a disk here ({(r.stderr or r.stdout).strip()[:120]})")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
