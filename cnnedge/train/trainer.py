"""`cnnedge train`: train a zoo network on in-memory tensors, checkpoint every epoch, report on the test set.

Reproducible by construction: every epoch reseeds from (seed, epoch), so a run resumed after an
interruption retraces the uninterrupted one exactly. Each completed epoch is checkpointed atomically into
`<out stem>.partial.pt`; Ctrl-C or SIGTERM abandons only the epoch in progress, and `--resume` continues
from that file. `--out` itself only ever holds a finished model: it is written last, after its metrics JSON
and plots, so a reader never sees a checkpoint without its metrics. An existing `--out` is refused unless
`--force` (or `--resume`), as export does.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnedge import __version__
from cnnedge.atomic import write_text
from cnnedge.train.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from cnnedge.train.data import Data, add_synthetic, augment_batch, load_data, normalization, split_validation
from cnnedge.choices import DEVICES
from cnnedge.errors import CnnedgeError, ExitCode
from cnnedge.infer.files import printable
from cnnedge.metrics import classification_report, confusion_matrix
from cnnedge.report import confusion_table, console, per_class_table, to_json, warn
from cnnedge.threads import thread_count
from cnnedge.train.options import (check_hparams, check_outputs, check_run, check_train, output_paths, partial_path,
                                   resume_source)
from cnnedge.train.zoo import DEFAULT_ARCH, get_arch

# Used where neither the command line nor the architecture's recipe says otherwise.
DEFAULT_HPARAMS = dict(
    optimizer="adam", lr=1e-3, momentum=0.9, weight_decay=0.0, schedule="constant",
    batch_size=128, epochs=5, loss="cross-entropy", label_smoothing=0.0, augment=False,
    synthetic=0.0,  # synthetic handwriting added to a digits training split, as a fraction of it
)
# With --from, in place of the architecture's recipe (options given on the command line still win).
# A pretrained network only needs adapting, often to a few dozen images (greek/: 9 per class): small
# batches over many short epochs, a new head at the full rate and the pretrained layers at a fraction of
# it, augmentation on, BatchNorm statistics kept from the source. See README, "Fine-tuning".
FINETUNE_HPARAMS = dict(
    optimizer="adamw", lr=3e-3, weight_decay=1e-4, schedule="cosine", batch_size=16, epochs=60,
    loss="cross-entropy", label_smoothing=0.0, augment=True, backbone_lr_scale=0.3,
)
# A recipe is tuned for its dataset: edgenet's 3 epochs of batch 128 are 543 optimizer steps on MNIST, but 3
# steps on 57 images. Unless --batch-size and --epochs say otherwise, a small dataset gets batches of at
# most 1/8 of it and enough epochs for this many steps.
MIN_STEPS = 500
SMALL_BATCH = 8
MAX_SMALL_EPOCHS = 300
MAX_PRINTED_CLASSES = 30  # larger confusion matrices go to the metrics JSON only
MAX_PLOTTED_CLASSES = 100


@dataclass
class TrainConfig:
    arch: str = DEFAULT_ARCH
    dataset: str = "mnist"
    data_dir: str | None = None
    out: str = "models/cnn.pt"
    device: str = "auto"
    seed: int = 0
    val_fraction: float | None = None  # None: 0.05, or 0 when fine-tuning a dataset that has a test split
    limit: int | None = None  # train on the first N training images only (smoke tests, quick checks)
    download: bool = False
    resume: bool = False
    from_checkpoint: str | None = None
    freeze_backbone: bool = False
    plots: bool = True
    hparams: dict = field(default_factory=dict)  # only what the user set; the rest comes from the recipe
    force: bool = False  # replace an existing --out (and its metrics and plots)
    threads: int | None = None  # torch's CPU threads; None: the cores other processes leave free, at each epoch


class Interrupted(Exception):
    def __init__(self, signum: int):
        self.signum = signum


@contextmanager
def interruptible():
    """Turn SIGINT and SIGTERM into one exception so both keep the last completed epoch. Yields `hold`:
    a signal that arrives inside `with hold():` (while a checkpoint is written) is raised when it ends,
    so a finished epoch is never thrown away half-saved."""
    holding, pending = [False], []

    def handler(signum, frame):
        if holding[0]:
            pending.append(signum)
        else:
            raise Interrupted(signum)

    @contextmanager
    def hold():
        holding[0] = True
        try:
            yield
        finally:
            holding[0] = False
        if pending:
            raise Interrupted(pending[0])

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield hold
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def pick_device(name: str) -> torch.device:
    if name not in DEVICES:
        raise CnnedgeError(f"unknown device {name!r}; choose one of: {', '.join(DEVICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CnnedgeError("--device cuda: no CUDA device is available to torch")
    if name == "mps" and not torch.backends.mps.is_available():
        raise CnnedgeError("--device mps: the Metal backend is not available")
    return torch.device(name)


def resolve_hparams(arch: str, given: dict, fine_tune: bool = False) -> dict:
    recipe = FINETUNE_HPARAMS if fine_tune else get_arch(arch).recipe
    hp = {**DEFAULT_HPARAMS, **recipe, **{k: v for k, v in given.items() if v is not None}}
    for warning in check_hparams(hp):
        warn(warning)
    return hp


def fit_to_dataset(hp: dict, given: dict, n_train: int, world: int = 1) -> tuple[str | None, str | None]:
    """Adapt a recipe's batch size and epochs to a small dataset (see MIN_STEPS), in place, where the user did
    not set them -> (what was changed, for the log; a warning when the user's own choice leaves far too few
    optimizer steps)."""
    steps = lambda batch, epochs: epochs * math.ceil(math.ceil(n_train / world) / batch)
    recipe = (hp["batch_size"], hp["epochs"])
    if steps(*recipe) >= MIN_STEPS:
        return None, None
    if given.get("batch_size") is None:
        hp["batch_size"] = min(hp["batch_size"], max(SMALL_BATCH, n_train // 8))
    if given.get("epochs") is None:
        hp["epochs"] = max(hp["epochs"], min(MAX_SMALL_EPOCHS, math.ceil(MIN_STEPS / steps(hp["batch_size"], 1))))
    total = steps(hp["batch_size"], hp["epochs"])
    fitted = warning = None
    if (hp["batch_size"], hp["epochs"]) != recipe:
        fitted = (f"small dataset ({n_train:,} training images): batch {hp['batch_size']} and {hp['epochs']} epochs, "
                  f"{total:,} optimizer steps (batch {recipe[0]} and {recipe[1]} epochs would be {steps(*recipe):,}); "
                  f"set --batch-size and --epochs to choose")
    if total < MIN_STEPS // 5:
        warning = (f"{n_train:,} training images in batches of {hp['batch_size']} for {hp['epochs']} epoch(s) are only "
                   f"{total:,} optimizer steps (the recipes are tuned for about {MIN_STEPS}): the network will learn "
                   f"little; use a smaller --batch-size or more --epochs")
    return fitted, warning


def make_optimizer(params, hp: dict) -> torch.optim.Optimizer:
    name, lr, wd = hp["optimizer"], hp["lr"], hp["weight_decay"]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=hp["momentum"], nesterov=hp["momentum"] > 0, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    return torch.optim.RMSprop(params, lr=lr, momentum=hp["momentum"], weight_decay=wd)


def make_scheduler(optimizer, hp: dict, steps_per_epoch: int):
    total = hp["epochs"] * steps_per_epoch
    if hp["schedule"] == "onecycle":
        max_lr = [group["lr"] for group in optimizer.param_groups]  # each group peaks at its own rate
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total, pct_start=0.25)
    if hp["schedule"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, hp: dict) -> torch.Tensor:
    if hp["loss"] == "mse":  # seed 002's Keras recipe: squared error between softmax and one-hot
        return F.mse_loss(logits.softmax(dim=1), F.one_hot(targets, logits.shape[1]).to(logits.dtype))
    return F.cross_entropy(logits, targets, label_smoothing=hp["label_smoothing"])


@torch.no_grad()
def evaluate(model, x, y, mean, std, hp, device, batch_size=1000) -> tuple[float, np.ndarray]:
    """Mean loss and predictions over (x, y), in eval mode."""
    model.eval()
    total_loss, preds = 0.0, []
    for i in range(0, len(x), batch_size):
        xb = normalize(x[i : i + batch_size].to(device), mean, std)
        yb = y[i : i + batch_size].to(device)
        logits = model(xb)
        total_loss += loss_fn(logits, yb, hp).item() * len(yb)
        preds.append(logits.argmax(1).cpu())
    return total_loss / max(len(x), 1), torch.cat(preds).numpy() if preds else np.zeros(0, np.int64)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def train_epoch(model, optimizer, scheduler, x, y, order, mean, std, hp, device, progress, task, world,
                total_steps: int | None = None) -> tuple[float, float]:
    """One epoch; the scheduler steps after every optimizer step but the very last of the run (`total_steps`):
    a one-cycle or cosine schedule stepped past its end turns back up."""
    model.train()
    if getattr(model, "keep_bn_statistics", False):
        model.eval()  # fine-tuning keeps the source's BatchNorm statistics (BN weights and biases still train)
    bs = hp["batch_size"]
    # [loss sum, correct, seen] on the device: no host sync per batch
    totals = torch.zeros(3, device=device, dtype=torch.float64)
    for step, i in enumerate(range(0, len(order), bs)):
        idx = order[i : i + bs]
        xb, yb = x[idx], y[idx]
        if hp["augment"]:
            xb = augment_batch(xb)
        logits = model(normalize(xb, mean, std))
        loss = loss_fn(logits, yb, hp)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if total_steps is None or scheduler.last_epoch < total_steps - 1:
            scheduler.step()
        totals[0] += loss.detach() * len(idx)
        totals[1] += (logits.argmax(1) == yb).sum()
        totals[2] += len(idx)
        if progress is not None and (step % 20 == 0 or i + bs >= len(order)):
            loss_sum, correct, seen = totals.tolist()
            progress.update(task, completed=step + 1, loss=loss_sum / seen, acc=correct / seen)
    if world > 1:
        torch.distributed.all_reduce(totals)  # the epoch's figures over every process
    loss_sum, correct, seen = totals.tolist()
    return loss_sum / max(seen, 1), correct / max(seen, 1)


def replace_head(model: nn.Sequential, num_classes: int) -> nn.Sequential:
    """Swap the final linear layer for a fresh one with `num_classes` outputs (fine-tuning)."""
    name, head = list(model.named_children())[-1]
    if not isinstance(head, nn.Linear):
        raise CnnedgeError(f"cannot replace the head: the last layer {name!r} is not a linear layer")
    setattr(model, name, nn.Linear(head.in_features, num_classes))
    return model


@torch.no_grad()
def imprint_head(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, mean, std) -> None:
    """Set the head to the nearest-class-mean classifier of the embeddings ("weight imprinting"), so a
    frozen backbone's training starts at the few-shot solution instead of below it:
    logit_c = (|e|^2 - |e - p_c|^2) / s = (2 e.p_c - |p_c|^2) / s, with p_c the mean embedding of class c
    and s the mean squared distance of an embedding to its class mean (a scale at which softmax still learns)."""
    model.eval()
    e = torch.cat([model[:-1](normalize(x[i : i + 1000], mean, std)) for i in range(0, len(x), 1000)])
    head, present = model[-1], torch.unique(y)  # a class without images keeps its random row
    protos = torch.stack([e[y == c].mean(0) for c in present])
    spread = ((e - protos[torch.searchsorted(present, y)]) ** 2).sum(1).mean().clamp_min(1e-6)
    head.weight[present] = 2 * protos / spread
    head.bias[present] = -(protos**2).sum(1) / spread


def fine_tune_param_groups(model: nn.Sequential, hp: dict) -> list[dict]:
    """The new head at --lr; the pretrained layers (unless frozen) at backbone_lr_scale times it, so a
    few dozen images adapt the features without wiping out what they learnt on the source dataset."""
    head = list(model[-1].parameters())
    backbone = [p for p in model[:-1].parameters() if p.requires_grad]
    groups = [{"params": head, "lr": hp["lr"]}]
    if backbone:
        groups.append({"params": backbone, "lr": hp["lr"] * hp.get("backbone_lr_scale", 1.0)})
    return groups


def _history_line(h: dict, epochs: int) -> str:
    val = f"  val loss {h['val_loss']:.4f} acc {100 * h['val_accuracy']:.2f}%" if h.get("val_accuracy") is not None else ""
    return (f"epoch {h['epoch']}/{epochs}  train loss {h['train_loss']:.4f} acc {100 * h['train_accuracy']:.2f}%"
            f"{val}  lr {h['lr']:.4g}  {h['seconds']:.1f} s")


@dataclass
class Distributed:
    """This process's place in a torchrun job; a plain run is a world of one."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join the process group torchrun set up (gloo on CPU, NCCL on GPU); one GPU per process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed(), device
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), local_rank, dist.get_world_size()), device


def run(config: TrainConfig, command: str | None = None, on_epoch: Callable[[dict], None] | None = None) -> dict | None:
    """Train (or resume) and return the metrics written to <out stem>.metrics.json (on rank 0).

    `on_epoch(entry)` is called on rank 0 after each epoch is checkpointed, with that epoch's history entry
    (train/val loss and accuracy): `cnnedge sweep` shows progress and prunes bad trials with it. Whatever it
    raises ends the run there, the epoch's checkpoint kept."""
    dist, device = init_distributed(pick_device(config.device))
    try:
        return _run(config, command, dist, device, on_epoch)
    finally:
        if dist.world > 1:
            torch.distributed.destroy_process_group()


def resume_point(out: Path) -> tuple[Path, dict]:
    """(the file to resume from, its checkpoint), checked as far as it can be before the data is loaded."""
    source = resume_source(out)
    resumed = load_checkpoint(source)
    if source == out and resumed.get("complete"):
        raise CnnedgeError(f"--resume: {out} is a finished run of {resumed.get('epoch')} epochs, nothing to resume; "
                           "train into another --out, or pass --force without --resume to train again")
    config, hp, epoch, history = (resumed.get(k) for k in ("config", "hparams", "epoch", "history"))
    if not isinstance(config, dict) or not isinstance(hp, dict) or "optimizer_state" not in resumed:
        raise CnnedgeError(f"--resume: {source} carries no training state (config, hparams, optimizer state)")
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(str(k) for k in config if k not in names)
    if unknown:
        raise CnnedgeError(f"--resume: {source}: unknown training options {', '.join(unknown)[:200]}")
    def wrong(key: str, value, kind) -> bool:
        return key in config and config[key] is not None and not isinstance(config[key], kind)
    for key, kind in (("arch", str), ("dataset", str), ("data_dir", str), ("from_checkpoint", str), ("hparams", dict),
                      ("freeze_backbone", bool), ("plots", bool), ("download", bool), ("force", bool)):
        if wrong(key, config.get(key), kind):
            raise CnnedgeError(f"--resume: {source}: training option {key} is {config[key]!r}")
    try:
        get_arch(config.get("arch", DEFAULT_ARCH))
        check_run(config.get("limit"), config.get("seed", 0), config.get("val_fraction"))
        missing = [k for k in DEFAULT_HPARAMS if k not in hp]
        if missing:
            raise CnnedgeError(f"hyperparameters {', '.join(missing)} are missing")
        check_hparams(hp)
    except CnnedgeError as e:
        raise CnnedgeError(f"--resume: {source}: {e}") from None
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 1 <= epoch <= hp["epochs"]:
        raise CnnedgeError(f"--resume: {source}: epoch {epoch!r} is not one of the run's {hp['epochs']} epochs")
    if (not isinstance(history, list) or len(history) != epoch
            or not all(isinstance(h, dict) and h.get("epoch") == i + 1 for i, h in enumerate(history))):
        raise CnnedgeError(f"--resume: {source}: its history does not list epochs 1 to {epoch}")
    return source, resumed


def _written_by(out: Path, resumed: dict) -> bool:
    """Whether the checkpoint in `out` is the end of the run `resumed` is part of (the same epochs so far)."""
    if not os.path.lexists(out):
        return False
    try:
        finished = load_checkpoint(out)
    except CnnedgeError:
        return False
    history = resumed["history"]
    return bool(finished.get("complete")) and finished.get("history", [])[: len(history)] == history


def _run(config: TrainConfig, command: str | None, dist: Distributed, device: torch.device, on_epoch=None) -> dict | None:
    out = Path(config.out)
    partial = partial_path(out)
    command = command or shlex.join(["cnnedge", *sys.argv[1:]])
    # Rank 0 alone logs; lines name paths, which are shown escaped and never read as rich markup.
    say = (lambda text: console.print(printable(text), markup=False)) if dist.main else (lambda text: None)
    check_train(config.arch, config.dataset, config.data_dir, config.download, config.out, config.resume,
                config.from_checkpoint, config.freeze_backbone)
    resumed = source = None
    if config.resume:
        if config.force:
            raise CnnedgeError("--resume continues an interrupted run as it was started: it takes no --force")
        source, resumed = resume_point(out)
        overrides = {k: v for k, v in (("data_dir", config.data_dir), ("download", config.download or None),
                                       ("threads", config.threads)) if v}
        config = TrainConfig(**{**resumed["config"], **overrides, "out": str(out), "device": config.device, "resume": True})
        command = resumed.get("command", command)
    else:
        check_run(config.limit, config.seed, config.val_fraction)
        check_outputs(config.out, config.force)

    base = None
    if config.from_checkpoint:
        base = load_checkpoint(config.from_checkpoint)
        config.arch = base["arch"]
    hp = resolve_hparams(config.arch, config.hparams, fine_tune=base is not None) if resumed is None else resumed["hparams"]
    started = time.perf_counter()
    data = load_data(config.dataset, config.data_dir, config.download)
    seconds = {"data": time.perf_counter() - started}  # where the run's time goes (metrics JSON)
    if resumed is not None and data.class_names != resumed["class_names"]:
        raise CnnedgeError(f"--resume: {data.name} now has {len(data.class_names)} classes, the interrupted run "
                           f"trained on {len(resumed['class_names'])} ({', '.join(resumed['class_names'])[:120]}): "
                           "a class folder was added or removed; train into a new --out")
    if config.limit:
        data.x_train, data.y_train = data.x_train[: config.limit], data.y_train[: config.limit]
    if config.val_fraction is None:
        # A fine-tuning set is often tiny (54 images): a 5% split would hold out about 3 images, say
        # nothing and cost training data. With a test split to report on, keep every image for training.
        config.val_fraction = 0.0 if base is not None and data.x_test is not None else 0.05
    arch = get_arch(config.arch)
    if tuple(data.x_train.shape[1:]) != arch.input_shape:
        raise CnnedgeError(f"{data.name}: images are {tuple(data.x_train.shape[1:])}, {arch.name} expects {arch.input_shape}")

    train_idx, val_idx = split_validation(len(data.x_train), config.val_fraction, config.seed)
    if data.x_test is None and not len(val_idx):
        raise CnnedgeError(f"{data.name} has no test split and --val-fraction {config.val_fraction} holds out no "
                           "image: nothing to report accuracy on (add a test/ folder or raise --val-fraction)")
    fitted = warning = None
    if resumed is None and base is None:  # the fine-tuning recipe is made for a few dozen images already
        fitted, warning = fit_to_dataset(hp, config.hparams, len(train_idx), dist.world)
    if warning and dist.main:
        warn(warning)
    if resumed is not None or base is not None:  # keep the saved (or base network's) input convention
        mean, std, preprocess = ((resumed or base)[k] for k in ("mean", "std", "preprocess"))
    else:
        mean, std = normalization(data.x_train[train_idx])
        preprocess = data.preprocess
    # Synthetic handwriting (cnnedge.synth) for the ways of writing MNIST under-represents: training only,
    # after the split, with the real images' normalisation; not with --limit, which means these N images.
    # Fixed seed: part of the data, not of the run.
    fraction = 0.0 if config.limit else hp.get("synthetic", 0.0)
    train_idx, synthetic = add_synthetic(data, train_idx, fraction, seed=0)
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)

    torch.manual_seed(config.seed)  # same initial weights on every process
    num_classes = len(data.class_names)
    if base is not None:
        model = replace_head(model_from_checkpoint(base, config.from_checkpoint), num_classes)
        if config.freeze_backbone:
            for p in list(model.parameters())[:-2]:
                p.requires_grad_(False)
    else:
        model = arch.build(num_classes)
    history: list[dict] = []
    start_epoch = 1
    if resumed is not None:
        try:
            model.load_state_dict(resumed["state_dict"])
        except RuntimeError as e:
            raise CnnedgeError(f"--resume: {source}: its weights do not fit {config.arch} "
                               f"({' '.join(str(e).split())[:160]})") from None
        history = list(resumed.get("history", []))
        start_epoch = resumed["epoch"] + 1
    model = model.to(device).to(memory_format=torch.channels_last)
    model.keep_bn_statistics = base is not None
    if base is not None and config.freeze_backbone and resumed is None:
        # With the backbone trained as well the features leave the prototypes behind: no gain measured there.
        imprint_head(model, data.x_train[train_idx].to(device), data.y_train[train_idx].to(device), mean_t, std_t)
    net = model  # what trains; `model` stays the plain module that is evaluated and saved
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        net.keep_bn_statistics = model.keep_bn_statistics
    from torch.utils.data import DistributedSampler

    # Each process takes its own shard of a shuffled order that depends only on (seed, epoch).
    sampler = DistributedSampler(range(len(train_idx)), num_replicas=dist.world, rank=dist.rank,
                                 shuffle=True, seed=config.seed)
    params = fine_tune_param_groups(model, hp) if base is not None else [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, hp)
    steps_per_epoch = math.ceil(len(sampler) / hp["batch_size"])
    scheduler = make_scheduler(optimizer, hp, steps_per_epoch)
    total_steps = hp["epochs"] * steps_per_epoch
    if resumed is not None:
        try:
            optimizer.load_state_dict(resumed["optimizer_state"])
            scheduler.load_state_dict(resumed["scheduler_state"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CnnedgeError(f"--resume: {source}: its optimizer state does not fit this run "
                               f"({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
        say(f"resuming {out}: {resumed['epoch']} of {hp['epochs']} epochs done")

    # Results depend on the thread count (parallel sums round differently): the same seed and --threads give the
    # same metrics. Without --threads the count follows the free cores, checked again at every epoch.
    threads = thread_count(config.threads)
    torch.set_num_threads(threads)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_val, y_val = x_train[val_idx.to(device)], y_train[val_idx.to(device)]
    run_info = {
        "format_version": 1, "cnnedge_version": __version__, "command": command,
        "arch": config.arch, "num_classes": num_classes, "class_names": data.class_names,
        "input_shape": list(arch.input_shape), "mean": mean, "std": std, "preprocess": preprocess,
        "dataset": data.name, "seed": config.seed, "epochs": hp["epochs"], "hparams": hp,
        "config": {**asdict(config), "resume": False}, "device": str(device), "processes": dist.world,
    }
    if base is not None:
        run_info["fine_tuned_from"] = {"path": str(config.from_checkpoint), "dataset": base.get("dataset")}

    processes = f" x {dist.world} processes" if dist.world > 1 else ""
    if base is not None:
        backbone = "frozen" if config.freeze_backbone else f"at lr {hp['lr'] * hp.get('backbone_lr_scale', 1.0):.3g}"
        head = " (imprinted from the class means)" if config.freeze_backbone else ""
        say(f"fine-tuning {config.from_checkpoint} (trained on {base.get('dataset', '?')}): new {num_classes}-class "
            f"head{head}, backbone {backbone}, BatchNorm statistics kept")
    if fitted:
        say(fitted)
    extra = f" + {synthetic:,} synthetic" if synthetic else ""
    say(f"training {config.arch} on {data.name} ({len(train_idx) - synthetic:,} train{extra} / {len(val_idx):,} val"
        f"{'' if data.x_test is None else f' / {len(data.x_test):,} test'}) on {device}{processes}"
        f" ({threads} CPU thread{'s' if threads > 1 else ''}): "
        f"{hp['optimizer']} lr {hp['lr']} {hp['schedule']}, batch {hp['batch_size']}, {hp['epochs']} epochs, "
        f"{hp['loss']}{', augment' if hp['augment'] else ''}")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    saved = start_epoch - 1  # the last epoch whose checkpoint is on disk
    seconds["setup"] = time.perf_counter() - started - seconds["data"]
    try:
        with interruptible() as hold:
            for epoch in range(start_epoch, hp["epochs"] + 1):
                torch.manual_seed((config.seed * 100_003 + epoch) * 64 + dist.rank)  # augmentation, dropout
                if config.threads is None and (now := thread_count()) != threads:
                    threads = now  # another process took cores, or gave them back
                    torch.set_num_threads(threads)
                sampler.set_epoch(epoch)
                order = train_idx[torch.tensor(list(sampler))].to(device)
                t0 = time.perf_counter()
                with Progress(TextColumn(f"epoch {epoch}/{hp['epochs']}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.2%}"),
                              console=console, transient=True, disable=not dist.main) as progress:
                    task = progress.add_task("train", total=steps_per_epoch, loss=0.0, acc=0.0)
                    train_loss, train_acc = train_epoch(net, optimizer, scheduler, x_train, y_train, order, mean_t,
                                                        std_t, hp, device, progress if dist.main else None, task, dist.world,
                                                        total_steps)
                if not math.isfinite(train_loss):  # every process sees the same all-reduced loss
                    kept = f"{partial} keeps epoch {saved}" if saved else "nothing was saved"
                    raise CnnedgeError(f"training diverged in epoch {epoch} (loss {train_loss}); {kept}: lower --lr "
                                       f"(it is {hp['lr']:g}) or try another --optimizer")
                if dist.main:
                    val_loss, val_acc = None, None
                    if len(val_idx):
                        val_loss, preds = evaluate(model, x_val, y_val, mean_t, std_t, hp, device)
                        val_acc = float((preds == y_val.cpu().numpy()).mean())
                    h = {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc, "val_loss": val_loss,
                         "val_accuracy": val_acc, "lr": optimizer.param_groups[0]["lr"],
                         "seconds": time.perf_counter() - t0, "threads": threads}
                    history.append(h)
                    say(_history_line(h, hp["epochs"]))
                    with hold():
                        # The first save of a new run claims the name: a run started meanwhile is not replaced.
                        save_checkpoint(partial, {**run_info, "epoch": epoch, "complete": False, "history": history,
                                                  "state_dict": model.state_dict(), "optimizer_state": optimizer.state_dict(),
                                                  "scheduler_state": scheduler.state_dict()},
                                        overwrite=resumed is not None or config.force or saved > 0)
                        saved = epoch
                    if on_epoch is not None:
                        on_epoch(h)
                if dist.world > 1:
                    torch.distributed.barrier()  # nobody starts the next epoch before the checkpoint is on disk
    except Interrupted as e:
        code = ExitCode.INTERRUPTED if e.signum == signal.SIGINT else ExitCode.TERMINATED
        holder = source if source is not None and saved == start_epoch - 1 else partial
        kept = (f"{holder} keeps epoch {saved}; continue with `cnnedge train --out {out} --resume`" if saved
                else "no epoch completed")
        raise CnnedgeError(f"interrupted during epoch {saved + 1}: {kept}", code) from None

    if not dist.main:
        return None
    seconds["epochs"] = sum(h["seconds"] for h in history[start_epoch - 1:])
    # The finished model replaces an existing --out only if the run was started with --force, or if --out is
    # this run's own (an older cnnedge kept the run there; a kill came after it was written, before the
    # partial file was removed); else it is published only if nobody wrote --out meanwhile.
    metrics = finish(model, data, run_info, history, mean_t, std_t, hp, device, out, val_idx, config.plots,
                     overwrite=config.force or source == out or (resumed is not None and _written_by(out, resumed)),
                     seconds=seconds)
    if source != out:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)  # cnnedge wrote it; the finished model in --out replaces it
    return metrics


def training_samples(x: torch.Tensor, y: torch.Tensor, hp: dict, seed: int, n: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """`n` random training images as the network saw them: augmented when the recipe augments. The
    global RNG is left as it was (seeded here, so the same run draws the same samples)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        idx = torch.randperm(len(x))[:n]
        images = augment_batch(x[idx]) if hp["augment"] else x[idx]
    return images.squeeze(1).numpy(), y[idx].numpy()


@torch.no_grad()
def prediction_picks(model, x, y: np.ndarray, preds: np.ndarray, mean_t, std_t, device, seed: int,
                     n: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Which evaluated images to show: the mistakes, most confident first (at most two thirds of the
    grid, so that right answers show too), then random correct ones, `n` in all; and the confidence of
    each shown prediction."""
    def confidence(idx: np.ndarray) -> np.ndarray:  # the predicted class's probability, 1000 images at a time
        chunks = [model(normalize(x[idx[i: i + 1000]].to(device), mean_t, std_t)).softmax(1).amax(1).cpu().numpy()
                  for i in range(0, len(idx), 1000)]
        return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)

    model.eval()
    wrong, right = np.flatnonzero(preds != y), np.flatnonzero(preds == y)
    wrong_conf = confidence(wrong)
    order = np.argsort(-wrong_conf, kind="stable")[: max(2 * n // 3, n - len(right))]
    rng = np.random.default_rng(seed)
    right = np.sort(rng.choice(right, size=min(n - len(order), len(right)), replace=False))
    picks = np.concatenate([wrong[order], right]).astype(np.int64)
    return picks, np.concatenate([wrong_conf[order], confidence(right)])


def finish(model, data: Data, run_info, history, mean_t, std_t, hp, device, out: Path, val_idx, plots: bool,
           overwrite: bool = True, seconds: dict | None = None) -> dict:
    """Final report on the test set (validation when there is none): plots and metrics, then the complete
    checkpoint, last, so that a checkpoint in --out always has its metrics beside it."""
    if data.x_test is not None:
        split, x, y = "test", data.x_test, data.y_test
    else:
        split, x, y = "validation", data.x_train[val_idx], data.y_train[val_idx]
    t0 = time.perf_counter()
    loss, preds = evaluate(model, x.to(device), y.to(device), mean_t, std_t, hp, device)
    seconds = {**(seconds or {}), "test": time.perf_counter() - t0}
    cm = confusion_matrix(y.numpy(), preds, len(data.class_names))
    report = classification_report(cm, data.class_names)
    train_seconds = sum(h["seconds"] for h in history)
    metrics = {
        "arch": run_info["arch"], "dataset": run_info["dataset"], "epochs": run_info["epochs"],
        "command": run_info["command"], "report_split": split, f"{split}_loss": loss,
        f"{split}_accuracy": report["accuracy"], "train_seconds": train_seconds, "history": history,
        "parameters": sum(p.numel() for p in model.parameters()),
        **{k: v for k, v in report.items() if k != "accuracy"},
        "cnnedge_version": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": seconds,  # where the time went: data loading, set-up, epochs (with validation), test, plots
    }
    summary = {k: metrics[k] for k in (f"{split}_accuracy", f"{split}_loss", "train_seconds")}
    metrics_path, curves_path, confusion_path, samples_path, predictions_path, _ = output_paths(out)
    written = []
    if plots:
        from cnnedge.train.plots import plot_confusion, plot_curves, plot_predictions, plot_samples

        t0 = time.perf_counter()
        written.append(plot_curves(history, curves_path))
        if len(data.class_names) <= MAX_PLOTTED_CLASSES:
            written.append(plot_confusion(cm, data.class_names, confusion_path))
        keep = torch.ones(len(data.x_train), dtype=torch.bool)
        keep[val_idx] = False  # samples from the training split only
        images, labels = training_samples(data.x_train[keep], data.y_train[keep], hp, run_info["seed"])
        picks, confidence = prediction_picks(model, x, y.numpy(), preds, mean_t, std_t, device, run_info["seed"])
        written += [plot_samples(images, labels, data.class_names, hp["augment"], samples_path),
                    plot_predictions(x[picks].squeeze(1).numpy(), preds[picks], y.numpy()[picks], confidence,
                                     data.class_names, int((preds != y.numpy()).sum()), split, predictions_path)]
        seconds["plots"] = time.perf_counter() - t0
    write_text(metrics_path, to_json(metrics) + "\n", overwrite=overwrite)
    written.append(metrics_path)
    save_checkpoint(out, {**run_info, "epoch": run_info["epochs"], "complete": True, "history": history,
                          "metrics": summary, "state_dict": model.state_dict()}, overwrite=overwrite)
    written.insert(0, out)
    console.print(per_class_table(cm, data.class_names, title=f"{split} accuracy per class"))
    if len(data.class_names) <= MAX_PRINTED_CLASSES:
        console.print(confusion_table(cm, data.class_names))
    missed = [name for name, acc in report["per_class_accuracy"].items() if acc == 0]  # None: no image of it
    if missed:
        warn(f"{len(missed)} class(es) never recognised on the {split} split: {', '.join(missed[:10])[:200]}")
    console.print(f"{split} accuracy {100 * report['accuracy']:.2f}% (loss {loss:.4f}) after {train_seconds:.1f} s of training")
    console.print(printable("wrote " + ", ".join(str(p) for p in written)), markup=False)
    return metrics
