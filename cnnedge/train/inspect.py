"""`cnnedge inspect`: look inside a trained network, as seed 003 did.

A grid of a conv layer's filters, and for an image: the filters applied with OpenCV's filter2D next
to the network's own output of that layer. filter2D computes the same correlation as the conv
(zero border, summed over input channels), so the two panels must agree; the figure says how closely.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from cnnedge.atomic import check_writable, write_bytes
from cnnedge.train.checkpoint import load_checkpoint, model_from_checkpoint
from cnnedge.errors import CnnedgeError, ImageError
from cnnedge.infer.files import read_image
from cnnedge.infer.preprocess import prepare

TILE = 48  # pixels per map in a grid
GAP = 4


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) of the most square grid holding n maps."""
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def _diverging_lut() -> np.ndarray:
    # blue (negative) -> white (zero) -> red (positive), as BGR: signs matter for filters
    t = np.linspace(-1, 1, 256)
    b = np.where(t < 0, 1.0, 1 - t)
    r = np.where(t > 0, 1.0, 1 + t)
    g = 1 - np.abs(t)
    return (np.stack([b, g, r], axis=1) * 255).astype(np.uint8).reshape(256, 1, 3)


def tile_grid(maps: np.ndarray, signed: bool = True) -> np.ndarray:
    """(n, h, w) maps -> BGR grid image; one shared scale so that maps are comparable."""
    n = len(maps)
    rows, cols = grid_shape(n)
    scale = float(np.abs(maps).max()) or 1.0
    canvas = np.full((rows * TILE + (rows + 1) * GAP, cols * TILE + (cols + 1) * GAP, 3), 64, np.uint8)
    lut = _diverging_lut()
    for i, m in enumerate(maps):
        if signed:
            u8 = np.clip((m / scale + 1) * 127.5, 0, 255).astype(np.uint8)
            tile = cv2.applyColorMap(u8, lut)
        else:
            u8 = np.clip(m / scale * 255, 0, 255).astype(np.uint8)
            tile = cv2.cvtColor(u8, cv2.COLOR_GRAY2BGR)
        tile = cv2.resize(tile, (TILE, TILE), interpolation=cv2.INTER_NEAREST)
        r, c = divmod(i, cols)
        y, x = GAP + r * (TILE + GAP), GAP + c * (TILE + GAP)
        canvas[y : y + TILE, x : x + TILE] = tile
    return canvas


def _with_title(image: np.ndarray, title: str) -> np.ndarray:
    bar = np.full((28, image.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, title, (4, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([bar, image])


def _encode_png(image: np.ndarray) -> bytes:
    ok, png = cv2.imencode(".png", image)
    assert ok
    return png.tobytes()


def find_conv(model: nn.Module, name: str | None) -> tuple[str, nn.Conv2d]:
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if name is None:
        return convs[0]
    for n, m in convs:
        if n == name or n == f"{name}.0":  # Keras-style rows wrap their conv: conv1 -> conv1.0
            return n, m
    raise CnnedgeError(f"--layer {name!r} is not a conv layer; choose one of: {', '.join(n for n, _ in convs)}")


def filter2d_responses(layer_input: np.ndarray, conv: nn.Conv2d) -> np.ndarray:
    """The conv layer's output computed with cv2.filter2D: per output channel, the sum over input
    channels of the correlation with that kernel, plus the bias."""
    weight = conv.weight.detach().numpy()
    bias = conv.bias.detach().numpy() if conv.bias is not None else np.zeros(len(weight), np.float32)
    kh, kw = conv.kernel_size
    (sh, sw), (ph, pw) = conv.stride, conv.padding
    ah, aw = kh // 2, kw // 2  # filter2D's default anchor
    out_h = (layer_input.shape[1] + 2 * ph - kh) // sh + 1
    out_w = (layer_input.shape[2] + 2 * pw - kw) // sw + 1
    responses = np.zeros((weight.shape[0], out_h, out_w), np.float32)
    for o in range(weight.shape[0]):
        total = np.zeros(layer_input.shape[1:], np.float32)
        for i in range(weight.shape[1]):
            total += cv2.filter2D(layer_input[i], cv2.CV_32F, weight[o, i], borderType=cv2.BORDER_CONSTANT)
        # filter2D centres the kernel at its anchor; the conv starts at -padding
        responses[o] = total[ah - ph :: sh, aw - pw :: sw][:out_h, :out_w] + bias[o]
    return responses


def inspect(checkpoint_path: str | Path, image_path: str | Path | None = None, layer: str | None = None,
            out_dir: str | Path | None = None) -> tuple[list[Path], float | None]:
    """Write the filter grid (and, with an image, the responses figure); return the files and the
    largest filter2D-vs-network difference."""
    checkpoint = load_checkpoint(checkpoint_path)
    model = model_from_checkpoint(checkpoint, checkpoint_path)
    name, conv = find_conv(model, layer)
    checkpoint_path = Path(checkpoint_path)
    out_dir = Path(out_dir) if out_dir else checkpoint_path.with_name(checkpoint_path.stem + "_inspect")
    label = name.replace(".", "_")
    check_writable(out_dir / f"{label}.filters.png")  # a path under a file, a read-only folder: before the work
    written = []

    weights = conv.weight.detach().numpy().mean(axis=1)  # deeper layers: averaged over input channels
    what = "filters" if conv.in_channels == 1 else f"filters (mean over {conv.in_channels} input channels)"
    grid = _with_title(tile_grid(weights), f"{name}: {conv.out_channels} {what}")
    path = out_dir / f"{label}.filters.png"
    write_bytes(path, _encode_png(grid))
    written.append(path)

    if image_path is None:
        return written, None
    try:
        image = prepare(read_image(image_path), checkpoint["preprocess"], checkpoint["input_shape"][-1])
    except ImageError as e:
        raise CnnedgeError(f"{image_path}: {e}") from None
    mean, std = checkpoint["mean"][0], checkpoint["std"][0]
    x = torch.from_numpy((image - mean) / std).float()[None, None]
    captured = {}
    hook = conv.register_forward_hook(lambda m, i, o: captured.update(input=i[0][0].numpy(), output=o[0].numpy()))
    with torch.no_grad():
        logits = model(x)
    hook.remove()
    opencv = filter2d_responses(captured["input"], conv)
    network = captured["output"]
    difference = float(np.abs(opencv - network).max())
    top = int(logits.argmax())
    panels = [
        _with_title(tile_grid(opencv), "cv2.filter2D"),
        _with_title(tile_grid(network), f"network {name}, diff {difference:.0e}"),
    ]
    network_input = cv2.resize((image * 255).astype(np.uint8), (panels[0].shape[0] - 28,) * 2, interpolation=cv2.INTER_NEAREST)
    panels.insert(0, _with_title(cv2.cvtColor(network_input, cv2.COLOR_GRAY2BGR),
                                 f"input -> {checkpoint['class_names'][top]}"))
    gap = np.full((panels[0].shape[0], 12, 3), 255, np.uint8)
    figure = np.hstack([panels[0], gap, panels[1], gap, panels[2]])
    path = out_dir / f"{label}.{Path(image_path).stem}.responses.png"
    write_bytes(path, _encode_png(figure))
    written.append(path)
    return written, difference
