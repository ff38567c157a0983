"""Every architecture's documented layer table against its real module."""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import replace

import pytest
from torch import nn

from cnnedge import cli
from cnnedge.train.zoo import ARCHS, Layer, build_edgenet, check_layers, get_arch
from conftest import ROOT
from conftest import cli as in_process


@pytest.mark.parametrize("name", list(ARCHS))
def test_documented_table_matches_module(name):
    arch = ARCHS[name]
    rows = check_layers(arch.build(10), arch, 10)
    assert [r.name for r in rows] == [layer.name for layer in arch.table]
    assert all(r.ok for r in rows), [(r.name, r.problems()) for r in rows if not r.ok]
    assert sum(r.measured.params for r in rows) == sum(layer.params for layer in arch.table)


def seed_text(number: str) -> str:
    folder = ROOT.parent / "shared" / "seeds"
    found = sorted(folder.glob(f"{number}_*.txt"))
    if not found:
        reason = f"seed write-up {number} not found in {folder}"
        if os.environ.get("CNNEDGE_REQUIRE_DATA") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return found[0].read_text()


def test_seed_004_summary_is_our_keras_mnist_cnn_table():
    """The Keras model.summary() printed in seed 004, row by row: (None, H, W, C) shapes and parameters."""
    rows = re.findall(r"^\w+ \((\w+)\)?\s+\(None, ([\d, ]+)\)\s+([\d,]+)$", seed_text("004"), re.M)
    summary = [(kind, tuple(int(d) for d in dims.split(",")), int(params.replace(",", ""))) for kind, dims, params in rows]
    first = summary[: len(ARCHS["keras_mnist_cnn"].table)]  # the first of the seed's two identical summaries
    assert [k for k, _, _ in first] == ["Conv2D", "Conv2D", "MaxPooling2", "Dropout", "Flatten", "Dense", "Dropout", "Dense"]
    for layer, (_, dims, params) in zip(ARCHS["keras_mnist_cnn"].table, first):
        chw = (dims[2], dims[0], dims[1]) if len(dims) == 3 else dims
        assert (layer.shape, layer.params) == (chw, params), layer.name
    assert "Total params: 1,199,882" in seed_text("004")


def test_seed_002_figures_are_our_keras_convnet_table():
    text = seed_text("002")
    table = {layer.name: layer for layer in ARCHS["keras_convnet"].table}
    documented = [int(n) for n in re.findall(r"No\. parameters = [\d *+()]+= +(\d+)", text)]
    assert documented[:2] == [table["conv1"].params, table["conv2"].params]  # 544, 9248
    shapes = [tuple(int(d) for d in m.split(", ")) for m in re.findall(r"Output dim = \(None, ([\d, ]+)\)", text)]
    assert [(c, h, w) for h, w, c in shapes] == [table[n].shape for n in ("conv1", "pool1", "conv2", "pool2")]
    assert "into (None, 800)" in text and table["flatten"].shape == (800,)
    # The seed counts the dense layer's weights only (800 * 10); the table adds the 10 biases and says so.
    assert documented[2] == 8000 and table["dense"].params == 8000 + 10 and "biases" in table["dense"].note


def test_seed_003_module_is_our_lenet_dropout_table():
    """Parameter counts computed from the module seed 003 prints (kernel sizes and features), not from ours."""
    text = seed_text("003")
    convs = [tuple(int(v) for v in m) for m in re.findall(r"Conv2d\((\d+), (\d+), kernel_size=\((\d+), \d+\)", text)]
    linears = [tuple(int(v) for v in m) for m in re.findall(r"Linear\(in_features=(\d+), out_features=(\d+)", text)]
    table = {layer.name: layer for layer in ARCHS["lenet_dropout"].table}
    assert [table["conv1"].params, table["conv2"].params] == [cout * (cin * k * k + 1) for cin, cout, k in convs]
    assert [table["fc1"].params, table["fc2"].params] == [o * (i + 1) for i, o in linears]
    assert table["flatten"].shape == (linears[0][0],) and "tensor.view(320)" in text


def test_seed_000_flatten_is_our_qmnist_convnet_table():
    text = seed_text("000")
    fan_in = re.search(r"nn\.Linear\(7\*7\*32, num_classes\)", text)
    assert fan_in and ARCHS["qmnist_convnet"].table[-2].shape == (7 * 7 * 32,)
    assert ARCHS["qmnist_convnet"].table[-1].params == 7 * 7 * 32 * 10 + 10


def test_head_adapts_to_other_class_counts():
    arch = get_arch("lenet_dropout")
    head = arch.table_for(6)[-1]
    assert head.shape == (6,) and head.params == 6 * 51
    assert all(r.ok for r in check_layers(arch.build(6), arch, 6))


def test_wrong_channels_are_reported():
    arch = get_arch("edgenet")
    model = build_edgenet(10)
    model.conv2 = nn.Conv2d(16, 24, 3, padding=1, bias=False)  # the table says 32 channels
    model.bn2 = nn.BatchNorm2d(24)
    model.conv3 = nn.Conv2d(24, 64, 3, padding=1, bias=False)
    bad = {r.name: r.problems() for r in check_layers(model, arch, 10) if not r.ok}
    assert set(bad) == {"conv2", "bn2", "relu2", "pool2", "conv3"}
    assert "torch shape (24, 14, 14) != documented (32, 14, 14)" in bad["conv2"]
    assert "3,456 parameters != documented 4,608" in bad["conv2"]


def test_missing_and_extra_layers_are_reported():
    arch = replace(get_arch("edgenet"), table=(*get_arch("edgenet").table[:-1], Layer("softmax", (10,), 0)))
    problems = {r.name: r.problems() for r in check_layers(build_edgenet(10), arch, 10) if not r.ok}
    assert problems == {"softmax": ["documented layer missing from the network"],
                        "fc2": ["layer not in the documented table"]}


def test_summary_exits_3_on_a_mismatch(monkeypatch, capsys):
    def broken(num_classes=10):
        model = build_edgenet(num_classes)
        model.fc1 = nn.Linear(576, 100)
        model.fc2 = nn.Linear(100, num_classes)
        return model

    monkeypatch.setitem(ARCHS, "broken", replace(get_arch("edgenet"), name="broken", build=broken))
    monkeypatch.setattr(sys, "argv", ["cnnedge", "summary", "--arch", "broken"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fc1" in err[0] and "(100) != documented (128)" in err[0]


def test_summary_cli_lists_every_architecture():
    result = in_process("summary")
    assert result.returncode == 0, result.stderr
    for name in ARCHS:
        assert name in result.stdout
    detail = in_process("summary", "--arch", "keras_mnist_cnn")
    assert detail.returncode == 0, detail.stderr
    assert "1,199,882 parameters" in detail.stdout and "documented activation total 87,194" in detail.stdout
    assert "87,194 activations" in detail.stdout  # measured total equals the documented one


def test_macs_are_counted_from_the_module():
    rows = check_layers(build_edgenet(10), get_arch("edgenet"), 10)
    macs = {r.name: r.measured.macs for r in rows}
    assert macs["conv1"] == 16 * 28 * 28 * 9
    assert macs["conv2"] == 32 * 14 * 14 * 16 * 9
    assert macs["fc1"] == 576 * 128
    assert sum(macs.values()) == 1_994_240
    assert math.prod(rows[0].measured.shape) == 16 * 28 * 28
