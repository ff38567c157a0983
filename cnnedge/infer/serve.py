"""`cnnedge serve`: HTTP inference for the edge box (torch-free: Starlette on uvicorn, the Predictor).

    cnnedge serve                                   # http://127.0.0.1:8000/: a draw-a-digit page and the API
    curl --data-binary @digit.png localhost:8000/v1/predict
    curl -F image=@a.png -F image=@b.jpg localhost:8000/v1/predict/batch

Each worker process runs one event loop (HTTP) and one inference thread. Requests that arrive together
are batched (`Batcher`): the images of concurrent requests are gathered for up to `batch_wait_ms` or
`max_batch` images, then decoded, preprocessed and classified by one Predictor call, so one onnxruntime
run serves them all. Routes, JSON shapes, errors and figures: docs/serve.md.

Every answer is JSON except the page and /metrics; bad input gets a status and the one-line reason the
CLI prints (422: not an image, no symbol; 413: too large), never a traceback, and the server goes on.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import os
import re
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from cnnedge.errors import CnnedgeError

CONFIG_ENV = "CNNEDGE_SERVE_CONFIG"  # how the parent hands the configuration to its worker processes
TOKEN_ENV = "CNNEDGE_TOKEN"
MAX_BATCH_IMAGES = 256  # images in one /v1/predict/batch request
MAX_TOPK = 100
ROUTES = ("/", "/healthz", "/metrics", "/v1/model", "/v1/predict", "/v1/predict/batch")
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

log = logging.getLogger("cnnedge.serve")


@dataclass
class ServeConfig:
    model: str | None = None  # None: the shipped model
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    max_body: int = 16 << 20  # bytes per request
    max_batch: int = 32  # images per onnxruntime call (one request's images are never split)
    batch_wait_ms: float = 2.0  # how long the first request of a batch waits for company
    galleries: dict[str, str] = field(default_factory=dict)  # name -> gallery file (`cnnedge enroll`)
    threads: int | None = None  # per worker: preprocessing and onnxruntime threads [default: cores / workers]
    predictor: dict = field(default_factory=dict)  # further Predictor options (provider, metric, ...)

    def check(self) -> None:
        if not 0 <= self.port <= 65535:
            raise CnnedgeError(f"--port must be between 0 and 65535, not {self.port}")
        for name, value, least in (("--workers", self.workers, 1), ("--max-body", self.max_body, 1),
                                   ("--max-batch", self.max_batch, 1)):
            if value < least:
                raise CnnedgeError(f"{name} must be at least {least}, not {value}")
        if not 0 <= self.batch_wait_ms <= 10_000:
            raise CnnedgeError(f"--batch-wait-ms must be between 0 and 10000, not {self.batch_wait_ms}")
        if self.threads is not None and self.threads < 1:
            raise CnnedgeError(f"--threads must be at least 1, not {self.threads}")

    @property
    def worker_threads(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // self.workers)


def parse_galleries(specs: list[str]) -> dict[str, str]:
    """`--gallery [NAME=]FILE` options -> {name: file}; the name defaults to the file's name without
    .gallery.npz (greek.gallery.npz -> greek). Requests choose one with ?gallery=NAME."""
    galleries: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            path = spec
            name = Path(spec).name.removesuffix(".npz").removesuffix(".gallery")
        if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise CnnedgeError(f"--gallery {spec}: name the gallery with letters, digits, '-', '_' or '.' "
                               f"(NAME=FILE)")
        if name in galleries:
            raise CnnedgeError(f"--gallery {spec}: a second gallery named {name!r} (use NAME=FILE)")
        galleries[name] = path
    return galleries


def parse_size(text: str, option: str) -> int:
    """"16MB", "512KB", "1GB" (binary multiples: 16 MB = 16 MiB here) or a number of bytes -> bytes."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?)(I?B)?", text.strip(), re.IGNORECASE)
    if m is None:
        raise CnnedgeError(f"{option} {text}: give a size such as 16MB, 512KB or 1048576 (bytes)")
    value = float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2).upper()]
    if value < 1:
        raise CnnedgeError(f"{option} {text}: must be at least 1 byte")
    return int(value)


# ------------------------------------------------------------------------------------------ models


class Models:
    """What a worker serves: the model's Predictor and one per gallery, `cnnedge info` of the model, and
    the thread that runs every batch (one onnxruntime call at a time per process)."""

    def __init__(self, config: ServeConfig, warm_up: bool = True):
        from cnnedge.infer.info import describe
        from cnnedge.infer.predictor import Predictor

        threads = config.worker_threads
        options = dict(batch_size=config.max_batch, workers=threads, threads=threads, inputs=True,
                       **config.predictor)
        metric = options.pop("metric", None)
        self.predictors = {None: Predictor(config.model, **options)}
        for name, path in config.galleries.items():
            self.predictors[name] = Predictor(config.model, gallery=path, metric=metric, **options)
        self.headers = {name: p.header() for name, p in self.predictors.items()}
        self.info = describe(config.model)
        main = self.predictors[None]
        self.info["provider"] = main.provider
        self.info["galleries"] = {name: {"classes": p.class_names, "metric": p.metric,
                                         "images": int(len(p.gallery.labels))}
                                  for name, p in self.predictors.items() if name is not None}
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="cnnedge-infer")
        if warm_up:
            self.warm_up()

    def warm_up(self) -> None:
        """The first request would pay for lazy set-ups (the thread pool, the PNG decoder, onnxruntime's
        first run at a batch size): a drawn digit goes through every Predictor first, alone and in a full batch."""
        import cv2
        import numpy as np

        from cnnedge.synth import render_digit

        png = cv2.imencode(".png", render_digit(7, "mnist", np.random.default_rng(0)))[1].tobytes()
        for p in self.predictors.values():
            p.predict([png])
            p.predict([png] * p.batch_size)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        for p in self.predictors.values():
            p.close()
        self.predictors.clear()


# ---------------------------------------------------------------------------------------- batching


@dataclass
class Job:
    images: list[bytes]
    topk: int
    future: asyncio.Future
    arrived: float


class Batcher:
    """Dynamic batching with a bounded wait: the first waiting request waits at most `wait` seconds for
    others, or until `max_images` images are waiting, then all of them run as one Predictor call in the
    inference thread. Requests that arrive while a batch runs form the next one, so under load batches
    grow by themselves and the wait is only paid when the server is quiet. max_images=1: no batching."""

    def __init__(self, predictor, executor: ThreadPoolExecutor, max_images: int, wait: float, metrics):
        self.predictor, self.executor = predictor, executor
        self.max_images, self.wait, self.metrics = max_images, wait, metrics
        self.pending: deque[Job] = deque()
        self.pending_images = 0
        self.idle = False
        self.waiter: asyncio.Future | None = None
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def predict(self, images: list[bytes], topk: int):
        """(predictions, timing) for one request's images."""
        loop = asyncio.get_running_loop()
        job = Job(images, topk, loop.create_future(), time.perf_counter())
        self.pending.append(job)
        self.pending_images += len(images)
        if self.waiter is not None and not self.waiter.done() and (self.idle or self.pending_images >= self.max_images):
            self.waiter.set_result(None)
        return await job.future

    async def _sleep(self, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, _resolve, self.waiter)
        try:
            await self.waiter
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()

    async def _loop(self) -> None:
        while True:
            if not self.pending:
                self.idle = True
                await self._sleep(None)
                self.idle = False
            delay = self.pending[0].arrived + self.wait - time.perf_counter()
            if delay > 0 and self.pending_images < self.max_images:
                await self._sleep(delay)
            jobs = [self.pending.popleft()]
            n = len(jobs[0].images)
            while self.pending and n + len(self.pending[0].images) <= self.max_images:
                jobs.append(self.pending.popleft())
                n += len(jobs[-1].images)
            self.pending_images -= n
            await self._run(jobs, n)

    async def _run(self, jobs: list[Job], n: int) -> None:
        images = [image for job in jobs for image in job.images]
        k = max(job.topk for job in jobs)
        start = time.perf_counter()
        try:
            predictions = await asyncio.get_running_loop().run_in_executor(
                self.executor, self.predictor.predict, images, k)
        except Exception as e:  # a bug: every request of the batch answers 500, the server goes on
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        done = time.perf_counter()
        failed = sum(p.error is not None for p in predictions)
        self.metrics.batch(n, n - failed, failed)
        i = 0
        for job in jobs:
            mine = predictions[i: i + len(job.images)]
            i += len(job.images)
            for p in mine:
                del p.topk[job.topk:]
            timing = {"queue_ms": round(1000 * (start - job.arrived), 3), "batch_ms": round(1000 * (done - start), 3),
                      "batch_images": n}
            if not job.future.done():  # the client may have gone
                job.future.set_result((mine, timing))


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


# ----------------------------------------------------------------------------------------- metrics


class Metrics:
    """Prometheus metrics. With several worker processes every one writes its values to files in
    PROMETHEUS_MULTIPROC_DIR (set by `run` before anything imports prometheus_client) and /metrics adds
    them up, whichever worker answers."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics

        disable_created_metrics()  # no *_created series: Prometheus does not need them

        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.registry = CollectorRegistry()
        own = None if self.multiprocess else self.registry
        self.requests = Counter("cnnedge_requests", "HTTP requests by route and status.", ["route", "status"],
                                registry=own)
        self.latency = Histogram("cnnedge_request_duration_seconds", "Time from request to response, by route.",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=own)
        self.images = Counter("cnnedge_images", "Images classified.", registry=own)
        self.image_errors = Counter("cnnedge_image_errors", "Images refused: not an image, no symbol, too large.",
                                    registry=own)
        self.internal_errors = Counter("cnnedge_internal_errors", "Requests that failed on a bug (500).",
                                       registry=own)
        self.batch_images = Histogram("cnnedge_batch_images", "Images per onnxruntime call (dynamic batching).",
                                      buckets=BATCH_BUCKETS, registry=own)
        self._children: dict = {}
        if self.multiprocess:
            from prometheus_client import multiprocess

            multiprocess.MultiProcessCollector(self.registry)

    def request(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        children = self._children.get(key)
        if children is None:  # label lookups are the slow part: once per route and status
            children = self._children[key] = (self.requests.labels(route, str(status)), self.latency.labels(route))
        children[0].inc()
        children[1].observe(seconds)

    def batch(self, n: int, ok: int, failed: int) -> None:
        self.batch_images.observe(n)
        if ok:
            self.images.inc(ok)
        if failed:
            self.image_errors.inc(failed)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# ---------------------------------------------------------------------------------------- the app


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers


def _json(status: int, doc: dict, headers: dict | None = None):
    from starlette.responses import Response

    return Response(json.dumps(doc, ensure_ascii=False, separators=(",", ":")), status, headers,
                    media_type="application/json")


def _error(status: int, message: str, headers: dict | None = None):
    return _json(status, {"error": message, "status": status}, headers)


class Guard:
    """Pure ASGI middleware in front of every route: the token, the body limit, the request metrics."""

    def __init__(self, app, token: str | None, max_body: int, metrics: Metrics):
        self.app, self.max_body, self.metrics = app, max_body, metrics
        self.token = token.encode() if token else None

    def authorised(self, scope) -> bool:
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, credentials = header.partition(b" ")
        scheme, credentials = scheme.lower(), credentials.strip()
        if scheme == b"basic":  # a browser's login prompt: any user name, the token as password
            try:
                credentials = base64.b64decode(credentials, validate=True).partition(b":")[2]
            except ValueError:
                return False
        elif scheme != b"bearer":
            return False
        return hmac.compare_digest(credentials, self.token)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        path = scope["path"]
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.token is not None and path != "/healthz" and not self.authorised(scope):
                # Basic too, so that a browser asks for the token (as the password) and opens the page.
                challenge = {"WWW-Authenticate": 'Bearer realm="cnnedge", Basic realm="cnnedge", charset="UTF-8"'}
                await _error(401, "this server needs its token: send `Authorization: Bearer TOKEN`",
                             challenge)(scope, receive, send_status)
                return
            length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
            if length is not None and length.isdigit() and int(length) > self.max_body:
                await _error(413, _too_large(int(length), self.max_body))(scope, receive, send_status)
                return
            received = 0

            async def limited_receive():
                nonlocal received
                message = await receive()
                received += len(message.get("body", b""))
                if received > self.max_body:  # a chunked body without Content-Length
                    raise HTTPError(413, _too_large(None, self.max_body))
                return message

            await self.app(scope, limited_receive, send_status)
        finally:
            self.metrics.request(path if path in ROUTES else "other", status, time.perf_counter() - start)


def _too_large(length: int | None, limit: int) -> str:
    size = "the request body" if length is None else f"a request body of {length:,} bytes"
    return f"{size} is over the {limit:,}-byte limit (--max-body)"


def config_from_env() -> ServeConfig:
    return ServeConfig(**json.loads(os.environ[CONFIG_ENV]))


def app_from_env():
    """The worker processes' app factory (uvicorn imports it by name in each one)."""
    config = config_from_env()
    quiet_native_output()
    return create_app(config, Models(config), os.environ.get(TOKEN_ENV) or None)


def create_app(config: ServeConfig, models: Models, token: str | None):
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, Response
    from starlette.routing import Route

    metrics = Metrics()
    page = resources.files("cnnedge.infer").joinpath("static/index.html").read_bytes()
    batchers: dict[str | None, Batcher] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for name, predictor in models.predictors.items():
            batchers[name] = Batcher(predictor, models.executor, config.max_batch, config.batch_wait_ms / 1000,
                                     metrics)
            batchers[name].start()
        try:
            yield
        finally:
            for batcher in batchers.values():
                await batcher.stop()
            models.close()

    # -------------------------------------------------------------------------------- requests

    def options(request: Request) -> tuple[str | None, int, bool]:
        q = request.query_params
        unknown = sorted(set(q) - {"gallery", "topk", "input"})
        if unknown:
            raise HTTPError(400, f"unknown query parameter {unknown[0]!r}; this route takes gallery, topk and input")
        gallery = q.get("gallery") or None
        if gallery is not None and gallery not in batchers:
            names = ", ".join(n for n in batchers if n) or "none: start the server with --gallery"
            raise HTTPError(400, f"no gallery named {gallery!r} (this server has {names})")
        predictor = models.predictors[gallery]
        topk = q.get("topk", str(predictor.topk))
        if not topk.isdigit() or not 1 <= int(topk) <= MAX_TOPK:
            raise HTTPError(400, f"topk must be a whole number from 1 to {MAX_TOPK}, not {topk!r}")
        want_input = q.get("input", "0").lower()
        if want_input not in ("0", "1", "true", "false"):
            raise HTTPError(400, f"input must be 1 or 0, not {want_input!r}")
        return gallery, int(topk), want_input in ("1", "true")

    async def uploads(request: Request, most: int) -> list[tuple[str | None, bytes]]:
        """[(client's file name or None, bytes)]: the files of a multipart form, else the raw body."""
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            return [(None, await request.body())]
        from starlette.datastructures import UploadFile

        form = await request.form(max_files=most, max_fields=16, max_part_size=config.max_body)
        try:
            files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            if not files:
                raise HTTPError(400, "no file in the form: upload the image as a file field (curl -F image=@digit.png)")
            return [(f.filename or None, await f.read()) for f in files]
        finally:
            await form.close()

    def result(p, timing: dict, header: dict, want_input: bool, start: float) -> dict:
        doc = {**p.to_dict(), **header}
        if want_input and p.input is not None:
            doc["input"] = _png_data_url(p.input)
        doc["timing"] = {"total_ms": round(1000 * (time.perf_counter() - start), 3), **timing}
        return doc

    # ---------------------------------------------------------------------------------- routes

    async def predict(request: Request):
        start = time.perf_counter()
        gallery, topk, want_input = options(request)
        files = await uploads(request, 2)
        if len(files) != 1:
            raise HTTPError(400, f"{len(files)} files in one request: /v1/predict takes one image, "
                                 f"/v1/predict/batch several")
        name, data = files[0]
        [p], timing = await batchers[gallery].predict([data], topk)
        p.path = name
        doc = result(p, timing, models.headers[gallery], want_input, start)
        return _json(200 if p.error is None else _image_status(p), doc)

    async def predict_batch(request: Request):
        start = time.perf_counter()
        gallery, topk, want_input = options(request)
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            raise HTTPError(400, "/v1/predict/batch takes a multipart form with one file field per image "
                                 "(curl -F image=@a.png -F image=@b.png)")
        files = await uploads(request, MAX_BATCH_IMAGES + 1)
        if len(files) > MAX_BATCH_IMAGES:
            raise HTTPError(413, f"more than {MAX_BATCH_IMAGES} images in one request")
        predictions, timing = await batchers[gallery].predict([data for _, data in files], topk)
        results = []
        for (name, _), p in zip(files, predictions):
            p.path = name
            r = p.to_dict()
            if want_input and p.input is not None:
                r["input"] = _png_data_url(p.input)
            if p.error is not None:
                r["status"] = _image_status(p)
            results.append(r)
        errors = sum(p.error is not None for p in predictions)
        doc = {**models.headers[gallery], "results": results, "summary": {"images": len(results), "errors": errors},
               "timing": {"total_ms": round(1000 * (time.perf_counter() - start), 3), **timing}}
        return _json(200, doc)

    async def model_info(request: Request):
        return _json(200, models.info)

    async def healthz(request: Request):
        return _json(200, {"status": "ok"})

    async def metrics_route(request: Request):
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    async def index(request: Request):
        return HTMLResponse(page)

    # -------------------------------------------------------------------------------- errors

    async def http_error(request: Request, exc: HTTPError):
        return _error(exc.status, str(exc), exc.headers)

    async def starlette_error(request: Request, exc: HTTPException):
        if exc.status_code == 404:
            message = f"no such route: {request.method} {request.url.path} (routes: {', '.join(ROUTES)})"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path} (allowed: {exc.headers.get('Allow', '?')})"
        elif exc.status_code == 400:
            message = f"malformed request: {exc.detail}"  # an unreadable multipart form
        else:
            message = str(exc.detail)
        return _error(exc.status_code, message, exc.headers)

    async def internal_error(request: Request, exc: Exception):
        metrics.internal_errors.inc()
        message = f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        log.error("%s %s: %s", request.method, request.url.path, message,
                  exc_info=os.environ.get("CNNEDGE_DEBUG", "") not in ("", "0"))
        return _error(500, message)

    def guarded(endpoint):
        """Unexpected exceptions answer 500 here rather than in Starlette's outermost middleware, which
        would log a traceback for each one."""
        async def run(request: Request):
            try:
                return await endpoint(request)
            except (HTTPError, HTTPException):
                raise
            except Exception as e:
                return await internal_error(request, e)
        return run

    routes = [Route("/", index, methods=["GET"]), Route("/healthz", healthz, methods=["GET"]),
              Route("/metrics", metrics_route, methods=["GET"]), Route("/v1/model", model_info, methods=["GET"]),
              Route("/v1/predict", guarded(predict), methods=["POST"]),
              Route("/v1/predict/batch", guarded(predict_batch), methods=["POST"])]
    return Starlette(routes=routes, lifespan=lifespan,
                     middleware=[Middleware(Guard, token=token, max_body=config.max_body, metrics=metrics)],
                     exception_handlers={HTTPError: http_error, HTTPException: starlette_error,
                                         Exception: internal_error})


def _image_status(p) -> int:
    from cnnedge.errors import ImageTooLarge

    return 413 if isinstance(p.exception, ImageTooLarge) else 422


def _png_data_url(x) -> str:
    """The 28x28 network input as a PNG data URL, for the page to show what the network saw."""
    import cv2
    import numpy as np

    ok, png = cv2.imencode(".png", np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8))
    return "data:image/png;base64," + base64.b64encode(png.tobytes()).decode()


_process_lifetime = contextlib.ExitStack()  # what stays entered until the process exits


def quiet_native_output() -> None:
    """For the process's lifetime: what native decoders print (libpng's complaint about each truncated
    upload) goes nowhere, while Python's logging keeps the real stderr (cnnedge.infer.files)."""
    from cnnedge.infer.files import quiet_native_stderr

    _process_lifetime.enter_context(quiet_native_stderr())
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(levelname)s: %(message)s", force=True)


# --------------------------------------------------------------------------------------------- run


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a busy port is one clear line before anything starts."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        raise CnnedgeError(f"cannot listen on {host}:{port}: {os.strerror(e.errno) if e.errno else e}") from None
    sock.set_inheritable(True)
    return sock


def run(config: ServeConfig, token: str | None = None) -> None:
    """The `cnnedge serve` command: check everything, listen, serve until Ctrl-C or SIGTERM."""
    config.check()
    if token is not None and (not token.isascii() or not token.isprintable() or " " in token or not token):
        raise CnnedgeError("--token must be a non-empty string of printable ASCII characters without spaces")
    if token:
        os.environ[TOKEN_ENV] = token  # the worker processes read it from there, as from the user's shell
    with tempfile.TemporaryDirectory(prefix="cnnedge-metrics-") as metrics_dir:
        if config.workers > 1:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # before prometheus_client is imported
        if config.workers == 1:  # (worker processes do it themselves: they inherit this process's stderr)
            quiet_native_output()
        # The model and galleries load here first: a bad file is one line and exit 2, not N failing workers.
        models = Models(config, warm_up=config.workers == 1)
        sock = listen(config.host, config.port)
        host, port = sock.getsockname()[:2]
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
        print(f"cnnedge serve: {url} ({models.headers[None]['model']} on {models.headers[None]['provider']}, "
              f"{config.workers} worker{'s' * (config.workers > 1)}, Ctrl-C to stop)", flush=True)
        _serve(config, models, token, sock)


def _serve(config: ServeConfig, models: Models, token: str | None, sock: socket.socket) -> None:
    import uvicorn

    options = dict(http="httptools", loop="uvloop" if _has("uvloop") else "asyncio", lifespan="on",
                   log_config=None, access_log=False, server_header=False, timeout_keep_alive=5,
                   limit_concurrency=4096, backlog=2048)
    if config.workers == 1:
        # uvicorn stops gracefully on Ctrl-C or SIGTERM, then raises the signal again for the handler it found:
        # this one, so that a stop asked for is a clean exit (0), not "interrupted".
        stop_signals = [s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGBREAK", None)) if s]
        previous = {s: signal.signal(s, lambda *_: None) for s in stop_signals}
        try:
            uvicorn.Server(uvicorn.Config(create_app(config, models, token), **options)).run(sockets=[sock])
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return
    # Several processes share the socket; uvicorn's supervisor restarts any that dies or hangs.
    from uvicorn.supervisors import Multiprocess

    models.close()  # the parent only supervises
    os.environ[CONFIG_ENV] = json.dumps(asdict(config))
    uv_config = uvicorn.Config("cnnedge.infer.serve:app_from_env", factory=True, workers=config.workers, **options)
    Multiprocess(uv_config, sockets=[sock]).run()


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
