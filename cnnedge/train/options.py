"""What the training commands accept, torch-free: `cnnedge train`, `export`, `inspect` and `summary` check the
options they were given, the files they would read and the outputs they would replace here before they import
PyTorch (seconds of start-up), so that a usage error or a refusal costs what `cnnedge --help` costs. The modules
that do the work call the same functions (the trainer on the resolved recipe, and a resumed checkpoint's), so a
Python caller meets the same rules. Impossible values are a one-line CnnedgeError; dubious ones come back as
warnings."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from cnnedge.atomic import check_writable
from cnnedge.choices import LOSSES, OPTIMIZERS, QUANTIZATIONS, SCHEDULES
from cnnedge.errors import CnnedgeError
from cnnedge.train.checkpoint import check_checkpoint_file
from cnnedge.train.zoo import get_arch

MAX_SEED = 2**32 - 1  # the epoch seeds derived from it must fit torch's 64-bit generator seeds
NATIVE_OPSET = 18  # export's opset, which torch's dynamo exporter emits itself; any other is converted from it
# name -> (torchvision class, preprocessing mode that maps user images into its domain)
DATASETS = {
    "mnist": ("MNIST", "digit"),
    "qmnist": ("QMNIST", "digit"),
    "fashion-mnist": ("FashionMNIST", "fit"),
    "kmnist": ("KMNIST", "digit"),
}
IMAGEFOLDER_PREFIX = "imagefolder:"
# MNIST's idx files in torchvision's raw layout, read with numpy (cnnedge.train.data.read_mnist_idx)
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_hparams(hp: dict) -> list[str]:
    """Refuse impossible hyperparameters (of those present in `hp`); return warnings for dubious ones."""
    def bad(flag: str, why: str) -> CnnedgeError:
        return CnnedgeError(f"--{flag} {hp[flag.replace('-', '_')]!r}: {why}")

    for key, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("loss", LOSSES)):
        if key in hp and hp[key] not in choices:
            raise CnnedgeError(f"unknown {key} {hp[key]!r}; choose one of: {', '.join(choices)}")
    for key in ("epochs", "batch_size"):
        if key in hp and not (_integer(hp[key]) and hp[key] >= 1):
            raise bad(key.replace("_", "-"), "must be a whole number of at least 1")
    if "lr" in hp and not (_number(hp["lr"]) and hp["lr"] > 0):
        raise bad("lr", "the learning rate must be a finite number above 0")
    if "momentum" in hp and not (_number(hp["momentum"]) and 0 <= hp["momentum"] < 1):
        raise bad("momentum", "must be at least 0 and below 1 (1 and above never settle)")
    if "weight_decay" in hp and not (_number(hp["weight_decay"]) and hp["weight_decay"] >= 0):
        raise bad("weight-decay", "must be a finite number of at least 0")
    if "label_smoothing" in hp and not (_number(hp["label_smoothing"]) and 0 <= hp["label_smoothing"] < 1):
        raise bad("label-smoothing", "must be at least 0 and below 1 (1 would make every target uniform)")
    if "augment" in hp and not isinstance(hp["augment"], bool):
        raise bad("augment", "must be true or false")
    if "backbone_lr_scale" in hp and not (_number(hp["backbone_lr_scale"]) and hp["backbone_lr_scale"] >= 0):
        raise CnnedgeError(f"backbone_lr_scale {hp['backbone_lr_scale']!r} must be a finite number of at least 0")
    warnings = []
    if "lr" in hp and hp["lr"] > (1.0 if hp.get("optimizer") in (None, "sgd") else 0.1):
        warnings.append(f"--lr {hp['lr']:g} is very high for {hp.get('optimizer') or 'this optimizer'}: "
                        "training is likely to diverge")
    if hp.get("weight_decay", 0) > 0.1:
        warnings.append(f"--weight-decay {hp['weight_decay']:g} is very high: the weights will shrink towards 0")
    if hp.get("label_smoothing", 0) > 0.5:
        warnings.append(f"--label-smoothing {hp['label_smoothing']:g} leaves the true class less than half the target")
    return warnings


def check_run(limit, seed, val_fraction) -> None:
    """--limit, --seed and --val-fraction."""
    if limit is not None and not (_integer(limit) and limit >= 1):
        raise CnnedgeError(f"--limit {limit!r}: must be a whole number of at least 1 (the first N training images)")
    if not (_integer(seed) and 0 <= seed <= MAX_SEED):
        raise CnnedgeError(f"--seed {seed!r}: must be a whole number from 0 to {MAX_SEED:,}")
    if val_fraction is not None and not (_number(val_fraction) and 0 <= val_fraction < 1):
        raise CnnedgeError(f"--val-fraction must be at least 0 and below 1, not {val_fraction}")


# ------------------------------------------------------------------------------------------ outputs


def partial_path(out: str | os.PathLike) -> Path:
    """Where the completed epochs of a run in progress are checkpointed (what --resume continues)."""
    out = Path(out)
    return out.with_name(out.stem + ".partial.pt")


def output_paths(out: str | os.PathLike) -> list[Path]:
    """The files a finished run writes: its metrics and plots, then the checkpoint, last."""
    out = Path(out)
    return [out.with_name(out.stem + suffix) for suffix in (".metrics.json", ".curves.png", ".confusion.png",
                                                             ".samples.png", ".predictions.png")] + [out]


def check_outputs(out: str | os.PathLike, force: bool) -> None:
    """A new run replaces nothing without --force, as export: not a model (the default --out is the shipped
    one), nor its metrics or plots, nor an unfinished run that --resume could continue."""
    partial = partial_path(out)
    if os.path.lexists(partial) and not force:
        raise CnnedgeError(f"{partial} holds an unfinished run of {out} (interrupted, or still training): "
                           f"continue it with `cnnedge train --out {out} --resume`, or pass --force to start again")
    existing = [p for p in output_paths(out) if os.path.lexists(p)]
    if existing and not force:
        raise CnnedgeError(f"{existing[-1]} already exists; pass --force to overwrite it (or train into another --out)")
    check_writable(out)


def resume_source(out: str | os.PathLike) -> Path:
    """The file `--resume` continues: <stem>.partial.pt, or --out itself (a run in progress kept by an older
    cnnedge)."""
    partial = partial_path(out)
    source = partial if os.path.lexists(partial) else Path(out)
    if not os.path.lexists(source):
        raise CnnedgeError(f"--resume: no interrupted run of {out} ({partial} does not exist); train without --resume")
    return source


def check_train(arch: str, dataset: str, data_dir: str | None, download: bool, out: str, resume: bool,
                from_checkpoint: str | None, freeze_backbone: bool) -> None:
    """The architecture, the files a run reads (the run to resume, the checkpoint to fine-tune, the dataset)."""
    if resume:
        check_checkpoint_file(resume_source(out))
        return  # the rest comes from the interrupted run
    if freeze_backbone and not from_checkpoint:
        raise CnnedgeError("--freeze-backbone needs --from: there is no pretrained backbone to freeze")
    if from_checkpoint:
        check_checkpoint_file(from_checkpoint)  # its architecture is the one trained
    else:
        get_arch(arch)
    dataset_root(dataset, data_dir, download)


# ----------------------------------------------------------------------------------------------- data


def dataset_root(dataset: str, data_dir: str | os.PathLike | None = None, download: bool = False) -> Path:
    """The folder a dataset is read from: an ImageFolder tree, or the root of torchvision's layout (MNIST's
    files are checked here; torchvision checks the other datasets' when it reads them)."""
    if dataset.startswith(IMAGEFOLDER_PREFIX):
        path = Path(dataset[len(IMAGEFOLDER_PREFIX):]).expanduser()
        try:
            if not path.is_dir():
                raise CnnedgeError(f"imagefolder {path}: not a directory")
        except OSError as e:  # an unreadable folder
            raise CnnedgeError(f"imagefolder {path}: {e.strerror or e}") from None
        return path
    if dataset not in DATASETS:
        choices = ", ".join([*DATASETS, "imagefolder:PATH"])
        raise CnnedgeError(f"unknown dataset {dataset!r}; choose one of: {choices}")
    from cnnedge.infer.files import resolve_data_dir  # (OpenCV and numpy: only for the dataset)

    root = resolve_data_dir(data_dir)
    raw = root / DATASETS[dataset][0] / "raw"
    if dataset == "mnist" and not download and not all((raw / name).is_file() for name in MNIST_FILES):
        raise CnnedgeError(f"mnist not found: expected {', '.join(MNIST_FILES)} in {raw} "
                           "(set --data-dir or CNNEDGE_DATA, or pass --download when online)")
    return root


# --------------------------------------------------------------------------------------------- export


@dataclass
class ExportConfig:
    checkpoint: str
    out: str | None = None  # default: export/<checkpoint stem>.onnx
    opset: int = NATIVE_OPSET
    quantize: tuple[str, ...] = ()  # any of fp16, int8; the fp32 model is always written
    calibration_images: int = 1_000
    force: bool = False
    data_dir: str | None = None
    parity_images: int | None = None  # real test images used for parity; None: the whole test set
    threads: int | None = None  # torch, onnxruntime and OpenCV threads; None: the free cores (cnnedge.threads)


def export_paths(config: ExportConfig, quantize: list[str]) -> dict[str, Path]:
    """fp32 model, each variant beside it (cnn.onnx -> cnn.int8.onnx), and the JSON report."""
    out = Path(config.out) if config.out else Path("export") / f"{Path(config.checkpoint).stem}.onnx"
    if out.suffix != ".onnx":
        raise CnnedgeError(f"--out {out}: the model file must end in .onnx")
    paths = {"fp32": out, **{q: out.with_name(f"{out.stem}.{q}.onnx") for q in quantize}, "report": out.with_suffix(".json")}
    for path in paths.values():
        if os.path.isdir(path):
            raise CnnedgeError(f"{path} is a directory")
        if os.path.lexists(path) and not config.force:
            raise CnnedgeError(f"{path} already exists; pass --force to overwrite it")
        check_writable(path)  # a path under a file, a read-only folder: now, not after a minute of checks
    return paths


def check_export(config: ExportConfig) -> tuple[list[str], dict[str, Path]]:
    """(the variants to write, every output path): the options, the checkpoint file, and outputs that exist
    without --force. The opset is checked once onnx and onnxruntime are loaded (the newest is theirs to say)."""
    quantize = [q for q in dict.fromkeys(config.quantize) if q != "none"]
    for q in quantize:
        if q not in QUANTIZATIONS:
            raise CnnedgeError(f"unknown --quantize {q!r}; choose from: {', '.join(QUANTIZATIONS)}")
    if config.calibration_images < 1:
        raise CnnedgeError("--calibration-images must be at least 1")
    check_checkpoint_file(config.checkpoint)
    return quantize, export_paths(config, quantize)
