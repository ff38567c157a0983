"""The `cnnedge` command line. Thin glue: arguments are checked first, then each command imports its module,
so `cnnedge predict` never loads torch and a usage error costs what `cnnedge --help` costs.
docs/cli.md is generated from this app (tests/test_cli_docs.py fails when it is stale):
    uv run typer cnnedge.cli utils docs --name cnnedge --title "cnnedge command line reference" --output docs/cli.md"""

from __future__ import annotations

import importlib.util
import inspect as pyinspect
import os
import sys
import typing
from pathlib import Path
from typing import Optional

import typer

from cnnedge import __version__
from cnnedge.choices import (BenchFormat, Device, InfoFormat, Loss, Metric, Optimizer, PredictFormat, Provider,
                             QuantizeOption, Runtime, Schedule, SweepKeep, SweepSearch, WebcamFormat)
from cnnedge.errors import CnnedgeError, ExitCode

app = typer.Typer(
    name="cnnedge",
    help="Train small CNNs, export them to verified ONNX, and run them fast on edge devices.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts say "[default: ...]", which rich markup would swallow
    context_settings={"help_option_names": ["-h", "--help"]},
)
# What each command imports from the cnnedge[train] extra (torch, torchvision, onnx, onnxscript, matplotlib):
# a machine with torch alone (a GPU box's own python3) trains MNIST, which is read without torchvision.
TRAIN_MODULES = {"train": ("torch",), "summary": ("torch",), "inspect": ("torch",),
                 "export": ("torch", "onnx", "onnxscript"), "sweep": ("torch", "torchvision", "matplotlib")}
SHIPPED_MODEL = "[default: the shipped model, cnnedge/infer/model/cnn.onnx in a wheel, export/cnn.onnx in the repo]"
THREADS_HELP = ("CPU threads (torch and onnxruntime) [default: the cores other processes leave free, or "
                "OMP_NUM_THREADS when set].")
RUNTIME_HELP = ("What runs the network: onnxruntime, or opencv (OpenCV DNN, CPU only: for boards without onnxruntime "
                "wheels such as 32-bit ARM) [default: onnxruntime; opencv where onnxruntime is not installed].")


def main() -> None:
    """Console-script entry point: user errors become one line on stderr and a documented exit code."""
    _check_standard_streams()
    stdout = sys.stdout
    sys.stdout = _Stdout(stdout)
    try:
        _main()
    finally:
        sys.stdout = stdout  # for callers in the same process (tests)


def _main() -> None:
    # Click's exception types, wherever this Typer keeps them (its own copy of click, or click itself).
    usage_error = typer.BadParameter.__mro__[1]
    ClickException = usage_error.__mro__[1]
    NoArgsIsHelpError = getattr(sys.modules[usage_error.__module__], "NoArgsIsHelpError", ())
    try:
        code = app(prog_name="cnnedge", standalone_mode=False)
        sys.stdout.flush()  # here, not at exit, so that a full disk behind stdout is reported like any error
    except NoArgsIsHelpError as e:  # `cnnedge` alone: the help, as a usage error
        print(e.ctx.get_help() if e.ctx else e.format_message(), file=sys.stderr)
        code = ExitCode.USAGE
    except ClickException as e:  # a bad option or value: one line, not a usage block
        ctx = getattr(e, "ctx", None)
        command = f" {ctx.command.name}" if ctx is not None and ctx.parent is not None else ""
        message = e.format_message().replace("Value error, ", "")  # pydantic's prefix on a wrong choice
        _fail(f"{' '.join(message.split())} (see `cnnedge{command} --help`)", ExitCode.USAGE)
    except CnnedgeError as e:
        _fail(str(e), e.code)
    except (KeyboardInterrupt, typer.Abort):
        _fail("interrupted", ExitCode.INTERRUPTED)
    except BrokenPipeError:  # `| head`: the reader has gone; nothing to say to it
        _broken_pipe()
    except Exception as e:  # a bug: still no traceback unless asked for
        if os.environ.get("CNNEDGE_DEBUG", "") not in ("", "0"):
            raise
        _fail(f"internal error: {type(e).__name__}: {' '.join(str(e).split())} "
              f"(rerun with CNNEDGE_DEBUG=1 for the traceback)", ExitCode.INTERNAL)
    sys.exit(int(code or 0))


def _fail(message: str, code: int) -> None:
    if os.environ.get("RANK", "0") == "0" and sys.stderr is not None:  # under torchrun, rank 0 alone speaks
        if not message.isprintable():  # a file name with ESC or a newline in it: shown escaped, on one line
            from cnnedge.infer.files import printable

            message = printable(message)
        try:
            print(f"error: {' '.join(message.split())}", file=sys.stderr)
        except OSError:  # stderr itself is gone: the exit code still says it
            pass
    sys.exit(code)


def _check_standard_streams() -> None:
    """`cnnedge ... >&-` starts without file descriptor 1: the next file opened would get it, and the results
    would be written into that file (a model, a checkpoint). Refuse before opening anything. A closed stdin or
    stderr is put on /dev/null for the same reason (native libraries write their logs to fd 2)."""
    closed = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: this one
            closed.append(fd)
    if 1 in closed or sys.stdout is None:
        _fail("standard output is closed; redirect it to a file or to /dev/null", ExitCode.USAGE)


class _Stdout:
    """sys.stdout, with its write errors made reportable. A full disk or /dev/full behind it becomes a one-line
    error (an OSError from anywhere else is a file cnnedge writes, or a bug). A broken pipe stays a
    BrokenPipeError but without an errno: click turns an EPIPE OSError into exit code 1, which cnnedge
    reserves for "some inputs failed"; main exits 141 instead, as a shell reports a reader that left."""

    def __init__(self, stream):
        self._stream = stream

    def _call(self, method: str, *args):
        try:
            return getattr(self._stream, method)(*args)
        except BrokenPipeError:
            raise BrokenPipeError("standard output's reader has gone") from None
        except OSError as e:
            _discard_stdout()
            raise CnnedgeError(f"cannot write to standard output: {e.strerror or e}") from None

    def write(self, text: str) -> int:
        return self._call("write", text)

    def flush(self) -> None:
        self._call("flush")

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _discard_stdout() -> None:
    # Python would try to flush stdout again at exit and complain: point it at /dev/null first.
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    except OSError:
        pass


def _broken_pipe() -> None:
    _discard_stdout()
    sys.exit(ExitCode.BROKEN_PIPE)


def needs_torch(command: str, *also: str) -> None:
    """Commands that train or export need the cnnedge[train] extra; say so in one line before importing it."""
    missing = [m for m in (*TRAIN_MODULES[command], *also) if importlib.util.find_spec(m) is None]
    if missing:
        raise CnnedgeError(f"`cnnedge {command}` needs {', '.join(missing)}, which this install lacks: "
                           f'pip install "cnnedge[train]"')


def _version(value: bool) -> None:
    if value:
        print(f"cnnedge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Train small CNNs, export them to verified ONNX, and run them fast on edge devices."""


def command(**kwargs):
    """@app.command with the docstring's first line as the summary `cnnedge --help` shows in full."""
    def decorate(fn):
        return app.command(short_help=(fn.__doc__ or "").strip().splitlines()[0], **kwargs)(fn)
    return decorate


# ----------------------------------------------------------------------------------------------- train


# What an interrupted run was started with: `--resume` continues it as it was, so these cannot change.
RESUME_FIXED = ("arch", "dataset", "epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "schedule",
                "loss", "label_smoothing", "augment", "seed", "val_fraction", "limit", "from_checkpoint",
                "freeze_backbone", "plots")


@command()
def train(
    ctx: typer.Context,
    arch: str = typer.Option("edgenet", help="Architecture from `cnnedge summary`."),
    dataset: str = typer.Option("mnist", help="mnist, qmnist, fashion-mnist, kmnist, or imagefolder:PATH."),
    data_dir: Optional[Path] = typer.Option(None, help="Dataset root [default: $CNNEDGE_DATA, else ~/.cache/cnnedge]."),
    epochs: Optional[int] = typer.Option(None, help="Epochs [default: the architecture's recipe]."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size [default: recipe]."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (peak for one-cycle) [default: recipe]."),
    optimizer: Optional[Optimizer] = typer.Option(None, help="Optimizer [default: recipe]."),
    momentum: Optional[float] = typer.Option(None, help="Momentum for sgd and rmsprop [default: recipe]."),
    weight_decay: Optional[float] = typer.Option(None, help="Weight decay [default: recipe]."),
    schedule: Optional[Schedule] = typer.Option(None, help="Learning-rate schedule [default: recipe]."),
    loss: Optional[Loss] = typer.Option(None, help="Loss [default: recipe]."),
    label_smoothing: Optional[float] = typer.Option(None, help="Label smoothing for cross-entropy [default: recipe]."),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment", help="Random affine and stroke width [default: recipe]."),
    device: Device = typer.Option("auto", help="Where to train: auto picks cuda, then mps, then cpu."),
    seed: int = typer.Option(0, help="Seed: the same seed and --threads on CPU give the same metrics."),
    val_fraction: Optional[float] = typer.Option(None, help="Fraction of the training set held out for validation [default: 0.05; 0 with --from when the dataset has a test split]."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N training images (quick checks)."),
    out: Path = typer.Option(Path("models/cnn.pt"), help="Checkpoint to write when training ends (with .metrics.json and plots beside it); completed epochs go to <stem>.partial.pt until then."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run of --out (from <stem>.partial.pt), with the options it was started with."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --out, its metrics and plots (without it they are refused, as by export)."),
    download: bool = typer.Option(False, "--download", help="Download the dataset if missing (needs internet)."),
    from_checkpoint: Optional[Path] = typer.Option(None, "--from", help="Fine-tune this checkpoint: new head for the dataset's classes; unset options come from the fine-tuning recipe (docs/training.md)."),
    freeze_backbone: bool = typer.Option(False, "--freeze-backbone", help="With --from: train only the new head."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write PNG plots of the curves and confusion matrix."),
    threads: Optional[int] = typer.Option(None, min=1, help=THREADS_HELP),
) -> None:
    """Train a network and write a checkpoint, its metrics JSON and plots."""
    torchvision = download or not (dataset == "mnist" or dataset.startswith("imagefolder:"))  # MNIST: numpy reads it
    needs_torch("train", *(["matplotlib"] if plots else []), *(["torchvision"] if torchvision else []))
    from cnnedge.train.options import check_hparams, check_outputs, check_run, check_train  # torch-free: fails fast

    hparams = dict(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, momentum=momentum,
                   weight_decay=weight_decay, schedule=schedule, loss=loss, label_smoothing=label_smoothing,
                   augment=augment)
    check_hparams({k: v for k, v in hparams.items() if v is not None})
    check_run(limit, seed, val_fraction)
    if resume:
        given = [next(p.opts[0] for p in ctx.command.params if p.name == name) for name in RESUME_FIXED
                 if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"]
        if given:
            raise CnnedgeError(f"--resume continues the interrupted run with the options it was started with: "
                               f"{', '.join(given)} cannot change (train into a new --out to change them)")
    else:
        check_outputs(out, force)
    check_train(arch, dataset, str(data_dir) if data_dir else None, download, str(out), resume,
                str(from_checkpoint) if from_checkpoint else None, freeze_backbone)
    from cnnedge.train.trainer import TrainConfig, run

    run(TrainConfig(arch=arch, dataset=dataset, data_dir=str(data_dir) if data_dir else None, out=str(out),
                    device=device, seed=seed, val_fraction=val_fraction, limit=limit, download=download, resume=resume,
                    from_checkpoint=str(from_checkpoint) if from_checkpoint else None,
                    freeze_backbone=freeze_backbone, plots=plots, hparams=hparams, force=force, threads=threads))


# ----------------------------------------------------------------------------------------------- sweep

# The sweep sets these itself for each trial; every other train option takes one or more values there.
NOT_SWEPT = ("ctx", "out", "resume", "download", "plots", "seed", "force")


def _sweepable():
    """train's parameters that sweep takes, with each one's option declaration and help."""
    for p in pyinspect.signature(train).parameters.values():
        if p.name not in NOT_SWEPT:
            decls = p.default.param_decls
            yield p, (decls[0] if decls else "--" + p.name.replace("_", "-"))


def with_train_options(fn):
    """Give `fn` (which takes **train_options) every sweepable train option as a list-valued option of
    its own, with train's flag and help: one definition of each option, and a new train option is
    sweepable the moment it exists."""
    params = [p for p in pyinspect.signature(fn).parameters.values() if p.kind is not p.VAR_KEYWORD]
    for p, flag in _sweepable():
        is_flag = "/" in flag or p.annotation == "bool"  # --augment/--no-augment, --freeze-backbone
        option = typer.Option(None, flag.split("/")[0], metavar="VALUES",
                              help=p.default.help + (" Values: true, false." if is_flag else ""))
        params.append(pyinspect.Parameter(p.name, pyinspect.Parameter.KEYWORD_ONLY, default=option,
                                          annotation=Optional[list[str]]))
    fn.__signature__ = pyinspect.Signature(params)
    return fn


@command()
@with_train_options
def sweep(
    out: Path = typer.Option(..., help="Folder for the trials, sweep.json, sweep.csv and the plots; rerun the same command to continue."),
    seeds: str = typer.Option("0", help="Train every point once per seed (0,1,2 or 0..4): the spread shows in the tables and plots."),
    search: SweepSearch = typer.Option("grid", help="grid: every combination of the values; tpe: Optuna's TPE sampler over the values and ranges, pruning trials whose validation accuracy lags."),
    trials: Optional[int] = typer.Option(None, help="With --search tpe: trials in the study in all, over every process that shares it."),
    storage: Optional[str] = typer.Option(None, help="With --search tpe: Optuna storage URL that several processes or machines share, e.g. sqlite:///runs/study.db or postgresql://user@host/db [default: study.db in --out]."),
    study: Optional[str] = typer.Option(None, help="With --search tpe: study name in the storage [default: the --out folder's name]."),
    keep: SweepKeep = typer.Option("all", help="Checkpoints to keep: every trial's, or the best one's (the metrics of all stay)."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write the sweep's PNG plots."),
    trial_plots: bool = typer.Option(False, "--trial-plots/--no-trial-plots", help="Each trial writes its own training plots too (about 1 s more per trial)."),
    **train_options,
) -> None:
    """Train over a grid or a search of train options; tables and plots.

    A live table, sweep.json/.csv, plots and the best trial.

    Every train option takes one or more values, repeated or comma-separated (--epochs 1,2,4 --epochs 8),
    and numeric ones ranges: LOW..HIGH[:STEP] (--batch-size 500..10000:500; a grid steps through it) or
    LOW..HIGH:log (--lr 1e-4..0.1:log, for --search tpe)."""
    from cnnedge.train.sweep import SweepConfig, TrainOption, check, parse_seeds, parse_values  # torch-free

    hints = typing.get_type_hints(train)
    known = {p.name: TrainOption(p.name, flag, hints[p.name]) for p, flag in _sweepable()}
    options = {name: parse_values(known[name], values) for name, values in train_options.items() if values}
    config = SweepConfig(out=str(out), options=options, train_options={n: known[n] for n in options},
                         seeds=parse_seeds(seeds), keep=keep, search=search, trials=trials, storage=storage,
                         study=study, plots=plots, trial_plots=trial_plots)
    check(config)
    needs_torch("sweep")
    if search == "tpe" and importlib.util.find_spec("optuna") is None:
        raise CnnedgeError('`cnnedge sweep --search tpe` needs optuna, which this install lacks: pip install "cnnedge[train]"')
    from cnnedge.train.sweep import run as run_sweep

    run_sweep(config)


# --------------------------------------------------------------------------------------------- summary


@command()
def summary(
    arch: Optional[str] = typer.Option(None, help="Print this architecture's layer table."),
    num_classes: int = typer.Option(10, help="Classes of the head (tables are documented for 10)."),
) -> None:
    """List the model zoo, or check an architecture against its table.

    With --arch: the real module's layers against the architecture's documented table."""
    needs_torch("summary")
    from cnnedge.train.zoo import get_arch, print_summary  # the registry is torch-free

    if arch is not None:
        get_arch(arch)

    print_summary(arch, num_classes)


# ---------------------------------------------------------------------------------------------- export


@command()
def export(
    checkpoint: Path = typer.Argument(..., help="A cnnedge checkpoint (.pt), e.g. models/cnn.pt."),
    out: Optional[Path] = typer.Option(None, help="ONNX file to write [default: export/<checkpoint stem>.onnx]; the report goes beside it as .json."),
    opset: int = typer.Option(18, help="ONNX opset: 17 up to the newest the installed onnxruntime runs (26 for onnxruntime 1.31)."),
    quantize: Optional[list[QuantizeOption]] = typer.Option(None, help="Also write this variant beside --out (cnn.fp16.onnx, cnn.int8.onnx); repeat for both. The fp32 model is always written."),
    calibration_images: int = typer.Option(1000, help="Training images that calibrate --quantize int8."),
    data_dir: Optional[Path] = typer.Option(None, help="Dataset root for parity and accuracy [default: $CNNEDGE_DATA, else ~/.cache/cnnedge]."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
    threads: Optional[int] = typer.Option(None, min=1, help=THREADS_HELP),
) -> None:
    """Export a checkpoint to verified ONNX with embedded metadata.

    Verified layer by layer and against PyTorch (onnxruntime and OpenCV DNN), with the preprocessing, labels
    and accuracy embedded as metadata; --quantize adds fp16 and int8 variants."""
    needs_torch("export")
    from cnnedge.train.options import ExportConfig, check_export  # torch-free: refusals before torch's start-up

    config = ExportConfig(checkpoint=str(checkpoint), out=str(out) if out else None, opset=opset,
                          quantize=tuple(q.value for q in quantize or ()), calibration_images=calibration_images,
                          data_dir=str(data_dir) if data_dir else None, force=force, threads=threads)
    check_export(config)
    from cnnedge.train.export import run

    run(config)


# --------------------------------------------------------------------------------------------- inspect


@command()
def inspect(
    checkpoint: Path = typer.Argument(..., help="A cnnedge checkpoint (.pt)."),
    image: Optional[Path] = typer.Option(None, help="Also show the filters applied to this image."),
    layer: Optional[str] = typer.Option(None, help="Conv layer to show [default: the first]."),
    out: Optional[Path] = typer.Option(None, help="Folder for the PNGs [default: <checkpoint stem>_inspect beside it]."),
) -> None:
    """Draw a conv layer's filters and what they do to an image (PNGs).

    The filters as a PNG grid, and with --image their outputs, cv2.filter2D against the network's own."""
    needs_torch("inspect")
    from cnnedge.train.checkpoint import check_checkpoint_file  # torch-free: refusals before torch's start-up

    check_checkpoint_file(checkpoint)
    from cnnedge.errors import ImageError
    from cnnedge.infer.files import printable, read_image

    if image is not None:
        try:
            read_image(image)
        except ImageError as e:
            raise CnnedgeError(f"{printable(str(image))}: {e}") from None
    from cnnedge.report import console
    from cnnedge.train.inspect import inspect as run_inspect

    written, difference = run_inspect(checkpoint, image, layer, out)
    if difference is not None:
        console.print(f"cv2.filter2D reproduces the network's layer output to within {difference:.1e}")
    for path in written:
        console.print(f"wrote {printable(str(path))}", markup=False)


# ---------------------------------------------------------------------------------------------- pixels


@command()
def pixels(
    image: Path = typer.Argument(..., help="An image file; the model's own preprocessing turns it into the network input."),
    out: Optional[Path] = typer.Option(None, help="PNG to write [default: <image stem>.pixels.png in the current folder]."),
    model: Optional[Path] = typer.Option(None, help=f"ONNX model whose preprocessing and prediction to show {SHIPPED_MODEL}."),
    cell: int = typer.Option(34, min=16, max=96, help="Picture pixels per input pixel."),
) -> None:
    """Draw an image's network input, each pixel's value written in it.

    A large grid of the 28x28 input the model's preprocessing makes (no PyTorch)."""
    from cnnedge.infer.pixels import run as run_pixels
    from cnnedge.report import console

    path, prediction = run_pixels(str(image), str(out) if out else None, str(model) if model else None, cell)
    console.print(f"wrote {path} (the model says {prediction})", markup=False, soft_wrap=True)


# --------------------------------------------------------------------------------------------- predict


@command()
def predict(
    inputs: list[str] = typer.Argument(..., help="Image files, folders (with their class subfolders) or glob patterns."),
    model: Optional[Path] = typer.Option(None, help=f"ONNX model from `cnnedge export`; labels, input size, normalization and preprocessing come from its metadata {SHIPPED_MODEL}."),
    provider: Provider = typer.Option("auto", help="onnxruntime execution provider; auto: CUDA when it really loads, else CPU."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Descend into folders at any depth (default: a folder and its immediate subfolders)."),
    batch_size: int = typer.Option(256, min=1, help="Images per inference batch."),
    topk: int = typer.Option(3, "--topk", min=1, help="Most probable classes to show per image."),
    output_format: PredictFormat = typer.Option("table", "--format", help="Output; json and csv go to stdout."),
    save_crops: Optional[Path] = typer.Option(None, help="Write each 28x28 network input as a PNG into this folder (debugging)."),
    workers: Optional[int] = typer.Option(None, min=1, help="Threads that decode and preprocess [default: CPU count, at most 8]."),
    gallery: Optional[Path] = typer.Option(None, help="Classes from `cnnedge enroll` instead of the model's: the nearest class prototype wins."),
    metric: Optional[Metric] = typer.Option(None, help="With --gallery: cosine, or ssd (sum of squared differences) [default: the gallery's]."),
    runtime: Optional[Runtime] = typer.Option(None, help=RUNTIME_HELP),
    threads: Optional[int] = typer.Option(None, min=1, help="onnxruntime (or OpenCV) threads that run the network [default: the cores other processes leave free, or OMP_NUM_THREADS when set]."),
    grid: Optional[Path] = typer.Option(None, help="Also draw the 28x28 network inputs with their predictions into this PNG, red where a class folder says a prediction is wrong (the first 400 images)."),
    summary_only: bool = typer.Option(False, "--summary", help="No line per image: the table format prints the accuracy tables and the summary line, json leaves out \"results\" (not with csv)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="The table format prints the summary line alone; no progress bar or \"wrote\" notes on stderr (json and csv are unchanged). Warnings and errors still print."),
) -> None:
    """Classify images (no PyTorch): a table, JSON or CSV, and accuracy.

    onnxruntime or OpenCV DNN; inputs in class folders (samples/3/x.png) get accuracy and a confusion matrix."""
    if summary_only and output_format == "csv":
        raise CnnedgeError("--summary: csv has one row per image and no summary; use --format table or json")
    from cnnedge.infer.predict import run as run_predict

    code = run_predict(inputs, model=str(model) if model else None, provider=provider, recursive=recursive,
                       batch_size=batch_size, topk=topk, fmt=output_format,
                       save_crops=str(save_crops) if save_crops else None, workers=workers,
                       gallery=str(gallery) if gallery else None, metric=metric, runtime=runtime,
                       grid=str(grid) if grid else None, threads=threads, summary_only=summary_only, quiet=quiet)
    if code:
        raise typer.Exit(code)


# ---------------------------------------------------------------------------------------------- enroll


@command()
def enroll(
    folder: Path = typer.Argument(..., help="A folder with one subfolder of images per new class (a few images each)."),
    out: Path = typer.Option(..., help="Gallery file to write, e.g. export/greek.gallery.npz."),
    model: Optional[Path] = typer.Option(None, help=f"ONNX model whose embedding output describes the images; predict --gallery must use the same {SHIPPED_MODEL}."),
    provider: Provider = typer.Option("auto", help="onnxruntime execution provider; auto: CUDA when it really loads, else CPU."),
    batch_size: int = typer.Option(256, min=1, help="Images per inference batch."),
    workers: Optional[int] = typer.Option(None, min=1, help="Threads that decode and preprocess [default: CPU count, at most 8]."),
    runtime: Optional[Runtime] = typer.Option(None, help=RUNTIME_HELP),
) -> None:
    """Add new classes without training (no PyTorch): a gallery file.

    The gallery stores the images' embeddings and class prototypes, for predict and serve --gallery."""
    from cnnedge.infer.enroll import run as run_enroll

    code = run_enroll(folder, out, model=str(model) if model else None, provider=provider, batch_size=batch_size,
                      workers=workers, runtime=runtime)
    if code:
        raise typer.Exit(code)


# ---------------------------------------------------------------------------------------------- webcam


@command()
def webcam(
    source: str = typer.Option("0", help="Camera index, video file or stream URL (anything cv2.VideoCapture opens)."),
    model: Optional[Path] = typer.Option(None, help=f"ONNX model from `cnnedge export` (preprocessing and labels from its metadata) {SHIPPED_MODEL}."),
    provider: Provider = typer.Option("cpu", help="onnxruntime execution provider. One frame at a time, a small network runs in about 0.1 ms on the CPU."),
    roi: Optional[str] = typer.Option(None, help="Region to search: x,y,w,h in pixels, or full. Default: a centred square, 60% of the short side."),
    smooth: int = typer.Option(5, min=1, help="Average the probabilities of the last K frames (1: no smoothing)."),
    min_confidence: float = typer.Option(0.5, min=0.0, max=1.0, help="Below this smoothed confidence the label is shown as unsure (null in JSON)."),
    window: Optional[bool] = typer.Option(None, "--window/--no-window", help="OpenCV window, or a terminal panel. Default: a window when a display is present."),
    output_format: WebcamFormat = typer.Option("live", "--format", help="live (window or terminal panel) or json (one line per frame on stdout, then a summary)."),
    max_frames: Optional[int] = typer.Option(None, min=1, help="Stop after N processed frames."),
    save: Optional[Path] = typer.Option(None, help="Write the annotated video here (.mp4, .m4v, .mov, .mkv or .avi)."),
    work_size: int = typer.Option(128, min=28, help="Analyse the ROI at most this many pixels on its long side (raise it for small digits with --roi full)."),
    runtime: Optional[Runtime] = typer.Option(None, help=RUNTIME_HELP),
) -> None:
    """Recognise digits live on a camera, video file or stream.

    An overlay window, a terminal panel or JSON lines (no PyTorch)."""
    from cnnedge.infer.webcam import run as run_webcam

    code = run_webcam(source, model=str(model) if model else None, provider=provider, roi=roi, smooth=smooth,
                      min_confidence=min_confidence, window=window, fmt=output_format, max_frames=max_frames,
                      save=str(save) if save else None, work_size=work_size, runtime=runtime)
    if code:
        raise typer.Exit(code)


# ------------------------------------------------------------------------------------------------ info


@command()
def info(
    model: Optional[Path] = typer.Argument(None, help=f"An ONNX model from `cnnedge export` {SHIPPED_MODEL}."),
    output_format: InfoFormat = typer.Option("table", "--format", help="Output; json goes to stdout."),
) -> None:
    """Show what a model is, from its metadata (no PyTorch).

    Classes, input, preprocessing, precision, accuracy and sha256 of an exported model."""
    from cnnedge.infer.info import run as run_info

    run_info(str(model) if model else None, output_format)


# ----------------------------------------------------------------------------------------------- serve


@command()
def serve(
    model: Optional[Path] = typer.Option(None, help=f"ONNX model from `cnnedge export` {SHIPPED_MODEL}."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; 0.0.0.0 or :: for every network (then set --token)."),
    port: int = typer.Option(8000, help="Port to listen on (0: any free port, printed at start)."),
    workers: int = typer.Option(1, min=1, help="Worker processes; one per core serves on all cores (a supervisor restarts any that dies)."),
    provider: Provider = typer.Option("auto", help="onnxruntime execution provider; auto: CUDA when it really loads, else CPU."),
    token: Optional[str] = typer.Option(None, envvar="CNNEDGE_TOKEN", show_envvar=True, help="Require `Authorization: Bearer TOKEN` on every route but /healthz (the environment variable keeps it out of `ps`)."),
    gallery: Optional[list[str]] = typer.Option(None, metavar="[NAME=]FILE", help="[NAME=]FILE from `cnnedge enroll`, repeatable: requests with ?gallery=NAME get its classes [NAME: the file name without .gallery.npz]."),
    metric: Optional[Metric] = typer.Option(None, help="With --gallery: cosine or ssd [default: each gallery's]."),
    max_body: str = typer.Option("16MB", metavar="SIZE", help="Largest request body (bytes, or with KB, MB, GB); larger ones get 413."),
    max_batch: int = typer.Option(32, min=1, help="Dynamic batching: images per onnxruntime call at most (1: no batching)."),
    batch_wait_ms: float = typer.Option(2.0, min=0.0, max=10_000.0, help="Dynamic batching: how long a request waits for others to share its batch."),
    threads: Optional[int] = typer.Option(None, min=1, help="Preprocessing and onnxruntime threads per worker [default: CPU count / workers]."),
    runtime: Optional[Runtime] = typer.Option(None, help=RUNTIME_HELP),
) -> None:
    """Serve a model over HTTP (no PyTorch), with a draw-a-digit page.

    A JSON API with dynamic batching, /metrics, and a page to draw digits on."""
    from cnnedge.infer.serve import ServeConfig, parse_galleries, parse_size

    config = ServeConfig(model=str(model) if model else None, host=host, port=port, workers=workers,
                         max_body=parse_size(max_body, "--max-body"), max_batch=max_batch,
                         batch_wait_ms=batch_wait_ms, galleries=parse_galleries(gallery or []), threads=threads,
                         predictor={"provider": provider, "runtime": runtime, **({"metric": metric} if metric else {})})
    if metric and not config.galleries:
        raise CnnedgeError("--metric needs --gallery (a file from `cnnedge enroll`)")
    from cnnedge.infer.serve import run as run_serve

    run_serve(config, token)


# ----------------------------------------------------------------------------------------------- bench


@command()
def bench(
    model: Optional[Path] = typer.Option(None, help=f"fp32 ONNX model; its variants beside it (cnn.fp16.onnx, cnn.int8.onnx) get rows too {SHIPPED_MODEL}."),
    checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint for the PyTorch eager rows [default: models/cnn.pt when present; none without torch]."),
    batch_sizes: str = typer.Option("1,64,256", help="Comma-separated batch sizes."),
    providers: str = typer.Option("auto", help="Comma-separated cpu, cuda, tensorrt; auto: cpu, and cuda where it really loads."),
    runtimes: Optional[str] = typer.Option(None, help="Comma-separated onnxruntime, opencv (OpenCV DNN, CPU only) [default: every installed one]."),
    threads: Optional[int] = typer.Option(None, min=1, help="onnxruntime intra-op, OpenCV and torch threads [default: the cores other processes leave free, or OMP_NUM_THREADS when set]."),
    warmup: int = typer.Option(10, min=0, help="Untimed calls before each measurement."),
    repeat: int = typer.Option(30, min=1, help="At least this many timed calls per row (and 3 runs of the file benchmarks)."),
    min_time: float = typer.Option(1.0, min=0.0, help="And at least this many seconds per row."),
    images: int = typer.Option(2000, min=0, help="28x28 images for the preprocessing and end-to-end runs (0: skip)."),
    photos: int = typer.Option(100, min=0, help="Generated 640x480 photos for the preprocessing and end-to-end runs (0: skip)."),
    test_images: Optional[int] = typer.Option(None, min=1, help="Accuracy on the first N test images [default: all]."),
    data_dir: Optional[Path] = typer.Option(None, help="Dataset root with the test set [default: $CNNEDGE_DATA, else ~/.cache/cnnedge]."),
    output_format: BenchFormat = typer.Option("table", "--format", help="Output (to stdout)."),
) -> None:
    """Measure latency, throughput, accuracy and size of each runtime.

    PyTorch eager vs onnxruntime and OpenCV DNN, fp32/fp16/int8; preprocessing and end to end too."""
    from cnnedge.bench import BenchConfig, main as run_bench, parse_batch_sizes, parse_providers, parse_runtimes

    config = BenchConfig(model=str(model) if model else None, checkpoint=str(checkpoint) if checkpoint else None,
                         batch_sizes=parse_batch_sizes(batch_sizes), providers=parse_providers(providers),
                         runtimes=parse_runtimes(runtimes) if runtimes else None, threads=threads,
                         warmup=warmup, repeat=repeat, min_time=min_time, images=images, photos=photos,
                         test_images=test_images, data_dir=str(data_dir) if data_dir else None)
    run_bench(config, output_format)
