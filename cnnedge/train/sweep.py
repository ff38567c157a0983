"""`cnnedge sweep`: many `cnnedge train` runs over a grid, or an Optuna search, of training options.

    cnnedge sweep --epochs 1,2,4,8 --batch-size 64,256,1024 --out runs/sweep1
    cnnedge sweep --search tpe --trials 30 --lr 1e-3..0.3:log --batch-size 32..512:32 --out runs/tpe1

The folder --out holds:
    sweep.json, sweep.csv          every trial: options, test accuracy and loss, validation figures, times,
                                   parameters, the `cnnedge train` command that reproduces it
    *.png                          test accuracy and loss against each swept option; a heatmap for two
    trials/<name>/cnn.pt           each trial's checkpoint (with --keep best, only the best trial's) ...
    trials/<name>/cnn.metrics.json ... and metrics, exactly as `cnnedge train` writes them
    trials/<name>/trial.json       the trial's options (what a rerun checks before it skips or resumes)
    study.db                       with --search tpe: the Optuna study, unless --storage names another

Trials run in this process, one after another, through `cnnedge.train.trainer.run`: a fresh process per
trial would import torch every time (about 4 s here); in-process, a trial costs a dataset decode (about
0.1 s) beyond what `cnnedge train` itself does. The trainer's signal handling stays in force: Ctrl-C or
SIGTERM stops inside the current trial, whose checkpoint keeps its last completed epoch. A trial is done
when its metrics file exists (the trainer writes it atomically, last); sweep.json and sweep.csv are
rewritten atomically after every trial. Rerunning the same command skips the done trials and resumes the
interrupted one from its checkpoint, so Ctrl-C keeps what finished and SIGKILL loses at most the epoch
in progress.

Argument parsing (`parse_values`, `TrainOption`) is torch-free so the CLI can check a sweep before it
imports anything heavy; the trainer, Optuna and matplotlib are imported when the sweep runs.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
import shlex
import statistics
import time
import types
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cnnedge.atomic import write_text
from cnnedge.errors import CnnedgeError, ExitCode
from cnnedge.train.options import partial_path

TRIAL_CHECKPOINT = "cnn.pt"
RESULT_COLUMNS = ("test_accuracy", "test_loss", "val_accuracy", "val_loss", "best_val_accuracy", "best_epoch",
                  "epochs_run", "train_seconds", "wall_seconds", "parameters", "report_split")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


# ------------------------------------------------------------------------------------ the options


@dataclass(frozen=True)
class TrainOption:
    """A `cnnedge train` option as the sweep sees it."""

    name: str  # the TrainConfig field or hyperparameter it sets (epochs, batch_size, from_checkpoint, ...)
    flag: str  # how `cnnedge train` spells it: --batch-size, --from, --augment/--no-augment
    annotation: object  # its type there: Optional[int], Optional[Optimizer], str, ...

    @property
    def kind(self) -> tuple[type, tuple | None]:
        """(int, float, bool, str or Path; the choices of a Literal type or None)."""
        annotation = self.annotation
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # Optional[X] -> X
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        if typing.get_origin(annotation) is typing.Literal:
            return str, typing.get_args(annotation)
        return annotation, None

    @property
    def label(self) -> str:
        """Its name in tables, plots and trial folder names: the flag without dashes (batch-size, from)."""
        return self.flag.split("/")[0].lstrip("-")

    def argv(self, value) -> list[str]:
        """The `cnnedge train` arguments that set it to `value`."""
        if self.kind[0] is bool:
            on, _, off = self.flag.partition("/")
            return [on] if value else ([off] if off else [])
        return [self.flag, str(value)]


@dataclass(frozen=True)
class Range:
    """LOW..HIGH[:STEP] or LOW..HIGH:log: a grid expands it with STEP (1 for integers); TPE samples it."""

    low: float
    high: float
    step: float | None
    log: bool
    integer: bool

    def grid_values(self, flag: str) -> list:
        if self.log:
            raise CnnedgeError(f"{flag}: a :log range is sampled by --search tpe; a grid needs LOW..HIGH:STEP or a list")
        step = self.step if self.step is not None else (1 if self.integer else None)
        if step is None:
            raise CnnedgeError(f"{flag}: a float range needs a step in a grid (LOW..HIGH:STEP), or --search tpe")
        n = int(math.floor((self.high - self.low) / step + 1e-9))
        values = [self.low + i * step for i in range(n + 1)]
        return [int(v) for v in values] if self.integer else [round(v, 12) for v in values]

    def to_json(self) -> dict:
        return {"low": self.low, "high": self.high, "step": self.step, "log": self.log}


def _number(flag: str, text: str, integer: bool):
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        raise CnnedgeError(f"{flag}: {text!r} is not {'an integer' if integer else 'a number'}") from None
    if not math.isfinite(value):
        raise CnnedgeError(f"{flag}: {text!r} is not a finite number")
    return value


def _range(flag: str, text: str, integer: bool) -> Range:
    body, _, step_text = text.partition(":")
    low_text, _, high_text = body.partition("..")
    low, high = _number(flag, low_text, integer), _number(flag, high_text, integer)
    log = step_text == "log"
    step = None if log or not step_text else _number(flag, step_text, integer)
    if high < low:
        raise CnnedgeError(f"{flag}: range {text!r} runs downwards")
    if step is not None and step <= 0:
        raise CnnedgeError(f"{flag}: range {text!r} needs a positive step")
    if log and low <= 0:
        raise CnnedgeError(f"{flag}: a :log range must start above 0, not {text!r}")
    return Range(low, high, step, log, integer)


def parse_values(option: TrainOption, raw: list[str]) -> list:
    """The values of a repeated or comma-separated option: numbers, choices, true/false, paths, and for
    numeric options ranges (LOW..HIGH[:STEP|:log]). Duplicates are dropped, the order kept."""
    base, choices = option.kind
    values: list = []
    for piece in (p.strip() for text in raw for p in text.split(",")):
        if not piece:
            raise CnnedgeError(f"{option.flag}: an empty value in {','.join(raw)!r}")
        if base in (int, float) and ".." in piece:
            value = _range(option.flag, piece, base is int)
        elif base in (int, float):
            value = _number(option.flag, piece, base is int)
        elif base is bool:
            if piece.lower() not in _TRUE + _FALSE:
                raise CnnedgeError(f"{option.label}: {piece!r} is neither true nor false")
            value = piece.lower() in _TRUE
        elif choices is not None:
            if piece not in choices:
                raise CnnedgeError(f"{option.flag}: {piece!r} is not one of: {', '.join(choices)}")
            value = piece
        else:
            value = str(piece)  # str and paths: TrainConfig takes paths as strings
        if value not in values:
            values.append(value)
    return values


def parse_seeds(text: str) -> list[int]:
    """--seeds: 0,1,2 or a range 0..4."""
    seeds = []
    for v in parse_values(TrainOption("seed", "--seeds", int), [text]):
        seeds += v.grid_values("--seeds") if isinstance(v, Range) else [v]
    return list(dict.fromkeys(seeds))


# ------------------------------------------------------------------------------------ the config


@dataclass
class SweepConfig:
    out: str
    options: dict[str, list]  # option name -> its values (ranges included), as parse_values returns them
    train_options: dict[str, TrainOption]  # every option named in `options`
    seeds: list[int] = field(default_factory=lambda: [0])
    keep: str = "all"  # or "best": only the best trial keeps its checkpoint
    search: str = "grid"  # or "tpe"
    trials: int | None = None  # tpe: trials in the study, over every process that shares it
    storage: str | None = None  # tpe: Optuna RDB storage URL [default: sqlite in --out]
    study: str | None = None  # tpe: study name [default: the --out folder's name]
    plots: bool = True
    trial_plots: bool = False  # each trial's own curves, confusion, samples and predictions PNGs


def check(config: SweepConfig) -> None:
    """Refuse what cannot run, before anything is imported or trained."""
    from cnnedge.choices import SWEEP_KEEPS, SWEEP_SEARCHES

    if config.search not in SWEEP_SEARCHES or config.keep not in SWEEP_KEEPS:
        raise CnnedgeError(f"search {config.search!r} or keep {config.keep!r}: choose from {SWEEP_SEARCHES} and {SWEEP_KEEPS}")
    tpe = config.search == "tpe"
    if tpe and not config.trials:
        raise CnnedgeError("--search tpe needs --trials N (the study's total, over every process that shares it)")
    if not tpe:
        for flag, given in (("--trials", config.trials), ("--storage", config.storage), ("--study", config.study)):
            if given is not None:
                raise CnnedgeError(f"{flag} is for --search tpe; a grid runs every combination")
    if config.trials is not None and config.trials < 1:
        raise CnnedgeError(f"--trials must be at least 1, not {config.trials}")
    if tpe and len(config.seeds) > 1:
        raise CnnedgeError("--search tpe takes one --seeds value (repeat the best point in a grid to see its spread)")
    if tpe and not any(len(v) > 1 or isinstance(v[0], Range) for v in config.options.values()):
        raise CnnedgeError("--search tpe needs an option to search: several values, or a range LOW..HIGH[:log]")
    for name, values in config.options.items():
        option = config.train_options[name]
        ranges = [v for v in values if isinstance(v, Range)]
        if tpe and ranges and len(values) > 1:
            raise CnnedgeError(f"{option.flag}: --search tpe takes one range or a list of values, not both")
        if tpe and ranges and ranges[0].log and ranges[0].step is not None:
            raise CnnedgeError(f"{option.flag}: a range is either stepped or :log")
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise CnnedgeError(f"--out {out}: exists and is not a folder")


def grid(config: SweepConfig) -> list[dict]:
    """Every combination of the options' values (ranges expanded), in option order."""
    names = list(config.options)
    expanded = [[x for v in config.options[n] for x in (v.grid_values(config.train_options[n].flag)
                                                         if isinstance(v, Range) else [v])] for n in names]
    return [dict(zip(names, combo)) for combo in itertools.product(*expanded)]


def swept_names(config: SweepConfig) -> list[str]:
    return [n for n, v in config.options.items() if len(v) > 1 or isinstance(v[0], Range)]


# ------------------------------------------------------------------------------------ one trial


def train_command(config: SweepConfig, options: dict, seed: int, out: Path) -> str:
    """The `cnnedge train` command line that runs this trial."""
    argv = ["cnnedge", "train"]
    for name, value in options.items():
        argv += config.train_options[name].argv(value)
    return shlex.join([*argv, "--seed", str(seed), "--out", str(out)])


def trial_name(config: SweepConfig, options: dict, seed: int) -> str:
    """A folder name that says what the trial is: epochs-2_batch-size-64_seed-0."""
    parts = [f"{config.train_options[n].label}-{options[n]}" for n in swept_names(config)]
    name = re.sub(r"[^\w.=+-]+", "-", "_".join([*parts, f"seed-{seed}"]))
    if len(name) > 100:  # long paths as values: keep it readable, keep it unique
        import hashlib

        name = name[:90] + "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return name


@contextmanager
def quiet_trainer():
    """The trainer prints epochs and tables on cnnedge.report.console; the sweep shows its own table."""
    from cnnedge.report import console

    before = console.quiet
    console.quiet = True
    try:
        yield
    finally:
        console.quiet = before


def train_config(config: SweepConfig, options: dict, seed: int, out: Path, resume: bool):
    """The TrainConfig of one trial: options that are TrainConfig fields go there, the rest are hyperparameters."""
    from dataclasses import fields

    from cnnedge.train.trainer import DEFAULT_HPARAMS, TrainConfig

    if resume:  # the trainer takes everything else from the checkpoint
        device = options.get("device", "auto")
        return TrainConfig(out=str(out), resume=True, device=device)
    known = {f.name for f in fields(TrainConfig)}
    hparams = {k: v for k, v in options.items() if k in DEFAULT_HPARAMS}
    settings = {k: v for k, v in options.items() if k in known}
    unknown = set(options) - set(hparams) - set(settings)
    if unknown:  # a train option the sweep does not know how to pass on: a bug, not a user error
        raise RuntimeError(f"sweep: no TrainConfig field or hyperparameter for {sorted(unknown)}")
    return TrainConfig(**settings, seed=seed, out=str(out), plots=config.plots and config.trial_plots, hparams=hparams)


def validate_point(options: dict) -> dict:
    """What the trainer would refuse at the start of a trial, refused before the first one; returns the
    hyperparameters the trial will train with."""
    from cnnedge.train.trainer import DEFAULT_HPARAMS, resolve_hparams
    from cnnedge.train.zoo import DEFAULT_ARCH, get_arch

    arch = options.get("arch", DEFAULT_ARCH)
    get_arch(arch)
    fraction = options.get("val_fraction")
    if fraction is not None and not 0 <= fraction < 1:
        raise CnnedgeError(f"--val-fraction must be at least 0 and below 1, not {fraction}")
    given = {k: v for k, v in options.items() if k in DEFAULT_HPARAMS}
    return resolve_hparams(arch, given, fine_tune=bool(options.get("from_checkpoint")))


def result_row(name: str, options: dict, seed: int, metrics: dict, folder: Path, wall: float | None) -> dict:
    """One trial's line in sweep.json and sweep.csv, read from its metrics file."""
    split = metrics["report_split"]
    history = metrics["history"]
    with_val = [h for h in history if h.get("val_accuracy") is not None]
    best = max(with_val, key=lambda h: h["val_accuracy"], default=None)
    last = history[-1] if history else {}
    checkpoint = folder / TRIAL_CHECKPOINT
    return {
        "trial": name, "status": "done", **options, "seed": seed,
        "test_accuracy": metrics[f"{split}_accuracy"], "test_loss": metrics[f"{split}_loss"],
        "val_accuracy": last.get("val_accuracy"), "val_loss": last.get("val_loss"),
        "best_val_accuracy": best["val_accuracy"] if best else None, "best_epoch": best["epoch"] if best else None,
        "epochs_run": len(history), "train_seconds": metrics["train_seconds"], "wall_seconds": wall,
        "parameters": metrics.get("parameters"), "report_split": split,
        "checkpoint": str(checkpoint) if checkpoint.exists() else None, "command": metrics["command"],
    }


def objective(row: dict) -> float:
    """What "best" means: the last epoch's validation accuracy (the model that was saved), or the
    reported accuracy when there is no validation split."""
    value = row.get("val_accuracy")
    return value if value is not None else row["test_accuracy"]


class Trial:
    """One training run in its own folder, and the record that lets a rerun skip or resume it."""

    def __init__(self, config: SweepConfig, options: dict, seed: int, name: str):
        self.config, self.options, self.seed, self.name = config, options, seed, name
        self.folder = Path(config.out) / "trials" / name
        self.checkpoint = self.folder / TRIAL_CHECKPOINT
        self.metrics_path = self.checkpoint.with_name(self.checkpoint.stem + ".metrics.json")
        self.record_path = self.folder / "trial.json"
        self.command = train_command(config, options, seed, self.checkpoint)

    def _record(self) -> dict | None:
        try:
            return json.loads(self.record_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise CnnedgeError(f"{self.record_path}: unreadable ({e})") from None

    def check_folder(self) -> None:
        """The folder is this trial's, or empty: never resume or skip another sweep's run."""
        record = self._record()
        if record is None:
            if self.checkpoint.exists() or self.partial.exists() or self.metrics_path.exists():
                raise CnnedgeError(f"{self.folder} holds a run that is not from this sweep; use another --out")
            return
        if record.get("options") != json.loads(json.dumps(self.options)) or record.get("seed") != self.seed:
            raise CnnedgeError(f"{self.folder} was run with other options ({record.get('command')}); rerun that "
                               "sweep's command to continue it, or use another --out")

    @property
    def partial(self) -> Path:
        return partial_path(self.checkpoint)  # the epochs of a trial in progress

    @property
    def done(self) -> bool:
        return self.metrics_path.exists() and not self.partial.exists()

    def row(self) -> dict:
        try:
            metrics = json.loads(self.metrics_path.read_text())
        except (OSError, ValueError) as e:
            raise CnnedgeError(f"{self.metrics_path}: unreadable ({e})") from None
        record = self._record() or {}
        return result_row(self.name, self.options, self.seed, metrics, self.folder, record.get("wall_seconds"))

    def run(self, on_epoch=None) -> dict:
        """Train (or resume an interrupted run of) this trial; return its row."""
        from cnnedge.train.trainer import run

        record = {"trial": self.name, "options": self.options, "seed": self.seed, "command": self.command}
        resume = self.partial.exists()
        write_text(self.record_path, json.dumps(record, indent=2) + "\n")
        start = time.perf_counter()
        with quiet_trainer():
            run(train_config(self.config, self.options, self.seed, self.checkpoint, resume), self.command, on_epoch)
        wall = time.perf_counter() - start
        write_text(self.record_path, json.dumps({**record, "wall_seconds": wall}, indent=2) + "\n")
        return self.row()


# ------------------------------------------------------------------------------------ results


def points(rows: list[dict], swept: list[str]) -> list[dict]:
    """Done trials grouped by their swept options (over seeds): mean and spread."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] == "done":
            groups.setdefault(tuple(json.dumps(r[n]) for n in swept), []).append(r)
    out = []
    for members in groups.values():
        acc = [r["test_accuracy"] for r in members]
        loss = [r["test_loss"] for r in members]
        val = [r["val_accuracy"] for r in members if r["val_accuracy"] is not None]
        out.append({**{n: members[0][n] for n in swept}, "seeds": [r["seed"] for r in members],
                    "test_accuracy_mean": statistics.fmean(acc), "test_accuracy_std": _std(acc),
                    "test_loss_mean": statistics.fmean(loss), "test_loss_std": _std(loss),
                    "val_accuracy_mean": statistics.fmean(val) if val else None})
    return out


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _sort_key(value):
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))


def _numeric(values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def line_plot(rows: list[dict], swept: list[str], x: str, labels: dict[str, str]) -> dict:
    """Test accuracy and loss against option `x`, one line per combination of the other swept options,
    mean and standard deviation over seeds: exactly what the PNG draws."""
    others = [n for n in swept if n != x]
    lines: dict[str, dict] = {}
    for p in points(rows, swept):
        label = ", ".join(f"{labels[n]}={p[n]}" for n in others) or "all trials"
        line = lines.setdefault(label, {"label": label, "order": [_sort_key(p[n]) for n in others], "points": []})
        line["points"].append(p)
    values = [json.loads(v) for v in {json.dumps(p[x]) for line in lines.values() for p in line["points"]}]
    numeric = _numeric(values)
    out = []
    for line in sorted(lines.values(), key=lambda line: line["order"]):
        ps = sorted(line["points"], key=lambda p: _sort_key(p[x]))
        out.append({"label": line["label"], "x": [p[x] for p in ps],
                    "accuracy": [p["test_accuracy_mean"] for p in ps], "accuracy_std": [p["test_accuracy_std"] for p in ps],
                    "loss": [p["test_loss_mean"] for p in ps], "loss_std": [p["test_loss_std"] for p in ps],
                    "seeds": [len(p["seeds"]) for p in ps]})
    positive = numeric and values and min(values) > 0
    return {"kind": "lines", "x": x, "x_label": labels[x], "categorical": not numeric,
            "log_x": bool(positive and max(values) / min(values) >= 50),
            "x_values": sorted(values, key=_sort_key) if not numeric else None, "lines": out}


def heatmap_plot(rows: list[dict], swept: list[str], labels: dict[str, str]) -> dict:
    """Mean test accuracy over the two swept options (rows: the first, columns: the second)."""
    first, second = swept
    ps = points(rows, swept)
    ys = sorted({json.dumps(p[first]) for p in ps}, key=lambda v: _sort_key(json.loads(v)))
    xs = sorted({json.dumps(p[second]) for p in ps}, key=lambda v: _sort_key(json.loads(v)))
    cell = {(json.dumps(p[first]), json.dumps(p[second])): p["test_accuracy_mean"] for p in ps}
    return {"kind": "heatmap", "y": first, "x": second, "y_label": labels[first], "x_label": labels[second],
            "y_values": [json.loads(v) for v in ys], "x_values": [json.loads(v) for v in xs],
            "accuracy": [[cell.get((y, x)) for x in xs] for y in ys]}


def search_plots(rows: list[dict], swept: list[str], labels: dict[str, str], log: set[str]) -> dict[str, dict]:
    """For a TPE study: the objective per trial (pruned ones marked), and each searched option's values
    against the test accuracy of the finished trials (on a log axis for the `log` ones: :log ranges)."""
    finished = [r for r in rows if r["status"] in ("done", "pruned")]
    plots = {"history.png": {"kind": "history", "trials": [r["number"] for r in finished],
                             "objective": [r["objective"] for r in finished],
                             "pruned": [r["status"] == "pruned" for r in finished]}}
    done = [r for r in rows if r["status"] == "done"]
    for name in swept:
        numeric = _numeric([r[name] for r in done])
        plots[f"test_vs_{name}.png"] = {
            "kind": "points", "x": name, "x_label": labels[name], "categorical": not numeric, "log_x": name in log,
            "values": [r[name] for r in done], "accuracy": [r["test_accuracy"] for r in done],
            "loss": [r["test_loss"] for r in done], "trials": [r["number"] for r in done]}
    return plots


def grid_plots(rows: list[dict], swept: list[str], labels: dict[str, str]) -> dict[str, dict]:
    plots = {f"test_vs_{x}.png": line_plot(rows, swept, x, labels) for x in swept}
    if len(swept) == 2:
        plots[f"heatmap_{swept[0]}_{swept[1]}.png"] = heatmap_plot(rows, swept, labels)
    return plots


def write_results(out: Path, doc: dict, columns: list[str]) -> None:
    """sweep.json and sweep.csv, each written atomically."""
    write_text(out / "sweep.json", json.dumps(doc, indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in doc["trials"]:
        writer.writerow(["" if row.get(c) is None else row[c] for c in columns])
    write_text(out / "sweep.csv", buffer.getvalue())


def draw_plots(out: Path, plots: dict[str, dict]) -> list[Path]:
    from cnnedge.train.plots import plot_search_history, plot_sweep_heatmap, plot_sweep_lines, plot_sweep_points

    draw = {"lines": plot_sweep_lines, "heatmap": plot_sweep_heatmap, "history": plot_search_history,
            "points": plot_sweep_points}
    return [draw[spec["kind"]](spec, out / name) for name, spec in plots.items()]


def keep_best_only(rows: list[dict], best: str | None, out: Path) -> None:
    """--keep best: delete the checkpoints of the other finished trials (files this sweep wrote)."""
    for row in rows:
        if row["trial"] != best and row["status"] in ("done", "pruned"):
            checkpoint = out / "trials" / row["trial"] / TRIAL_CHECKPOINT
            checkpoint.unlink(missing_ok=True)
            row["checkpoint"] = None


# ------------------------------------------------------------------------------------ display


def _pct(value) -> str:
    return "" if value is None else f"{100 * value:.2f}%"


class Board:
    """What a sweep shows while it runs: a table of the trials (the latest that fit on the screen) and a
    progress bar over trials; on a terminal it is redrawn live, elsewhere each finished trial is one line."""

    def __init__(self, total: int, swept: list[str], labels: dict[str, str], seeds: bool, title: str):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        from cnnedge.report import console

        # Not the trainer's console: that one is silenced during trials (cnnedge.report.console.quiet).
        self.console = Console(highlight=False, width=None if console.is_terminal else console.width)
        self.swept, self.labels, self.seeds, self.title = swept, labels, seeds, title
        self.rows: dict[str, dict] = {}
        self.progress = Progress(TextColumn("trials"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("eta"), TimeRemainingColumn(), console=self.console)
        self.task = self.progress.add_task("trials", total=total)
        self.live = None

    def __enter__(self):
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(self._render(), console=self.console, transient=True, refresh_per_second=4)
            self.live.start()
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.stop()

    def update(self, row: dict, finished: bool = False, before: bool = False) -> None:
        """Show `row` (new or changed); `finished` advances the bar, `before`: done by an earlier run."""
        self.rows[row["trial"]] = row
        if finished:
            self.progress.advance(self.task)
            if self.live is None and not before and row["status"] in ("done", "pruned"):
                self.console.print(self._line(row), markup=False)
        if self.live is not None:
            self.live.update(self._render())

    def set_total(self, total: int, completed: int) -> None:
        self.progress.update(self.task, total=total, completed=completed)

    def _line(self, row: dict) -> str:
        where = ", ".join(f"{self.labels[n]}={row[n]}" for n in self.swept)
        seed = f" seed {row['seed']}" if self.seeds else ""
        if row["status"] == "pruned":
            return f"{row['trial']}: {where}{seed}: pruned after epoch {row['epochs_run']} (val {_pct(row['val_accuracy'])})"
        return (f"{row['trial']}: {where}{seed}: test {_pct(row['test_accuracy'])} (loss {row['test_loss']:.4f}), "
                f"val {_pct(row['val_accuracy'])}, {row['train_seconds']:.1f} s")

    def table(self, rows: list[dict], best: str | None = None, limit: int | None = None):
        from rich.table import Table

        # "#": the trial's place in the grid, or its number in the study; its folder name is in sweep.json.
        table = Table(title=self.title, title_justify="left")
        for column in ("#", *(self.labels[n] for n in self.swept), *(["seed"] if self.seeds else []), "status",
                       "epoch", "val acc", "test acc", "test loss", "train s"):
            table.add_column(column, justify="left" if column == "status" else "right")
        numbered = [(r.get("number", i), r) for i, r in enumerate(rows, 1)]
        for number, r in numbered[-limit:] if limit else numbered:
            epoch = f"{r.get('epochs_run') or 0}/{r['epochs']}" if r.get("epochs") else str(r.get("epochs_run") or "")
            cells = [str(number), *(str(r[n]) for n in self.swept), *([str(r["seed"])] if self.seeds else []),
                     r["status"], epoch, _pct(r.get("val_accuracy")), _pct(r.get("test_accuracy")),
                     "" if r.get("test_loss") is None else f"{r['test_loss']:.4f}",
                     "" if r.get("train_seconds") is None else f"{r['train_seconds']:.1f}"]
            style = "bold green" if r["trial"] == best else "dim" if r["status"] in ("pruned", "failed") else None
            table.add_row(*cells, style=style)
        return table

    def _render(self):
        from rich.console import Group

        limit = max(3, self.console.size.height - 10)
        return Group(self.table(list(self.rows.values()), limit=limit), self.progress)


# ------------------------------------------------------------------------------------ the sweep


def _timing(start: float, ran: list[float]) -> dict:
    """Time spent by this process, and what the sweep adds to the training runs it made (`ran`: the wall
    time of each call to the trainer): tables, result files, trial bookkeeping."""
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "ran": len(ran),
            "overhead_seconds_per_trial": (seconds - sum(ran)) / len(ran) if ran else None}


def _labels(config: SweepConfig) -> dict[str, str]:
    return {n: config.train_options[n].label for n in config.options}


def _interrupted(e: BaseException, done: int, out: Path, then: str) -> CnnedgeError:
    """Ctrl-C or SIGTERM, inside a trial's epochs (the trainer's CnnedgeError) or elsewhere (a
    KeyboardInterrupt while loading or evaluating): what is saved, and how to go on."""
    code = e.code if isinstance(e, CnnedgeError) else ExitCode.INTERRUPTED
    return CnnedgeError(f"sweep interrupted; {done} trial(s) finished and saved in {out}: rerun the same command "
                        f"to continue ({then})", code)


def _is_interrupt(e: BaseException) -> bool:
    return isinstance(e, KeyboardInterrupt) or (isinstance(e, CnnedgeError)
                                                 and e.code in (ExitCode.INTERRUPTED, ExitCode.TERMINATED))


def run(config: SweepConfig) -> dict:
    """Run the sweep (or continue it); return what sweep.json holds."""
    check(config)
    return run_search(config) if config.search == "tpe" else run_grid(config)


def run_grid(config: SweepConfig) -> dict:
    out = Path(config.out)
    swept, labels = swept_names(config), _labels(config)
    trials, epochs = [], {}
    for options in grid(config):
        hp = validate_point(options)
        for seed in config.seeds:
            trials.append(Trial(config, options, seed, trial_name(config, options, seed)))
            epochs[trials[-1].name] = hp["epochs"]
    for trial in trials:
        trial.check_folder()
    columns = ["trial", "status", *swept, *[n for n in config.options if n not in swept], "seed", *RESULT_COLUMNS,
               "checkpoint", "command"]
    fixed = {n: v[0] for n, v in config.options.items() if n not in swept}
    shape = [str(len({json.dumps(t.options[n]) for t in trials})) for n in swept]
    if len(config.seeds) > 1:
        shape.append(f"{len(config.seeds)} seeds")
    board = Board(len(trials), swept, labels, len(config.seeds) > 1,
                  f"sweep: {len(trials)} trials ({' x '.join(shape) or 'one point'}) -> {out}")
    start = time.perf_counter()
    rows: dict[str, dict] = {}
    ran: list[float] = []  # wall time of each trial run by this process

    def document() -> dict:
        done = [r for r in rows.values() if r["status"] == "done"]
        best = max(done, key=objective, default=None)
        if config.keep == "best":
            keep_best_only(done, best["trial"] if best else None, out)
        return {"search": "grid", "swept": swept, "fixed": fixed, "seeds": config.seeds,
                "objective": "val_accuracy (last epoch), else test_accuracy", "trials": list(rows.values()),
                "points": points(list(rows.values()), swept), **_timing(start, ran),
                "best": None if best is None else {"trial": best["trial"], "command": best["command"],
                                                     "checkpoint": best["checkpoint"]}}

    with board:
        for trial in trials:
            if trial.done:
                rows[trial.name] = trial.row()
                board.update(rows[trial.name], finished=True, before=True)
                continue
            row = {"trial": trial.name, "status": "running", **trial.options, "seed": trial.seed,
                   "epochs": epochs[trial.name]}
            board.update(row)

            def on_epoch(h, row=row):
                row.update(epochs_run=h["epoch"], val_accuracy=h.get("val_accuracy"))
                board.update(row)

            try:
                rows[trial.name] = trial.run(on_epoch)
            except (CnnedgeError, KeyboardInterrupt) as e:
                if _is_interrupt(e):
                    done = sum(r["status"] == "done" for r in rows.values())
                    raise _interrupted(e, done, out, f"{trial.name} resumes from its last finished epoch") from None
                raise
            ran.append(rows[trial.name]["wall_seconds"])
            write_results(out, document(), columns)
            board.update(rows[trial.name], finished=True)

    doc = document()
    doc["plots"] = grid_plots(list(rows.values()), swept, labels) if config.plots and swept else {}
    write_results(out, doc, columns)
    written = draw_plots(out, doc["plots"]) if doc["plots"] else []
    _report(board, doc, written, out)
    return doc


def _report(board: Board, doc: dict, written: list[Path], out: Path) -> None:
    rows = doc["trials"]
    best = doc["best"]
    board.console.print(board.table(rows, best=best["trial"] if best else None))
    if board.seeds and doc.get("points"):
        from rich.table import Table

        table = Table(title="over seeds", title_justify="left")
        for column in (*(board.labels[n] for n in board.swept), "seeds", "test acc mean", "std", "test loss mean"):
            table.add_column(column, justify="right")
        for p in doc["points"]:
            table.add_row(*(str(p[n]) for n in board.swept), str(len(p["seeds"])), _pct(p["test_accuracy_mean"]),
                          _pct(p["test_accuracy_std"]), f"{p['test_loss_mean']:.4f}")
        board.console.print(table)
    say = lambda text: board.console.print(text, markup=False, soft_wrap=True)
    done = [r for r in rows if r["status"] == "done"]
    if best is not None:
        row = next(r for r in rows if r["trial"] == best["trial"])
        say(f"best (by {'validation' if row['val_accuracy'] is not None else row['report_split']} accuracy): "
            f"{row['trial']}: test accuracy {_pct(row['test_accuracy'])}, loss {row['test_loss']:.4f}")
        say(f"reproduce: {best['command']}")
    ran, seconds = doc["ran"], doc["seconds"]
    pruned = sum(r["status"] == "pruned" for r in rows)
    line = f"{len(done)} trials done" + (f", {pruned} pruned" if pruned else "") + f"; {ran} ran here in {seconds:.1f} s"
    if ran:
        line += f", the sweep's own overhead {doc['overhead_seconds_per_trial']:.3f} s per trial"
    say(line)
    say("wrote " + ", ".join(str(p) for p in [out / "sweep.json", out / "sweep.csv", *written]))


# ------------------------------------------------------------------------------------ TPE


def _storage(config: SweepConfig):
    """Optuna's RDB storage with heartbeats: a trial whose process died (SIGKILL, a lost machine) is
    marked failed after the grace period and retried once, with its parameters, by whoever runs next."""
    import warnings

    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    url = config.storage or f"sqlite:///{(Path(config.out) / 'study.db').resolve()}"
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None  # processes take turns
    if url.startswith("sqlite:///") and not config.storage:
        Path(config.out).mkdir(parents=True, exist_ok=True)
    for attempt in range(6):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5, and have been since 2.8
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return url, RDBStorage(url, engine_kwargs=engine, heartbeat_interval=10, grace_period=60,
                                       heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
        except (optuna.exceptions.OptunaError, ImportError, ValueError) as e:
            raise CnnedgeError(f"--storage {url}: {' '.join(str(e).split())[:200]}") from None
        except Exception as e:  # SQLAlchemy's errors: an unreachable server, a bad file, a race
            text = " ".join(str(e).split())
            # Workers that start together on a new database race to create its tables; the losers retry.
            if attempt < 5 and any(word in text for word in ("already exists", "duplicate key", "locked")):
                time.sleep(0.3 * (attempt + 1))
                continue
            raise CnnedgeError(f"--storage {url}: {type(e).__name__}: {text[:200]}") from None


def _suggest(trial, name: str, values: list, option: TrainOption):
    if len(values) > 1:
        return trial.suggest_categorical(name, values)
    value = values[0]
    if not isinstance(value, Range):
        return value
    if value.integer:
        return trial.suggest_int(name, int(value.low), int(value.high), step=int(value.step or 1), log=value.log)
    return trial.suggest_float(name, value.low, value.high, step=value.step, log=value.log)


def run_search(config: SweepConfig) -> dict:
    import optuna

    import cnnedge.train.trainer  # noqa: F401  (torch: imported before the clock starts, as a grid does)

    out = Path(config.out)
    swept, labels = swept_names(config), _labels(config)
    seed = config.seeds[0]
    url, storage = _storage(config)
    study_name = config.study or out.resolve().name
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, study_name=study_name, direction="maximize", load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(n_startup_trials=min(5, config.trials)),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0))
    study.set_user_attr("options", {n: [v.to_json() if isinstance(v, Range) else v for v in vs]
                                    for n, vs in config.options.items()})
    finished_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    columns = ["trial", "number", "status", *swept, *[n for n in config.options if n not in swept], "seed",
               "objective", *RESULT_COLUMNS, "checkpoint", "command"]
    fixed = {n: v[0] for n, v in config.options.items() if n not in swept}
    start = time.perf_counter()
    ran: list[float] = []
    board = Board(config.trials, swept, labels, False, f"TPE search: {config.trials} trials, study {study_name!r} at {url}")

    def study_rows() -> list[dict]:
        rows = []
        for t in study.get_trials(deepcopy=False):
            row = dict(t.user_attrs.get("row") or {})
            if not row:  # started elsewhere and not finished, or failed before a row was made
                row = {"trial": f"trial-{t.number:04d}", **fixed, **t.params, "seed": seed}
            state = {"COMPLETE": "done", "PRUNED": "pruned", "RUNNING": "running", "FAIL": "failed"}.get(t.state.name, t.state.name.lower())
            row.update(number=t.number, status=state, objective=t.value if t.value is not None else row.get("objective"))
            rows.append(row)
        return rows

    def document() -> dict:
        rows = study_rows()
        done = [r for r in rows if r["status"] == "done"]
        best = max(done, key=lambda r: r["objective"], default=None)
        return {"search": "tpe", "study": study_name, "storage": url, "swept": swept, "fixed": fixed, "seeds": [seed],
                "objective": "val_accuracy (last epoch)", "trials": rows, **_timing(start, ran),
                "best": None if best is None else {"trial": best["trial"], "command": best["command"],
                                                     "checkpoint": best.get("checkpoint")}}

    def objective_fn(trial: optuna.Trial) -> float:
        options = {n: _suggest(trial, n, vs, config.train_options[n]) for n, vs in config.options.items()}
        epochs = validate_point(options)["epochs"]
        name = f"trial-{trial.number:04d}"
        job = Trial(config, options, seed, name)
        job.check_folder()
        row = {"trial": name, "number": trial.number, "status": "running", **options, "seed": seed, "epochs": epochs}
        board.update(row)

        def on_epoch(h):
            if h.get("val_accuracy") is None:
                raise CnnedgeError("--search tpe tunes on the validation split, and this run has none: "
                                   "give --val-fraction above 0")
            row.update(epochs_run=h["epoch"], val_accuracy=h["val_accuracy"], val_loss=h["val_loss"])
            board.update(row)
            trial.report(h["val_accuracy"], h["epoch"])
            if h["epoch"] < epochs and trial.should_prune():  # after the last epoch there is nothing to save
                row.update(status="pruned", objective=h["val_accuracy"], command=job.command)
                trial.set_user_attr("row", row)
                raise optuna.TrialPruned()

        started = time.perf_counter()
        try:
            result = job.run(on_epoch)
        except optuna.TrialPruned:
            ran.append(time.perf_counter() - started)
            if config.keep == "best":
                job.checkpoint.unlink(missing_ok=True)
            board.update(row, finished=True)
            raise
        ran.append(result["wall_seconds"])
        result["objective"] = objective(result)
        trial.set_user_attr("row", result)
        board.update({**result, "number": trial.number}, finished=True)
        return result["objective"]

    def after_trial(study_, frozen) -> None:
        doc = document()
        if config.keep == "best":
            local = [r for r in doc["trials"] if (out / "trials" / r["trial"]).is_dir()]
            keep_best_only(local, doc["best"]["trial"] if doc["best"] else None, out)
        write_results(out, doc, columns)
        board.set_total(config.trials, sum(r["status"] in ("done", "pruned") for r in doc["trials"]))

    finished = sum(t.state in finished_states for t in study.get_trials(deepcopy=False))
    board.set_total(config.trials, finished)
    with board:
        try:
            if finished < config.trials:
                study.optimize(objective_fn, n_trials=config.trials - finished, catch=(),
                               callbacks=[optuna.study.MaxTrialsCallback(config.trials, states=finished_states),
                                          after_trial])
        except (CnnedgeError, KeyboardInterrupt) as e:
            if _is_interrupt(e):
                done = sum(t.state in finished_states for t in study.get_trials(deepcopy=False))
                raise _interrupted(e, done, out, "the interrupted trial counts as failed; new ones are sampled") from None
            raise

    doc = document()
    log = {n for n, values in config.options.items() if isinstance(values[0], Range) and values[0].log}
    doc["plots"] = search_plots(doc["trials"], swept, labels, log) if config.plots else {}
    write_results(out, doc, columns)
    written = draw_plots(out, doc["plots"]) if doc["plots"] else []
    _report(board, doc, written, out)
    return doc
