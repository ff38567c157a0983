"""`cnnedge webcam` on real video: a clip of pen digits on paper written with cv2.VideoWriter, an MJPEG
stream served over HTTP (a live source), and the window with OpenCV's GUI calls replaced by a script."""

from __future__ import annotations

import http.server
import itertools
import json
import math
import signal
import socketserver
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import cv2
import numpy as np
import pytest

from conftest import MODEL, ROOT, assert_one_line_error, run_cli, run_torch_free
from cnnedge import synth
from cnnedge.infer import webcam

SIZE = (640, 480)
DIGITS = [3, 7, None, 0, 4, 9, 1, 2, 5, 6, 8]  # None: blank paper, nothing to read
PER_DIGIT = 8
GLITCH = {3 * PER_DIGIT + 4: 8}  # one frame in the middle of the 0s shows an 8: what smoothing is for


def render_clip(digits, per_digit: int, seed: int = 0, size=SIZE, glitch=None) -> tuple[list[np.ndarray], list[str | None]]:
    """Frames of a phone filming a page: a pen digit per segment, drifting across the centre of the frame,
    with camera blur and noise; `glitch` maps a frame's index to another digit drawn there instead.
    Returns the BGR frames and the digit in each (None for blank paper)."""
    rng = np.random.default_rng(seed)
    W, H = size
    page = synth.paper((H, W), rng, shadow=False, lighting=0.2)
    glitch = glitch or {}
    odd = np.random.default_rng(seed + 1)  # glitches draw on their own: the rest of the clip stays the same
    frames, labels = [], []
    for d in digits:
        segment = None if d is None else synth.digit_strokes(d, rng)
        height, width = rng.uniform(120, 170), rng.uniform(9, 14)
        ink = np.float32([0.35, 0.12, 0.06]) if rng.random() < 0.5 else np.float32([0.08, 0.08, 0.08])
        a = rng.uniform(0, 2 * math.pi)
        for j in range(per_digit):
            t = 2 * j / max(1, per_digit - 1) - 1
            centre = (W / 2 + 25 * math.cos(a) * t, H / 2 + 18 * math.sin(a) * t)
            img, label = page, glitch.get(len(frames), d)
            if len(frames) in glitch:
                cov = synth.draw_strokes((H, W), synth.digit_strokes(label, odd), centre, height, width, odd, supersample=2)
                img = page * (1 - cov[..., None]) + ink * cov[..., None]
            elif segment is not None:
                cov = synth.draw_strokes((H, W), segment, centre, height, width, rng, supersample=2)
                img = page * (1 - cov[..., None]) + ink * cov[..., None]
            frames.append(synth.camera(img, rng, blur=(0.3, 0.8), noise=(0.005, 0.015), jpeg=None))
            labels.append(None if label is None else str(label))
    return frames, labels


def write_video(path, frames, fps: float = 15.0, fourcc: str = "mp4v") -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (frames[0].shape[1], frames[0].shape[0]))
    assert writer.isOpened()
    for f in frames:
        writer.write(f)
    writer.release()


def read_video(path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    cap.release()
    return frames


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    frames, labels = render_clip(DIGITS, PER_DIGIT, glitch=GLITCH)
    path = tmp_path_factory.mktemp("webcam") / "digits.mp4"
    write_video(path, frames)
    assert len(read_video(path)) == len(frames)  # this OpenCV reads back all it wrote
    return path, labels


def json_lines(stdout: str) -> tuple[list[dict], dict]:
    lines = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    assert "summary" in lines[-1] and all("summary" not in d for d in lines[:-1])
    return lines[:-1], lines[-1]["summary"]


def test_every_frame_of_a_video_is_read_right_without_smoothing(clip):
    path, labels = clip
    r = run_cli("webcam", "--source", path, "--no-window", "--format", "json", "--smooth", "1")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    frames, summary = json_lines(r.stdout)
    assert [f["frame"] for f in frames] == list(range(len(labels)))  # a file: none dropped, in order
    assert [f["label"] for f in frames] == labels
    for f in frames:
        assert set(f) == {"frame", "label", "confidence", "topk", "latency_ms"}
        assert f["latency_ms"] > 0
        if f["label"] is None:  # blank paper: no digit, no guess
            assert f["confidence"] is None and f["topk"] == []
        else:
            assert f["confidence"] >= 0.5 and f["topk"][0]["label"] == f["label"] and len(f["topk"]) == 3
    assert summary["frames"] == summary["read"] == len(labels)
    assert summary["dropped"] == 0 and summary["end"] == "end of video"
    assert summary["with_digit"] == sum(lab is not None for lab in labels)
    assert summary["latency_ms"]["p50"] > 0 and summary["fps"] > 0 and summary["saved"] is None


def test_every_frame_is_read_right_in_opencv_dnn_too(clip, fresh_export):
    """--runtime opencv (this tree's export: the shipped file predates the OpenCV-loadable graph), in this
    process: the same label on every frame as the test above, and the summary names the runtime."""
    from typer.testing import CliRunner

    from cnnedge import cli

    path, labels = clip
    result = CliRunner().invoke(cli.app, ["webcam", "--source", str(path), "--no-window", "--format", "json",
                                          "--smooth", "1", "--runtime", "opencv", "--model", str(fresh_export.path)])
    assert result.exit_code == 0, result.output
    frames, summary = json_lines(result.stdout)
    assert [f["label"] for f in frames] == labels
    assert summary["runtime"] == "opencv" and summary["provider"] == "cpu" and summary["frames"] == len(labels)


def test_smoothing_lags_a_little_and_never_flickers(clip):
    path, labels = clip
    glitch = next(iter(GLITCH))
    assert labels[glitch] == str(GLITCH[glitch])  # read as such without smoothing (previous test)
    r = run_cli("webcam", "--source", path, "--no-window", "--format", "json", "--smooth", "5")
    assert r.returncode == 0, r.stderr
    got = [f["label"] for f in json_lines(r.stdout)[0]]
    # Each segment is read right once the window of 5 holds a majority of its frames: at most 2 frames
    # late; the odd frame among the 0s does not show.
    for k, d in enumerate(DIGITS):
        start = k * PER_DIGIT
        assert got[start + 2: start + PER_DIGIT] == [None if d is None else str(d)] * (PER_DIGIT - 2), (k, got)
    # The shown label changes once per segment boundary, never back and forth.
    changes = sum(a != b for a, b in itertools.pairwise(got))
    assert changes == len(DIGITS) - 1, got


def test_smoother_averages_out_an_odd_frame_and_drops_a_vanished_digit():
    seven, one = np.eye(10)[7] * 0.9 + 0.01, np.eye(10)[1] * 0.9 + 0.01
    s = webcam.Smoother(5)
    out = [s.update(p) for p in (seven, seven, one, seven, seven)]
    assert [int(np.argmax(o)) for o in out] == [7, 7, 7, 7, 7]
    assert out[-1][7] == pytest.approx((4 * 0.91 + 0.01) / 5)
    out = [s.update(None) for _ in range(3)]  # the digit is taken away: gone once absent in most of the window
    assert out[0] is not None and out[1] is not None and out[2] is None
    assert webcam.Smoother(1).update(one) is not None and webcam.Smoother(1).update(None) is None


def test_roi_decides_where_to_look(clip):
    path, labels = clip
    r = run_cli("webcam", "--source", path, "--no-window", "--format", "json", "--smooth", "1", "--roi", "full",
                "--work-size", "320")
    assert r.returncode == 0, r.stderr
    assert [f["label"] for f in json_lines(r.stdout)[0]] == labels
    # A corner of the page, away from the digits: nothing there, whatever the network would guess.
    r = run_cli("webcam", "--source", path, "--no-window", "--format", "json", "--roi", "0,0,160,160")
    assert r.returncode == 0, r.stderr
    frames, summary = json_lines(r.stdout)
    assert all(f["label"] is None for f in frames) and summary["with_digit"] == 0


@pytest.fixture(scope="module")
def classifier():
    return webcam.FrameClassifier(MODEL, "cpu", smooth=1)


def test_no_digit_rather_than_a_guess(classifier):
    """Blank pages, specks and digits cut by the ROI's border give no label; shadows, the table beyond the
    page and a hand reaching in are what a camera really sees, and almost never get one."""
    W, H = SIZE
    roi = webcam.resolve_roi(None, W, H)
    x, y, w, h = roi
    clutter = labelled = 0
    for seed in range(12):
        rng = np.random.default_rng(seed)
        page = synth.paper((H, W), rng, shadow=False)
        dot = page.copy()
        cv2.circle(dot, (int(rng.uniform(x + 40, x + w - 40)), int(rng.uniform(y + 40, y + h - 40))),
                   int(rng.integers(2, 9)), (0.1, 0.1, 0.1), -1, cv2.LINE_AA)
        centre = [(x, H / 2), (x + w, H / 2), (W / 2, y), (W / 2, y + h)][seed % 4]  # on the ROI's border
        cov = synth.draw_strokes((H, W), synth.digit_strokes(seed % 10, rng), centre, rng.uniform(120, 170),
                                 rng.uniform(8, 14), rng, supersample=2)
        for img in (page, dot, page * (1 - cov[..., None]) + 0.1 * cov[..., None]):
            assert classifier.classify(synth.camera(img, rng), 0, roi).confidence is None
        table = page.copy()
        cv2.rectangle(table, (0, int(rng.uniform(150, 330))), (W, H), (0.3, 0.25, 0.2), -1)
        hand = page.copy()
        cv2.ellipse(hand, (int(rng.uniform(250, 400)), int(rng.uniform(300, 480))), (90, 140), 10, 0, 360,
                    (0.55, 0.65, 0.85), -1)
        for img in (synth.paper((H, W), rng, shadow=True), table, hand):
            clutter += 1
            labelled += classifier.classify(synth.camera(img, rng), 0, roi).label is not None
    assert labelled <= 0.1 * clutter, (labelled, clutter)


def test_save_writes_the_annotated_video_and_max_frames_stops(clip, tmp_path):
    path, _ = clip
    out = tmp_path / "out" / "annotated.mp4"
    r = run_cli("webcam", "--source", path, "--no-window", "--format", "json", "--save", out)
    assert r.returncode == 0, r.stderr
    summary = json_lines(r.stdout)[1]
    saved = read_video(out)
    original = read_video(path)
    assert len(saved) == len(original) == summary["saved"]["frames"] == summary["frames"]
    assert saved[0].shape == original[0].shape
    assert sorted(p.name for p in out.parent.iterdir()) == ["annotated.mp4"]  # no temporary file left behind
    # The overlay is there: the ROI's box is drawn green (a digit was read) on the first frame.
    x, y, _, h = webcam.resolve_roi(None, *SIZE)
    edge = saved[0][y + h // 2, x - 1: x + 2].astype(int)
    assert (edge[:, 1] > 150).any() and (edge[:, 1] - edge[:, 2] > 80).any(), edge

    avi = tmp_path / "first.avi"
    r = run_cli("webcam", "--source", path, "--no-window", "--format", "json", "--max-frames", "10", "--save", avi)
    assert r.returncode == 0, r.stderr
    frames, summary = json_lines(r.stdout)
    assert len(frames) == 10 and summary["frames"] == 10 and summary["end"] == "--max-frames 10"
    assert len(read_video(avi)) == 10


def test_headless_panel_prints_a_summary(clip):
    path, _ = clip
    r = run_cli("webcam", "--source", path, "--no-window", "--max-frames", "12")
    assert r.returncode == 0, r.stderr
    assert "cnnedge webcam" in r.stdout and "latency" in r.stdout  # the panel's last state
    assert f"12 frames from {path} (--max-frames 12): 12 with a digit, 0 without, 0 dropped" in r.stdout
    assert "provider cpu" in r.stdout


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_cleanly_with_a_summary_and_a_complete_video(clip, tmp_path, sig, code):
    path, _ = clip
    long = tmp_path / "long.avi"  # 8 passes over the clip: more JSON than a pipe buffers
    frames = read_video(path)
    write_video(long, frames * 8, fourcc="MJPG")
    out = tmp_path / "saved.mp4"
    p = subprocess.Popen([sys.executable, "-m", "cnnedge", "webcam", "--source", str(long), "--no-window",
                          "--format", "json", "--save", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    first = p.stdout.readline()
    assert json.loads(first)["frame"] == 0
    p.send_signal(sig)
    rest, err = p.communicate(timeout=120)
    assert p.returncode == code, err
    lines, summary = json_lines(first + rest)
    assert summary["end"] == "interrupted" and 1 <= summary["frames"] < 8 * len(frames)
    assert len(lines) == summary["frames"]
    assert len(read_video(out)) == summary["frames"] == summary["saved"]["frames"]
    assert "Traceback" not in err


def test_unopenable_sources_and_bad_options_are_one_line_errors(clip, tmp_path):
    path, _ = clip
    assert_one_line_error(run_cli("webcam", "--source", tmp_path / "missing.mp4", "--no-window"), 2,
                          "missing.mp4", "no such file")
    assert_one_line_error(run_cli("webcam", "--source", "99", "--no-window"), 2, "camera 99", "no camera at index 99")
    not_video = tmp_path / "notes.mp4"
    not_video.write_text("not a video\n")
    assert_one_line_error(run_cli("webcam", "--source", not_video, "--no-window"), 2, "cannot open video source")
    assert_one_line_error(run_cli("webcam", "--source", "http://127.0.0.1:9/stream.mjpg", "--no-window"), 2,
                          "cannot open video source http://127.0.0.1:9/stream.mjpg")
    for args, fragment in ((["--roi", "1,2,3"], "expected x,y,w,h"), (["--roi", "900,0,10,10"], "outside the 640x480"),
                           (["--format", "xml"], "'xml' is not one of"), (["--smooth", "0"], "--smooth"),
                           (["--save", tmp_path / "x.gif"], "unsupported extension"),
                           (["--max-frames", "0"], "--max-frames"), (["--model", tmp_path / "none.onnx"], "no such model"),
                           (["--window"], "no display")):
        r = run_cli("webcam", "--source", path, *args, env={"DISPLAY": "", "WAYLAND_DISPLAY": ""})
        assert_one_line_error(r, 2, fragment)
        assert r.stdout == ""
    assert not (tmp_path / "x.gif").exists()


def test_webcam_never_imports_torch(clip):
    path, _ = clip
    r = run_torch_free(["webcam", "--source", path, "--no-window", "--format", "json", "--max-frames", "5"])
    assert json_lines(r.stdout)[1]["frames"] == 5


# ------------------------------------------------------------------------------------- live sources


@contextmanager
def mjpeg_stream(frames: list[np.ndarray], fps: float):
    """An HTTP MJPEG stream (what IP cameras serve) of `frames`, once, at `fps`. Yields its URL."""
    jpegs = [cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes() for f in frames]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            self.end_headers()
            try:
                for jpeg in jpegs:
                    self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s\r\n"
                                     % (len(jpeg), jpeg))
                    time.sleep(1 / fps)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *args):
            pass

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/stream.mjpg"
    finally:
        server.shutdown()
        server.server_close()


def test_a_live_source_keeps_only_the_newest_frame(clip):
    frames = read_video(clip[0])
    with mjpeg_stream(frames, fps=200) as url, webcam.FrameSource(url) as src:
        assert src.live and src.size == SIZE
        first, _ = src.get(30.0)
        # A slow consumer: take nothing while the stream runs on, however long this machine needs to read it.
        deadline = time.monotonic() + 120
        while src.frames_read < first + 12 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert src.frames_read >= first + 12
        index, frame = src.get(5.0)
        assert index >= first + 11 and src.dropped >= 10  # the newest frame, not the next of a backlog
        assert frame.shape == (SIZE[1], SIZE[0], 3)


def test_a_stream_through_the_cli_until_it_ends(clip):
    path, labels = clip
    frames = read_video(path)
    with mjpeg_stream(frames, fps=30) as url:
        r = run_cli("webcam", "--source", url, "--no-window", "--format", "json", "--smooth", "1")
    assert r.returncode == 0, r.stderr
    lines, summary = json_lines(r.stdout)
    assert summary["end"] == "end of stream: no more frames" and summary["source"] == url
    assert "warning: " in r.stderr and "Traceback" not in r.stderr
    assert lines  # how many are dropped depends on this machine's speed (the test above pins the rule down)
    assert summary["frames"] + summary["dropped"] <= summary["read"] == len(frames)
    for f in lines:  # indices count the stream's frames, so each can be checked against the clip
        assert f["label"] == labels[f["frame"]], f


# -------------------------------------------------------------------------------------------- window


def test_window_keys_toggle_the_network_input_and_quit(clip, monkeypatch, capsys):
    """The window loop with OpenCV's GUI calls scripted (no display here): 'i' at the 3rd frame shows the
    28x28 input, 'q' at the 6th quits."""
    path, _ = clip
    shown, keys = [], iter([-1, -1, ord("i"), -1, -1, ord("q")])
    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.setattr(webcam.cv2, "namedWindow", lambda *a: None)
    monkeypatch.setattr(webcam.cv2, "imshow", lambda name, img: shown.append(img.copy()))
    monkeypatch.setattr(webcam.cv2, "waitKey", lambda delay: next(keys, -1))
    monkeypatch.setattr(webcam.cv2, "getWindowProperty", lambda *a: 1.0)
    monkeypatch.setattr(webcam.cv2, "destroyWindow", lambda *a: None)
    code = webcam.run(str(path), model=str(MODEL), smooth=1)
    assert code == 0
    assert len(shown) == 6
    assert f"6 frames from {path} (quit)" in capsys.readouterr().out
    W = SIZE[0]

    def corner(img):  # where the inset goes
        return img[10:122, W - 122: W - 10]

    # Before 'i': the paper. After: the network input, mostly black with white strokes, in a white frame.
    assert corner(shown[2]).mean() > 100
    assert corner(shown[3]).mean() < 100 and (corner(shown[3]) > 200).any()
    assert shown[3].shape == (SIZE[1], SIZE[0], 3)


def test_window_falls_back_to_headless_without_gui_support(clip, monkeypatch, capsys):
    path, _ = clip
    monkeypatch.setenv("DISPLAY", ":0")

    def no_gui(*args):
        raise cv2.error("The function is not implemented")

    monkeypatch.setattr(webcam.cv2, "namedWindow", no_gui)
    code = webcam.run(str(path), model=str(MODEL), fmt="json", max_frames=3)
    assert code == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == "info: this OpenCV has no GUI support; running headless"
    assert json_lines(captured.out)[1]["frames"] == 3
