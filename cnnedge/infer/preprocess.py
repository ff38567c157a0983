"""OpenCV preprocessing: turn what users photograph or draw into what the network was trained on.

Torch-free: predict, webcam, enroll and serve run on onnxruntime, OpenCV and numpy alone; decoding files is
cnnedge.infer.files' job.

Modes (stored in the ONNX metadata as `preprocess`):

- "digit": the MNIST convention. White strokes on black, the symbol's bounding box fitted into 20x20
  keeping its aspect ratio, anti-aliased, placed in 28x28 so that its centre of mass is at the centre.
- "fit": the object fills the frame (Fashion-MNIST): white-on-black, the box fitted into the whole frame.

The digit pipeline (`prepare`, or `analyse` for the box and the details) runs ten steps on uint8 grey:
decode, the MNIST-like shortcut, work size, polarity, illumination, rules, threshold, components, stroke
width, fit and centre. docs/preprocessing.md describes each step, with pictures traced from `analyse`
(`trace=`); the functions below say why they work as they do.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cv2
import numpy as np

from cnnedge.choices import PREPROCESS_MODES
from cnnedge.errors import ImageError, ImageTooLarge
from cnnedge.infer.files import MAX_PIXELS, decode_grey, decode_image

INK = ("auto", "dark", "light")

WORK_MAX = 352  # long side of the working resolution (issue 18: 512 found the same digits at 2.1x the pixels)
SUPERSAMPLE = 4  # the shape is rebuilt at this multiple of the output scale before the final INTER_AREA
STROKE_RATIO = 0.115  # MNIST's median stroke width / box side (2.25 px of 20, measured on the test set)
MIN_SIDE = 8  # smaller images hold no recognisable symbol (8x8: the smallest digit datasets, e.g. sklearn's)


@dataclass
class Prepared:
    """What `analyse` found: the network input and where the symbol was."""

    input: np.ndarray  # float32 (size, size) in [0, 1], white symbol on black
    box: tuple[int, int, int, int] | None  # (x, y, w, h) of the symbol in the given image's pixels
    light_ink: bool  # the symbol was lighter than its background (white on black, chalk on a board)
    passthrough: bool  # already MNIST-like: used as is
    stroke_width: float = 0.0  # measured stroke width in input pixels (0 when not measured)


# ----------------------------------------------------------------------------------------- decode


def _checked(image: np.ndarray) -> np.ndarray:
    """The image as an array, or ImageError when it is none: (H, W) or (H, W, 1/3/4) of numbers."""
    img = np.asarray(image)
    if img.ndim not in (2, 3):
        raise ImageError(f"not an image: array of shape {img.shape} (expected height x width [x channels])")
    if img.size == 0:
        raise ImageError(f"empty image (shape {img.shape})")
    if img.ndim == 3 and img.shape[2] not in (1, 3, 4):
        raise ImageError(f"unsupported channel count {img.shape[2]} (1, 3 or 4)")
    if img.dtype.kind not in "biuf":
        raise ImageError(f"unsupported pixel type {img.dtype}")
    return img


def to_gray(image: np.ndarray) -> np.ndarray:
    """Any decoded image -> float32 grey in [0, 1]. Transparent pixels become white paper, or black when
    the visible ink is light (white strokes on a transparent layer)."""
    img = _checked(image)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.dtype == np.uint8:
        scale = 1 / 255.0
    elif img.dtype == np.uint16:
        scale = 1 / 65535.0
    else:
        # Other types: values in [0, 1] as they are, else stretched from their finite range; infinities
        # clip to that range and NaN counts as its lowest value. float64, where float32 would overflow.
        img = img.astype(np.float64)
        finite = img[np.isfinite(img)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        img = np.nan_to_num(img, nan=lo, posinf=hi, neginf=lo)
        if not (0.0 <= lo and hi <= 1.0):
            span = max(abs(lo), abs(hi))  # divided first: hi - lo overflows near the float64 limits
            img, lo, hi = img / span, lo / span, hi / span
            img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
        img = img.astype(np.float32)
        scale = 1.0
    if img.ndim == 2:  # floats were made float32 in [0, 1] above (scale 1)
        return img if scale == 1.0 else img.astype(np.float32) * np.float32(scale)
    grey = cv2.cvtColor(img[:, :, :3].astype(np.float32) * np.float32(scale), cv2.COLOR_BGR2GRAY)
    if img.shape[2] == 3:
        return grey
    alpha = img[:, :, 3].astype(np.float32) * np.float32(scale)
    if float(alpha.min()) > 0.99:  # opaque: the alpha channel says nothing
        return grey
    visible = alpha > 0.5
    light_ink = visible.any() and float(grey[visible].mean()) > 0.6 and visible.mean() < 0.5
    paper = 0.0 if light_ink else 1.0
    return grey * alpha + paper * (1.0 - alpha)


# -------------------------------------------------------------------------------------- helpers


def _odd(n: float) -> int:
    n = max(3, int(round(n)))
    return n if n % 2 else n + 1


def _fit_box(size: int) -> int:
    return max(1, round(size * 20 / 28))


def _place_by_mass(patch: np.ndarray, size: int) -> np.ndarray:
    """Put `patch` into a size x size field so its centre of mass lands on the centre pixel (MNIST: 14)."""
    out = np.zeros((size, size), np.float32)
    m = cv2.moments(patch)
    h, w = patch.shape
    if m["m00"] <= 1e-6:
        cx, cy = (w - 1) / 2, (h - 1) / 2
    else:
        cx, cy = m["m10"] / m["m00"], m["m01"] / m["m00"]
    x0, y0 = int(round(size / 2 - cx)), int(round(size / 2 - cy))
    ya, xa, yb, xb = max(0, y0), max(0, x0), min(size, y0 + h), min(size, x0 + w)
    if yb > ya and xb > xa:
        out[ya:yb, xa:xb] = patch[ya - y0: yb - y0, xa - x0: xb - x0]
    return out


@functools.lru_cache(maxsize=8)
def _moments(size: int) -> tuple[np.ndarray, np.ndarray]:
    """For flattened size x size images: a (size * size, 2 * size) matrix whose product gives the row and
    column sums, and a (size * size, 3) one for the moments of order 1 and 0 (y, x, mass)."""
    y, x = np.divmod(np.arange(size * size), size)
    sums = np.zeros((size * size, 2 * size), np.float32)
    sums[np.arange(size * size), y] = 1
    sums[np.arange(size * size), size + x] = 1
    return sums, np.stack([y, x, np.ones_like(x)], axis=1).astype(np.float32)


def mnist_like(batch: np.ndarray) -> np.ndarray:
    """For a stack (N, size, size) of grey images in [0, 1]: which ones already are MNIST-style network
    inputs and should be used as they are. Not any small white-on-black image: what MNIST's recipe makes
    of a digit. The ink's box fitted into 20x20 (its longer side 18-20 px at 28x28: so a dark border, at
    least 8 rows and 8 columns without ink, which also settles the polarity), the centre of mass on the
    centre pixel (within 0.6 px), a stroke neither a hairline nor a blob. The whole MNIST training and
    test sets pass; the thin 1-2 px polylines that an app shrank from its canvas, in a 21x17 box placed
    by eye, do not. Vectorised in few numpy calls: predict checks a whole chunk of 28x28 files at once,
    `Predictor.preprocess` single images."""
    n, size = batch.shape[0], batch.shape[1]
    sums, moments = _moments(size)
    flat = batch.reshape(n, -1)
    peak = flat.max(axis=1)[:, None]
    # The box: the rows and columns holding a tenth of a peak pixel's worth of ink or more.
    lit = ((flat @ sums) > 0.1 * peak).reshape(n, 2, size)
    extent = (size - lit.argmax(axis=2) - lit[:, :, ::-1].argmax(axis=2)).max(axis=1)
    ok = (peak[:, 0] >= 0.3) & (extent >= _fit_box(size) - 2 * size / 28) & (extent <= _fit_box(size))
    # The centre of mass, in pixel indices: MNIST puts it at 14 +- 0.5 of a 28x28 field.
    m = flat @ moments
    ok &= np.abs(m[:, :2] - size / 2 * m[:, 2:]).max(axis=1) <= 0.6 * size / 28 * m[:, 2]
    # Stroke width, area / half the boundary length of the ink at half the peak: 0.6 to 7 px (MNIST: 0.77
    # to 6.3). Counted along the flattened rows, so across the row ends too, where the border is dark.
    on = flat > 0.5 * peak
    area = on.sum(axis=1)
    boundary = (on[:, 1:] != on[:, :-1]).sum(axis=1) + (on[:, size:] != on[:, :-size]).sum(axis=1)
    ok &= (area >= 0.01 * size * size) & (area >= 0.3 * size / 28 * boundary) & (area <= 3.5 * size / 28 * boundary)
    return ok


def as_network_input(batch: np.ndarray) -> np.ndarray:
    """MNIST-like images used as they are; only a dim one is stretched so that its peak is 1, like MNIST's."""
    peak = batch.reshape(batch.shape[0], -1).max(axis=1)
    if peak.min() >= 0.98:
        return batch
    scale = np.where(peak < 0.98, 1.0 / np.maximum(peak, 1e-6), 1.0).astype(np.float32)
    return batch * scale[:, None, None]


def _passthrough(batch: np.ndarray) -> list[Prepared | None]:
    """For a stack (N, size, size) of grey images in [0, 1]: the network input of each one that already is an
    MNIST-style input, in either polarity (see `mnist_like`), else None. One rule for single images and
    batches of files alike."""
    n, size = batch.shape[0], batch.shape[1]
    out: list[Prepared | None] = [None] * n
    light = mnist_like(batch)
    dark = np.zeros(n, bool)
    if not light.all():
        dark[~light] = mnist_like(1.0 - batch[~light])
    for light_ink, mask in ((True, light), (False, dark)):
        if mask.any():
            ready = as_network_input(batch[mask] if light_ink else 1.0 - batch[mask])
            for j, i in enumerate(np.flatnonzero(mask)):
                out[i] = Prepared(ready[j], (0, 0, size, size), light_ink, True)
    return out


def _ink_extent(img: np.ndarray, thr: float) -> tuple[int, int, int, int] | None:
    pts = cv2.findNonZero((img > thr).astype(np.uint8))
    return None if pts is None else cv2.boundingRect(pts)


# ---------------------------------------------------------------------------------------- digits


def _histogram(image: np.ndarray) -> np.ndarray:
    """The count of each level of a uint8 image: cv2.calcHist, 5x faster than np.bincount and, unlike it,
    free of the GIL (predict preprocesses on several threads)."""
    return cv2.calcHist([image], [0], None, [256], [0, 256]).ravel().astype(np.int64)


def _quantile(hist: np.ndarray, q: float) -> int:
    """The bin at quantile q of a histogram (statistics on uint8 images without sorting them)."""
    cdf = np.cumsum(hist)
    return int(np.searchsorted(cdf, q * cdf[-1]))


def _median_vote(thumb: np.ndarray, frac: float) -> float:
    """In [-1, 1], positive when the strongest deviations of a uint8 image from its local median are
    lighter than it."""
    k = min(_odd(max(5, max(thumb.shape) / frac)), 255)
    r = thumb.astype(np.int16) - cv2.medianBlur(thumb, k)
    hist = np.bincount((r + 255).ravel(), minlength=511)  # deviations -255..255
    values = np.arange(-255, 256)
    peak = max(_quantile(hist, 0.998) - 255, 255 - _quantile(hist, 0.002))
    mad = _quantile(np.bincount(np.abs(values), weights=hist, minlength=256), 0.5)
    level = max(4 * 1.4826 * mad + 0.25, 0.35 * peak)
    light = float((np.maximum(values - level, 0) * hist).sum())
    dark = float((np.maximum(-values - level, 0) * hist).sum())
    return (light - dark) / (light + dark) if light + dark > 0 else 0.0


def _flat_background(gray: np.ndarray) -> tuple[bool, bool | None]:
    """(flat, light) for a uint8 image. Flat: a digital drawing whose background is one grey level (no
    illumination to correct). Light: whether the pixels away from the dominant level are lighter than it
    (None when that level is not dominant enough to tell)."""
    H, W = gray.shape
    step = max(1, max(H, W) // 256)
    hist = _histogram(gray[::step, ::step])
    mode = int(hist.argmax())
    at_mode = hist[max(0, mode - 2): mode + 3].sum()
    if hist[max(0, mode - 25): mode + 26].sum() < 0.5 * hist.sum():
        return False, None  # the commonest level is not the majority: uniform ink (a fat marker cut tight)
    flat = bool(at_mode >= 0.4 * hist.sum())
    if at_mode >= 0.3 * hist.sum():
        levels = np.arange(256) - mode
        light = int((np.maximum(levels - 25, 0) * hist).sum())
        dark = int((np.maximum(-levels - 25, 0) * hist).sum())
        if light != dark:
            return flat, light > dark
    return flat, None


def _polarity(gray: np.ndarray) -> bool:
    """True when the ink of a photo (uint8) is lighter than its background.

    Decided by the strongest deviations from a local median (the median ignores thin strokes of either
    polarity, and unlike a morphological opening it does not mistake the paper between a digit and the
    page edge for a light stroke), voted over three window sizes so that both fat marker strokes and a
    page edge near the digit are handled."""
    H, W = gray.shape
    f = min(1.0, 96 / max(H, W))
    thumb = cv2.resize(gray, (max(1, round(W * f)), max(1, round(H * f))), interpolation=cv2.INTER_AREA) if f < 1 else gray
    vote = _median_vote(thumb, 3) + _median_vote(thumb, 5)
    if vote <= -0.45:  # dark ink whatever the last window says (a vote is at most 1): its median is the slow one
        return False
    vote += _median_vote(thumb, 8)
    # Dark ink on light paper is by far the commoner case, so light ink must win the vote clearly and,
    # unless it wins overwhelmingly, be surrounded by a dark border. (Light-ink photos vote 0.7 to 3 with
    # dark borders; fat dark strokes cut tight at the border can vote up to about 1.8, with light borders.)
    if vote <= 0.6:
        return False
    if vote > 2.0:
        return True
    threshold, _ = cv2.threshold(thumb, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    ring = np.concatenate([thumb[0], thumb[-1], thumb[1:-1, 0], thumb[1:-1, -1]])
    return bool((ring < threshold).mean() > 0.5)


def _shade(g: np.ndarray, k: int) -> np.ndarray:
    """A cap on the background of `_normalised_ink` (uint8, g's size): the paper's brightness as a median
    twice as wide as the closing's window sees it, a little above it. Where the edge of a shadow crosses
    the page, the closing carries the lit paper into the shade, which would then read as ink (and join the
    digit it touches); the median follows the edge, and pen strokes are too small a part of its window to
    move it. Computed at <= 128 px: the light varies slowly."""
    H, W = g.shape
    f = min(1.0, 128 / max(H, W))
    small = cv2.resize(g, (max(1, round(W * f)), max(1, round(H * f))), interpolation=cv2.INTER_AREA) if f < 1 else g
    median = cv2.medianBlur(small, min(255, _odd(0.6 * min(small.shape))))
    return cv2.add(cv2.resize(median, (W, H), interpolation=cv2.INTER_LINEAR) if f < 1 else median, 10)


def _normalised_ink(g: np.ndarray, k: int, shade: np.ndarray | None = None) -> np.ndarray:
    """g: uint8, dark ink on a light background. Returns uint8 ink: 255 x the relative darkness under the
    local background (a closing wider than the strokes, capped by `shade`). Dividing by the background
    removes gradients and shadows; the floor keeps dark regions (the table beyond the page) from
    amplifying their noise."""
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (k, k))
    bg = cv2.morphologyEx(g, cv2.MORPH_CLOSE, kernel)
    bg = cv2.max(bg if shade is None else cv2.min(bg, shade), g)
    floor = max(1, _quantile(_histogram(bg[::3, ::3]), 0.95) // 2)
    return cv2.divide(cv2.subtract(bg, g), cv2.max(bg, floor), scale=255)


def _components(mask: np.ndarray):
    """8-connected components of a uint8 mask with their stats: (count, labels, stats, centroids). Grana's
    block-based algorithm labels exactly as OpenCV's default (the same numbering, in raster order) but
    computes the stats about 3x faster (0.4 against 1.1 ms at 512x384): it was preprocessing's largest cost."""
    return cv2.connectedComponentsWithStatsWithAlgorithm(mask, 8, cv2.CV_32S, cv2.CCL_GRANA)


def _rules(ink: np.ndarray, horizontal: bool, threshold: float) -> np.ndarray | None:
    """The opened ink of the printed rules in one direction, or None when there are fewer than three."""
    H, W = ink.shape
    length = W if horizontal else H
    n = max(5, length // 12)  # short enough to fit along a slightly tilted thin line
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (n, 1) if horizontal else (1, n))
    opened = cv2.morphologyEx(ink, cv2.MORPH_OPEN, kernel)
    # A rule's columns (rows) are all inked, being connected: without 70% of them inked there is none (most
    # pages), and the components below need not be labelled.
    if np.count_nonzero((opened > threshold).any(axis=0 if horizontal else 1)) < 0.7 * length:
        return None
    # The wide strokes of a large digit survive that opening too and would join the rules into one blob:
    # keep only what is no thicker across than a rule can be (the `thin` bound below).
    # (Subtracted only where it clearly stands out, so that a rule crossing a stroke stays whole, and a
    # rule on the faint ink of a shade keeps its level.)
    thickest = int(0.02 * length + 2) + 1
    thick = cv2.morphologyEx(opened, cv2.MORPH_OPEN, cv2.getStructuringElement(
        cv2.MORPH_RECT, (1, thickest) if horizontal else (thickest, 1)))
    thick[thick < 1.5 * threshold] = 0
    opened = cv2.subtract(opened, thick)
    count, labels, stats, centroids = _components((opened > threshold).astype(np.uint8))
    extent = stats[:, cv2.CC_STAT_WIDTH if horizontal else cv2.CC_STAT_HEIGHT]
    area = stats[:, cv2.CC_STAT_AREA]
    # Printed rules cross (nearly) the whole image and are thin (area / length, which tilt does not change,
    # nor a pen stroke touching the rule here and there); a page has several of them.
    thin = area <= (0.02 * length + 2) * extent
    lines = [i for i in range(1, count) if extent[i] >= 0.7 * length and thin[i]]
    if len(lines) < 3:
        return None
    # On a ruled page, also the pieces of rules: where they fade out or a digit interrupts them (thin, along,
    # running off the page), and between a large digit's strokes, in its loops: thin, along, on the grid of
    # the whole rules (their offsets across, at their common tilt and spacing).
    axes = [0, 1] if horizontal else [1, 0]  # (x, y) -> (along the rules, across them)
    start = stats[:, cv2.CC_STAT_LEFT if horizontal else cv2.CC_STAT_TOP]
    ys, xs = np.nonzero(np.isin(labels, lines))
    pts = np.stack([xs, ys], axis=1)[:, axes] - centroids[labels[ys, xs]][:, axes]
    tilt = float((pts[:, 0] * pts[:, 1]).sum() / max((pts[:, 0] ** 2).sum(), 1.0))
    offset = centroids[:, axes[1]] - tilt * centroids[:, axes[0]]  # where each component crosses the axis
    grid = np.sort(offset[lines])
    spacing = float(np.diff(grid).min())
    for i in range(1, count):
        if i in lines or not thin[i] or extent[i] < n:
            continue
        off_grid = abs((offset[i] - grid[0] + spacing / 2) % spacing - spacing / 2) if spacing > 2 else math.inf
        if start[i] <= 1 or start[i] + extent[i] >= length - 1 or off_grid <= max(2.0, 0.1 * spacing):
            lines.append(i)
    return np.where(np.isin(labels, lines), opened, 0).astype(np.uint8)


def _remove_ruling(ink: np.ndarray) -> np.ndarray:
    """Subtract the lines of ruled or squared paper from the uint8 ink: three or more thin straight lines
    that cross nearly the whole image in the same direction (a digit's own straight strokes never make
    three). Only what is no darker than a typical rule is removed, so a pen stroke on a rule survives."""
    level = _quantile(_histogram(ink[::2, ::2]), 0.995)
    if level < 20:
        return ink
    # Look at half resolution first (4x cheaper); most images have no rules at all.
    small = cv2.resize(ink, (max(1, ink.shape[1] // 2), max(1, ink.shape[0] // 2)), interpolation=cv2.INTER_AREA)
    out = ink
    for horizontal in (True, False):
        if _rules(small, horizontal, 0.1 * level) is not None:
            rule = _rules(ink, horizontal, 0.15 * level)
            if rule is not None:
                # How dark a rule is: along its middle (the blurred flanks of a photographed rule are fainter).
                across = cv2.getStructuringElement(cv2.MORPH_RECT, (1, 5) if horizontal else (5, 1))
                ridge = rule[(rule > 0) & (rule >= cv2.dilate(rule, across))]
                typical = _quantile(np.bincount(ridge, minlength=256), 0.5)
                near = cv2.dilate((rule > 0).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
                out = out.copy() if out is ink else out
                out[near & (ink <= 1.6 * typical)] = 0
    return out


def _stroke_width(mask: np.ndarray) -> float:
    """Mean stroke width in pixels of a binary mask: area / half the boundary length."""
    area = int(cv2.countNonZero(mask))
    if area == 0:
        return 0.0
    contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    perimeter = sum(cv2.arcLength(c, True) for c in contours)
    return float(area / max(perimeter / 2, 1.0)) if perimeter > 0 else 1.0


def _segment(ink: np.ndarray):
    """Hysteresis threshold on the uint8 ink, set from the image's own noise (median absolute deviation)
    and ink contrast -> (labels, stats, kept component ids)."""
    hist = _histogram(ink[::2, ::2])
    med = _quantile(hist, 0.5)
    sigma = 1.4826 * _quantile(np.bincount(np.abs(np.arange(256) - med), weights=hist, minlength=256), 0.5) + 0.5
    above = hist.copy()
    above[: min(255, int(med + 6 * sigma)) + 1] = 0
    level = _quantile(above, 0.95) if above.sum() >= 3 else 0
    if level < 20:
        raise ImageError("no symbol found (blank or featureless image)")
    strong = max(med + 6 * sigma, 0.45 * level, 15)
    weak = max(med + 3 * sigma, 0.22 * level, 10)
    mask = (ink > weak).astype(np.uint8)
    n, labels, stats, _ = _components(mask)
    seeds = np.bincount(labels[ink > strong], minlength=n)
    return labels, stats, [i for i in range(1, n) if seeds[i] > 0]


def _elongation(mask: np.ndarray) -> float:
    """Perimeter^2 / (4 area): about 3 for a blob, the length/width ratio for a stroke, more for a ring."""
    area = int(cv2.countNonZero(mask))
    if area == 0:
        return 0.0
    contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    perimeter = sum(cv2.arcLength(c, True) for c in contours) + 4  # a 1-pixel speck has a perimeter of 0
    return perimeter * perimeter / (4 * area)


def _sheet(work: np.ndarray) -> np.ndarray | None:
    """Where a sheet of paper photographed on a much darker surface lies (a page on a table, tilted, the
    table visible around it), in working pixels and shrunk by a margin that covers the sheet's shadowed,
    dimmer edges. None when there is no such sheet: the paper fills the frame, or what surrounds the light
    region is no darker than shadowed paper. Found on a thumbnail: the largest light region (Otsu), whose
    convex outline (a sheet, with the writing inside it) must be light nearly throughout."""
    H, W = work.shape
    f = min(1.0, 128 / max(H, W))
    thumb = cv2.resize(work, (max(1, round(W * f)), max(1, round(H * f))), interpolation=cv2.INTER_AREA) if f < 1 else work
    thumb = cv2.GaussianBlur(thumb, (0, 0), 1.0)
    _, light = cv2.threshold(thumb, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    contours, _ = cv2.findContours(light, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    outline = max(contours, key=cv2.contourArea)
    hull = cv2.convexHull(outline)
    h, w = thumb.shape
    sheet = np.zeros_like(thumb)
    cv2.drawContours(sheet, [hull], -1, 255, -1)
    inside = sheet > 0
    # Mostly paper inside its outline (the writing is a small part of it; a fat 0 has a hole), and large.
    if not 0.2 * h * w <= np.count_nonzero(inside) <= 0.92 * h * w or np.count_nonzero(light[inside]) < 0.85 * np.count_nonzero(inside):
        return None
    surround = ~inside
    border = np.concatenate([surround[0], surround[-1], surround[1:-1, 0], surround[1:-1, -1]])
    # The table runs along much of the frame and is far darker than the paper (shadows on paper rarely halve it).
    if border.mean() < 0.4 or np.median(thumb[surround]) > 0.5 * np.median(thumb[inside]):
        return None
    margin = _odd(0.04 * max(h, w))
    sheet = cv2.erode(sheet, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (margin, margin)))
    return cv2.resize(sheet, (W, H), interpolation=cv2.INTER_NEAREST) > 0


def _select(labels: np.ndarray, stats: np.ndarray, keep: list[int], shape: tuple[int, int],
            sheet: np.ndarray | None = None) -> tuple[list[int], float]:
    """The components that make up the symbol, and its stroke width.

    A main component (large, stroke-like, central, off the border) plus the parts close to it (a 5's
    bar, a broken stroke). Specks (compact blobs), far components, page edges (what runs along the
    border: the table beyond the sheet, its shadow, even when texture breaks it into fragments) stay
    out. A component along the border is only taken for a page edge when something else substantial
    is left: in a tight crop the digit itself touches the border."""
    H, W = shape
    if not keep:
        return [], 0.0
    area = stats[:, cv2.CC_STAT_AREA]
    cache: dict[int, float] = {}

    def elongation(c):
        if c not in cache:
            x, y, w, h = stats[c, :4]
            cache[c] = _elongation((labels[y: y + h, x: x + w] == c).astype(np.uint8))
        return cache[c]

    def touches(c):
        x, y, w, h = stats[c, :4]
        return x <= 0 or y <= 0 or x + w >= W or y + h >= H

    z = _odd(0.03 * max(H, W))
    edges: set[int] = set()
    border = [c for c in keep if stats[c, 0] <= z or stats[c, 1] <= z or stats[c, 0] + stats[c, 2] >= W - z
              or stats[c, 1] + stats[c, 3] >= H - z]
    if border:
        rect = cv2.getStructuringElement(cv2.MORPH_RECT, (z, z))
        grouped = cv2.morphologyEx(np.isin(labels, border).astype(np.uint8), cv2.MORPH_CLOSE, rect)
        n, glabels, gstats, _ = _components(grouped)
        along = []
        dy, dx = int(0.25 * H), int(0.25 * W)
        for j in range(1, n):
            m = glabels == j
            # How much of each side of the image the blob runs along: top, bottom, left, right.
            runs = (np.count_nonzero(m[:z].any(axis=0)) >= 0.5 * W, np.count_nonzero(m[H - z:].any(axis=0)) >= 0.5 * W,
                    np.count_nonzero(m[:, :z].any(axis=1)) >= 0.5 * H, np.count_nonzero(m[:, W - z:].any(axis=1)) >= 0.5 * H)
            # Along every side too: the table all around a tilted page. (A zero cut tight to its box runs along
            # them as well; with nothing else left it is kept below, as the symbol.)
            if not any(runs):
                continue
            # A page edge stays in a band along the sides it runs along; a digit reaches into the image.
            band = np.zeros((H, W), bool)
            for run, region in zip(runs, (np.s_[:dy], np.s_[H - dy:], np.s_[:, :dx], np.s_[:, W - dx:])):
                if run:
                    band[region] = True
            if np.count_nonzero(band & m) >= 0.9 * gstats[j, cv2.CC_STAT_AREA]:
                along.append(j)
        if along:
            zone = cv2.dilate(np.isin(glabels, along).astype(np.uint8), rect)
            inside = np.bincount(labels[zone > 0], minlength=len(stats))
            edges = {c for c in keep if inside[c] >= 0.5 * area[c]}
    if sheet is not None:  # and what lies mostly beyond the sheet of paper: the table, its shadow
        inside = np.bincount(labels[sheet], minlength=len(stats))
        edges |= {c for c in keep if inside[c] < 0.5 * area[c]}
    rest = [c for c in keep if c not in edges]
    if not any(max(stats[c, 2], stats[c, 3]) >= 0.08 * min(H, W) and elongation(c) >= 4.5 for c in rest):
        rest = list(keep)  # nothing but the border structure: it is the symbol (a tight crop)
    biggest = max(area[c] for c in rest)
    cands = [c for c in rest if area[c] >= max(3, 0.02 * biggest)]
    if not cands:  # specks of a pixel or two: nothing to read
        return [], 0.0

    def score(c):
        x, y, w, h = stats[c, :4]
        d = math.hypot((x + w / 2 - W / 2) / W, (y + h / 2 - H / 2) / H)
        s = area[c] / (1 + 4 * d * d)
        if touches(c):
            s *= 0.3
        if elongation(c) < 4.5:  # a blob, not a pen stroke
            s *= 0.3
        return s

    main = max(cands, key=score)
    x0, y0, w0, h0 = stats[main, :4]
    sw = _stroke_width((labels[y0: y0 + h0, x0: x0 + w0] == main).astype(np.uint8))
    chosen = {main}
    box = [x0, y0, x0 + w0, y0 + h0]
    changed = True
    while changed:
        changed = False
        span = max(box[2] - box[0], box[3] - box[1])
        for c in rest:
            if c in chosen:
                continue
            x, y, w, h = stats[c, :4]
            a = area[c]
            gap = max(box[0] - (x + w), x - box[2], 0) + max(box[1] - (y + h), y - box[3], 0)
            touching = gap <= max(2.0, 1.5 * sw) and a >= max(2.0, 0.005 * area[main])
            near = (gap <= 0.25 * span and a >= 0.04 * area[main] and max(w, h) >= 2.5 * sw
                    and elongation(c) >= 4.5 and not (touches(c) and not touches(main)))
            if touching or near:
                chosen.add(c)
                box = [min(box[0], x), min(box[1], y), max(box[2], x + w), max(box[3], y + h)]
                changed = True
    return sorted(chosen), sw


def _render(mask: np.ndarray, sw: float, size: int, trace: dict | None = None) -> np.ndarray:
    """Binary symbol mask (cropped to its box) with stroke width `sw` -> MNIST-style size x size field."""
    box = _fit_box(size)
    big = box * SUPERSAMPLE
    h, w = mask.shape
    s = big / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    width = sw * s
    if s < 1:
        cov = cv2.resize(mask.astype(np.float32), (nw, nh), interpolation=cv2.INTER_AREA)
        m = cov > min(0.5, 0.4 * width)
        width = max(width, 1.0)
    else:
        m = cv2.resize(mask.astype(np.float32), (nw, nh), interpolation=cv2.INTER_LINEAR) > 0.5
    target = STROKE_RATIO * big
    grow = (target - width) / 2
    pad = int(math.ceil(max(grow, 0))) + 2
    m = cv2.copyMakeBorder(m.astype(np.uint8), pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    if grow > 0.25:
        dist = cv2.distanceTransform(1 - m, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        soft = np.clip(grow + 1 - dist, 0, 1)
    elif grow < -0.5:
        shrink = min(-grow, max(0.0, (width - 2) / 2))
        dist = cv2.distanceTransform(m, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        soft = np.clip(dist - shrink, 0, 1)
    else:
        soft = m.astype(np.float32)
    if trace is not None:
        trace["9 stroke width"] = soft
    rect = _ink_extent(soft, 0.05)
    if rect is None:
        raise ImageError("no symbol found")
    x, y, rw, rh = rect
    soft = soft[y: y + rh, x: x + rw]
    f = box / max(rw, rh)
    fw, fh = max(1, round(rw * f)), max(1, round(rh * f))
    patch = cv2.resize(soft, (fw, fh), interpolation=cv2.INTER_AREA)
    peak = float(patch.max())
    if peak > 0:
        patch = np.clip(patch / peak, 0, 1)
    return _place_by_mass(patch, size)


def _locate(gray: np.ndarray, work: np.ndarray, scale: float, light: bool, flat: bool, sheet: np.ndarray | None = None,
            trace: dict | None = None):
    """Find the symbol in a uint8 image assuming the given polarity, on the `sheet` of paper when one was
    found (see `_sheet`). Returns (mask cropped to the symbol's box, stroke width, box (x0, y0, x1, y1) in
    working pixels)."""
    wh, ww = work.shape
    # The background window: larger than any stroke, small enough to follow shadows. A flat digital
    # background has no shadows to follow, and fat marker strokes need the widest window.
    k = _odd(max(wh, ww) / 2) if flat else _odd(max(7, min(wh, ww) / 6))
    if scale < 0.7:
        # Shrinking averages thin strokes away: pool the ink first (min for dark ink, max for light).
        f = int(math.ceil(1 / scale))
        kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (f, f))
        pooled = cv2.dilate(gray, kernel) if light else cv2.erode(gray, kernel)
        work = cv2.resize(pooled, (ww, wh), interpolation=cv2.INTER_AREA)
    g = cv2.bitwise_not(work) if light else work
    g = cv2.GaussianBlur(g, (3, 3), 0.6) if min(wh, ww) >= 24 else g

    widest = max(wh, ww) if flat else _odd(min(wh, ww) / 2)  # wider would no longer follow the lighting
    shade = None if flat else _shade(g, k)  # a flat digital background has no shadows
    found = None
    for _ in range(4):
        try:
            ink = _remove_ruling(_normalised_ink(g, k, shade))
            labels, stats, keep = _segment(ink)
        except ImageError:
            if found is None:
                raise
            break  # the wider window saw the lighting as ink: keep what the narrower one found
        chosen, sw = _select(labels, stats, keep, (wh, ww), sheet)
        found = labels, stats, chosen
        if trace is not None:  # the last window's stages (docs/figures.py draws them)
            trace.update({f"4 polarity: {'light' if light else 'dark'} ink": work, "5 illumination": _normalised_ink(g, k, shade),
                          "6 rules removed": ink, "7 threshold": (labels > 0).astype(np.float32),
                          "8 components": np.where(np.isin(labels, chosen), 1.0, 0.35 * (labels > 0))})
        if 4 * sw <= k or k >= widest:
            break
        # Strokes too fat for the background window (only their edges were found, a crossing of fat
        # strokes left a hole): estimate the background again with a wider window.
        k = _odd(min(max(5 * sw + 1, 1.5 * k), widest))
    labels, stats, chosen = found
    if not chosen:
        raise ImageError("no symbol found")
    x0 = min(stats[c, 0] for c in chosen)
    y0 = min(stats[c, 1] for c in chosen)
    x1 = max(stats[c, 0] + stats[c, 2] for c in chosen)
    y1 = max(stats[c, 1] + stats[c, 3] for c in chosen)
    crop = np.isin(labels[y0:y1, x0:x1], chosen).astype(np.uint8)
    return crop, _stroke_width(crop), (x0, y0, x1, y1)


def _inside_patch(work: np.ndarray, light: bool, box: tuple[int, int, int, int]):
    """The symbol inside a solid patch of the working image (inset a little, so that the patch's edges stay
    out). Returns what `_locate` returns, in working coordinates, or None when nothing stroke-like is inside."""
    x0, y0, x1, y1 = box
    inset = max(1, round(0.03 * min(x1 - x0, y1 - y0)))
    x0, y0, x1, y1 = x0 + inset, y0 + inset, x1 - inset, y1 - inset
    if min(x1 - x0, y1 - y0) < 8:
        return None
    g = work[y0:y1, x0:x1]
    g = cv2.bitwise_not(g) if light else g
    # The patch's own paper: a closing wider than its strokes, as for a whole page, but on the patch alone.
    ink = _normalised_ink(g, _odd(max(7, min(g.shape) / 3)))
    try:
        labels, stats, keep = _segment(ink)
    except ImageError:
        return None
    chosen, sw = _select(labels, stats, keep, ink.shape)
    if not chosen:
        return None
    a = min(stats[c, 0] for c in chosen)
    b = min(stats[c, 1] for c in chosen)
    c1 = max(stats[c, 0] + stats[c, 2] for c in chosen)
    d1 = max(stats[c, 1] + stats[c, 3] for c in chosen)
    crop = np.isin(labels[b:d1, a:c1], chosen).astype(np.uint8)
    if crop.mean() > 0.6:
        return None
    return crop, _stroke_width(crop), (x0 + a, y0 + b, x0 + c1, y0 + d1)


def _work_scale(H: int, W: int) -> float:
    """The working resolution, as a scale of the image: its long side at most WORK_MAX, and an exact 1/n of
    the image where one lies within 10% below that (INTER_AREA shrinks by whole ratios 50x faster: a 640x480
    photo, or a JPEG decoded at half of 1280x960, works at 320x240)."""
    if max(H, W) <= WORK_MAX:
        return 1.0
    n = math.ceil(max(H, W) / WORK_MAX)
    if H % n == 0 and W % n == 0 and max(H, W) / n >= 0.9 * WORK_MAX:
        return 1.0 / n
    return WORK_MAX / max(H, W)


def _gray_u8(image: np.ndarray) -> np.ndarray:
    """Any decoded image -> uint8 grey, contrast stretched so that its brightest pixel is white (a 12-bit
    sensor in a 16-bit file, or a dim photo, uses the full range). 8-bit input skips the float detour."""
    if image.dtype == np.uint8 and (image.ndim == 2 or image.shape[2] in (1, 3)):
        g = image if image.ndim == 2 else (image[:, :, 0] if image.shape[2] == 1 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))
        peak = int(g.max())
        return g if peak >= 200 or peak == 0 else cv2.convertScaleAbs(g, alpha=255.0 / peak)
    g = to_gray(image)
    peak = float(g.max())
    return cv2.convertScaleAbs(g, alpha=255.0 / peak if peak > 0 else 255.0)


def _digit(image: np.ndarray, size: int, ink: str = "auto", trace: dict | None = None) -> Prepared:
    H, W = image.shape[:2]
    if (H, W) == (size, size):
        ready = _passthrough(to_gray(image)[None])[0]
        if ready is not None:
            return ready
    gray = _gray_u8(image)
    scale = _work_scale(H, W)
    if scale < 1.0:
        work = cv2.resize(gray, (max(1, round(W * scale)), max(1, round(H * scale))), interpolation=cv2.INTER_AREA)
    else:
        work = gray
    flat, light = _flat_background(work)
    sheet = None if flat else _sheet(work)  # a photographed page with the table around it
    if ink != "auto":  # the caller knows (a video of a page)
        light = ink == "light"
    elif sheet is not None:  # writing on paper: dark ink (the light page on a dark table is no light symbol)
        light = False
    elif light is None:
        light = _polarity(work)
    if trace is not None:
        trace["3 work size"] = work
    crop, sw, (x0, y0, x1, y1) = _locate(gray, work, scale, light, flat, None if light else sheet, trace)
    if crop.mean() > 0.85 and min(crop.shape) >= 8:
        # A solid block is no pen stroke: a darker patch of paper (a label, a pasted crop) with the symbol
        # inside. Look again within it; a fat marker bar finds nothing inside itself and stays as it is.
        inner = _inside_patch(work, light, (x0, y0, x1, y1))
        if inner is not None:
            crop, sw, (x0, y0, x1, y1) = inner
    out = _render(crop, sw, size, trace)
    inv_scale = 1.0 / scale
    box = (int(x0 * inv_scale), int(y0 * inv_scale), int(math.ceil((x1 - x0) * inv_scale)),
           int(math.ceil((y1 - y0) * inv_scale)))
    return Prepared(out, box, light, False, sw * inv_scale)


def _fit(gray: np.ndarray, size: int) -> Prepared:
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    light_bg = float(np.median(border)) > 0.5
    ink = 1.0 - gray if light_bg else gray
    u8 = np.clip(ink * 255 + 0.5, 0, 255).astype(np.uint8)
    _, mask = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    rect = cv2.boundingRect(cv2.findNonZero(mask)) if cv2.countNonZero(mask) else (0, 0, gray.shape[1], gray.shape[0])
    x, y, w, h = rect
    crop = ink[y: y + h, x: x + w]
    f = size / max(w, h)
    nw, nh = max(1, round(w * f)), max(1, round(h * f))
    small = cv2.resize(crop, (nw, nh), interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)
    out = np.zeros((size, size), np.float32)
    oy, ox = (size - nh) // 2, (size - nw) // 2
    out[oy: oy + nh, ox: ox + nw] = small
    return Prepared(out, rect, not light_bg, False)


# ------------------------------------------------------------------------------------------- API


def analyse(image: np.ndarray, mode: str = "digit", size: int = 28,
            roi: tuple[int, int, int, int] | None = None, ink: str = "auto", trace: dict | None = None) -> Prepared:
    """Find the symbol in a decoded image (grey, BGR or BGRA; 8/16-bit or float), optionally only inside
    `roi` = (x, y, w, h), and return the network input with the symbol's box in image coordinates.
    `ink` is "auto" (detect the polarity), "dark" (ink darker than the paper) or "light". A `trace` dict
    receives the digit pipeline's intermediate images by step (docs/preprocessing.md shows them).

    Raises ImageError when there is nothing to classify (blank image, empty ROI)."""
    if mode not in PREPROCESS_MODES:
        raise ValueError(f"unknown preprocessing mode {mode!r}; choose one of {', '.join(PREPROCESS_MODES)}")
    if ink not in INK:
        raise ValueError(f"unknown ink {ink!r}; choose one of {', '.join(INK)}")
    img = _checked(image)
    if img.shape[0] * img.shape[1] > MAX_PIXELS:
        raise ImageTooLarge(f"{img.shape[1]}x{img.shape[0]} pixels is over the {MAX_PIXELS:,}-pixel limit")
    ox = oy = 0
    if roi is not None:
        x, y, w, h = (int(v) for v in roi)
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(img.shape[1], x + w), min(img.shape[0], y + h)
        if x1 <= x0 or y1 <= y0:
            raise ImageError("empty region of interest")
        img, ox, oy = img[y0:y1, x0:x1], x0, y0
    if min(img.shape[:2]) < MIN_SIDE:
        raise ImageError(f"{img.shape[1]}x{img.shape[0]} pixels is too small to hold a symbol "
                         f"(at least {MIN_SIDE}x{MIN_SIDE})")
    result = _digit(img, size, ink, trace) if mode == "digit" else _fit(to_gray(img), size)
    if result.box is not None and (ox or oy):
        bx, by, bw, bh = result.box
        result.box = (bx + ox, by + oy, bw, bh)
    return result


def decode_for(data: bytes | np.ndarray, mode: str = "digit") -> tuple[np.ndarray, int]:
    """An image file's contents decoded for `analyse` in `mode`, and the factor by which its pixels were
    shrunk (boxes found in it are that many times smaller than the file's). The digit pipeline works on grey,
    so a large JPEG is decoded in the DCT domain at 1/2, 1/4 or 1/8 scale straight to grey
    (cnnedge.infer.files.decode_grey), keeping twice the working size: the shrink to WORK_MAX that remains
    still pools the ink (see `_locate`), which a DCT-domain shrink, an average, does not do for thin strokes.
    Smaller JPEGs, PNG and the rest, and the "fit" mode: as decode_image."""
    return decode_grey(data, 2 * WORK_MAX) if mode == "digit" else (decode_image(data), 1)


def prepare(image: np.ndarray, mode: str = "digit", size: int = 28,
            roi: tuple[int, int, int, int] | None = None, ink: str = "auto") -> np.ndarray:
    """Decoded image (or a video frame, optionally an ROI of it) -> float32 (size, size) in [0, 1]."""
    return analyse(image, mode, size, roi, ink).input


def analyse_batch(images: list[np.ndarray | None], mode: str = "digit", size: int = 28) -> list[Prepared | ImageError | None]:
    """`analyse` for many decoded images at once (predict's chunks, the imagefolder loader): 8-bit grey
    files of the network's own size are checked for the MNIST-like shortcut as one stack. Each entry is
    the `Prepared` input, or the ImageError saying why there is none; None entries (unreadable files) stay None."""
    out: list = [None] * len(images)
    if mode == "digit":
        fast = [i for i, im in enumerate(images) if im is not None and im.dtype == np.uint8 and im.shape == (size, size)]
        if fast:
            stack = np.stack([images[i] for i in fast]).astype(np.float32) * np.float32(1 / 255)
            for i, ready in zip(fast, _passthrough(stack)):
                out[i] = ready
    for i, image in enumerate(images):
        if out[i] is not None or image is None:
            continue
        try:
            out[i] = analyse(image, mode, size)
        except ImageError as e:
            out[i] = e
        except (cv2.error, ValueError, MemoryError) as e:  # pathological inputs OpenCV or numpy reject
            out[i] = ImageError(f"cannot be processed ({type(e).__name__}: {' '.join(str(e).split())[:120]})")
    return out
