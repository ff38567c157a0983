"""The model zoo: the five seed networks, a variant (seed 003's experiment), and our edge network, each
with its documented layer table.

A table is data, not a comment: every row names a child of the network's `nn.Sequential` and gives
the output shape (without the batch axis) and parameter count its source documents. `check_layers`
measures the real module with forward hooks and compares; export repeats the check on the ONNX graph.
Tables are documented for 10 classes; `Arch.table_for` adapts the classifier row to other counts.
The registry loads without torch (the functions that build or measure a network import it), so that a
wrong --arch is refused before PyTorch's seconds of start-up.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Callable

from cnnedge.errors import CnnedgeError, ExitCode


@dataclass(frozen=True)
class Layer:
    """One documented row: the output of the child module called `name`."""

    name: str
    shape: tuple[int, ...]  # (C, H, W) or (features,)
    params: int
    memory: int | None = None  # activation elements, where the source documents them
    note: str = ""


@dataclass(frozen=True)
class Arch:
    name: str
    source: str
    description: str
    table: tuple[Layer, ...]
    build: Callable[[int], nn.Sequential]  # num_classes -> network
    embedding: str  # the layer whose output is the embedding (penultimate activations)
    recipe: dict = field(default_factory=dict)  # training defaults; the seed's own where documented
    input_shape: tuple[int, int, int] = (1, 28, 28)
    num_classes: int = 10
    input_memory: int | None = None  # the INPUT row of a table that documents activation memory

    def table_for(self, num_classes: int) -> tuple[Layer, ...]:
        """The documented table for a head of `num_classes` outputs (last row is a biased linear layer)."""
        if num_classes == self.num_classes:
            return self.table
        head = self.table[-1]
        per_class = head.params // self.num_classes  # fan_in weights + 1 bias per class
        memory = num_classes if head.memory is not None else None
        head = replace(head, shape=(num_classes,), params=per_class * num_classes, memory=memory)
        return (*self.table[:-1], head)


def _seq(*layers: tuple[str, nn.Module]) -> nn.Sequential:
    from torch import nn

    return nn.Sequential(OrderedDict(layers))


def _conv_bn_block(i: int, cin: int, cout: int, kernel: int = 3) -> list[tuple[str, nn.Module]]:
    from torch import nn

    return [
        (f"conv{i}", nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)),
        (f"bn{i}", nn.BatchNorm2d(cout)),
        (f"relu{i}", nn.ReLU(inplace=True)),
        (f"pool{i}", nn.MaxPool2d(2)),
    ]


# --- edgenet: ours. Three conv-BN-ReLU-pool blocks, a 128-d embedding, ~2 M MACs per image. ---
# Bias-free convs because BatchNorm follows; onnxruntime folds BN into the conv at load time.
def build_edgenet(num_classes: int = 10) -> nn.Sequential:
    from torch import nn

    return _seq(
        *_conv_bn_block(1, 1, 16),
        *_conv_bn_block(2, 16, 32),
        *_conv_bn_block(3, 32, 64),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(64 * 3 * 3, 128)),
        ("relu4", nn.ReLU(inplace=True)),
        ("fc2", nn.Linear(128, num_classes)),
    )


EDGENET_TABLE = (
    Layer("conv1", (16, 28, 28), 144),
    Layer("bn1", (16, 28, 28), 32),
    Layer("relu1", (16, 28, 28), 0),
    Layer("pool1", (16, 14, 14), 0),
    Layer("conv2", (32, 14, 14), 4_608),
    Layer("bn2", (32, 14, 14), 64),
    Layer("relu2", (32, 14, 14), 0),
    Layer("pool2", (32, 7, 7), 0),
    Layer("conv3", (64, 7, 7), 18_432),
    Layer("bn3", (64, 7, 7), 128),
    Layer("relu3", (64, 7, 7), 0),
    Layer("pool3", (64, 3, 3), 0),
    Layer("flatten", (576,), 0),
    Layer("fc1", (128,), 73_856),
    Layer("relu4", (128,), 0),
    Layer("fc2", (10,), 1_290),
)


# --- seed 000: the QMNIST ConvNet (Deep Learning Wizard): 2 x [conv 5x5 pad 2, BN, ReLU, pool]. ---
def build_qmnist_convnet(num_classes: int = 10) -> nn.Sequential:
    from torch import nn

    def block(i: int, cin: int, cout: int) -> list[tuple[str, nn.Module]]:
        return [
            (f"conv{i}", nn.Conv2d(cin, cout, 5, stride=1, padding=2)),
            (f"bn{i}", nn.BatchNorm2d(cout)),
            (f"relu{i}", nn.ReLU()),
            (f"pool{i}", nn.MaxPool2d(2, 2)),
        ]

    return _seq(*block(1, 1, 16), *block(2, 16, 32), ("flatten", nn.Flatten()), ("fc", nn.Linear(7 * 7 * 32, num_classes)))


QMNIST_CONVNET_TABLE = (
    Layer("conv1", (16, 28, 28), 416),
    Layer("bn1", (16, 28, 28), 32),
    Layer("relu1", (16, 28, 28), 0),
    Layer("pool1", (16, 14, 14), 0),
    Layer("conv2", (32, 14, 14), 12_832),
    Layer("bn2", (32, 14, 14), 64),
    Layer("relu2", (32, 14, 14), 0),
    Layer("pool2", (32, 7, 7), 0),
    Layer("flatten", (1_568,), 0, note="7*7*32"),
    Layer("fc", (10,), 15_690),
)


# --- seed 001: VGG-style (ng-daniel/mnist_convolutional_nn): two blocks of three 3x3 convs at 16 channels. ---
def build_vgg_mini(num_classes: int = 10) -> nn.Sequential:
    from torch import nn

    layers: list[tuple[str, nn.Module]] = []
    cin = 1
    for block in (1, 2):
        for i in (1, 2, 3):
            layers += [(f"conv{block}_{i}", nn.Conv2d(cin, 16, 3, padding=1)), (f"relu{block}_{i}", nn.ReLU())]
            cin = 16
        layers.append((f"pool{block}", nn.MaxPool2d(2)))
    return _seq(*layers, ("flatten", nn.Flatten()), ("fc", nn.Linear(16 * 49, num_classes)))


def _vgg_table() -> tuple[Layer, ...]:
    rows = []
    for block, size in ((1, 28), (2, 14)):
        for i in (1, 2, 3):
            params = 160 if (block, i) == (1, 1) else 2_320
            rows += [Layer(f"conv{block}_{i}", (16, size, size), params), Layer(f"relu{block}_{i}", (16, size, size), 0)]
        rows.append(Layer(f"pool{block}", (16, size // 2, size // 2), 0))
    return (*rows, Layer("flatten", (784,), 0, note="hidden*49"), Layer("fc", (10,), 7_850))


# --- seed 002: Keras, SGD + MSE. Keras fuses the ReLU into Conv2D, so each conv row is conv+ReLU. ---
def build_keras_convnet(num_classes: int = 10) -> nn.Sequential:
    from torch import nn

    return _seq(
        ("conv1", nn.Sequential(nn.Conv2d(1, 32, 4), nn.ReLU())),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Sequential(nn.Conv2d(32, 32, 3), nn.ReLU())),
        ("pool2", nn.MaxPool2d(2)),
        ("dropout", nn.Dropout(0.3)),
        ("flatten", nn.Flatten()),
        ("dense", nn.Linear(800, num_classes)),
    )


KERAS_CONVNET_TABLE = (
    Layer("conv1", (32, 25, 25), 544, note="32 * (4*4*1 + 1)"),
    Layer("pool1", (32, 12, 12), 0, note="valid padding, as the seed assumes"),
    Layer("conv2", (32, 10, 10), 9_248, note="32 * (3*3*32 + 1)"),
    Layer("pool2", (32, 5, 5), 0),
    Layer("dropout", (32, 5, 5), 0, note="p=0.3"),
    Layer("flatten", (800,), 0),
    Layer("dense", (10,), 8_010, note="the seed writes 800*10 = 8,000, leaving out the 10 biases"),
)


# --- seed 003: the classic PyTorch MNIST net with Dropout2d, used for the Greek-letter embeddings. ---
def build_lenet_dropout(num_classes: int = 10) -> nn.Sequential:
    from torch import nn

    return _seq(
        ("conv1", nn.Conv2d(1, 10, 5)),
        ("pool1", nn.MaxPool2d(2)),
        ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(10, 20, 5)),
        ("conv2_drop", nn.Dropout2d(0.5)),
        ("pool2", nn.MaxPool2d(2)),
        ("relu2", nn.ReLU()),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(320, 50)),
        ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(50, num_classes)),
    )


LENET_DROPOUT_TABLE = (
    Layer("conv1", (10, 24, 24), 260),
    Layer("pool1", (10, 12, 12), 0),
    Layer("relu1", (10, 12, 12), 0),
    Layer("conv2", (20, 8, 8), 5_020),
    Layer("conv2_drop", (20, 8, 8), 0, note="Dropout2d(0.5)"),
    Layer("pool2", (20, 4, 4), 0),
    Layer("relu2", (20, 4, 4), 0),
    Layer("flatten", (320,), 0),
    Layer("fc1", (50,), 16_050),
    Layer("relu3", (50,), 0),
    Layer("fc2", (10,), 510),
)


# --- seed 003, task 4: the same network with a second dropout layer, between the fully connected layers. ---
# The seed puts it "after fc2" for the reason that fully connected layers have more nodes; after the 10 logits
# it would drop class scores, so it goes after fc1's 50 units, where the classic PyTorch MNIST example has it.
def build_lenet_dropout2(num_classes: int = 10) -> nn.Sequential:
    from torch import nn

    layers = list(build_lenet_dropout(num_classes).named_children())
    at = [name for name, _ in layers].index("relu3") + 1
    return _seq(*layers[:at], ("fc1_drop", nn.Dropout(0.5)), *layers[at:])


# Seed 003's training loop, for both of its networks.
SEED003_RECIPE = dict(optimizer="sgd", lr=0.01, momentum=0.5, batch_size=640, epochs=5, loss="cross-entropy")

LENET_DROPOUT2_TABLE = (
    *LENET_DROPOUT_TABLE[:-1],
    Layer("fc1_drop", (50,), 0, note="Dropout(0.5): the second dropout layer"),
    LENET_DROPOUT_TABLE[-1],
)


# --- seed 004: the Keras MNIST CNN; its table documents activation memory as well. ---
def build_keras_mnist_cnn(num_classes: int = 10) -> nn.Sequential:
    from torch import nn

    return _seq(
        ("conv1", nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU())),
        ("conv2", nn.Sequential(nn.Conv2d(32, 64, 3), nn.ReLU())),
        ("pool", nn.MaxPool2d(2)),
        ("dropout1", nn.Dropout(0.25)),
        ("flatten", nn.Flatten()),
        ("dense1", nn.Sequential(nn.Linear(9_216, 128), nn.ReLU())),
        ("dropout2", nn.Dropout(0.5)),
        ("dense2", nn.Linear(128, num_classes)),
    )


KERAS_MNIST_CNN_TABLE = (
    Layer("conv1", (32, 26, 26), 320, memory=21_632),
    Layer("conv2", (64, 24, 24), 18_496, memory=36_864, note="the hand table's 18342 is a typo of 18432 (no biases)"),
    Layer("pool", (64, 12, 12), 0, memory=9_216),
    Layer("dropout1", (64, 12, 12), 0, memory=9_216),
    Layer("flatten", (9_216,), 0, memory=9_216),
    Layer("dense1", (128,), 1_179_776, memory=128),
    Layer("dropout2", (128,), 0, memory=128),
    Layer("dense2", (10,), 1_290, memory=10),
)


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch(
            "edgenet",
            "cnnedge (ours)",
            "3 x [conv 3x3, BN, ReLU, max-pool], fc 128, fc 10: the default, built for the edge",
            EDGENET_TABLE,
            build_edgenet,
            embedding="relu4",
            # synthetic: 8% more training images, of the ways of writing MNIST under-represents (closed-top 4s,
            # open-top 6s, g-like 9s, crossed zeros, flagged 1s, barred 7s, thin and bold pens, turned digits;
            # cnnedge.synth.mnist_digits), for at most 8% more training time. 10% cost 0.1-0.2 points of
            # MNIST test accuracy, as did turning every image by up to 20 degrees instead of 12.
            recipe=dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="onecycle",
                        batch_size=128, epochs=3, loss="cross-entropy", label_smoothing=0.1, augment=True,
                        synthetic=0.08),
        ),
        Arch(
            "qmnist_convnet",
            "seed 000 (QMNIST ConvNet)",
            "2 x [conv 5x5 pad 2, BN, ReLU, max-pool 2] with 16 and 32 channels, fc 1568 -> 10",
            QMNIST_CONVNET_TABLE,
            build_qmnist_convnet,
            embedding="flatten",
            recipe=dict(optimizer="adam", lr=1e-3, batch_size=100, epochs=5, loss="cross-entropy"),
        ),
        Arch(
            "vgg_mini",
            "seed 001 (VGG-style, 2 blocks)",
            "2 x [3 x (conv 3x3, ReLU), max-pool] at 16 channels, fc 784 -> 10",
            _vgg_table(),
            build_vgg_mini,
            embedding="flatten",
            recipe=dict(optimizer="adam", lr=1e-3, batch_size=32, epochs=5, loss="cross-entropy"),
        ),
        Arch(
            "keras_convnet",
            "seed 002 (Keras, SGD + MSE)",
            "conv 32 4x4, pool, conv 32 3x3, pool, dropout 0.3, dense 10",
            KERAS_CONVNET_TABLE,
            build_keras_convnet,
            embedding="flatten",
            recipe=dict(optimizer="sgd", lr=0.01, momentum=0.0, batch_size=32, epochs=20, loss="mse"),
        ),
        Arch(
            "lenet_dropout",
            "seed 003 (Dropout2d, Greek embeddings)",
            "conv 10 5x5, pool, ReLU, conv 20 5x5, Dropout2d, pool, ReLU, fc 50, fc 10",
            LENET_DROPOUT_TABLE,
            build_lenet_dropout,
            embedding="relu3",
            recipe=SEED003_RECIPE,
        ),
        Arch(
            "lenet_dropout2",
            "seed 003, task 4 (a second dropout layer)",
            "lenet_dropout with Dropout(0.5) after fc1: conv 10, conv 20 + Dropout2d, fc 50 + Dropout, fc 10",
            LENET_DROPOUT2_TABLE,
            build_lenet_dropout2,
            embedding="relu3",
            recipe=SEED003_RECIPE,
        ),
        Arch(
            "keras_mnist_cnn",
            "seed 004 (Keras MNIST CNN)",
            "conv 32 3x3, conv 64 3x3, pool, dropout, dense 128, dropout, dense 10",
            KERAS_MNIST_CNN_TABLE,
            build_keras_mnist_cnn,
            embedding="dense1",
            recipe=dict(optimizer="adam", lr=1e-3, batch_size=256, epochs=4, loss="cross-entropy"),
            input_memory=784,  # with it the documented total is 87,194 elements (~0.3 MB per image)
        ),
    )
}
DEFAULT_ARCH = "edgenet"


def get_arch(name: str) -> Arch:
    try:
        return ARCHS[name]
    except KeyError:
        raise CnnedgeError(f"unknown architecture {name!r}; choose one of: {', '.join(ARCHS)}") from None


def build_model(arch: str, num_classes: int = 10) -> nn.Sequential:
    return get_arch(arch).build(num_classes)


# --- measuring the real module and checking it against the table ---


@dataclass
class Measured:
    shape: tuple[int, ...]
    params: int
    macs: int


def measure_layers(model: nn.Sequential, input_shape: tuple[int, ...]) -> "OrderedDict[str, Measured]":
    """Output shape, parameter count and multiply-accumulates of every child, from a real forward pass."""
    import torch
    from torch import nn

    children = OrderedDict(model.named_children())
    shapes: dict[str, tuple[int, ...]] = {}
    macs = dict.fromkeys(children, 0)

    def record_shape(name):
        return lambda module, inputs, output: shapes.__setitem__(name, tuple(output.shape[1:]))

    def count_macs(top):
        def hook(module, inputs, output):
            per_output = 0
            if isinstance(module, nn.Conv2d):
                per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
            elif isinstance(module, nn.Linear):
                per_output = module.in_features
            macs[top] += per_output * math.prod(output.shape[1:])

        return hook

    hooks = [child.register_forward_hook(record_shape(name)) for name, child in children.items()]
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            hooks.append(module.register_forward_hook(count_macs(name.split(".")[0])))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(2, *input_shape, device=device))  # batch 2: a flatten over the batch shows up
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return OrderedDict(
        (name, Measured(shapes[name], sum(p.numel() for p in child.parameters()), macs[name]))
        for name, child in children.items()
    )


@dataclass
class LayerCheck:
    """A documented row next to what the module (and, after export, the ONNX graph) really produce."""

    name: str
    documented: Layer | None
    measured: Measured | None
    onnx_shape: tuple[int, ...] | None = None
    onnx_checked: bool = False

    def problems(self) -> list[str]:
        from cnnedge.report import fmt_shape  # rich and numpy: not on the refusal path of `train --arch`

        doc, got = self.documented, self.measured
        if doc is None:
            return ["layer not in the documented table"]
        if got is None:
            return ["documented layer missing from the network"]
        out = []
        if got.shape != doc.shape:
            out.append(f"torch shape {fmt_shape(got.shape)} != documented {fmt_shape(doc.shape)}")
        if got.params != doc.params:
            out.append(f"{got.params:,} parameters != documented {doc.params:,}")
        if doc.memory is not None and math.prod(got.shape) != doc.memory:
            out.append(f"{math.prod(got.shape):,} activations != documented {doc.memory:,}")
        if self.onnx_checked and self.onnx_shape != doc.shape:
            out.append(f"onnx shape {fmt_shape(self.onnx_shape)} != documented {fmt_shape(doc.shape)}")
        return out

    @property
    def ok(self) -> bool:
        return not self.problems()


def check_layers(model: nn.Sequential, arch: Arch, num_classes: int) -> list[LayerCheck]:
    """Every documented row against the real module, in order; extra or missing layers are mismatches."""
    measured = measure_layers(model, arch.input_shape)
    table = arch.table_for(num_classes)
    documented = {row.name: row for row in table}
    rows = [LayerCheck(row.name, row, measured.get(row.name)) for row in table]
    return rows + [LayerCheck(name, None, m) for name, m in measured.items() if name not in documented]


def print_summary(arch: str | None, num_classes: int = 10) -> None:
    """`cnnedge summary`: the zoo with parameters, MACs and table checks, or one architecture's table."""
    from rich.table import Table

    from cnnedge.report import console, layer_table

    if arch is None:
        table = Table(title="cnnedge model zoo", title_justify="left")
        for col, justify in (("arch", "left"), ("source", "left"), ("parameters", "right"), ("MACs", "right"), ("table", "left")):
            table.add_column(col, justify=justify)
        failed = False
        for a in ARCHS.values():
            rows = check_layers(a.build(num_classes), a, num_classes)
            ok = all(r.ok for r in rows)
            failed |= not ok
            params = sum(r.measured.params for r in rows if r.measured)
            macs = sum(r.measured.macs for r in rows if r.measured)
            table.add_row(a.name, a.source, f"{params:,}", f"{macs:,}", "[green]ok[/]" if ok else "[red]MISMATCH[/]")
        console.print(table)
        if failed:
            raise CnnedgeError("some networks disagree with their documented tables", ExitCode.CHECK_FAILED)
        return

    a = get_arch(arch)
    rows = check_layers(a.build(num_classes), a, num_classes)
    console.print(layer_table(rows, f"{a.name}: {a.description} [{a.source}]"))
    params = sum(r.measured.params for r in rows if r.measured)
    macs = sum(r.measured.macs for r in rows if r.measured)
    activations = math.prod(a.input_shape) + sum(math.prod(r.measured.shape) for r in rows if r.measured)
    line = f"total: {params:,} parameters, {macs:,} MACs per image, {activations:,} activations ({4 * activations / 2**20:.2f} MiB fp32) per image incl. input"
    if a.input_memory is not None:
        documented = a.input_memory + sum(r.documented.memory or 0 for r in rows if r.documented)
        line += f"; documented activation total {documented:,}"
    console.print(line)
    bad = [r for r in rows if not r.ok]
    if bad:
        raise CnnedgeError(f"{a.name}: {len(bad)} layer(s) disagree with the documented table: "
                           + "; ".join(f"{r.name}: {', '.join(r.problems())}" for r in bad), ExitCode.CHECK_FAILED)
