"""Shared fixtures. Real data comes from $CNNEDGE_DATA (../shared/data in CI); tests that need it
skip without it, except when CNNEDGE_REQUIRE_DATA=1 (CI), where missing data is a failure."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

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


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m cnnedge ARGS` as a user would, capturing text output."""
    return subprocess.run(
        [sys.executable, "-m", "cnnedge", *map(str, args)],
        cwd=cwd or ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout,
    )


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
