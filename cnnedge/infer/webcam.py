"""`cnnedge webcam`: live digit recognition on a camera, a video file or a stream (torch-free).

    cnnedge webcam                                   # camera 0, a window with the overlay
    cnnedge webcam --source clip.mp4 --no-window --format json --save annotated.mp4

Per frame: crop the region of interest (a centred square by default), shrink it to at most
`work_size` pixels, preprocess it exactly like `cnnedge predict` (the mode stored in the model's
metadata), run the network at batch 1, average the probabilities of the last k frames, and draw.
A digit cut by the ROI's border, a speck, or a smoothed confidence below `min_confidence` gives
"no digit" (label null) rather than a forced guess.

Capture runs in its own thread. Cameras and streams keep only the newest frame, so slow inference
drops frames instead of lagging behind the scene; a video file keeps them all (none dropped).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from cnnedge.atomic import commit, temp_beside
from cnnedge.errors import CnnedgeError, ExitCode, ImageError
from cnnedge.infer.files import captured_output, printable, quiet_native_stderr
from cnnedge.infer.modelinfo import default_model
from cnnedge.infer.preprocess import analyse
from cnnedge.infer.backend import topk as top_k
from cnnedge.infer.runtime import open_runtime
from cnnedge.report import to_json

ROI_FRACTION = 0.6  # the default ROI: a centred square, this fraction of the frame's short side
WORK_SIZE = 128  # the ROI is analysed at most this many pixels on its long side (see bench_webcam.py)
MIN_DIGIT_PIXELS = 20  # a digit spans at least this many analysed pixels (MNIST draws its digits in 20x20)
MAX_STROKE_RATIO = 0.2  # stroke width / the digit's long side: MNIST's pen is 0.115; fatter fills the loops
TOPK = 3
STALL_SECONDS = 10.0  # a camera or stream silent for this long has stopped
WINDOW = "cnnedge webcam"
VIDEO_CODECS = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".mkv": "mp4v", ".avi": "MJPG"}


# ------------------------------------------------------------------------------------------ source


def parse_source(spec: str) -> tuple[int | str, bool, str]:
    """--source -> (what cv2.VideoCapture opens, live, a name for messages). Live: a camera or a stream."""
    spec = str(spec).strip()
    if spec.isdigit():
        return int(spec), True, f"camera {int(spec)}"
    if "://" in spec:
        return spec, True, spec
    path = Path(spec)
    if not path.exists():
        raise CnnedgeError(f"--source {spec}: no such file, and not a camera index or a stream URL")
    if not path.is_file():
        raise CnnedgeError(f"--source {spec}: not a file")
    if path.stat().st_size == 0:
        raise CnnedgeError(f"--source {spec}: empty file")
    return str(path), False, spec


def _open_failure(target: int | str, log: str) -> str:
    """Why cv2.VideoCapture did not open: FFmpeg's own reason for a stream, ours otherwise."""
    if isinstance(target, int):
        return f"no camera at index {target}" + (f" (/dev/video{target} does not exist)"
                                                 if sys.platform.startswith("linux") and not os.path.exists(f"/dev/video{target}") else "")
    for line in reversed(log.splitlines()):
        if line.startswith("[") and "] " in line and "@" in line.split("] ")[0]:  # "[tcp @ 0x...] reason"
            return line.split("] ", 1)[1].strip()
    return "not a video or image OpenCV can decode" if Path(str(target)).exists() else "cannot be opened"


class FrameSource:
    """Frames from a camera, a video file or a stream, read by a background thread.

    Cameras and streams keep only the newest frame: when processing is slower than the camera, older
    frames are dropped instead of queueing (the picture would lag further and further behind).
    Files keep every frame: a short queue lets decoding overlap processing, the reader waits when
    it is full. `get` hands out (index in the source, frame)."""

    def __init__(self, spec: str):
        self.target, self.live, self.name = parse_source(spec)
        with captured_output() as log:  # OpenCV and FFmpeg print their complaints over several lines
            cap = cv2.VideoCapture(self.target)
        if not cap.isOpened():
            raise CnnedgeError(f"cannot open video source {self.name}: {_open_failure(self.target, log())}")
        if self.live:
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # where the backend supports it: no stale frames in the driver
        ok, first = cap.read()
        if not ok or first is None or first.size == 0:
            cap.release()
            raise CnnedgeError(f"cannot read a frame from {self.name}")
        self.cap = cap
        self.size = (first.shape[1], first.shape[0])
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps = fps if math.isfinite(fps) and 1 <= fps <= 1000 else 30.0
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.frame_count = count if not self.live and count > 0 else None
        self.frames_read = 1  # frames taken from the source so far
        self.dropped = 0  # frames replaced by a newer one before they were processed (live sources)
        self.error: str | None = None
        self._buffer: deque = deque([(0, first)])
        self._capacity = 1 if self.live else 4
        self._cond = threading.Condition()
        self._stop = False
        self._done = False  # the reader has stopped: end of the file, failure, or close()
        self._thread = threading.Thread(target=self._read_loop, name="cnnedge-capture", daemon=True)
        self._thread.start()

    def _read_loop(self) -> None:
        try:
            while True:
                ok, frame = self.cap.read()  # releases the GIL while it waits for the camera or decodes
                with self._cond:
                    if self._stop or not ok or frame is None:
                        return
                    if self.live:
                        if len(self._buffer) >= self._capacity:
                            self._buffer.popleft()
                            self.dropped += 1
                    else:
                        self._cond.wait_for(lambda: len(self._buffer) < self._capacity or self._stop)
                        if self._stop:
                            return
                    self._buffer.append((self.frames_read, frame))
                    self.frames_read += 1
                    self._cond.notify_all()
        except Exception as e:  # a decoder failing mid-stream ends the source, it does not kill the thread silently
            self.error = f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def get(self, timeout: float = 0.1) -> tuple[int, np.ndarray] | None:
        """The next frame, or None when none came within `timeout` seconds (see `ended`)."""
        with self._cond:
            if self._cond.wait_for(lambda: self._buffer or self._done, timeout) and self._buffer:
                item = self._buffer.popleft()
                self._cond.notify_all()
                return item
        return None

    @property
    def ended(self) -> bool:
        with self._cond:
            return self._done and not self._buffer

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=2.0)
        if not self._thread.is_alive():  # releasing while another thread is inside read() is undefined
            self.cap.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------------------ region of interest


def parse_roi(text: str | None) -> tuple[int, int, int, int] | str | None:
    """--roi: None (the centred square), "full", or (x, y, w, h) in pixels."""
    if text is None or text.strip().lower() in ("", "centre", "center"):
        return None
    if text.strip().lower() == "full":
        return "full"
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise CnnedgeError(f"--roi {text!r}: expected x,y,w,h in pixels (e.g. 160,80,320,320) or full") from None
    if x < 0 or y < 0 or w < 1 or h < 1:
        raise CnnedgeError(f"--roi {text!r}: x and y must be >= 0, w and h >= 1")
    return x, y, w, h


def resolve_roi(spec, width: int, height: int) -> tuple[int, int, int, int]:
    """The ROI in pixels of a width x height frame, clipped to it."""
    if spec is None:
        side = max(1, int(ROI_FRACTION * min(width, height)))
        return (width - side) // 2, (height - side) // 2, side, side
    if spec == "full":
        return 0, 0, width, height
    x, y, w, h = spec
    x1, y1 = min(width, x + w), min(height, y + h)
    if x >= width or y >= height:
        raise CnnedgeError(f"--roi {','.join(map(str, spec))} lies outside the {width}x{height} frame")
    return x, y, x1 - x, y1 - y


# ---------------------------------------------------------------------------------------- classify


class Smoother:
    """The mean of the probability vectors of the last k frames.

    A mean rather than a majority vote: one odd frame moves the result by at most 1/k, the confidence
    keeps its meaning (a digit seen at 0.95 for k frames stays at 0.95) and the top-3 comes with it,
    and there are no ties. Frames without a digit count as absent: the label goes once they are the
    majority of the window, so a digit taken away disappears after about k/2 frames."""

    def __init__(self, k: int):
        self.window: deque = deque(maxlen=max(1, k))

    def update(self, probs: np.ndarray | None) -> np.ndarray | None:
        self.window.append(probs)
        seen = [p for p in self.window if p is not None]
        if 2 * len(seen) <= len(self.window):
            return None
        return np.mean(seen, axis=0)


@dataclass
class FrameResult:
    index: int  # the frame's index in the source (gaps: frames dropped by a live source)
    roi: tuple[int, int, int, int]
    label: str | None = None  # smoothed; None: no digit, or not confident enough
    confidence: float | None = None  # smoothed top-1 probability; None when no digit is in view
    topk: list[tuple[str, float]] = field(default_factory=list)
    input: np.ndarray | None = None  # this frame's network input (size x size in [0, 1])
    box: tuple[int, int, int, int] | None = None  # this frame's digit in frame pixels (x, y, w, h)
    prep_ms: float = 0.0  # ROI crop + resize + preprocessing
    infer_ms: float = 0.0
    latency_ms: float = 0.0  # the whole per-frame pipeline, overlay included when one is drawn

    def to_dict(self) -> dict:
        return {"frame": self.index, "label": self.label,
                "confidence": None if self.confidence is None else round(self.confidence, 4),
                "topk": [{"label": n, "probability": round(p, 4)} for n, p in self.topk],
                "latency_ms": round(self.latency_ms, 3)}


class FrameClassifier:
    """ROI -> preprocessing (the model's mode, as in predict) -> the network at batch 1 -> smoothing."""

    def __init__(self, model: str | os.PathLike | None = None, provider: str = "cpu", smooth: int = 5,
                 work_size: int = WORK_SIZE, min_confidence: float = 0.5, threads: int = 1,
                 runtime: str | None = None):
        if smooth < 1:
            raise CnnedgeError(f"--smooth must be at least 1, not {smooth}")
        if work_size < 28:
            raise CnnedgeError(f"--work-size must be at least 28 pixels, not {work_size}")
        if not 0.0 <= min_confidence <= 1.0:
            raise CnnedgeError(f"--min-confidence must be between 0 and 1, not {min_confidence}")
        # One intra-op thread: at batch 1 a second thread costs more in hand-offs than it saves, and the
        # capture thread needs the other core (benchmarks/bench_webcam.py measures both).
        model = default_model() if model is None else model
        self.runtime = open_runtime(model, runtime, provider, threads=threads)
        self.info = self.runtime.info
        self.class_names = self.info.class_names
        self.channels, height, width = self.info.input_shape
        if height != width:
            raise CnnedgeError(f"{model}: non-square input {height}x{width} is not supported by the preprocessing")
        self.size = height
        self.work_size = work_size
        self.min_confidence = min_confidence
        self.smoother = Smoother(smooth)

    def _plausible(self, prepared, shape: tuple[int, ...]) -> bool:
        """A digit lies wholly inside the ROI and is a pen stroke, not a speck, a fragment or a blob. A camera
        sees shadows, the page edge and the hand at the ROI's border, and on blank paper under uneven light a
        bright or dark patch of its texture, where preprocessing would dutifully find "a digit"."""
        if self.info.preprocess != "digit":
            return True  # "fit" models classify what fills the frame
        if prepared.box is None:
            return False
        h, w = shape[:2]
        bx, by, bw, bh = prepared.box
        if prepared.stroke_width > MAX_STROKE_RATIO * max(bw, bh):
            return False
        inside = bx >= 1 and by >= 1 and bx + bw <= w - 1 and by + bh <= h - 1
        upright = bw <= 2 * bh  # handwritten digits are taller than wide; a flat box is an edge or a crease
        return inside and upright and max(bw, bh) >= MIN_DIGIT_PIXELS

    def classify(self, frame: np.ndarray, index: int, roi: tuple[int, int, int, int]) -> FrameResult:
        t0 = time.perf_counter()
        x, y, w, h = roi
        crop = frame[y: y + h, x: x + w]
        scale = min(1.0, self.work_size / max(w, h))
        if scale < 1.0:  # INTER_AREA averages: the shrunk ROI keeps thin strokes as grey lines
            crop = cv2.resize(crop, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        try:
            prepared = analyse(crop, self.info.preprocess, self.size)
        except (ImageError, cv2.error, ValueError):  # nothing there, or a frame OpenCV cannot work on
            prepared = None
        result = FrameResult(index, roi)
        t1 = time.perf_counter()
        probs = None
        if prepared is not None and self._plausible(prepared, crop.shape):
            result.input = prepared.input
            net_input = prepared.input[None] if self.channels == 1 else np.repeat(prepared.input[None, None], self.channels, 1)
            probs = self.runtime.probabilities(net_input)[0]
            bx, by, bw, bh = prepared.box
            result.box = (x + int(bx / scale), y + int(by / scale), math.ceil(bw / scale), math.ceil(bh / scale))
        t2 = time.perf_counter()
        smoothed = self.smoother.update(probs)
        if smoothed is not None:
            idx, val = top_k(smoothed[None], TOPK)
            result.topk = [(self.class_names[int(i)], float(v)) for i, v in zip(idx[0], val[0])]
            result.confidence = result.topk[0][1]
            if result.confidence >= self.min_confidence:
                result.label = result.topk[0][0]
        result.prep_ms, result.infer_ms = 1e3 * (t1 - t0), 1e3 * (t2 - t1)
        result.latency_ms = 1e3 * (time.perf_counter() - t0)
        return result


# ------------------------------------------------------------------------------------------ overlay

GREEN, GREY, WHITE, BLACK, YELLOW = (60, 200, 60), (170, 170, 170), (255, 255, 255), (0, 0, 0), (0, 215, 255)
FONT = cv2.FONT_HERSHEY_SIMPLEX


def _text(img: np.ndarray, text: str, org: tuple[int, int], scale: float, colour, thickness: int = 1) -> None:
    """Text on a black box: readable on any background."""
    (w, h), base = cv2.getTextSize(text, FONT, scale, thickness)
    x, y = org
    cv2.rectangle(img, (x - 4, y - h - 4), (x + w + 4, y + base + 2), BLACK, -1)
    cv2.putText(img, text, (x, y), FONT, scale, colour, thickness, cv2.LINE_AA)


def caption(result: FrameResult) -> str:
    if result.label is not None:
        return f"{result.label}  {100 * result.confidence:.0f}%"
    if result.confidence is None:
        return "no digit"
    return f"unsure ({result.topk[0][0]} {100 * result.confidence:.0f}%)"


def draw_overlay(frame: np.ndarray, result: FrameResult, fps: float, show_input: bool = False) -> np.ndarray:
    """Draw the ROI, the digit's box, the label and confidence, the top-3, FPS and latency, and (when
    asked) the 28x28 network input onto the BGR frame, in place."""
    H, W = frame.shape[:2]
    s = max(0.5, H / 480)  # fonts and lines follow the frame's size

    def px(v: float) -> int:
        return max(1, round(v * s))

    x, y, w, h = result.roi
    colour = GREEN if result.label is not None else GREY
    cv2.rectangle(frame, (x, y), (x + w - 1, y + h - 1), colour, px(2))
    if result.box is not None:
        bx, by, bw, bh = result.box
        cv2.rectangle(frame, (bx, by), (bx + bw, by + bh), YELLOW, 1)
    _text(frame, caption(result), (x + px(6), max(y - px(10), px(60))), 1.1 * s, colour, px(2))
    lines = [f"{fps:5.1f} FPS  {result.latency_ms:4.1f} ms"] + [f"{n}: {100 * p:3.0f}%" for n, p in result.topk]
    for i, line in enumerate(lines):
        _text(frame, line, (px(10), px(24 + 22 * i)), 0.55 * s, WHITE, 1)
    if show_input and result.input is not None:
        side = px(112)
        u8 = np.clip(result.input * 255 + 0.5, 0, 255).astype(np.uint8)
        inset = cv2.cvtColor(cv2.resize(u8, (side, side), interpolation=cv2.INTER_NEAREST), cv2.COLOR_GRAY2BGR)
        x0, y0 = W - side - px(10), px(10)
        if x0 >= 0 and y0 + side <= H:
            frame[y0: y0 + side, x0: x0 + side] = inset
            cv2.rectangle(frame, (x0 - 1, y0 - 1), (x0 + side, y0 + side), WHITE, 1)
    return frame


# -------------------------------------------------------------------------------------------- saving


class VideoSaver:
    """Annotated frames to a video file, atomically: cv2.VideoWriter writes a temporary file beside the
    target (with the same extension: the writer picks the container from it), renamed over the target
    once the writer has finalised it. An interrupted run keeps a complete, shorter video."""

    def __init__(self, path: str | os.PathLike, fps: float, size: tuple[int, int]):
        self.path = Path(path)
        codec = VIDEO_CODECS.get(self.path.suffix.lower())
        if codec is None:
            raise CnnedgeError(f"--save {path}: unsupported extension; use one of {', '.join(VIDEO_CODECS)}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_beside(self.path, suffix=self.path.suffix)
        self.size, self.fps, self.frames = size, fps, 0
        with captured_output() as log:
            self.writer = cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*codec), fps, size)
        if not self.writer.isOpened():
            self.tmp.unlink(missing_ok=True)
            raise CnnedgeError(f"--save {path}: OpenCV cannot write {codec} video here ({log().strip()[-120:] or 'no reason given'})")

    def write(self, frame: np.ndarray, repeat: int = 1) -> None:
        if (frame.shape[1], frame.shape[0]) != self.size:  # a stream that changed resolution mid-way
            frame = cv2.resize(frame, self.size, interpolation=cv2.INTER_AREA)
        for _ in range(repeat):
            self.writer.write(frame)
        self.frames += repeat

    def commit(self) -> None:
        self.writer.release()
        problem = self._unreadable()
        if problem:
            self.tmp.unlink(missing_ok=True)
            kept = "the existing file is kept" if self.path.exists() else "nothing was written"
            raise CnnedgeError(f"--save {self.path}: {problem}; {kept}")
        commit(self.tmp, self.path)

    def _unreadable(self) -> str | None:
        """What is wrong with the video just written, read back from its header and index: OpenCV's VideoWriter
        reports no write errors, and a full disk leaves a truncated file (no index, no moov atom)."""
        cap = cv2.VideoCapture(str(self.tmp))
        count = cap.get(cv2.CAP_PROP_FRAME_COUNT) if cap.isOpened() else float("nan")
        cap.release()
        if abs(count - self.frames) <= max(1.0, 0.01 * self.frames):  # False for NaN; MKV counts are estimates
            return None
        full = shutil.disk_usage(self.tmp.parent).free < (1 << 20)
        found = f"holds {int(count):,} of the {self.frames:,} frames" if math.isfinite(count) and count >= 0 else "is unreadable"
        return f"the video written {found}{' (the disk is full)' if full else ''}"

    def discard(self) -> None:
        self.writer.release()
        self.tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------- presenters


def display_available() -> bool:
    """Whether an OpenCV window can be opened. On Linux and the BSDs a window needs an X11 or Wayland
    display (an ssh session without X forwarding has neither); macOS and Windows always have one."""
    if sys.platform.startswith(("linux", "freebsd", "openbsd", "netbsd")):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


class Window:
    """The annotated frame in an OpenCV window. q or Esc quits (so does closing the window); i shows or
    hides the 28x28 network input. Video files play at their own frame rate, cameras as they come."""

    KEYS = "q or Esc quits, i shows the network input"

    def __init__(self, frame_interval: float | None):
        cv2.namedWindow(WINDOW, cv2.WINDOW_AUTOSIZE)  # raises cv2.error when OpenCV has no GUI backend
        self.frame_interval = frame_interval
        self.show_input = False
        self._last = time.perf_counter()

    def show(self, frame: np.ndarray) -> bool:
        """False when the user asked to quit."""
        cv2.imshow(WINDOW, frame)
        wait = 1
        if self.frame_interval:
            wait = max(1, int(1000 * (self.frame_interval - (time.perf_counter() - self._last))))
        key = cv2.waitKey(wait) & 0xFF
        self._last = time.perf_counter()
        if key in (ord("q"), ord("Q"), 27):
            return False
        if key in (ord("i"), ord("I")):
            self.show_input = not self.show_input
        return cv2.getWindowProperty(WINDOW, cv2.WND_PROP_VISIBLE) >= 1

    def close(self) -> None:
        cv2.destroyWindow(WINDOW)
        cv2.waitKey(1)  # let the GUI process the close


class Panel:
    """The headless view: a rich Live panel with the label, confidence, top-3, FPS and latency.
    Redrawn by the loop itself, at most 10 times a second, between frames: rich's own refresh thread
    would take the GIL in the middle of a frame (drawing costs more than the network)."""

    def __init__(self, console, title: str):
        from rich.live import Live

        self.title = title
        self.live = Live(console=console, auto_refresh=False, transient=False)
        self.live.start()
        self._next = 0.0
        self._last = None

    def show(self, result: FrameResult, stats: RunStats) -> None:
        self._last = (result, stats)
        now = time.perf_counter()
        if now >= self._next:
            self._next = now + 0.1
            self.live.update(self.render(result, stats), refresh=True)

    def render(self, result: FrameResult, stats: RunStats):
        from rich.markup import escape
        from rich.panel import Panel as RichPanel
        from rich.table import Table

        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="dim")
        grid.add_column()
        label = (f"[bold green]{escape(result.label)}[/]" if result.label is not None
                 else f"[dim]{escape(caption(result))}[/]")
        grid.add_row("digit", label)
        grid.add_row("confidence", "-" if result.confidence is None else f"{result.confidence:.3f}")
        grid.add_row(f"top {TOPK}", "  ".join(f"{escape(n)} [cyan]{_bar(p)}[/] {100 * p:3.0f}%" for n, p in result.topk) or "-")
        of = f" / {stats.frame_count}" if stats.frame_count else ""
        grid.add_row("frame", f"{result.index + 1}{of}" + (f"  ({stats.dropped} dropped)" if stats.dropped else ""))
        grid.add_row("FPS", f"{stats.fps():.1f}")
        grid.add_row("latency", f"{result.latency_ms:.2f} ms (preprocess {result.prep_ms:.2f}, "
                                f"network {result.infer_ms:.2f}); p50 {stats.p50():.2f} ms")
        return RichPanel(grid, title=escape(self.title), title_align="left", expand=False)

    def close(self) -> None:
        if self._last is not None:  # the final state, whenever the last redraw was
            self.live.update(self.render(*self._last), refresh=True)
        self.live.stop()
        if not self.live.console.is_terminal:  # rich ends the panel with a newline on terminals only
            self.live.console.line()


def _bar(p: float, width: int = 10) -> str:
    full = round(p * width)
    return "█" * full + "·" * (width - full)


class JsonLines:
    """One JSON object per processed frame on stdout, flushed, so a pipe sees each frame as it happens."""

    def __init__(self):
        self.broken = False

    def write(self, obj: dict) -> bool:
        if self.broken:
            return False
        try:
            sys.stdout.write(to_json(obj, indent=None) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:  # `| head`: the reader is gone; stop quietly
            self.broken = True
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return not self.broken


# ------------------------------------------------------------------------------------------------ run


@dataclass
class RunStats:
    frame_count: int | None = None  # frames in a video file
    dropped: int = 0
    frames: int = 0
    with_digit: int = 0
    latencies: list[float] = field(default_factory=list)
    recent: deque = field(default_factory=lambda: deque(maxlen=30))  # when the last frames were done
    started: float = field(default_factory=time.perf_counter)

    def add(self, result: FrameResult) -> None:
        self.frames += 1
        self.with_digit += result.label is not None
        self.latencies.append(result.latency_ms)
        self.recent.append(time.perf_counter())

    def fps(self) -> float:
        """Frames per second over the last 30 frames."""
        if len(self.recent) < 2:
            return 0.0
        return (len(self.recent) - 1) / max(self.recent[-1] - self.recent[0], 1e-9)

    def p50(self) -> float:
        return float(np.median(self.latencies[-300:])) if self.latencies else 0.0

    def summary(self, **extra) -> dict:
        lat = np.asarray(self.latencies or [0.0])
        seconds = (self.recent[-1] - self.started) if self.recent else 0.0
        return {
            **extra, "frames": self.frames, "dropped": self.dropped, "with_digit": self.with_digit,
            "without_digit": self.frames - self.with_digit, "seconds": round(seconds, 3),
            "fps": round(self.frames / seconds, 1) if seconds > 0 else None,
            "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 3),
                           "p99": round(float(np.percentile(lat, 99)), 3), "mean": round(float(lat.mean()), 3)},
        }


class _StopOnSignal:
    """SIGINT and SIGTERM end the loop after the current frame, so the camera and the writer are always
    released and the summary printed. A second Ctrl-C stops at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)


def run(source: str = "0", model: str | None = None, provider: str = "cpu", roi: str | None = None,
        smooth: int = 5, min_confidence: float = 0.5, window: bool | None = None, fmt: str = "live",
        max_frames: int | None = None, save: str | None = None, work_size: int = WORK_SIZE,
        runtime: str | None = None) -> int:
    """The `cnnedge webcam` command; returns the exit code (0, or 130/143 after Ctrl-C/SIGTERM)."""
    from cnnedge.report import console, err_console, warn

    if max_frames is not None and max_frames < 1:
        raise CnnedgeError(f"--max-frames must be at least 1, not {max_frames}")
    if save is not None and Path(save).suffix.lower() not in VIDEO_CODECS:
        raise CnnedgeError(f"--save {save}: unsupported extension; use one of {', '.join(VIDEO_CODECS)}")
    roi_spec = parse_roi(roi)
    if window and not display_available():
        raise CnnedgeError("--window: no display (DISPLAY and WAYLAND_DISPLAY are unset); use --no-window")
    use_window = display_available() if window is None else window

    classifier = FrameClassifier(model, provider, smooth, work_size, min_confidence, runtime=runtime)
    # Small images, one at a time: OpenCV's thread pool costs more than it saves here, and it would
    # compete with the capture thread for the cores (benchmarks/bench_webcam.py measures both).
    cv2.setNumThreads(1)
    # FFmpeg complains about every damaged frame of a video on stderr; the summary says how the run ended.
    with quiet_native_stderr(), FrameSource(source) as src, _StopOnSignal() as stop:
        resolve_roi(roi_spec, *src.size)  # an ROI outside the frame is a usage error before anything starts
        view = saver = panel = None
        if use_window:
            try:
                view = Window(None if src.live else 1.0 / src.fps)
                if fmt == "live":
                    console.print(f"{printable(src.name)}: {Window.KEYS}", markup=False)
            except cv2.error:
                err_console.print("info: this OpenCV has no GUI support; running headless", markup=False)
        json_out = JsonLines() if fmt == "json" else None
        try:
            if save is not None:
                saver = VideoSaver(save, src.fps, src.size)
            if view is None and json_out is None:
                rt = classifier.runtime
                title = printable(f"cnnedge webcam · {src.name} · {rt.path.name} on {rt.name} {rt.provider}")
                panel = Panel(console, title)
            stats, end = _loop(src, classifier, roi_spec, stop, view, panel, json_out, saver, max_frames)
        except BaseException:
            if saver is not None:
                saver.discard()
            raise
        finally:
            if panel is not None:
                panel.close()
            if view is not None:
                view.close()
        if saver is not None:
            saver.commit()  # a run cut short by Ctrl-C still leaves a complete, shorter video
    if src.error or end.startswith(("end of stream", "no frame")):  # a camera unplugged, a stream gone
        warn(f"{src.name}: {src.error or end}")
    summary = stats.summary(source=src.name, model=str(classifier.runtime.path), runtime=classifier.runtime.name,
                            provider=classifier.runtime.provider, end=end, read=src.frames_read)
    summary["saved"] = None if saver is None else {"path": str(saver.path), "frames": saver.frames,
                                                   "size": list(saver.size), "fps": round(saver.fps, 3)}
    if json_out is not None:
        json_out.write({"summary": summary})
    else:
        console.print(_summary_line(summary), markup=False, soft_wrap=True)
    if stop.signum is not None:
        return int(ExitCode.INTERRUPTED if stop.signum == signal.SIGINT else ExitCode.TERMINATED)
    return int(ExitCode.OK)


def _loop(src: FrameSource, classifier: FrameClassifier, roi_spec, stop: _StopOnSignal, view: Window | None,
          panel: Panel | None, json_out: JsonLines | None, saver: VideoSaver | None,
          max_frames: int | None) -> tuple[RunStats, str]:
    """Process frames until the source ends, the user quits or --max-frames -> (stats, why it ended)."""
    stats = RunStats(frame_count=src.frame_count)
    last_index, last_frame_time = -1, time.perf_counter()
    while stop.signum is None:
        item = src.get(0.1)
        if item is None:
            if src.ended:
                return stats, "end of video" if not src.live else "end of stream: no more frames"
            if src.live and time.perf_counter() - last_frame_time > STALL_SECONDS:
                return stats, f"no frame for {STALL_SECONDS:.0f} s"
            continue
        index, frame = item
        t0 = last_frame_time = time.perf_counter()
        if frame.ndim == 2:
            frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
        result = classifier.classify(frame, index, resolve_roi(roi_spec, frame.shape[1], frame.shape[0]))
        if view is not None or saver is not None:
            draw_overlay(frame, result, stats.fps(), view is not None and view.show_input)
            result.latency_ms = 1e3 * (time.perf_counter() - t0)
        stats.add(result)
        stats.dropped = src.dropped
        if saver is not None:  # a live source's dropped frames are filled with this one: the video keeps real time
            saver.write(frame, max(1, index - last_index) if src.live else 1)
        last_index = index
        if json_out is not None and not json_out.write(result.to_dict()):
            return stats, "output closed"
        if panel is not None:
            panel.show(result, stats)
        if view is not None and not view.show(frame):
            return stats, "quit"
        if max_frames is not None and stats.frames >= max_frames:
            return stats, f"--max-frames {max_frames}"
    return stats, "interrupted"


def _summary_line(s: dict) -> str:
    lat = s["latency_ms"]
    line = (f"{s['frames']} frames from {printable(s['source'])} ({s['end']}): {s['with_digit']} with a digit, "
            f"{s['without_digit']} without, {s['dropped']} dropped; latency p50 {lat['p50']:.2f} ms, "
            f"p99 {lat['p99']:.2f} ms")
    if s["fps"]:
        line += f"; {s['fps']:.1f} FPS"
    line += f"; runtime {s['runtime']}, provider {s['provider']}"
    if s["saved"]:
        saved = s["saved"]
        line += f"\nwrote {printable(saved['path'])} ({saved['frames']} frames, {saved['size'][0]}x{saved['size'][1]})"
    return line
