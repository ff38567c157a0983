"""How many threads cnnedge's thread pools get: the cores this process may use, less those other processes keep busy.

PyTorch's OpenMP threads and onnxruntime's intra-op threads spin while they wait for each other at every
parallel step, so one of them that the kernel has descheduled (the cores are busy with other work) stalls
the rest: the default `cnnedge train` took 176-432 s at a load average of 5-9, against 18-20 s on a quiet
machine, and 35-45 s with one thread (issue 18). So unless told (`--threads`, or OMP_NUM_THREADS), a pool
gets the cores that other processes have left free lately: the busy time /proc/stat counts on this
process's CPUs, less this process's own CPU time, since the previous reading (the first one: since cnnedge
was imported, which covers the imports and the data loading that come before any pool starts). Torch-free
and numpy-free; where /proc/stat does not exist (macOS, Windows) every usable core counts as free.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

MIN_WINDOW = 0.1  # seconds of /proc/stat to judge by: 10 clock ticks per CPU at Linux's USER_HZ of 100


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask), capped by a container's CPU quota (cgroup v2 or v1)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(n, math.ceil(quota))) if quota else n


def _cgroup_quota() -> float | None:
    """CPUs' worth of time the cgroup may use (`docker --cpus 1.5` -> 1.5), None when unlimited or unknown."""
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()  # v2: "max 100000" or "150000 100000"
        quota, period = (None if text[0] == "max" else int(text[0])), int(text[1])
    except (OSError, ValueError, IndexError):
        try:  # v1
            quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
            period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            return None
        quota = None if quota < 0 else quota
    return quota / period if quota and period > 0 else None


def _sample() -> tuple[float, float, int, int, int] | None:
    """(wall time, this process's CPU time, busy and total clock ticks of its CPUs, how many), or None."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
        cpus = os.sched_getaffinity(0)
    except (OSError, AttributeError):
        return None
    busy = total = counted = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or not name[3:].isdigit() or int(name[3:]) not in cpus:
            continue
        ticks = [int(t) for t in rest.split()[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(ticks)
        busy += sum(ticks) - ticks[3] - ticks[4]  # steal counts as busy: the hypervisor gave the core away
        counted += 1
    return (time.monotonic(), time.process_time(), busy, total, counted) if counted else None


_last = _sample()  # at import: the first window covers start-up
_last_free: float | None = None


def free_cores() -> float:
    """Cores other processes left free since the previous call (at least MIN_WINDOW of it: a call sooner
    than that gets the previous answer, the first call waits for the rest of its window)."""
    global _last, _last_free
    usable = usable_cores()
    now = _sample()
    if _last is None or now is None:
        return float(usable)
    if now[0] - _last[0] < MIN_WINDOW:
        if _last_free is not None:
            return _last_free
        time.sleep(MIN_WINDOW - (now[0] - _last[0]))
        now = _sample()
    wall, own, busy, total = (a - b for a, b in zip(now[:4], _last[:4]))
    cores = now[4]
    others = max(0.0, cores * busy / total - own / wall) if total > 0 and wall > 0 else 0.0
    _last, _last_free = now, max(0.0, min(usable, cores - others))
    return _last_free


def _from_environment() -> int | None:
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(value) if value.isdigit() and int(value) >= 1 else None


def thread_count(requested: int | None = None) -> int:
    """Threads for a pool: `requested` (--threads) when given, else OMP_NUM_THREADS when set, else the free
    cores, rounded (at least 1). Quiet 2-core machine: 2; both cores busy with other work: 1."""
    if requested:
        return int(requested)
    return _from_environment() or max(1, min(usable_cores(), int(free_cores() + 0.5)))
