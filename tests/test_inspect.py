"""`cnnedge inspect`: filter grids and the filter2D-vs-network figure."""

from __future__ import annotations

import cv2
import pytest

from cnnedge.train.inspect import GAP, TILE, grid_shape, inspect
from conftest import ROOT, assert_one_line_error, cli

CHECKPOINT = ROOT / "models" / "cnn.pt"


def _grid_size(n: int) -> tuple[int, int]:
    rows, cols = grid_shape(n)
    return 28 + rows * TILE + (rows + 1) * GAP, cols * TILE + (cols + 1) * GAP  # 28: the title bar


@pytest.mark.parametrize(("layer", "filters"), [(None, 16), ("conv2", 32), ("conv3", 64)])
def test_filter_grid_has_one_tile_per_filter(tmp_path, layer, filters):
    written, _ = inspect(CHECKPOINT, layer=layer, out_dir=tmp_path)
    image = cv2.imread(str(written[0]))
    assert image.shape[:2] == _grid_size(filters)
    assert grid_shape(filters) == {16: (4, 4), 32: (6, 6), 64: (8, 8)}[filters]
    # every tile holds a real filter: not the background colour everywhere
    rows, cols = grid_shape(filters)
    y, x = 28 + GAP, GAP
    assert image[y : y + TILE, x : x + TILE].std() > 0


@pytest.mark.parametrize("layer", ["conv1", "conv3"])
def test_filter2d_reproduces_the_network(tmp_path, handwritten_dir, layer):
    photo = handwritten_dir / "4" / "photo_4.png"
    written, difference = inspect(CHECKPOINT, image_path=photo, layer=layer, out_dir=tmp_path)
    assert difference < 1e-4
    figure = cv2.imread(str(written[1]))
    assert figure is not None and figure.shape[1] > 3 * figure.shape[0] - 100  # three panels side by side


def test_cli_prints_the_files_and_refuses_bad_input(tmp_path, handwritten_dir):
    result = cli("inspect", CHECKPOINT, "--image", handwritten_dir / "2" / "photo_2.png", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"wrote {tmp_path / 'conv1.filters.png'}" in result.stdout
    assert "conv1.photo_2.responses.png" in result.stdout
    assert_one_line_error(cli("inspect", CHECKPOINT, "--layer", "fc1", "--out", tmp_path), 2, "not a conv layer")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert_one_line_error(cli("inspect", CHECKPOINT, "--image", text, "--out", tmp_path), 2, str(text))
    assert_one_line_error(cli("inspect", text, "--out", tmp_path), 2, "not a cnnedge checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".png" and p != text) == [
        "conv1.filters.png", "conv1.photo_2.responses.png"]


def test_seed_network_with_valid_padding_and_even_kernel(tmp_path, handwritten_dir):
    # keras_convnet's first conv is 4x4 without padding: filter2D's anchor must be accounted for.
    import torch

    from cnnedge.train.checkpoint import save_checkpoint
    from cnnedge.train.zoo import build_model

    torch.manual_seed(0)
    model = build_model("keras_convnet")
    path = tmp_path / "keras.pt"
    save_checkpoint(path, {"arch": "keras_convnet", "num_classes": 10, "class_names": [str(i) for i in range(10)],
                           "input_shape": [1, 28, 28], "mean": [0.13], "std": [0.31], "preprocess": "digit",
                           "state_dict": model.state_dict()})
    for layer in ("conv1", "conv2"):
        # Without the anchor shift, filter2D's output is off by a pixel against the conv's: differences of ~1.
        _, difference = inspect(path, image_path=handwritten_dir / "8" / "photo_8.png", layer=layer, out_dir=tmp_path)
        assert difference < 1e-4
