"""What `cnnedge train` accepts, torch-free: the CLI checks the options it was given and the outputs it would
replace before importing PyTorch, and the trainer checks the resolved recipe (and a resumed checkpoint's) with
the same rules. Impossible values are a one-line CnnedgeError; dubious ones come back as warnings."""

from __future__ import annotations

import math
import os
from pathlib import Path

from cnnedge.atomic import check_writable
from cnnedge.choices import LOSSES, OPTIMIZERS, SCHEDULES
from cnnedge.errors import CnnedgeError

MAX_SEED = 2**32 - 1  # the epoch seeds derived from it must fit torch's 64-bit generator seeds


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
