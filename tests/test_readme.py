"""Every `cnnedge` command line in README.md works as written.

The rules are generic, so that they hold for whatever README lands:
- Command lines come from the ```bash, ```sh, ```shell and ```console blocks (in a console block, only the
  lines after a `$ ` prompt). A trailing backslash joins the next line; a `# comment` is dropped; a line is
  split at `|`, `||`, `&&`, `;` and `&`, and each part is cut at its first redirection (`>`, `2>`, `<`).
- A part is a cnnedge command when the word `cnnedge` is its program (after VAR=value assignments and an
  optional `uv run`) or follows `-m` (`python -m cnnedge`, `torchrun ... -m cnnedge`); `pip install cnnedge`
  is not one. $VARIABLES are expanded from the environment (CNNEDGE_DATA).
- Every cnnedge command is parsed by the real click command behind `cnnedge` (typer.main.get_command): the
  command exists, every option it names is one of that command's, choices and numbers are valid, and the
  required arguments are there.
- It also runs, in this process from the repository root, and must exit 0, when all of these hold:
  it is `predict`, `info` or `summary` (RUN), or names only --help/-h/--version; it names no option that
  writes files (WRITES: --out, --save-crops, --grid, --save) and no GPU (a cuda, tensorrt or mps value);
  every path it reads exists (an example's placeholder such as photo.jpg is only parsed); and its folders
  hold at most MAX_FILES files. train, sweep, export, webcam, serve, bench, enroll, inspect and pixels are
  only parsed: they train, need a camera or a server, take minutes or write files.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re
import shlex
from pathlib import Path

import pytest
import typer

from cnnedge.cli import app
from conftest import ROOT, cli

README = ROOT / "README.md"
RUN = ("predict", "info", "summary")
WRITES = ("out", "save_crops", "grid", "save")  # parameter names of options whose value is a file to write
GPU = ("cuda", "tensorrt", "mps")
MAX_FILES = 500
SHELL_BLOCK = re.compile(r"^```(bash|sh|shell|console)[ \t]*\n(.*?)^```", re.M | re.S)
SEPARATORS = ("|", "||", "&&", ";", "&")
GROUP = typer.main.get_command(app)


def command_lines(markdown: str) -> list[str]:
    lines = []
    for language, block in SHELL_BLOCK.findall(markdown):
        for line in re.sub(r"\\\n", " ", block).splitlines():
            if language == "console":
                if not line.startswith("$ "):
                    continue  # the command's output
                line = line[2:]
            line = _strip_comment(line).strip()
            if line:
                lines.append(line)
    return lines


def _strip_comment(line: str) -> str:
    """The line up to a `#` that starts a word outside quotes (a comment may hold an apostrophe)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def cnnedge_argvs(line: str) -> list[list[str]]:
    """The arguments after `cnnedge` of each cnnedge command in a shell line."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, ""
    parts, part = [], []
    for token in lexer:
        if token in SEPARATORS:
            parts.append(part)
            part = []
        else:
            part.append(token)
    parts.append(part)
    argvs = []
    for part in parts:
        cut = next((i for i, t in enumerate(part) if t[0] in "<>"), len(part))
        if cut and part[cut - 1].isdigit() and cut < len(part):
            cut -= 1  # 2> file: the descriptor goes with the redirection
        part = part[:cut]
        start = 0
        while start < len(part) and re.match(r"^[A-Za-z_]\w*=", part[start]):
            start += 1  # VAR=value
        if part[start:start + 2] == ["uv", "run"]:
            start += 2
            while start < len(part) and part[start].startswith("-"):
                start += 1
        if start < len(part) and part[start] == "cnnedge":
            argvs.append(part[start + 1:])
        elif "cnnedge" in part[start:]:
            at = part.index("cnnedge", start)
            if part[at - 1] == "-m":
                argvs.append(part[at + 1:])
    return [[os.path.expandvars(t) for t in argv] for argv in argvs]


def parse(argv: list[str]) -> tuple[str | None, dict]:
    """(the command, its parameters) as cnnedge would take them; AssertionError for what cnnedge refuses."""
    root_options = {o for p in GROUP.params for o in (*p.opts, *p.secondary_opts)} | {"-h", "--help"}
    at = next((i for i, t in enumerate(argv) if not t.startswith("-")), len(argv))
    unknown = [t for t in argv[:at] if t not in root_options]
    assert not unknown, f"`cnnedge` has no option {unknown[0]}"
    if at == len(argv):
        return None, {}
    name = argv[at]
    assert name in GROUP.commands, f"`cnnedge` has no command {name!r}"
    command = GROUP.commands[name]
    parent = GROUP.make_context("cnnedge", [name])
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            ctx = command.make_context(name, list(argv[at + 1:]), parent=parent)
    except typer.Exit:  # --help
        return name, {}
    except Exception as e:  # click's usage errors: no such option, a bad value, a missing argument
        raise AssertionError(f"`cnnedge {name}` refuses it: {' '.join(str(e).split())}") from None
    return name, ctx.params


def why_not_run(argv: list[str], name: str | None, params: dict) -> str | None:
    """None when the command is cheap and safe to run here, else the reason it is only parsed."""
    if name is None or {"-h", "--help"} & set(argv):
        return None
    if name not in RUN:
        return f"`{name}` is only parsed (not one of {', '.join(RUN)})"
    if any(params.get(w) for w in WRITES):
        return "writes files"
    if any(value in GPU for t in argv for value in t.split(",")):
        return "needs a GPU"
    command = GROUP.commands[name]
    arguments = {p.name for p in command.params if p.param_type_name == "argument"}
    for key, value in params.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, Path) or (key in arguments and isinstance(v, str)):
                path = ROOT / v
                if not (path.exists() or glob.glob(str(path))):
                    return f"reads {v}, which is not here"
                if path.is_dir() and sum(1 for _ in zip(range(MAX_FILES + 1), path.rglob("*"))) > MAX_FILES:
                    return f"{v} holds more than {MAX_FILES} files"
    return None


LINES = [(line, argv) for line in command_lines(README.read_text()) for argv in cnnedge_argvs(line)]


def test_the_readme_has_cnnedge_commands_and_some_run():
    assert LINES, "no `cnnedge` command found in README.md's shell blocks"
    assert any(why_not_run(argv, *parse(argv)) is None for _, argv in LINES), "no README command runs here"


@pytest.mark.parametrize("line, argv", LINES, ids=[line for line, _ in LINES])
def test_readme_command(line, argv):
    try:
        name, params = parse(argv)
    except AssertionError as e:
        raise AssertionError(f"README.md: {line}\n  {e}") from None
    if why_not_run(argv, name, params) is None:
        r = cli(*argv, cwd=ROOT)
        assert r.returncode == 0, f"README.md: {line}\n  exit {r.returncode}: {r.stderr.strip()[-500:]}"


# ------------------------------------------------------------------------- the extraction and checks


def test_extraction_follows_the_shell():
    markdown = "\n".join([
        "```bash", "uv run cnnedge predict samples/ --format json > out.json   # seed 002's recipe",
        "CNNEDGE_TOKEN=x uv run cnnedge serve --host 0.0.0.0 \\", "    --workers 2",
        "pip install cnnedge", 'cnnedge predict "shots/*.png" 2>/dev/null | head -3 && cnnedge info', "```",
        "```console", "$ uv run torchrun --nproc-per-node 4 -m cnnedge train --device cuda", "22 images", "```",
        "```python", "cnnedge predict never.png", "```"])
    argvs = [argv for line in command_lines(markdown) for argv in cnnedge_argvs(line)]
    assert argvs == [["predict", "samples/", "--format", "json"], ["serve", "--host", "0.0.0.0", "--workers", "2"],
                     ["predict", "shots/*.png"], ["info"], ["train", "--device", "cuda"]]


@pytest.mark.parametrize("argv, message", [
    (["predict", "samples/", "--formt", "json"], "No such option: --formt"),
    (["predict", "samples/", "--format", "yaml"], "'yaml' is not one of"),
    (["predict", "samples/", "--topk", "many"], "valid integer"),
    (["predikt", "samples/"], "no command 'predikt'"),
    (["--verbose", "info"], "no option --verbose"),
    (["enroll", "samples/"], "Missing parameter: out"),
])
def test_a_wrong_command_fails(argv, message):
    with pytest.raises(AssertionError, match=re.escape(message)):
        parse(argv)


def test_what_runs_and_what_is_only_parsed():
    def reason(line):
        argv, = cnnedge_argvs(line)
        return why_not_run(argv, *parse(argv))

    assert reason("cnnedge predict samples/ --runtime opencv") is None
    assert reason("cnnedge --version") is None and reason("cnnedge train -h") is None
    assert "not here" in reason("cnnedge predict photo.jpg")
    assert "GPU" in reason("cnnedge predict samples/ --provider cuda")
    assert "writes" in reason("cnnedge predict samples/ --grid grid.png")
    assert "only parsed" in reason("cnnedge train --epochs 1")
