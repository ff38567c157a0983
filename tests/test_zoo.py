"""Every architecture's documented layer table against its real module."""

from __future__ import annotations

import math
import sys
from dataclasses import replace

import pytest
from torch import nn

from cnnedge import cli
from cnnedge.train.zoo import ARCHS, Layer, build_edgenet, check_layers, get_arch
from conftest import run_cli


@pytest.mark.parametrize("name", list(ARCHS))
def test_documented_table_matches_module(name):
    arch = ARCHS[name]
    rows = check_layers(arch.build(10), arch, 10)
    assert [r.name for r in rows] == [layer.name for layer in arch.table]
    assert all(r.ok for r in rows), [(r.name, r.problems()) for r in rows if not r.ok]
    assert sum(r.measured.params for r in rows) == sum(layer.params for layer in arch.table)


def test_seed_tables_carry_the_documented_figures():
    # Figures straight from the seed write-ups, not from our modules.
    keras = {layer.name: layer for layer in ARCHS["keras_mnist_cnn"].table}
    assert keras["conv1"].shape == (32, 26, 26) and keras["conv1"].params == 320
    assert keras["dense1"].params == 1_179_776
    assert sum(layer.params for layer in keras.values()) == 1_199_882
    memory = ARCHS["keras_mnist_cnn"].input_memory + sum(layer.memory for layer in keras.values())
    assert memory == 87_194
    seed2 = {layer.name: layer for layer in ARCHS["keras_convnet"].table}
    assert (seed2["conv1"].shape, seed2["conv1"].params) == ((32, 25, 25), 544)
    assert (seed2["conv2"].shape, seed2["conv2"].params) == ((32, 10, 10), 9_248)
    assert seed2["flatten"].shape == (800,)
    assert ARCHS["lenet_dropout"].table[-4].shape == (320,)
    assert ARCHS["qmnist_convnet"].table[-2].shape == (7 * 7 * 32,)


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
    result = run_cli("summary")
    assert result.returncode == 0, result.stderr
    for name in ARCHS:
        assert name in result.stdout
    detail = run_cli("summary", "--arch", "keras_mnist_cnn")
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
