"""Thread counts for the free cores (cnnedge.threads), and what uses them: torch in train and export, onnxruntime
sessions (int8 as batch slices), bench."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from cnnedge import threads
from cnnedge.infer.runtime import SLICE, Runtime


@pytest.fixture
def fake_proc_stat(monkeypatch):
    """Drive free_cores() with given samples: (wall s, own CPU s, busy ticks, total ticks, CPUs)."""
    samples = []
    monkeypatch.setattr(threads, "_sample", lambda: samples.pop(0))
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "_last_free", None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    def feed(start, now):
        monkeypatch.setattr(threads, "_last", start)
        samples.append(now)
    return feed


def test_free_cores_are_the_cpus_less_what_other_processes_used(fake_proc_stat):
    # 1 s on 2 CPUs (200 ticks): 150 ticks busy, of which this process used 0.5 s -> others used 1 core
    fake_proc_stat((0.0, 0.0, 0, 0, 2), (1.0, 0.5, 150, 200, 2))
    assert threads.thread_count() == 1 and threads._last_free == pytest.approx(1.0)
    fake_proc_stat((0.0, 0.0, 0, 0, 2), (1.0, 1.8, 190, 200, 2))  # busy, but with this process's own threads
    assert threads.thread_count() == 2
    fake_proc_stat((0.0, 0.0, 0, 0, 2), (1.0, 0.0, 200, 200, 2))  # both cores taken by others: still one thread
    assert threads.thread_count() == 1 and threads._last_free == 0.0


def test_requested_threads_and_omp_num_threads_win(fake_proc_stat, monkeypatch):
    assert threads.thread_count(3) == 3  # nothing measured
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert threads.thread_count() == 4
    assert threads.thread_count(1) == 1


def test_both_cores_spun_by_other_processes_give_one_thread(monkeypatch):
    """Real /proc/stat: every usable core kept busy by another process for the measuring window."""
    if threads._sample() is None:
        pytest.skip("no /proc/stat here")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    spin = "import time\nprint('spinning', flush=True)\nend = time.monotonic() + 60\nwhile time.monotonic() < end: pass"
    spinners = [subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.PIPE, text=True)
                for _ in range(threads.usable_cores())]
    try:
        assert all(p.stdout.readline() == "spinning\n" for p in spinners)  # they are running, however late
        threads.free_cores()  # start a window
        time.sleep(0.5)
        assert threads.free_cores() < 0.75
        assert threads.thread_count() == 1
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def test_int8_runs_batches_as_slices_with_the_same_results(shipped_int8):
    sliced = Runtime(shipped_int8, "cpu", threads=2)
    assert sliced.slices == 2 and sliced.session.get_session_options().intra_op_num_threads == 1
    whole = Runtime(shipped_int8, "cpu", threads=1)
    assert whole.slices == 1
    x = np.random.default_rng(0).standard_normal((2 * SLICE + 3, 1, 28, 28)).astype(np.float32)
    for a, b in zip(sliced.forward(x, ("logits", "embedding")), whole.forward(x, ("logits", "embedding"))):
        assert a.shape == b.shape and np.array_equal(a, b)
    assert np.array_equal(sliced.forward(x[:1])[0], whole.forward(x[:1])[0])  # too small to split


@pytest.fixture(scope="module")
def shipped_int8():
    from cnnedge.infer.modelinfo import default_model

    path = default_model().with_name("cnn.int8.onnx")
    if not path.is_file():
        pytest.skip(f"{path} not exported")
    return path
