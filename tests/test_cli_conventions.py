"""The conventions people expect of a command line: --version/-V, -h as --help, shell completion, one-line
summaries in `cnnedge --help`, and predict's --summary/--quiet for big folders. In-process (conftest.cli goes
through the real entry point, cnnedge.cli.main: exit codes and stderr as a user sees them)."""

from __future__ import annotations

import json
import re
import shutil
from importlib.metadata import version

import pytest
import typer

from conftest import ROOT, assert_one_line_error, cli
from cnnedge.cli import app

COMMANDS = typer.main.get_command(app).commands
SAMPLES = str(ROOT / "samples")
SUMMARY_LINE = re.compile(r"^22 images, 0 errors, [\d,]+ images/s \([\d.]+ s\), runtime onnxruntime, provider cpu, "
                          r"accuracy 100\.00% \(22/22 in class folders\)$")


def test_version_long_and_short():
    for flag in ("--version", "-V"):
        r = cli(flag)
        assert (r.returncode, r.stdout, r.stderr) == (0, f"cnnedge {version('cnnedge')}\n", "")


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_h_is_help(command):
    argv = [command] if command else []
    long, short = cli(*argv, "--help", env={"COLUMNS": "80"}), cli(*argv, "-h", env={"COLUMNS": "80"})
    assert long.returncode == short.returncode == 0
    assert long.stdout == short.stdout and long.stdout.startswith(f"Usage: cnnedge {command or ''}".rstrip())


def test_shell_completion_completes_commands_options_and_choices():
    script = cli("--show-completion", "bash", env={"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"})
    assert script.returncode == 0 and "_CNNEDGE_COMPLETE=complete_bash" in script.stdout
    for words, expected in [("cnnedge pre", ["predict"]), ("cnnedge predict --su", ["--summary"]),
                            ("cnnedge predict --format ", ["table", "json", "csv"])]:
        r = cli(env={"_CNNEDGE_COMPLETE": "complete_bash", "COMP_WORDS": words,
                     "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1))})
        assert r.returncode == 0 and r.stdout.split() == expected, (words, r.stdout, r.stderr)


def test_help_lists_each_command_on_one_full_line():
    """Each summary is the docstring's first line, whole (click would cut a long one to "..."), and fits
    the 80-column help beside the command's name."""
    r = cli("--help", env={"COLUMNS": "80"})
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    for name, command in COMMANDS.items():
        first_line = command.callback.__doc__.strip().splitlines()[0]
        assert command.short_help == first_line and first_line.endswith(".")
        assert any(re.fullmatch(rf"  {name} +{re.escape(first_line)}", line) for line in lines), (name, r.stdout)
    listing = r.stdout[r.stdout.index("Commands:"):]
    assert "..." not in listing and "…" not in listing


# ---------------------------------------------------------------------------------- predict --summary/-q


@pytest.fixture(scope="module")
def full():
    """`cnnedge predict samples/` as it was: a row per image, the accuracy tables, the summary line."""
    r = cli("predict", SAMPLES)
    assert r.returncode == 0 and "00_mnist_like.png" in r.stdout, r.stderr
    return r


def test_summary_drops_the_rows_and_keeps_the_accuracy_tables(full):
    r = cli("predict", SAMPLES, "--summary")
    assert r.returncode == 0 and r.stderr == ""
    assert not any(path.name in r.stdout for path in (ROOT / "samples").glob("*/*"))
    assert "per-class accuracy" in r.stdout and "confusion matrix" in r.stdout
    assert SUMMARY_LINE.match(r.stdout.splitlines()[-1]), r.stdout
    # The same tables as the full output's, without the per-image table above them.
    tables = r.stdout[:r.stdout.rindex("\n", 0, len(r.stdout) - 1)]
    assert tables in full.stdout and full.stdout.index(tables) > 0


def test_quiet_prints_the_summary_line_alone(full):
    for flag in ("--quiet", "-q"):
        r = cli("predict", SAMPLES, flag)
        assert r.returncode == 0 and r.stderr == ""
        assert len(r.stdout.splitlines()) == 1 and SUMMARY_LINE.match(r.stdout.strip()), r.stdout
    assert SUMMARY_LINE.match(full.stdout.splitlines()[-1])  # the line the full output ends with


def test_summary_json_has_no_results_and_the_same_summary():
    whole = json.loads(cli("predict", SAMPLES, "--format", "json").stdout)
    r = cli("predict", SAMPLES, "--format", "json", "--summary")
    assert r.returncode == 0
    doc = json.loads(r.stdout)
    assert "results" not in doc and len(whole["results"]) == 22
    assert {k: v for k, v in doc.items() if k != "summary"} == {k: v for k, v in whole.items() if k not in ("summary", "results")}
    drop = ("seconds", "images_per_second")
    assert {k: v for k, v in doc["summary"].items() if k not in drop} == {k: v for k, v in whole["summary"].items() if k not in drop}
    assert doc["summary"]["accuracy"] == 1.0 and doc["summary"]["images"] == 22


def test_quiet_leaves_json_and_csv_unchanged():
    for fmt in ("json", "csv"):
        plain, quiet = cli("predict", SAMPLES, "--format", fmt), cli("predict", SAMPLES, "--format", fmt, "-q")
        assert plain.returncode == quiet.returncode == 0 and quiet.stderr == ""
        if fmt == "csv":
            assert quiet.stdout == plain.stdout and len(quiet.stdout.splitlines()) == 23
        else:
            a, b = json.loads(plain.stdout), json.loads(quiet.stdout)
            assert [r["label"] for r in a["results"]] == [r["label"] for r in b["results"]]


def test_summary_with_csv_is_a_usage_error():
    r = cli("predict", SAMPLES, "--format", "csv", "--summary")
    assert_one_line_error(r, 2, "--summary", "csv")
    assert r.stdout == ""


def test_quiet_and_summary_still_report_each_bad_input_on_one_line(tmp_path):
    shutil.copytree(ROOT / "samples" / "3", tmp_path / "3")
    (tmp_path / "3" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "3" / "empty.jpg").write_bytes(b"")
    for flags in (["-q"], ["--summary"], ["-q", "--summary", "--format", "json"]):
        r = cli("predict", str(tmp_path), *flags)
        assert r.returncode == 1, (flags, r.stderr)  # some inputs failed, the rest ran
        errors = r.stderr.splitlines()
        assert len(errors) == 2 and all(e.startswith("warning: ") and "skipped" in e for e in errors), r.stderr
        assert {"broken.png", "empty.jpg"} == {n for n in ("broken.png", "empty.jpg") if any(n in e for e in errors)}
        if flags == ["-q"]:
            assert r.stdout.startswith("5 images, 2 errors,") and len(r.stdout.splitlines()) == 1, r.stdout
        elif "json" in flags:
            assert json.loads(r.stdout)["summary"]["errors"] == 2


def test_quiet_drops_the_wrote_note_of_grid(tmp_path):
    loud = cli("predict", SAMPLES, "--grid", str(tmp_path / "a.png"))
    quiet = cli("predict", SAMPLES, "--grid", str(tmp_path / "b.png"), "-q")
    assert loud.returncode == quiet.returncode == 0
    assert "wrote" in loud.stderr and quiet.stderr == ""
    assert (tmp_path / "b.png").stat().st_size > 0
