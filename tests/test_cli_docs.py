"""docs/cli.md is generated from the app by Typer's own docs generator; it must match the code."""

from __future__ import annotations

import re
from pathlib import Path

import typer
from typer.cli import app as typer_cli
from typer.testing import CliRunner

from cnnedge.cli import app
from conftest import ROOT

DOCS = ROOT / "docs" / "cli.md"
TITLE = "cnnedge command line reference"
REGENERATE = f'uv run typer cnnedge.cli utils docs --name cnnedge --title "{TITLE}" --output docs/cli.md'


def generate(out: Path, columns: str = "80") -> str:
    """What REGENERATE writes, in this process. The generator does not wrap text; COLUMNS is set anyway
    (and varied below) so that no terminal width can change the file."""
    env = {"COLUMNS": columns, "TERM": "dumb", "CNNEDGE_TOKEN": None}
    r = CliRunner().invoke(typer_cli, ["cnnedge.cli", "utils", "docs", "--name", "cnnedge", "--title", TITLE,
                                       "--output", str(out)], env=env)
    assert r.exit_code == 0, r.output
    return out.read_text()


def test_docs_cli_md_is_up_to_date(tmp_path):
    fresh = generate(tmp_path / "cli.md")
    assert DOCS.read_text() == fresh, f"docs/cli.md is stale: regenerate it with `{REGENERATE}`"


def test_generation_is_deterministic_and_covers_every_option(tmp_path):
    narrow, wide = generate(tmp_path / "narrow.md", "40"), generate(tmp_path / "wide.md", "250")
    assert narrow == wide
    sections = dict(re.findall(r"^## `cnnedge (\w+)`\n(.*?)(?=^## |\Z)", narrow, re.M | re.S))
    commands = typer.main.get_command(app).commands
    assert sections.keys() == commands.keys()
    for name, command in commands.items():
        for opt in (o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")):
            assert re.search(rf"(`|, |/ ){re.escape(opt)}\b", sections[name]), (name, opt)
