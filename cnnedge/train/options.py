"""What the training commands accept, checked without torch: `cnnedge train`, `export`, `inspect` and `summary`
check their arguments, inputs and outputs here before they import PyTorch (seconds of start-up), so that a
usage error or a refusal costs what `cnnedge --help` costs. The modules that do the work call the same
functions, so a Python caller meets the same rules."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cnnedge.choices import LOSSES, OPTIMIZERS, QUANTIZATIONS, SCHEDULES
from cnnedge.errors import CnnedgeError
from cnnedge.train.checkpoint import check_checkpoint_file
from cnnedge.train.zoo import get_arch

NATIVE_OPSET = 18  # the lowest opset torch's dynamo exporter emits itself; 17 is converted from it

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


# ---------------------------------------------------------------------------------------------- train


def check_hparams(hp: dict) -> None:
    """The hyperparameters present in `hp` (those given on the command line, or a whole resolved recipe)."""
    for key, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("loss", LOSSES)):
        if hp.get(key) is not None and hp[key] not in choices:
            raise CnnedgeError(f"unknown {key} {hp[key]!r}; choose one of: {', '.join(choices)}")
    if any(hp.get(k) is not None and hp[k] < 1 for k in ("epochs", "batch_size")) or hp.get("lr") is not None and not hp["lr"] > 0:
        raise CnnedgeError("--epochs and --batch-size must be >= 1 and --lr > 0")


def check_train(arch: str, dataset: str, data_dir: str | None, download: bool, out: str, resume: bool,
                from_checkpoint: str | None, freeze_backbone: bool) -> None:
    """The architecture, the files a run reads (the run to resume, the checkpoint to fine-tune, the dataset)."""
    if resume:
        if not Path(out).is_file():
            raise CnnedgeError(f"--resume: {out} does not exist; train without --resume first")
        check_checkpoint_file(out)
        return  # the rest comes from the interrupted run
    if freeze_backbone and not from_checkpoint:
        raise CnnedgeError("--freeze-backbone needs --from: there is no pretrained backbone to freeze")
    if from_checkpoint:
        check_checkpoint_file(from_checkpoint)  # its architecture is the one trained
    else:
        get_arch(arch)
    dataset_root(dataset, data_dir, download)


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


def output_paths(config: ExportConfig, quantize: list[str]) -> dict[str, Path]:
    """fp32 model, each variant beside it (cnn.onnx -> cnn.int8.onnx), and the JSON report."""
    out = Path(config.out) if config.out else Path("export") / f"{Path(config.checkpoint).stem}.onnx"
    if out.suffix != ".onnx":
        raise CnnedgeError(f"--out {out}: the model file must end in .onnx")
    paths = {"fp32": out, **{q: out.with_name(f"{out.stem}.{q}.onnx") for q in quantize}, "report": out.with_suffix(".json")}
    for path in paths.values():
        if path.is_dir():
            raise CnnedgeError(f"{path} is a directory")
        if path.exists() and not config.force:
            raise CnnedgeError(f"{path} already exists; pass --force to overwrite it")
    return paths


def check_export(config: ExportConfig) -> tuple[list[str], dict[str, Path]]:
    """(the variants to write, every output path): the options, the checkpoint file, and outputs that exist
    without --force. The opset is checked once onnx is loaded (its newest opset is onnx's to say)."""
    quantize = [q for q in dict.fromkeys(config.quantize) if q != "none"]
    for q in quantize:
        if q not in QUANTIZATIONS:
            raise CnnedgeError(f"unknown --quantize {q!r}; choose from: {', '.join(QUANTIZATIONS)}")
    if config.calibration_images < 1:
        raise CnnedgeError("--calibration-images must be at least 1")
    check_checkpoint_file(config.checkpoint)
    return quantize, output_paths(config, quantize)
