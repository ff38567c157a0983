"""Pictures of network inputs: the training samples and predictions grids of `cnnedge train`, `cnnedge
predict --grid` (torch-free), and `cnnedge pixels`. Wrong predictions are found by colour, tile by tile."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest

from cnnedge.infer.grid import GREEN, GREY, LINE, RED, TITLE, grid_layout, label_grid
from conftest import MODEL, ROOT, assert_one_line_error, cli, run_cli, run_torch_free


def frame_colour(picture: np.ndarray, box) -> tuple[int, int, int]:
    x, y, w, h = box
    return tuple(int(c) for c in picture[y + 1, x + w // 2])  # inside the top edge of the frame


def red_mask(picture: np.ndarray) -> np.ndarray:
    b, g, r = (picture[..., i].astype(int) for i in range(3))
    return (r > 200) & (g < 40) & (b < 40)


def test_label_grid_marks_exactly_the_wrong_tiles():
    images = [np.full((28, 28), v, np.float32) for v in (0.0, 0.5, 1.0, 0.25, 0.75)]
    wrong = [True, False, None, True, False]
    captions = [["7 90%", "true 1"], ["2 80%"], ["3 99%"], ["1 51%", "true 4"], ["9 70%"]]
    picture, boxes = label_grid(images, captions, wrong, cols=3, title="five tiles")
    assert (picture.shape[:2], boxes) == grid_layout(5, (28, 28), cols=3, lines=2, title=True)
    assert picture.shape[:2] == (TITLE + 2 * (84 + 6 + 2 * LINE + 8) + 8, 3 * (84 + 6 + 8) + 8)
    expected = {True: RED, False: GREEN, None: GREY}
    mask = red_mask(picture)
    for box, bad, image in zip(boxes, wrong, images):
        assert frame_colour(picture, box) == expected[bad]
        x, y, w, h = box
        inner = picture[y + 3: y + h - 3, x + 3: x + w - 3]
        assert (inner == round(float(image[0, 0]) * 255)).all()  # the image itself, enlarged 3x
    # Red appears in the wrong tiles' frames and nowhere else.
    cells = np.zeros_like(mask)
    for box, bad in zip(boxes, wrong):
        if bad:
            x, y, w, h = box
            cells[y: y + h + 2 * LINE, x: x + w] = True
    assert mask[cells].any() and not mask[~cells].any()


@pytest.fixture(scope="module")
def trained(small_model):
    """The session's short training run (conftest.small_model), which wrote its grids."""
    return small_model[0]


def test_train_writes_samples_and_predictions_grids(trained, data_root):
    out = trained
    samples = cv2.imread(str(out.with_name(out.stem + ".samples.png")))
    size, boxes = grid_layout(25, (28, 28), cols=5, lines=1, title=True)
    assert samples.shape[:2] == size
    assert all(frame_colour(samples, b) == GREY for b in boxes) and not red_mask(samples).any()  # labels, no verdicts

    metrics = json.loads(out.with_name(out.stem + ".metrics.json").read_text())
    mistakes = round((1 - metrics["test_accuracy"]) * 10_000)
    assert 16 < mistakes < 9_984  # one short epoch: mistakes and right answers both to show
    shown_wrong = min(32, mistakes)  # at most two thirds of the 48 tiles
    predictions = cv2.imread(str(out.with_name(out.stem + ".predictions.png")))
    size, boxes = grid_layout(48, (28, 28), cols=8, lines=2, title=True)
    assert predictions.shape[:2] == size
    colours = [frame_colour(predictions, b) for b in boxes]
    assert colours == [RED] * shown_wrong + [GREEN] * (48 - shown_wrong)  # mistakes first, in red


def test_prediction_picks_put_the_most_confident_mistakes_first(trained, data_root):
    import torch

    from cnnedge.train.checkpoint import load_checkpoint, model_from_checkpoint
    from cnnedge.train.data import load_data
    from cnnedge.train.trainer import prediction_picks, training_samples

    checkpoint = load_checkpoint(trained)
    model = model_from_checkpoint(checkpoint)
    data = load_data("mnist", data_root)
    x, y = data.x_test[:2000], data.y_test[:2000].numpy()
    mean, std = (torch.tensor(checkpoint[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        logits = model(((x - mean) / std))
    preds = logits.argmax(1).numpy()
    picks, confidence = prediction_picks(model, x, y, preds, mean, std, "cpu", seed=0)
    wrong = int((preds[picks] != y[picks]).sum())
    assert wrong == min(32, int((preds != y).sum())) and (preds[picks[:wrong]] != y[picks[:wrong]]).all()
    assert (preds[picks[wrong:]] == y[picks[wrong:]]).all()
    assert np.all(np.diff(confidence[:wrong]) <= 1e-6)  # most confident mistake first
    top_mistake = np.flatnonzero(preds != y)[logits.softmax(1).amax(1).numpy()[preds != y].argmax()]
    assert picks[0] == top_mistake
    assert np.allclose(confidence, logits.softmax(1).amax(1).numpy()[picks], atol=1e-5)

    plain, _ = training_samples(data.x_train, data.y_train, {"augment": False}, seed=3)
    augmented, labels = training_samples(data.x_train, data.y_train, {"augment": True}, seed=3)
    torch.manual_seed(3)  # the draw training_samples makes
    expected = data.x_train[torch.randperm(len(data.x_train))[:25]].squeeze(1).numpy()
    assert np.array_equal(plain, expected)  # without augmentation: the images themselves
    assert augmented.shape == (25, 28, 28) and not np.allclose(augmented, plain)


def test_predict_grid_is_torch_free_and_red_where_the_class_folder_disagrees(tmp_path):
    (tmp_path / "7").mkdir()
    (tmp_path / "3").mkdir()
    (tmp_path / "loose").mkdir()
    wrong = shutil.copy(ROOT / "samples/3/04_pen_photo.jpg", tmp_path / "7")  # a 3 filed as a 7
    right = shutil.copy(ROOT / "samples/3/21_tight_crop.jpg", tmp_path / "3")
    unknown = shutil.copy(ROOT / "samples/5/01_mnist_like.png", tmp_path / "loose")  # no class folder
    grid = tmp_path / "grid.png"
    result = run_torch_free(["predict", wrong, right, unknown, "--grid", grid, "--format", "json"])
    assert [r["label"] for r in json.loads(result.stdout)["results"]] == ["3", "3", "5"]  # stdout stays JSON
    picture = cv2.imread(str(grid))
    size, boxes = grid_layout(3, (28, 28), cols=3, lines=2, title=True)
    assert picture.shape[:2] == size
    assert [frame_colour(picture, b) for b in boxes] == [RED, GREEN, GREY]
    mask = red_mask(picture)
    x, y, w, h = boxes[0]
    assert mask[y: y + h, x: x + w].any() and not mask[:, x + w:].any()  # red in the first tile only
    # What each tile shows is the network input predict classified (as --save-crops writes it).
    from cnnedge.infer.predictor import Predictor

    with Predictor() as predictor:
        crop = predictor.preprocess(cv2.imread(str(wrong)))
    tile = picture[y + 3: y + h - 3: 3, x + 3: x + w - 3: 3, 0]
    assert np.abs(tile.astype(int) - np.clip(crop.input * 255 + 0.5, 0, 255).astype(int)).max() <= 1


def test_predict_grid_refuses_what_it_cannot_write(tmp_path):
    assert_one_line_error(cli("predict", "samples/", "--grid", tmp_path / "grid.jpg"), 2, "--grid", ".png")


def test_pixels_writes_every_value_of_the_network_input(tmp_path):
    image = ROOT / "samples/6/06_rotated_photo.jpg"
    out = tmp_path / "six.pixels.png"
    result = run_torch_free(["pixels", image, "--out", out, "--cell", "30"])
    assert "the model says 6" in result.stdout
    picture = cv2.imread(str(out))
    margin = 26
    assert picture.shape[:2] == (TITLE + margin + 28 * 30, margin + 28 * 30)
    from cnnedge.infer.predictor import Predictor

    with Predictor(MODEL) as predictor:
        x = predictor.preprocess(cv2.imread(str(image))).input
    body = picture[TITLE + margin:, margin:, 0].astype(int)
    expected = np.clip(x * 255 + 0.5, 0, 255).astype(int)
    assert np.abs(body[2::30, 2::30] - expected).max() <= 1  # each cell's background is its pixel's value
    # Every cell has its value written in it: text pixels differ from the cell's own grey.
    cells = body.reshape(28, 30, 28, 30).transpose(0, 2, 1, 3)[..., 8:22, 4:26]
    assert (np.abs(cells - expected[..., None, None]) > 60).any(axis=(2, 3)).all()
    assert_one_line_error(run_cli("pixels", tmp_path / "missing.png", "--out", tmp_path / "x.png"), 2, "missing.png")
