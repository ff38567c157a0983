"""Synthetic handwriting, rendered the way users really produce digits (torch-free: numpy + OpenCV).

Seeded and reproducible: every function takes a `numpy.random.Generator`. Used by the realistic
evaluation (benchmarks/eval_preprocess.py), the tests, samples/generate.py and the webcam demo.

    rng = np.random.default_rng(0)
    image = render_digit(7, "paper", rng)      # uint8 BGR phone photo of a pen-drawn 7
    strokes = digit_strokes(7, rng)            # the pen trajectory alone, for drawing it yourself

Digit shapes are our own stroke skeletons (several common variants per digit: open and closed 4,
7 with and without a bar, 1 with and without flag and base, ...; and the unusual ones MNIST
under-represents, which the "unusual" style and `mnist_digits`, for training, draw as well), jittered,
slanted, rotated and stretched per sample, or OpenCV's Hershey fonts for the "font" style. Styles (see STYLES):

- mnist:     28x28 white on black, fitted into 20x20 and centred by centre of mass (MNIST's recipe)
- paper:     phone photo of pen on paper: texture, lighting gradient, shadow, perspective, blur,
             noise, JPEG; BGR
- thin:      1-3 px strokes of a drawing app on a large canvas (up to 1600 px), grey or BGR
- marker:    thick marker strokes on a small transparent BGRA image (colour under alpha 0 is black)
- dark:      light strokes on a dark background (chalkboard, dark-mode canvas), JPEG
- offcentre: a small off-centre digit with ink specks, the page edge and the table beyond it
- deep:      16-bit grey PNG data of a photographed page (full 16-bit or 12-bit range)
- pencil:    faint graphite on paper, uneven pressure and skips
- ruled:     pen on a notebook page, ruled or squared, photographed
- crop:      a pen photo cut tight around the digit (0-10% margin), as datasets of digit crops are
- font:      a Hershey font digit, photographed like "paper"
- app28:     a drawing app's 28x28 export: thin polylines drawn on a 280 px canvas, shrunk with INTER_AREA,
             not fitted into 20x20 nor centred by mass; white on black (black on white for paint programs)
- canvas:    a canvas drawing (mouse, finger, stylus) at its own size, flat light or dark background
- notebook:  a large digit (40-60% of the page) on ruled paper with 2 px rules every 5-7% of the page
- pageedge:  a tilted page on a dark table, with a shadow around it
- rotated:   a pen photo of a digit turned by 20-30 degrees
- unusual:   pen photos of the ways of writing MNIST under-represents (UNUSUAL_VARIANTS): closed-top 4s,
             open-top 6s, g-like 9s, 1s with flag and base, 7s with a bar, crossed zeros, ...

`sideways_jpeg` stores a photo turned, with the EXIF orientation that tells a viewer how to show it
upright, as phones do.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

STYLES = ("mnist", "paper", "thin", "marker", "dark", "offcentre", "deep", "pencil", "ruled", "crop", "font",
          "app28", "canvas", "notebook", "pageedge", "rotated", "unusual")
HANDWRITING_STYLES = tuple(s for s in STYLES if s != "font")

# ------------------------------------------------------------------------------------ skeletons
# Unit box: x in [0, 1] across the digit's own width, y in [0, 1] downwards. A stroke is one pen-down
# movement made of pieces: ("s", points) is a smooth Catmull-Rom curve through the points, ("l", points)
# a polyline. Consecutive pieces meet at a corner.

S, L = "s", "l"
_SKELETONS: dict[int, list[list[list[tuple[str, list[tuple[float, float]]]]]]] = {
    0: [
        [[(S, [(0.52, 0.0), (0.22, 0.1), (0.06, 0.5), (0.2, 0.9), (0.5, 1.0), (0.8, 0.9), (0.94, 0.5),
               (0.8, 0.1), (0.5, 0.0), (0.36, 0.06)])]],
        [[(S, [(0.6, 0.02), (0.3, 0.08), (0.1, 0.45), (0.2, 0.88), (0.48, 1.0), (0.78, 0.9), (0.92, 0.55),
               (0.85, 0.15), (0.62, 0.0), (0.55, 0.04)])]],
        [[(S, [(0.5, 0.0), (0.25, 0.12), (0.2, 0.5), (0.28, 0.9), (0.5, 1.0), (0.72, 0.88), (0.8, 0.5),
               (0.72, 0.1), (0.5, 0.0)])], [(L, [(0.9, 0.08), (0.1, 0.92)])]],  # crossed (slashed) zero
        [[(S, [(0.55, 0.02), (0.3, 0.15), (0.25, 0.55), (0.35, 0.92), (0.55, 1.0), (0.72, 0.85), (0.75, 0.45),
               (0.65, 0.08), (0.45, 0.0), (0.3, 0.1)])]],  # narrow, overlapping at the top
    ],
    1: [
        [[(L, [(0.5, 0.0), (0.5, 1.0)])]],
        [[(L, [(0.15, 0.25), (0.6, 0.0), (0.6, 1.0)])]],
        [[(L, [(0.2, 0.22), (0.55, 0.0), (0.55, 1.0)])], [(L, [(0.2, 1.0), (0.9, 1.0)])]],
        [[(L, [(0.05, 0.42), (0.65, 0.0), (0.62, 1.0)])]],  # long flag (continental 1)
        [[(L, [(0.5, 0.0), (0.5, 1.0)])], [(L, [(0.15, 1.0), (0.85, 1.0)])]],  # base, no flag
    ],
    2: [
        [[(S, [(0.08, 0.28), (0.25, 0.05), (0.55, 0.0), (0.85, 0.12), (0.88, 0.35), (0.62, 0.62),
               (0.35, 0.82), (0.05, 1.0)]), (L, [(0.05, 1.0), (0.95, 0.98)])]],
        [[(S, [(0.1, 0.25), (0.35, 0.02), (0.7, 0.04), (0.85, 0.3), (0.55, 0.62), (0.28, 0.85),
               (0.1, 0.98), (0.18, 1.0), (0.32, 0.9), (0.45, 0.92), (0.95, 1.0)])]],
    ],
    3: [
        [[(S, [(0.1, 0.14), (0.4, 0.0), (0.75, 0.06), (0.8, 0.27), (0.42, 0.47)]),
          (S, [(0.42, 0.47), (0.85, 0.6), (0.9, 0.85), (0.55, 1.0), (0.1, 0.88)])]],
        [[(L, [(0.1, 0.0), (0.85, 0.0), (0.45, 0.4)]),
          (S, [(0.45, 0.4), (0.85, 0.55), (0.9, 0.82), (0.55, 1.0), (0.1, 0.88)])]],
    ],
    4: [
        [[(L, [(0.68, 0.0), (0.05, 0.68), (0.95, 0.68)])], [(L, [(0.68, 0.02), (0.68, 1.0)])]],
        [[(L, [(0.2, 0.0), (0.08, 0.62), (0.92, 0.62)])], [(L, [(0.72, 0.08), (0.72, 1.0)])]],
        [[(L, [(0.25, 0.0), (0.1, 0.58), (0.92, 0.56)])], [(L, [(0.7, 0.2), (0.68, 1.0)])]],
        [[(L, [(0.6, 1.0), (0.6, 0.0), (0.05, 0.62), (1.0, 0.62)])]],  # closed top in one stroke, from the foot up
        [[(L, [(0.55, 0.0), (0.02, 0.6), (1.0, 0.6)])], [(L, [(0.66, 0.0), (0.6, 1.0)])]],  # crossed, long bar
        [[(S, [(0.3, 0.0), (0.12, 0.35), (0.15, 0.55)]), (L, [(0.15, 0.55), (0.95, 0.52)])],
         [(S, [(0.82, 0.05), (0.72, 0.5), (0.7, 1.0)])]],  # open top, curved arm
        [[(L, [(0.68, 0.0), (0.18, 0.04), (0.1, 0.56), (0.95, 0.56)])], [(L, [(0.68, 0.0), (0.68, 1.0)])]],  # boxed top
    ],
    5: [
        [[(L, [(0.88, 0.02), (0.25, 0.02)])],
         [(L, [(0.25, 0.02), (0.18, 0.45)]),
          (S, [(0.18, 0.45), (0.5, 0.37), (0.82, 0.5), (0.88, 0.75), (0.62, 0.97), (0.3, 1.0), (0.08, 0.88)])]],
        [[(L, [(0.88, 0.0), (0.22, 0.02), (0.18, 0.45)]),
          (S, [(0.18, 0.45), (0.55, 0.38), (0.85, 0.55), (0.85, 0.8), (0.55, 1.0), (0.1, 0.9)])]],
    ],
    6: [
        [[(S, [(0.8, 0.0), (0.45, 0.12), (0.18, 0.45), (0.12, 0.78), (0.38, 1.0), (0.72, 0.93),
               (0.82, 0.68), (0.55, 0.5), (0.28, 0.56), (0.15, 0.72)])]],
        [[(S, [(0.7, 0.0), (0.35, 0.25), (0.15, 0.6), (0.22, 0.92), (0.5, 1.0), (0.78, 0.85),
               (0.72, 0.6), (0.45, 0.55), (0.2, 0.7)])]],
        [[(L, [(0.75, 0.0), (0.2, 0.6)]), (S, [(0.2, 0.6), (0.18, 0.85), (0.45, 1.0), (0.78, 0.88), (0.8, 0.65),
                                               (0.5, 0.5), (0.22, 0.62)])]],  # straight stem, open top
        [[(S, [(0.85, 0.05), (0.5, 0.0), (0.22, 0.2), (0.12, 0.6), (0.3, 0.95), (0.6, 1.0), (0.85, 0.75),
               (0.7, 0.4), (0.4, 0.38), (0.18, 0.5)])]],  # the loop closes high
    ],
    7: [
        [[(L, [(0.05, 0.02), (0.92, 0.0), (0.4, 1.0)])]],
        [[(L, [(0.05, 0.02), (0.92, 0.0), (0.42, 1.0)])], [(L, [(0.35, 0.52), (0.82, 0.5)])]],
        [[(L, [(0.05, 0.05), (0.9, 0.0)]), (S, [(0.9, 0.0), (0.65, 0.4), (0.5, 1.0)])]],
        [[(L, [(0.08, 0.22), (0.05, 0.02), (0.92, 0.02), (0.45, 1.0)])]],  # serif at the start
        [[(L, [(0.02, 0.05), (0.95, 0.0)]), (S, [(0.95, 0.0), (0.7, 0.35), (0.55, 0.7), (0.5, 1.0)])],
         [(L, [(0.3, 0.5), (0.95, 0.48)])]],  # curved stem with a bar
    ],
    8: [
        [[(S, [(0.75, 0.12), (0.5, 0.0), (0.22, 0.1), (0.28, 0.32), (0.5, 0.48), (0.78, 0.66), (0.8, 0.88),
               (0.5, 1.0), (0.18, 0.88), (0.22, 0.66), (0.5, 0.48), (0.72, 0.3), (0.76, 0.1)])]],
        [[(S, [(0.5, 0.45), (0.22, 0.3), (0.25, 0.06), (0.5, 0.0), (0.75, 0.06), (0.78, 0.3), (0.5, 0.45),
               (0.15, 0.65), (0.18, 0.92), (0.5, 1.0), (0.85, 0.92), (0.85, 0.65), (0.5, 0.45)])]],
        [[(S, [(0.5, 0.44), (0.25, 0.35), (0.22, 0.12), (0.5, 0.0), (0.78, 0.12), (0.75, 0.35), (0.5, 0.44)])],
         [(S, [(0.5, 0.44), (0.15, 0.6), (0.12, 0.85), (0.5, 1.0), (0.88, 0.85), (0.85, 0.6), (0.5, 0.44)])]],  # two loops
    ],
    9: [
        [[(S, [(0.82, 0.2), (0.55, 0.0), (0.22, 0.1), (0.18, 0.35), (0.45, 0.5), (0.8, 0.35), (0.82, 0.08)]),
          (L, [(0.82, 0.08), (0.78, 1.0)])]],
        [[(S, [(0.85, 0.18), (0.55, 0.0), (0.2, 0.12), (0.2, 0.38), (0.5, 0.48), (0.85, 0.3), (0.85, 0.05)]),
          (S, [(0.85, 0.05), (0.85, 0.55), (0.75, 0.85), (0.55, 1.0)])]],
        [[(S, [(0.85, 0.2), (0.55, 0.0), (0.2, 0.1), (0.18, 0.38), (0.5, 0.48), (0.85, 0.3), (0.85, 0.08)]),
          (S, [(0.85, 0.08), (0.85, 0.6), (0.72, 0.92), (0.45, 1.0), (0.18, 0.88)])]],  # g-like, the tail curls left
        [[(S, [(0.75, 0.1), (0.45, 0.0), (0.15, 0.15), (0.18, 0.4), (0.5, 0.45), (0.8, 0.25), (0.75, 0.1)])],
         [(S, [(0.8, 0.15), (0.65, 0.6), (0.5, 1.0)])]],  # loop first, then a slanted tail
    ],
}

# The ways of writing that MNIST under-represents (indices into _SKELETONS): crossed and narrow zeros, 1s
# with a flag and a base, closed-top, crossed and boxed 4s, open-top 6s and 6s whose loop closes high,
# 7s with a serif or a bar, 8s of two loops, g-like 9s and 9s with a separate slanted tail.
UNUSUAL_VARIANTS = {0: (2, 3), 1: (2, 3, 4), 2: (1,), 3: (1,), 4: (0, 3, 4, 5, 6), 5: (1,), 6: (2, 3), 7: (1, 3, 4),
                    8: (2,), 9: (2, 3)}
COMMON_VARIANTS = {0: 2, 1: 3, 2: 2, 3: 2, 4: 3, 5: 2, 6: 2, 7: 3, 8: 2, 9: 2}  # the first ones: the styles' default
ALL_VARIANTS = {d: tuple(range(len(v))) for d, v in _SKELETONS.items()}


def _catmull_rom(points: np.ndarray, samples_per_segment: int = 16) -> np.ndarray:
    if len(points) < 3:
        return _polyline(points, samples_per_segment)
    p = np.vstack([2 * points[0] - points[1], points, 2 * points[-1] - points[-2]])
    t = np.linspace(0, 1, samples_per_segment, endpoint=False)[None, :, None]
    p0, p1, p2, p3 = (p[i: len(p) - 3 + i, None, :] for i in range(4))  # every segment at once
    out = 0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                 + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3)
    return np.vstack([out.reshape(-1, 2), points[-1:]])


def _polyline(points: np.ndarray, samples_per_segment: int = 16) -> np.ndarray:
    t = np.linspace(0, 1, samples_per_segment, endpoint=False)[:, None]
    out = [a + (b - a) * t for a, b in zip(points[:-1], points[1:])]
    out.append(points[-1:])
    return np.vstack(out)


def digit_strokes(digit: int, rng: np.random.Generator, variant: int | tuple[int, ...] | None = None,
                  jitter: float = 0.03, slant: tuple[float, float] = (-0.35, 0.15),
                  rotate_deg: float | tuple[float, float] = 10.0, width: tuple[float, float] = (0.5, 0.8)) -> list[np.ndarray]:
    """Pen trajectories of one hand-written digit: a list of (N, 2) float arrays (x, y), in units of the
    digit's height, centred on (0, 0) (y downwards). Every call draws a new hand: variant (one of the
    common ones, or of `variant` when given several: UNUSUAL_VARIANTS, ALL_VARIANTS), jitter, slant,
    rotation (up to `rotate_deg` either way, or between the two magnitudes of a (min, max) pair) and
    width are random."""
    variants = _SKELETONS[int(digit)]
    if variant is None:  # the common ways of writing it
        variant = int(rng.integers(COMMON_VARIANTS[int(digit)]))
    elif not isinstance(variant, int):
        variant = int(variant[rng.integers(len(variant))])
    skeleton = variants[variant % len(variants)]
    w = rng.uniform(*width)
    shear = rng.uniform(*slant)  # positive: the top leans right
    if isinstance(rotate_deg, tuple):
        angle = math.radians(rng.uniform(*rotate_deg) * rng.choice([-1, 1]))
    else:
        angle = math.radians(rng.uniform(-rotate_deg, rotate_deg))
    ca, sa = math.cos(angle), math.sin(angle)
    # A smooth random warp (low-order polynomial) on top of per-point jitter: hands are not affine.
    warp = rng.normal(0, 0.04, size=(2, 3))
    strokes = []
    for stroke in skeleton:
        pieces = []
        for kind, pts in stroke:
            p = np.asarray(pts, dtype=np.float64)
            p = p + rng.normal(0, jitter, size=p.shape) * np.array([1.0, 0.8])
            pieces.append(_catmull_rom(p) if kind == S else _polyline(p))
        # Pieces share their joints: move each piece's start onto the previous piece's end.
        for a, b in zip(pieces[:-1], pieces[1:]):
            b[0] = a[-1]
        xy = np.vstack(pieces)
        x, y = (xy[:, 0] - 0.5) * w, xy[:, 1] - 0.5
        x = x + warp[0, 0] * y * y + warp[0, 1] * x * y + warp[0, 2] * x * x
        y = y + warp[1, 0] * x * x + warp[1, 1] * x * y + warp[1, 2] * y * y
        x = x - shear * y
        strokes.append(np.stack([ca * x - sa * y, sa * x + ca * y], axis=1))
    # Recentre on the bounding box and rescale to height 1.
    allp = np.vstack(strokes)
    lo, hi = allp.min(0), allp.max(0)
    centre, height = (lo + hi) / 2, max(hi[1] - lo[1], 1e-3)
    return [(s - centre) / height for s in strokes]


def font_strokes(digit: int, rng: np.random.Generator, size: int = 128, thickness: int = 1) -> np.ndarray:
    """A Hershey font digit as a float coverage mask, cropped to its ink (for the "font" style)."""
    fonts = [cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_SCRIPT_SIMPLEX,
             cv2.FONT_HERSHEY_SCRIPT_COMPLEX, cv2.FONT_HERSHEY_SIMPLEX | cv2.FONT_ITALIC,
             cv2.FONT_HERSHEY_PLAIN, cv2.FONT_HERSHEY_TRIPLEX | cv2.FONT_ITALIC]
    font = fonts[rng.integers(len(fonts))]
    canvas = np.zeros((size, size), np.uint8)
    scale = cv2.getFontScaleFromHeight(font, int(size * 0.55), thickness)
    (tw, th), _ = cv2.getTextSize(str(digit), font, scale, thickness)
    cv2.putText(canvas, str(digit), ((size - tw) // 2, (size + th) // 2), font, scale, 255, thickness, cv2.LINE_AA)
    ys, xs = np.nonzero(canvas)
    return canvas[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1].astype(np.float32) / 255.0


# ---------------------------------------------------------------------------------------- drawing


def draw_strokes(shape: tuple[int, int], strokes: list[np.ndarray], centre: tuple[float, float], height: float,
                 width_px: float, rng: np.random.Generator | None = None, pressure: float = 0.0,
                 skips: float = 0.0, supersample: int = 4) -> np.ndarray:
    """Coverage (float32 in [0, 1], `shape`) of a pen drawing `strokes` (from digit_strokes) at `centre`
    (x, y pixels) with the digit `height` pixels tall and strokes about `width_px` wide. `pressure` varies
    the width along the stroke (0: constant), `skips` is the chance a short piece of stroke is missing
    (ballpoint skipping, dotted lines)."""
    rng = rng or np.random.default_rng(0)
    h, w = shape
    ss = supersample
    canvas = np.zeros((h * ss, w * ss), np.uint8)
    shift = 4  # cv2 sub-pixel coordinates: 4 fractional bits
    for stroke in strokes:
        pts = (stroke * height + np.asarray(centre)) * ss
        n = len(pts)
        phase = rng.uniform(0, 2 * math.pi)
        widths = width_px * (1 + pressure * np.sin(np.linspace(0, rng.uniform(2, 6), n) + phase))
        if pressure == 0 and skips == 0:  # one uniform line: a single call draws it (what training renders)
            t = max(1, int(round(width_px * ss)))
            cv2.polylines(canvas, [np.round(pts * (1 << shift)).astype(np.int32)], False, 255, t, cv2.LINE_AA, shift)
            continue
        skip = np.zeros(n, bool)
        if skips > 0:
            i = 0
            while i < n:
                if rng.random() < skips:
                    skip[i: i + rng.integers(2, 5)] = True
                i += 4
        for i in range(n - 1):
            if skip[i]:
                continue
            t = max(1, int(round(widths[i] * ss)))
            a = tuple(int(v) for v in np.round(pts[i] * (1 << shift)))
            b = tuple(int(v) for v in np.round(pts[i + 1] * (1 << shift)))
            cv2.line(canvas, a, b, 255, t, cv2.LINE_AA, shift)
    if ss == 1:
        return canvas.astype(np.float32) / 255.0
    return cv2.resize(canvas, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def _smooth_field(shape: tuple[int, int], rng: np.random.Generator, scale: float, amount: float) -> np.ndarray:
    """Low-frequency multiplicative field around 1 (paper fibres, pressure, illumination blotches)."""
    h, w = shape
    gh, gw = max(2, int(h / scale) + 2), max(2, int(w / scale) + 2)
    small = rng.normal(0, 1, (gh, gw)).astype(np.float32)
    field = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return 1 + amount * field


def paper(shape: tuple[int, int], rng: np.random.Generator, colour: tuple[float, float, float] | None = None,
          lighting: float = 0.35, shadow: bool | None = None) -> np.ndarray:
    """A float32 BGR page in [0, 1] as a phone sees it: tint, texture, grain, uneven light, maybe a shadow."""
    h, w = shape
    if colour is None:
        base = rng.uniform(0.78, 0.97)
        tint = rng.normal(0, 0.025, 3)
        colour = np.clip(base + tint + np.array([-0.03, 0.0, 0.02]) * rng.uniform(0, 1.5), 0.5, 1.0)
    img = np.empty((h, w, 3), np.float32)
    img[:] = np.asarray(colour, np.float32)
    tex = _smooth_field(shape, rng, scale=rng.uniform(20, 80), amount=0.02)
    grain = cv2.GaussianBlur(rng.normal(0, 0.015, (h, w)).astype(np.float32), (0, 0), 0.7)
    img *= (tex + grain)[:, :, None]
    # Lighting: a linear gradient plus a vignette, whose strength is `lighting`.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    g = ((xx / w - 0.5) * math.cos(theta) + (yy / h - 0.5) * math.sin(theta))
    cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
    r2 = ((xx - cx) / w) ** 2 + ((yy - cy) / h) ** 2
    light = 1 - lighting * rng.uniform(0.3, 1.0) * (g + 0.5) - lighting * rng.uniform(0, 0.8) * r2
    img *= np.clip(light, 0.2, 1.2)[:, :, None]
    if shadow is None:
        shadow = rng.random() < 0.5
    if shadow:
        img *= shadow_mask(shape, rng)[:, :, None]
    return img


def shadow_mask(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A soft-edged shadow (a hand or a phone between the lamp and the page): 1 outside, 0.45-0.85 inside."""
    h, w = shape
    mask = np.zeros((h, w), np.float32)
    # A half-plane through a random point, or a blob reaching in from an edge.
    if rng.random() < 0.5:
        px, py = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
        a = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        mask[((xx - px) * math.cos(a) + (yy - py) * math.sin(a)) > 0] = 1
    else:
        cx = rng.choice([0, w]) if rng.random() < 0.5 else rng.uniform(0, w)
        cy = rng.uniform(0, h) if cx in (0, w) else rng.choice([0, h])
        axes = (int(rng.uniform(0.2, 0.6) * w), int(rng.uniform(0.2, 0.6) * h))
        cv2.ellipse(mask, (int(cx), int(cy)), axes, rng.uniform(0, 180), 0, 360, 1.0, -1)
    soft = cv2.GaussianBlur(mask, (0, 0), rng.uniform(0.01, 0.06) * max(h, w) + 1)
    return 1 - rng.uniform(0.15, 0.55) * soft


def perspective(img: np.ndarray, rng: np.random.Generator, amount: float = 0.06, border=None) -> np.ndarray:
    h, w = img.shape[:2]
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    dst = src + rng.uniform(-amount, amount, (4, 2)).astype(np.float32) * np.float32([w, h])
    m = cv2.getPerspectiveTransform(src, dst)
    return cv2.warpPerspective(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
                               if border is None else cv2.BORDER_CONSTANT, borderValue=border)


def camera(img: np.ndarray, rng: np.random.Generator, blur: tuple[float, float] = (0.3, 1.3),
           noise: tuple[float, float] = (0.005, 0.03), jpeg: tuple[int, int] | None = (35, 92)) -> np.ndarray:
    """Float image in [0, 1] -> uint8 as a camera would give it: defocus, sensor noise, JPEG."""
    s = rng.uniform(*blur)
    if s > 0.05:
        img = cv2.GaussianBlur(img, (0, 0), s)
    img = img + rng.normal(0, rng.uniform(*noise), img.shape).astype(np.float32)
    out = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    if jpeg is not None:
        quality = int(rng.integers(jpeg[0], jpeg[1] + 1))
        ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, quality])
        out = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    return out


def _ink_colour(rng: np.random.Generator) -> np.ndarray:
    """BGR: black, blue or dark grey ballpoint/felt tip, sometimes red or green."""
    kind = rng.random()
    if kind < 0.45:
        c = [0.08, 0.08, 0.08]
    elif kind < 0.8:
        c = [0.45, 0.15, 0.08]  # blue (BGR)
    elif kind < 0.9:
        c = [0.15, 0.15, 0.55]  # red
    else:
        c = [0.2, 0.35, 0.1]  # green
    return np.clip(np.asarray(c) + rng.normal(0, 0.04, 3), 0, 1).astype(np.float32)


def _compose(background: np.ndarray, coverage: np.ndarray, ink: np.ndarray, strength: np.ndarray | float = 1.0) -> np.ndarray:
    a = np.clip(coverage * strength, 0, 1)[:, :, None]
    return background * (1 - a) + ink.reshape(1, 1, -1) * a


def _place(shape, rng, rel_height: tuple[float, float], off_centre: float = 0.08):
    h, w = shape
    height = rng.uniform(*rel_height) * min(h, w)
    cx = w / 2 + rng.uniform(-off_centre, off_centre) * w
    cy = h / 2 + rng.uniform(-off_centre, off_centre) * h
    return (cx, cy), height


# ----------------------------------------------------------------------------------------- styles


def _mnist(digit, rng, width=(1.8, 3.2), pressure=0.15, variant=None, rotate_deg=10.0):
    ss = 4
    strokes = digit_strokes(digit, rng, variant, rotate_deg=rotate_deg)
    canvas = draw_strokes((40, 40), strokes, (20, 20), 20, rng.uniform(*width), rng, pressure=pressure, supersample=ss)
    ys, xs = np.nonzero(canvas > 0.02)
    crop = canvas[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    h, w = crop.shape
    f = 20 / max(h, w)
    crop = cv2.resize(crop, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    m = cv2.moments(crop)
    cx, cy = m["m10"] / m["m00"], m["m01"] / m["m00"]
    out = np.zeros((28, 28), np.float32)
    x0, y0 = int(round(14 - cx)), int(round(14 - cy))
    hh, ww = crop.shape
    ya, xa = max(0, y0), max(0, x0)
    yb, xb = min(28, y0 + hh), min(28, x0 + ww)
    out[ya:yb, xa:xb] = crop[ya - y0: yb - y0, xa - x0: xb - x0]
    out = out / max(out.max(), 1e-6)
    return np.clip(out * 255 + 0.5, 0, 255).astype(np.uint8)


def _photo(digit, rng, rel_height=(0.4, 0.8), width=(0.05, 0.12), shadow=None, off_centre=0.08, font=False,
           pencil=False, variant=None, rotate_deg=10.0):
    h = int(rng.integers(320, 820))
    w = int(h * rng.uniform(0.75, 1.35))
    page = paper((h, w), rng, shadow=shadow)
    centre, height = _place((h, w), rng, rel_height, off_centre)
    width_px = rng.uniform(*width) * height
    if font:
        mask = font_strokes(digit, rng)  # Hershey strokes come out 11-18% of the height wide
        mh, mw = mask.shape
        f = height / mh
        mask = cv2.resize(mask, (max(1, int(mw * f)), max(1, int(mh * f))), interpolation=cv2.INTER_LINEAR)
        coverage = np.zeros((h, w), np.float32)
        y0, x0 = int(centre[1] - mask.shape[0] / 2), int(centre[0] - mask.shape[1] / 2)
        ys, xs = max(0, y0), max(0, x0)
        ye, xe = min(h, y0 + mask.shape[0]), min(w, x0 + mask.shape[1])
        coverage[ys:ye, xs:xe] = mask[ys - y0: ye - y0, xs - x0: xe - x0]
    else:
        strokes = digit_strokes(digit, rng, variant, rotate_deg=rotate_deg)
        coverage = draw_strokes((h, w), strokes, centre, height, width_px, rng,
                                pressure=rng.uniform(0, 0.3), skips=0.04 if pencil else 0.0, supersample=2)
    if pencil:
        ink = np.full(3, rng.uniform(0.2, 0.4), np.float32)
        strength = rng.uniform(0.35, 0.7) * _smooth_field((h, w), rng, 6, 0.25)
        strength *= np.clip(1 - 0.5 * rng.random((h, w)).astype(np.float32), 0, 1)  # graphite grain
    else:
        ink = _ink_colour(rng)
        strength = rng.uniform(0.75, 1.0) * _smooth_field((h, w), rng, 30, 0.1)
    img = _compose(page, coverage, ink, strength)
    img = perspective(img, rng, 0.05)
    return camera(img, rng)


def _thin(digit, rng):
    h = int(rng.integers(800, 1601))
    w = int(rng.integers(800, 1601))
    centre, height = _place((h, w), rng, (0.3, 0.85), 0.12)
    strokes = digit_strokes(digit, rng)
    cov = draw_strokes((h, w), strokes, centre, height, rng.uniform(1.0, 3.0), rng, supersample=1 if rng.random() < 0.3 else 2)
    ink = rng.uniform(0.0, 0.25)
    img = 1 - cov * (1 - ink)
    u8 = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return u8 if rng.random() < 0.5 else cv2.cvtColor(u8, cv2.COLOR_GRAY2BGR)


def _marker(digit, rng):
    size = int(rng.integers(40, 200))
    h, w = size, int(size * rng.uniform(0.8, 1.25))
    centre, height = _place((h, w), rng, (0.55, 0.9), 0.05)
    strokes = digit_strokes(digit, rng)
    cov = draw_strokes((h, w), strokes, centre, height, rng.uniform(0.12, 0.24) * height, rng, pressure=0.1)
    ink = _ink_colour(rng) if rng.random() < 0.7 else np.float32([0, 0, 0])
    out = np.zeros((h, w, 4), np.uint8)
    out[:, :, :3] = np.clip(ink * 255, 0, 255).astype(np.uint8)
    if rng.random() < 0.6:
        out[cov < 0.01, :3] = 0  # what many apps store under full transparency
    out[:, :, 3] = np.clip(cov * 255 + 0.5, 0, 255).astype(np.uint8)
    return out


def _dark(digit, rng):
    h = int(rng.integers(200, 600))
    w = int(h * rng.uniform(0.8, 1.3))
    if rng.random() < 0.5:  # chalkboard
        board = np.empty((h, w, 3), np.float32)
        board[:] = np.clip(np.array([0.18, 0.22, 0.14]) + rng.normal(0, 0.03, 3), 0, 1)
        board *= _smooth_field((h, w), rng, 40, 0.15)[:, :, None]
        ink = np.full(3, rng.uniform(0.75, 0.95), np.float32)
        grain = 0.5
    else:  # dark-mode canvas or inverted scan
        board = np.full((h, w, 3), rng.uniform(0.0, 0.2), np.float32)
        ink = np.clip(np.float32([0.95, 0.95, 0.95]) - rng.uniform(0, 0.25, 3).astype(np.float32), 0, 1)
        grain = 0.0
    centre, height = _place((h, w), rng, (0.4, 0.85), 0.08)
    cov = draw_strokes((h, w), digit_strokes(digit, rng), centre, height, rng.uniform(0.05, 0.13) * height, rng,
                       pressure=0.2)
    strength = np.clip(1 - grain * rng.random((h, w)).astype(np.float32), 0, 1)
    img = _compose(board, cov, ink, strength)
    return camera(img, rng, blur=(0.0, 1.0), noise=(0.0, 0.02))


def _offcentre(digit, rng):
    h = int(rng.integers(360, 800))
    w = int(h * rng.uniform(0.75, 1.35))
    page = paper((h, w), rng)
    # The page edge: the table beyond one or two sides of the sheet. The digit is written on the page,
    # anywhere on it (it may come close to the edge, not cross it).
    sides = rng.choice(4, size=int(rng.integers(1, 3)), replace=False)
    depth = {int(sd): rng.uniform(0.03, 0.15) for sd in sides}
    tilt = {int(sd): rng.uniform(-0.08, 0.08) for sd in sides}
    height = rng.uniform(0.2, 0.4) * min(h, w)
    margin = 0.06 + 0.02  # the edge's tilt plus a little paper
    x_lo = (depth.get(2, 0) + margin) * w + 0.35 * height
    x_hi = (1 - depth.get(3, 0) - margin) * w - 0.35 * height
    y_lo = (depth.get(0, 0) + margin) * h + 0.5 * height
    y_hi = (1 - depth.get(1, 0) - margin) * h - 0.5 * height
    centre = (rng.uniform(x_lo, max(x_lo, x_hi)), rng.uniform(y_lo, max(y_lo, y_hi)))
    cov = draw_strokes((h, w), digit_strokes(digit, rng), centre, height, rng.uniform(0.06, 0.12) * height, rng,
                       pressure=0.2, supersample=2)
    ink = _ink_colour(rng)
    img = _compose(page, cov, ink, rng.uniform(0.8, 1.0))
    # Specks: dust, pencil dots, bleed-through, not on the digit itself.
    speck = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(5, 30))):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        if abs(x - centre[0]) < 0.7 * height and abs(y - centre[1]) < 0.7 * height:
            continue
        r = rng.uniform(0.5, 0.02 * min(h, w) + 1)
        cv2.circle(speck, (int(x), int(y)), max(1, int(r)), float(rng.uniform(0.3, 1.0)), -1, cv2.LINE_AA)
    img = _compose(img, speck, np.float32([0.15, 0.15, 0.15]))
    table = np.empty_like(img)
    table[:] = np.clip(np.array([0.2, 0.3, 0.45]) * rng.uniform(0.3, 1.2) + rng.normal(0, 0.05, 3), 0, 1)
    table *= _smooth_field((h, w), rng, 15, 0.2)[:, :, None]
    edge = np.ones((h, w), np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for side in depth:
        d, t = depth[side], tilt[side]
        if side == 0:
            edge[yy < d * h + t * (xx - w / 2)] = 0
        elif side == 1:
            edge[yy > h - d * h + t * (xx - w / 2)] = 0
        elif side == 2:
            edge[xx < d * w + t * (yy - h / 2)] = 0
        else:
            edge[xx > w - d * w + t * (yy - h / 2)] = 0
    edge = cv2.GaussianBlur(edge, (0, 0), 1.0)[:, :, None]
    img = img * edge + table * (1 - edge)
    return camera(img, rng)


def _ruled(digit, rng, rel_height=(0.3, 0.7), spacing=(0.07, 0.14), rule_px=(1, 2), squared=0.5):
    h = int(rng.integers(320, 760))
    w = int(h * rng.uniform(0.75, 1.35))
    page = paper((h, w), rng)
    rules = np.zeros((h, w), np.float32)
    spacing = rng.uniform(*spacing) * min(h, w)
    tilt = rng.uniform(-0.02, 0.02)
    squared = rng.random() < squared
    for y in np.arange(rng.uniform(0, spacing), h + tilt * w, spacing):
        cv2.line(rules, (0, int(y)), (w, int(y + tilt * w)), 1.0, int(rng.integers(rule_px[0], rule_px[1] + 1)), cv2.LINE_AA)
    if squared:
        for x in np.arange(rng.uniform(0, spacing), w, spacing):
            cv2.line(rules, (int(x), 0), (int(x - tilt * h), h), 1.0, 1, cv2.LINE_AA)
    page = _compose(page, rules, np.float32([0.8, 0.6, 0.5]) * rng.uniform(0.7, 1.0), rng.uniform(0.3, 0.7))
    centre, height = _place((h, w), rng, rel_height, 0.1)
    cov = draw_strokes((h, w), digit_strokes(digit, rng), centre, height, rng.uniform(0.04, 0.1) * height, rng,
                       pressure=0.2, supersample=2)
    img = _compose(page, cov, _ink_colour(rng), rng.uniform(0.8, 1.0))
    return camera(perspective(img, rng, 0.03), rng)


def _crop(digit, rng):
    size = int(rng.integers(300, 700))
    page = paper((size, size), rng, lighting=0.2)
    height = rng.uniform(0.5, 0.7) * size
    cov = draw_strokes((size, size), digit_strokes(digit, rng), (size / 2, size / 2), height,
                       rng.uniform(0.04, 0.12) * height, rng, pressure=0.2, supersample=2)
    img = camera(_compose(page, cov, _ink_colour(rng), rng.uniform(0.8, 1.0)), rng)
    ys, xs = np.nonzero(cov > 0.1)
    m = int(rng.uniform(0, 0.1) * (ys.max() - ys.min()))
    return img[max(0, ys.min() - m): ys.max() + 1 + m, max(0, xs.min() - m): xs.max() + 1 + m]


def _app28(digit, rng):
    """What a drawing app sends: a digit drawn with the mouse or a finger on a 280 px canvas, the canvas
    shrunk to 28x28 (INTER_AREA). Thin 1-2 px polylines filling about 21x17 px, placed by eye (neither
    fitted into 20x20 nor centred by mass); white on black, sometimes black on white (paint programs).
    Every way of writing each digit, the unusual ones included (hooked 9s, open-top 6s, crossed 4s...)."""
    side = 280
    canvas = np.zeros((side, side), np.uint8)
    height = rng.uniform(0.55, 0.8) * side
    centre = np.array([side / 2, side / 2]) + rng.uniform(-0.07, 0.07, 2) * side
    pen = int(rng.integers(8, 21))  # 8-20 px on the canvas: 0.8-2 px at 28x28
    for stroke in digit_strokes(digit, rng, ALL_VARIANTS[digit]):
        pts = stroke * height + centre
        step = int(rng.integers(2, 6))  # pointer events every few samples, joined by straight segments
        pts = np.vstack([pts[::step], pts[-1:]])
        cv2.polylines(canvas, [np.round(pts * 16).astype(np.int32)], False, 255, pen, cv2.LINE_AA, 4)
    small = cv2.resize(canvas, (28, 28), interpolation=cv2.INTER_AREA)
    return 255 - small if rng.random() < 0.2 else small


def _canvas(digit, rng):
    """A canvas drawing (mouse, finger or stylus) saved at its own size: 200-640 px, a flat white or dark
    background, round-capped polylines 2-9% of the canvas wide, the digit wherever it was drawn; every way
    of writing each digit (closed-top 4s are half the misses on canvases)."""
    h = int(rng.integers(200, 641))
    w = int(h * rng.uniform(0.8, 1.6))
    cov = np.zeros((h, w), np.uint8)
    centre, height = _place((h, w), rng, (0.45, 0.85), 0.1)
    pen = max(2, int(rng.uniform(0.02, 0.09) * min(h, w)))
    for stroke in digit_strokes(digit, rng, ALL_VARIANTS[digit]):
        pts = stroke * height + np.asarray(centre)
        step = int(rng.integers(1, 5))
        pts = np.vstack([pts[::step], pts[-1:]])
        cv2.polylines(cov, [np.round(pts * 16).astype(np.int32)], False, 255, pen, cv2.LINE_AA, 4)
    dark = rng.random() < 0.3
    bg, ink = (rng.uniform(0, 40), rng.uniform(200, 255)) if dark else (rng.uniform(235, 255), rng.uniform(0, 60))
    img = np.clip(bg + (ink - bg) * cov.astype(np.float32) / 255 + 0.5, 0, 255).astype(np.uint8)
    if rng.random() < 0.5:
        return img
    tint = np.clip(np.float32([1.0, 1.0, 1.0]) + rng.normal(0, 0.06, 3), 0.7, 1.1)
    return np.clip(cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) * tint, 0, 255).astype(np.uint8)


def _pageedge(digit, rng):
    """A page photographed at an angle on a dark table: the sheet tilted by 5-25 degrees, its dark
    surround on every side, a soft shadow along its edges, uneven light; the digit written on the page."""
    h = int(rng.integers(420, 800))
    w = int(h * rng.uniform(0.75, 1.35))
    ph, pw = int(h * rng.uniform(0.7, 0.95)), int(w * rng.uniform(0.7, 0.95))
    sheet = paper((ph, pw), rng, shadow=False)
    centre, height = _place((ph, pw), rng, (0.3, 0.55), 0.08)
    cov = draw_strokes((ph, pw), digit_strokes(digit, rng), centre, height, rng.uniform(0.05, 0.11) * height, rng,
                       pressure=0.2, supersample=2)
    sheet = _compose(sheet, cov, _ink_colour(rng), rng.uniform(0.8, 1.0))
    angle = rng.uniform(5, 25) * rng.choice([-1, 1])
    m = cv2.getRotationMatrix2D((pw / 2, ph / 2), angle, 1.0)
    m[:, 2] += (w - pw) / 2 + rng.uniform(-0.05, 0.05) * w, (h - ph) / 2 + rng.uniform(-0.05, 0.05) * h
    page = cv2.warpAffine(sheet, m, (w, h), flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(np.ones((ph, pw), np.float32), m, (w, h), flags=cv2.INTER_LINEAR)
    table = np.empty((h, w, 3), np.float32)
    table[:] = np.clip(np.array([0.12, 0.16, 0.22]) * rng.uniform(0.5, 1.8) + rng.normal(0, 0.03, 3), 0, 1)
    table *= _smooth_field((h, w), rng, 20, 0.25)[:, :, None]
    # The sheet's shadow on the table: the mask, shifted away from the light and blurred.
    shift = rng.uniform(-0.03, 0.03, 2) * max(h, w)
    drop = cv2.warpAffine(mask, np.float32([[1, 0, shift[0]], [0, 1, shift[1]]]), (w, h))
    drop = cv2.GaussianBlur(drop, (0, 0), rng.uniform(0.01, 0.03) * max(h, w) + 1)
    table *= (1 - rng.uniform(0.3, 0.7) * drop)[:, :, None]
    edge_shade = 1 - rng.uniform(0.1, 0.35) * (1 - cv2.GaussianBlur(mask, (0, 0), 0.04 * max(h, w)))  # dim near the edges
    img = table * (1 - mask[:, :, None]) + page * (mask * edge_shade)[:, :, None]
    return camera(img, rng)


def _deep(digit, rng):
    img = _photo(digit, rng, shadow=False)
    grey = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY).astype(np.float32) / 255
    grey = cv2.GaussianBlur(grey, (0, 0), 0.6)  # smooth the 8-bit steps away a little
    top = 65535 if rng.random() < 0.5 else 4095  # full 16-bit, or a 12-bit sensor in a 16-bit file
    return np.clip(grey * top + 0.5, 0, 65535).astype(np.uint16)


def mnist_digits(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`count` synthetic hand-written digits in MNIST's own format, for training: uint8 (count, 28, 28)
    white on black, fitted into 20x20 and centred by mass, and their labels (0-9 in turn). Every skeleton
    variant is drawn alike, so the ways of writing MNIST under-represents (UNUSUAL_VARIANTS) get their
    share, with uniform pens from thin (1.2 px) to bold (4.5 px) that preprocessing may leave as they are,
    turned by up to 25 degrees either way (MNIST's own digits hardly lean, and its training augmentation
    turns them by 12 at most: more costs accuracy on them). Seeded: the same call gives the same images."""
    rng = np.random.default_rng([seed, 0x5E17])
    labels = np.arange(count) % 10
    if not count:
        return np.zeros((0, 28, 28), np.uint8), labels
    return np.stack([_mnist(int(d), rng, (1.2, 4.5), 0.0, ALL_VARIANTS[int(d)], 25.0) for d in labels]), labels


def render_digit(digit: int, style: str, rng: np.random.Generator) -> np.ndarray:
    """One image of `digit` drawn in `style` (see STYLES), as a file would hold it: uint8 grey, BGR or
    BGRA, or uint16 grey for "deep". Write it with cv2.imwrite (PNG keeps it exactly)."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of {', '.join(STYLES)}")
    digit = int(digit)
    if style == "mnist":
        return _mnist(digit, rng)
    if style == "paper":
        return _photo(digit, rng)
    if style == "pencil":
        return _photo(digit, rng, width=(0.03, 0.07), pencil=True)
    if style == "font":
        return _photo(digit, rng, font=True)
    if style == "thin":
        return _thin(digit, rng)
    if style == "marker":
        return _marker(digit, rng)
    if style == "dark":
        return _dark(digit, rng)
    if style == "offcentre":
        return _offcentre(digit, rng)
    if style == "ruled":
        return _ruled(digit, rng)
    if style == "notebook":
        return _ruled(digit, rng, rel_height=(0.4, 0.6), spacing=(0.05, 0.07), rule_px=(2, 2), squared=0.0)
    if style == "app28":
        return _app28(digit, rng)
    if style == "canvas":
        return _canvas(digit, rng)
    if style == "pageedge":
        return _pageedge(digit, rng)
    if style == "rotated":
        return _photo(digit, rng, rotate_deg=(20.0, 30.0))
    if style == "unusual":
        return _photo(digit, rng, variant=UNUSUAL_VARIANTS[digit])
    if style == "crop":
        return _crop(digit, rng)
    return _deep(digit, rng)


def sideways_jpeg(image: np.ndarray, orientation: int = 6, quality: int = 90) -> bytes:
    """JPEG bytes of `image` stored as a phone held upright (6), upside down (3) or the other way (8) stores
    it: the pixels turned, with the EXIF orientation that tells a viewer to turn them back."""
    stored = {3: cv2.ROTATE_180, 6: cv2.ROTATE_90_COUNTERCLOCKWISE, 8: cv2.ROTATE_90_CLOCKWISE}[orientation]
    # A big-endian TIFF header, one directory with one entry: Orientation (0x0112), SHORT, count 1.
    exif = b"MM\0*" + (8).to_bytes(4, "big") + (1).to_bytes(2, "big") + (0x0112).to_bytes(2, "big") + \
        (3).to_bytes(2, "big") + (1).to_bytes(4, "big") + orientation.to_bytes(2, "big") + bytes(6)
    ok, buf = cv2.imencodeWithMetadata(".jpg", cv2.rotate(image, stored), [cv2.IMAGE_METADATA_EXIF],
                                       [np.frombuffer(exif, np.uint8)], [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("OpenCV could not encode the JPEG")
    return buf.tobytes()
