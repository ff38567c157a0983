"""Load benchmark of `cnnedge serve` on loopback: N concurrent clients, p50/p99 latency, requests/s and
errors, with and without dynamic batching; start-up time and memory of the server.

    CNNEDGE_DATA=../shared/data uv run python benchmarks/bench_serve.py                 # every scenario
    uv run python benchmarks/bench_serve.py --only png-batched png-unbatched --requests 20000

Scenarios (each on a fresh server process, bounded in requests and in time):
- png-*: 28x28 PNGs (the MNIST test set when CNNEDGE_DATA has it, else synthetic digits), raw bodies;
  batched (the defaults), unbatched (--max-batch 1), and without the wait (--batch-wait-ms 0);
- jpeg-*: 640x480 phone-photo-like JPEGs (cnnedge.synth "paper"), 1 and 2 worker processes;
- bad-10pct: 10% bad inputs among the PNGs (garbage, truncated, over --max-body, empty, a decompression
  bomb): every request must be answered, 200 or the bad input's 4xx, none failed (5xx, reset) or hung.

Load generator: Debian's `wrk` (C, event-driven; `apt-get install wrk`), 2 threads, one connection per
client, a Lua script that cycles through the bodies and counts statuses; each thread stops after its
share of the requests, and -d bounds the time. wrk's own CPU time is reported: it uses a small part of
one core, so the client is not what limits the figures. Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from cnnedge.bench import photos  # noqa: E402
from cnnedge.infer.files import load_test_set  # noqa: E402
from cnnedge.synth import render_digit  # noqa: E402
from test_bad_inputs import png_bomb  # noqa: E402  (one copy of the decompression-bomb maker)

LUA = r"""
-- wrk script: args = manifest (one "file<TAB>content type" per line), requests per thread, path, marker prefix.
-- Globals (statuses, first, last) are what done() reads back from each thread.
local ffi = require("ffi")
ffi.cdef[[ typedef struct { long tv_sec; long tv_nsec; } cnnedge_timespec; int clock_gettime(int, cnnedge_timespec *); ]]
local ts = ffi.new("cnnedge_timespec")
local function now() ffi.C.clock_gettime(1, ts); return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9 end

local bodies, n, limit, counter, marker = {}, 0, 0, 0, ""
local threads = {}
statuses, first, last = {}, nil, nil

function setup(thread)
  thread:set("id", #threads)
  threads[#threads + 1] = thread
end

function init(args)
  for line in io.lines(args[1]) do
    local file, ctype = line:match("^([^\t]+)\t(.*)$")
    local f = assert(io.open(file, "rb"))
    local body = f:read("*a")
    f:close()
    local headers = {}
    if ctype ~= "" then headers["Content-Type"] = ctype end
    bodies[#bodies + 1] = wrk.format("POST", args[3], headers, body)
  end
  limit = tonumber(args[2])
  marker = args[4] .. id
  counter = (id * 7919) % #bodies  -- threads start at different places
end

function request()
  if first == nil then first = now() end
  counter = counter % #bodies + 1
  return bodies[counter]
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  n = n + 1
  if n == limit then  -- this thread's share is done: say so (the benchmark then stops wrk) and stop
    last = now()
    local f = io.open(marker, "w"); f:close()
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local total, t0, t1 = {}, math.huge, 0
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses")) do total[k] = (total[k] or 0) + v end
    t0 = math.min(t0, t:get("first") or math.huge)
    t1 = math.max(t1, t:get("last") or 0)
  end
  local parts = {}
  for k, v in pairs(total) do parts[#parts + 1] = string.format('"%d":%d', k, v) end
  local e = summary.errors
  local span = (t1 > t0) and (t1 - t0) or (summary.duration / 1e6)
  io.write(string.format('CNNEDGE_RESULT {"requests":%d,"seconds":%.6f,"p50_us":%d,"p90_us":%d,' ..
    '"p99_us":%d,"max_us":%d,"socket_errors":%d,"timeouts":%d,"statuses":{%s}}\n',
    summary.requests, span, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, e.connect + e.read + e.write, e.timeout, table.concat(parts, ",")))
end
"""


@dataclass
class Scenario:
    name: str
    bodies: str  # png, jpeg or bad
    server_args: list[str] = field(default_factory=list)
    requests: int = 20000


@dataclass
class Bodies:
    manifest: Path
    expected: dict[int, str] = field(default_factory=dict)  # status -> the kind of input that gets it


def write_bodies(folder: Path, kind: str, n_png: int, n_jpeg: int, max_body: int) -> Bodies:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []

    def add(name: str, data: bytes, ctype: str) -> None:
        (folder / name).write_bytes(data)
        lines.append(f"{folder / name}\t{ctype}")

    if kind == "jpeg":
        images, _ = photos(n_jpeg)
        for i, im in enumerate(images):
            add(f"{i:04d}.jpg", cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes(), "image/jpeg")
    else:
        x, _, _ = load_test_set("mnist", None, n_png)
        if x is None:
            rng = np.random.default_rng(0)
            x = np.stack([render_digit(i % 10, "mnist", rng) for i in range(n_png)])
        pngs = [cv2.imencode(".png", im)[1].tobytes() for im in x]
        if kind == "png":
            for i, data in enumerate(pngs):
                add(f"{i:04d}.png", data, "image/png")
        else:  # 90 good and 10 bad in every 100
            good = cv2.imencode(".png", render_digit(3, "paper", np.random.default_rng(0)))[1].tobytes()
            bad = [("garbage", os.urandom(3000), "application/octet-stream"),
                   ("truncated", good[: len(good) // 2], "image/png"),
                   ("oversized", os.urandom(max_body + 1), "application/octet-stream"),
                   ("empty", b"", ""),
                   ("bomb", png_bomb(10000, 9000), "image/png")]
            for block in range(max(1, n_png // 90)):
                for i in range(90):
                    add(f"{block:03d}_{i:02d}.png", pngs[(block * 90 + i) % len(pngs)], "image/png")
                for j in range(10):
                    name, data, ctype = bad[j % len(bad)]
                    add(f"{block:03d}_bad{j}_{name}", data, ctype)
    manifest = folder / "manifest.tsv"
    manifest.write_text("\n".join(lines) + "\n")
    return Bodies(manifest)


# ------------------------------------------------------------------------------------------ server


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes, summed over the server and its worker processes."""
    rss = pss = 0
    for p in descendants(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except OSError:
            pass
    return rss, pss


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in descendants(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
    return total


class Server:
    def __init__(self, args: list[str], probe: bytes, log: Path):
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "cnnedge", "serve", "--port", "0", *args], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
        line = self.proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if m is None:
            raise SystemExit(f"the server did not start: {line!r} {log.read_text()}")
        self.port = int(m.group(1))
        deadline = time.monotonic() + 60
        while True:  # start to the first real answer
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                c.request("POST", "/v1/predict", probe)
                r = c.getresponse()
                r.read()
                c.close()
                if r.status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"no answer from the server in 60 s: {log.read_text()}")
            time.sleep(0.005)
        self.first_answer_s = time.perf_counter() - self.started
        self.first_answer_cpu_s = cpu_seconds(self.proc.pid)  # what start-up costs, whatever else the machine runs
        self.peak = (0, 0)
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            rss, pss = memory(self.proc.pid)
            self.peak = (max(self.peak[0], rss), max(self.peak[1], pss))

    def stop(self) -> None:
        self._stop.set()
        self._sampler.join()
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def status_of(port: int, body: bytes) -> int:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("POST", "/v1/predict", body)
    r = c.getresponse()
    r.read()
    c.close()
    return r.status


# --------------------------------------------------------------------------------------------- run


def run_scenario(s: Scenario, bodies: Bodies, probe: bytes, args, tmp: Path) -> dict:
    server = Server(s.server_args, probe, tmp / f"{s.name}.log")
    try:
        if s.bodies == "bad":  # each kind once, by itself: the status it must get
            kinds = {}
            for line in bodies.manifest.read_text().splitlines():
                file = line.split("\t")[0]
                kind = file.rsplit("_", 1)[1] if "_bad" in file else "good"
                if kind not in kinds:
                    kinds[kind] = status_of(server.port, Path(file).read_bytes())
            expected = {"good": 200, "garbage": 422, "truncated": 422, "oversized": 413, "empty": 422, "bomb": 413}
            if kinds != expected:
                raise SystemExit(f"bad inputs got {kinds}, expected {expected}")
        cpu0 = cpu_seconds(server.proc.pid)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        threads = 2
        markers = tmp / f"{s.name}.done."
        cmd = ["wrk", "-t", str(threads), "-c", str(args.clients), "-d", f"{args.seconds}s", "--timeout", "10s",
               "-s", str(tmp / "load.lua"), f"http://127.0.0.1:{server.port}",
               "--", str(bodies.manifest), str(-(-s.requests // threads)), "/v1/predict", str(markers)]
        wrk = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # wrk sleeps for -d whatever its threads do: once every thread has sent its share, Ctrl-C it (it then
        # reports, as at the end of -d).
        while wrk.poll() is None and len(list(tmp.glob(markers.name + "*"))) < threads:
            time.sleep(0.05)
        if wrk.poll() is None:
            wrk.send_signal(signal.SIGINT)
        stdout, stderr = wrk.communicate(timeout=60)
        out = subprocess.CompletedProcess(cmd, wrk.returncode, stdout, stderr)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        server_cpu = cpu_seconds(server.proc.pid) - cpu0
        c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        c.request("GET", "/metrics")
        metrics = c.getresponse().read().decode()
        c.close()
        calls = float(re.search(r"^cnnedge_batch_images_count (\S+)$", metrics, re.M).group(1))
        images = float(re.search(r"^cnnedge_batch_images_sum (\S+)$", metrics, re.M).group(1))
        m = re.search(r"^CNNEDGE_RESULT (.*)$", out.stdout, re.M)
        if m is None:
            raise SystemExit(f"wrk failed: {out.stdout} {out.stderr}")
        r = json.loads(m.group(1))
    finally:
        server.stop()
    seconds = r["seconds"]  # first request to last response (wrk's Lua reads a monotonic clock)
    statuses = {int(k): v for k, v in r["statuses"].items()}
    expected = {200, 413, 422} if s.bodies == "bad" else {200}  # 4xx: the bad inputs' own answers
    failed = sum(v for k, v in statuses.items() if k not in expected) + r["socket_errors"] + r["timeouts"]
    client_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"scenario": s.name, "server": " ".join(s.server_args) or "(defaults)", "clients": args.clients,
            "requests": r["requests"], "seconds": round(seconds, 2), "requests_per_s": round(r["requests"] / seconds, 1),
            "p50_ms": r["p50_us"] / 1000, "p90_ms": r["p90_us"] / 1000, "p99_ms": r["p99_us"] / 1000,
            "max_ms": r["max_us"] / 1000, "images_per_call": round(images / max(calls, 1), 2), "statuses": statuses, "failed": failed, "timeouts": r["timeouts"],
            "first_answer_s": round(server.first_answer_s, 3), "first_answer_cpu_s": round(server.first_answer_cpu_s, 3), "peak_rss_mb": round(server.peak[0] / 2**20, 1),
            "peak_pss_mb": round(server.peak[1] / 2**20, 1),
            "client_cpu_pct_of_a_core": round(100 * client_cpu / seconds, 1),
            "server_cpu_pct_of_a_core": round(100 * server_cpu / seconds, 1),
            # Less sensitive to other load on the machine than req/s: what one request costs the server.
            "server_cpu_ms_per_request": round(1000 * server_cpu / max(1, r["requests"]), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", help="scenario names (default: all)")
    ap.add_argument("--requests", type=int, default=20000, help="requests per PNG scenario")
    ap.add_argument("--jpeg-requests", type=int, default=500, help="requests per JPEG scenario")
    ap.add_argument("--clients", type=int, default=16, help="concurrent connections")
    ap.add_argument("--seconds", type=int, default=120, help="at most this long per scenario")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("this benchmark drives the server with wrk: apt-get install wrk")
    scenarios = [
        Scenario("png-batched", "png", [], args.requests),
        Scenario("png-unbatched", "png", ["--max-batch", "1"], args.requests),
        Scenario("png-no-wait", "png", ["--batch-wait-ms", "0"], args.requests),
        Scenario("png-batched-2-workers", "png", ["--workers", "2"], args.requests),
        Scenario("png-unbatched-2-workers", "png", ["--workers", "2", "--max-batch", "1"], args.requests),
        Scenario("jpeg-batched", "jpeg", [], args.jpeg_requests),
        Scenario("jpeg-unbatched", "jpeg", ["--max-batch", "1"], args.jpeg_requests),
        Scenario("jpeg-batched-2-workers", "jpeg", ["--workers", "2"], args.jpeg_requests),
        Scenario("bad-10pct", "bad", ["--max-body", "1MB"], args.requests),
    ]
    if args.only:
        unknown = set(args.only) - {s.name for s in scenarios}
        if unknown:
            raise SystemExit(f"unknown scenario(s) {', '.join(sorted(unknown))}")
        scenarios = [s for s in scenarios if s.name in args.only]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "load.lua").write_text(LUA)
        probe = cv2.imencode(".png", render_digit(7, "mnist", np.random.default_rng(0)))[1].tobytes()
        made: dict[str, Bodies] = {}
        for s in scenarios:
            if s.bodies not in made:
                made[s.bodies] = write_bodies(tmp / s.bodies, s.bodies, 1000, 100, 1 << 20)
            row = run_scenario(s, made[s.bodies], probe, args, tmp)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print("| scenario | server options | requests | req/s | p50 ms | p99 ms | failed | images/call | server CPU ms/request | "
          "first answer s | peak RSS MB | peak PSS MB | wrk CPU % | server CPU % |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['scenario']} | `{r['server']}` | {r['requests']:,} | {r['requests_per_s']:,.0f} | {r['p50_ms']:.2f} | "
              f"{r['p99_ms']:.2f} | {r['failed']} | {r['images_per_call']:.1f} | {r['server_cpu_ms_per_request']:.3f} | {r['first_answer_s']:.2f} | "
              f"{r['peak_rss_mb']:.0f} | {r['peak_pss_mb']:.0f} | {r['client_cpu_pct_of_a_core']:.0f} | "
              f"{r['server_cpu_pct_of_a_core']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
