"""The dashboard's HTTP server: the standard library's threading server, a JSON API, and static
files of this package.

Safe by construction:

* It binds to 127.0.0.1 unless told otherwise; bound elsewhere it needs a token, and then every
  request must carry it (``Authorization: Bearer TOKEN``, or ``?token=TOKEN`` for the page, a
  download and the event stream, which a browser cannot give headers). On loopback without a
  token, the ``Host`` header must name the loopback address (a web page elsewhere cannot reach
  the server through DNS rebinding), and every POST must be JSON with the
  ``X-Bitlm-Dashboard`` header, which a page of another origin cannot send without a CORS
  preflight that this server never answers.
* The client names runs, never paths: :func:`bitlm_core.app.runs.resolve_run` keeps every
  name inside the runs folder (no ``/``, no ``..``, no symbolic link out). Static files are a
  fixed table of this package's files.
* Nothing a client sends is evaluated, imported or executed: bodies are JSON, a spec is
  validated as ``bitlm validate`` does, and a training is its own ``bitlm run`` process started
  with a fixed argument list (:class:`bitlm_core.app.control.Trainings`).
* Sizes are bounded: request bodies (:data:`MAX_BODY`), connections (:data:`MAX_CONNECTIONS`),
  event streams (:data:`MAX_STREAMS`), trainings started here (``--max-trainings``), one
  model in use at a time, and each read of a metrics file.
"""

from __future__ import annotations

import hmac
import json
import os
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional
from urllib.parse import parse_qs, urlsplit

from bitlm_core.app import control
from bitlm_core.app.runs import (MAX_LINE_BYTES, NoSuchRun, curves, flock_holders, json_safe,
                                 list_runs, lock_holder, open_regular, read_metrics,
                                 read_spec_dict, resolve_run, run_info)
from bitlm_core.errors import BitlmError, SafetyError, SpecError

STATIC = Path(__file__).parent / "static"
#: URL path -> (file, content type): everything the server sends that is not JSON
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/app.css": ("app.css", "text/css; charset=utf-8"),
    "/static/uPlot.iife.min.js": ("vendor/uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    "/static/uPlot.min.css": ("vendor/uPlot.min.css", "text/css; charset=utf-8"),
}
MAX_BODY = 64 << 10
MAX_CONNECTIONS = 64
MAX_STREAMS = 16
METRICS_CHUNK = 8 << 20  # bytes of metrics.jsonl per API answer
STREAM_POLL = 0.5  # seconds between reads of a live run's metrics
STREAM_IDLE = 20.0  # seconds a stream waits for a run that is not training (one starting)
LOOPBACK = ("127.0.0.1", "localhost", "::1")
COOKIE = "bitlm_dashboard_token"


class HTTPError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class RowCache:
    """Runs-table rows, read again only when a run's files changed (200 runs: one stat each)."""

    def __init__(self):
        self.rows: dict[str, tuple[tuple, dict[str, Any]]] = {}
        self.lock = threading.Lock()

    def row(self, run_dir: Path, holders) -> dict[str, Any]:
        from bitlm_core.store.rundir import METRICS_FILE, SUMMARY_FILE

        key = tuple(_stamp(run_dir / n) for n in (METRICS_FILE, SUMMARY_FILE, ".bitlm-lock"))
        with self.lock:
            cached = self.rows.get(run_dir.name)
        if cached and cached[0] == key:
            row = dict(cached[1])
            row.update(_status(run_dir, holders, row))
            return row
        row = run_info(run_dir, holders)
        with self.lock:
            self.rows[run_dir.name] = (key, row)
        return row


def _stamp(path: Path):
    try:
        st = path.stat()
        return st.st_mtime_ns, st.st_size
    except OSError:
        return None


def _status(run_dir: Path, holders, row: dict[str, Any]) -> dict[str, Any]:
    pid = lock_holder(run_dir, holders)
    return {"pid": pid, "status": "running" if pid else "finished" if row["finished"]
            else "stopped"}


class Dashboard(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, runs_dir: Path, host: str = "127.0.0.1", port: int = 8765,
                 token: Optional[str] = None, max_trainings: int = 1,
                 log=lambda message: None, say=lambda message: None):
        self.runs_dir = Path(runs_dir).resolve()
        self.token = token
        self.loopback = host in LOOPBACK
        self.trainings = control.Trainings(self.runs_dir, max_trainings)
        self.models = control.LoadedRuns()
        self.cache = RowCache()
        self.log = log  # every request (--verbose)
        self.say = say  # trainings started, stops, errors
        self.connections = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.streams = threading.BoundedSemaphore(MAX_STREAMS)
        self.closing = threading.Event()
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Handler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def process_request(self, request, client_address):
        if not self.connections.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                                b"Connection: close\r\n\r\n")
            finally:
                self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()

    def server_close(self):
        self.closing.set()
        super().server_close()
        self.trainings.close()


class Handler(BaseHTTPRequestHandler):
    server: Dashboard
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds a connection may stay idle (slow clients cannot hold threads)
    server_version = "bitlm-dashboard"
    sys_version = ""

    # -- plumbing --------------------------------------------------------------------------
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        self.server.log(f"{self.address_string()} {format % args}")

    def send_json(self, status: HTTPStatus, value: Any) -> None:
        body = json.dumps(json_safe(value), allow_nan=False, default=_jsonable).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.common_headers()
        self.end_headers()
        self.wfile.write(body)

    def common_headers(self) -> None:
        if getattr(self, "set_cookie", False):
            self.send_header("Set-Cookie", f"{COOKIE}={self.server.token}; HttpOnly; "
                             "SameSite=Strict; Path=/")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy",
                         "default-src 'self'; script-src 'self'; style-src 'self'; "
                         "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'")

    def fail(self, status: HTTPStatus, message: str) -> None:
        self.send_json(status, {"error": message, "status": int(status)})

    def query(self) -> dict[str, str]:
        return {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}

    def check_access(self, method: str) -> None:
        server = self.server
        if server.token is not None:
            given = self.headers.get("Authorization", "")
            given = given[7:] if given.startswith("Bearer ") else (
                self.query().get("token") or self.cookie(COOKIE) or "")
            if not hmac.compare_digest(given.encode(), server.token.encode()):
                raise HTTPError(HTTPStatus.UNAUTHORIZED, "this dashboard needs its token: open "
                                "the address it printed (…/?token=…) or send "
                                "'Authorization: Bearer TOKEN'")
            self.set_cookie = True  # the page's own requests (scripts, styles) carry it then
        elif server.loopback:
            host = self.headers.get("Host") or ""
            host = host[1:].split("]", 1)[0] if host.startswith("[") else host.rsplit(":", 1)[0]
            if host not in LOOPBACK:
                raise HTTPError(HTTPStatus.FORBIDDEN, f"Host {host[:60]!r} is not this "
                                "machine's loopback address; open "
                                f"http://127.0.0.1:{server.port}/")
        if method == "POST":  # a page of another origin cannot send these without a preflight
            if self.headers.get("X-Bitlm-Dashboard") != "1" or not (
                    self.headers.get("Content-Type", "").startswith("application/json")):
                raise HTTPError(HTTPStatus.FORBIDDEN, "POST requests need 'Content-Type: "
                                "application/json' and 'X-Bitlm-Dashboard: 1'")

    def cookie(self, name: str) -> Optional[str]:
        for part in (self.headers.get("Cookie") or "").split(";"):
            key, _, value = part.strip().partition("=")
            if key == name:
                return value
        return None

    def body(self, *keys: str) -> dict[str, Any]:
        """The request's JSON object (bounded), with no fields but ``keys``."""
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise HTTPError(HTTPStatus.LENGTH_REQUIRED, "send the body's Content-Length")
        if int(length) > MAX_BODY:
            raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"request bodies are limited to {MAX_BODY >> 10} KB")
        raw = self.rfile.read(int(length))
        try:
            value = json.loads(raw or b"{}")
        except RecursionError:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "the body is nested too deeply") from None
        except ValueError:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "the body is not JSON") from None
        if not isinstance(value, dict):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
        unknown = set(value) - set(keys)
        if unknown:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"unknown field(s) "
                            f"{', '.join(sorted(map(str, unknown)))[:200]}; this request takes "
                            f"{', '.join(keys) or 'none'}")
        return value

    def handle_one(self, method: str) -> None:
        self.set_cookie = False
        try:
            self.check_access(method)
            path = urlsplit(self.path).path
            if method == "GET" and path in FILES:
                return self.static(*FILES[path])
            if method == "GET" and path == "/favicon.ico":
                self.send_response(HTTPStatus.NO_CONTENT)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            parts = path.split("/")[1:]
            if len(parts) == 2 and parts[0] == "api":  # /api/runs, /api/validate
                route, args = ROUTES.get((method, parts[1])), ()
            elif len(parts) == 4 and parts[:2] == ["api", "runs"]:  # /api/runs/NAME/what
                route, args = ROUTES.get((method, "runs/NAME/" + parts[3])), (parts[2],)
            else:
                route = None
            if route is None:
                raise HTTPError(HTTPStatus.NOT_FOUND, f"no such page: {path[:100]}")
            route(self, *args)
        except HTTPError as exc:
            if method == "POST":
                self.close_connection = True  # the body may not have been read
            self.fail(exc.status, exc.message)
        except SafetyError as exc:
            self.fail(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc))
        except NoSuchRun as exc:
            self.fail(HTTPStatus.NOT_FOUND, str(exc))
        except (SpecError, BitlmError) as exc:
            self.fail(HTTPStatus.BAD_REQUEST, str(exc))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # noqa: BLE001 - one message, and the server goes on
            self.server.say(f"error answering {self.path[:200]}: {control.describe(exc)}")
            self.fail(HTTPStatus.INTERNAL_SERVER_ERROR, control.describe(exc))

    def do_GET(self):
        self.handle_one("GET")

    def do_POST(self):
        self.handle_one("POST")

    def do_PUT(self):
        self.fail(HTTPStatus.METHOD_NOT_ALLOWED, "GET and POST only")

    do_DELETE = do_PATCH = do_OPTIONS = do_PUT

    def static(self, name: str, content_type: str) -> None:
        path = STATIC / name
        if not path.is_file():
            raise HTTPError(HTTPStatus.SERVICE_UNAVAILABLE, f"{name} is missing from the "
                            "package: run `python -m bitlm_dashboard.assets` once")
        data = path.read_bytes()
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache")
        self.common_headers()
        self.end_headers()
        self.wfile.write(data)

    # -- the API -------------------------------------------------------------------------
    def api_runs(self) -> None:
        server = self.server
        holders = flock_holders()
        rows = [server.cache.row(r, holders) for r in list_runs(server.runs_dir)]
        self.send_json(HTTPStatus.OK, {"runs": rows, "runs_dir": str(server.runs_dir),
                                       "started_here": server.trainings.running(),
                                       "max_trainings": server.trainings.limit})

    def api_metrics(self, name: str) -> None:
        run_dir = resolve_run(self.server.runs_dir, name)
        asked = _offset(self.query().get("offset", "0"))
        records, offset = read_metrics(run_dir, asked, METRICS_CHUNK)
        start = _start(asked, offset)
        more = offset - start > METRICS_CHUNK - MAX_LINE_BYTES  # a full chunk: ask again
        self.send_json(HTTPStatus.OK, {"run": name, "offset": offset, "start": start,
                                       "more": more, **curves(records)})

    def api_spec(self, name: str) -> None:
        run_dir = resolve_run(self.server.runs_dir, name)
        self.send_json(HTTPStatus.OK, {"run": name, "spec": read_spec_dict(run_dir)})

    def api_download(self, name: str) -> None:
        """metrics.jsonl as it is (the export), streamed."""
        from bitlm_core.store.rundir import METRICS_FILE

        run_dir = resolve_run(self.server.runs_dir, name)
        path = run_dir / METRICS_FILE
        try:
            f = open_regular(path)
        except OSError:
            raise HTTPError(HTTPStatus.NOT_FOUND, f"run {name!r} has no metrics yet") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Content-Length", str(size))
            self.send_header("Content-Disposition", f'attachment; filename="{name}.jsonl"')
            self.common_headers()
            self.end_headers()
            left = size
            while left > 0:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    break
                self.wfile.write(chunk)
                left -= len(chunk)

    def api_events(self, name: str) -> None:
        """Server-sent events of a run's new metrics: ``metrics`` events (curves from the
        offset on) while it trains, a ``status`` event when it stops, then the end."""
        server = self.server
        run_dir = resolve_run(server.runs_dir, name)
        offset = _offset(self.query().get("offset", "0"))
        if not server.streams.acquire(blocking=False):
            raise HTTPError(HTTPStatus.SERVICE_UNAVAILABLE, f"at most {MAX_STREAMS} live "
                            "views at once; close one")
        try:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.common_headers()
            self.end_headers()
            self.close_connection = True
            quiet, idle = 0.0, 0
            while not server.closing.is_set():
                records, new = read_metrics(run_dir, offset, METRICS_CHUNK)
                changed = new != offset
                if changed:
                    self.event("metrics", {"offset": new, "start": _start(offset, new),
                                           **curves(records)})
                    offset, idle = new, 0
                if not changed and lock_holder(run_dir) is None:
                    idle += 1
                    if idle * STREAM_POLL > STREAM_IDLE:  # not training, nothing new: end
                        self.event("status", {"status": "stopped", "offset": offset})
                        return
                quiet += STREAM_POLL
                if quiet >= 15:
                    self.wfile.write(b": keep-alive\n\n")
                    self.wfile.flush()
                    quiet = 0.0
                time.sleep(STREAM_POLL)
        finally:
            server.streams.release()

    def event(self, kind: str, value: Any) -> None:
        data = json.dumps(json_safe(value), allow_nan=False, default=_jsonable)
        self.wfile.write(f"event: {kind}\ndata: {data}\n\n".encode("utf-8"))
        self.wfile.flush()

    def api_start(self) -> None:
        body = self.body("base", "name", "overrides")
        spec, out = control.new_run_spec(self.server.runs_dir, body.get("base"),
                                         body.get("name"), body.get("overrides"))
        try:
            started = self.server.trainings.start(spec, out)
        except BitlmError as exc:
            raise HTTPError(HTTPStatus.TOO_MANY_REQUESTS, str(exc)) from None
        self.server.say(f"started run {out.name} (PID {started['pid']})")
        self.send_json(HTTPStatus.ACCEPTED, started)

    def api_validate(self) -> None:
        body = self.body("spec", "base", "name", "overrides")
        if "spec" in body:
            spec = control.check_submitted(self.server.runs_dir, body["spec"]).spec
        else:
            spec, _ = control.new_run_spec(self.server.runs_dir, body.get("base"),
                                           body.get("name") or "validate-only",
                                           body.get("overrides"), validate_only=True)
        self.send_json(HTTPStatus.OK, {"valid": True, "spec": spec.model_dump(mode="json")})

    def api_stop(self, name: str) -> None:
        self.body()
        stopped = self.server.trainings.stop(name)
        self.server.say(f"stopping run {name} (PID {stopped['pid']})")
        self.send_json(HTTPStatus.ACCEPTED, stopped)

    def api_sample(self, name: str) -> None:
        body = self.body("prompt", "bytes", "seed", "gate", "floors", "max_retries")
        server = self.server
        result = control.sample_run(server.models, server.runs_dir, name,
                                    body.get("prompt", ""), body.get("bytes", 200),
                                    body.get("seed", 0), body.get("gate"), body.get("floors"),
                                    body.get("max_retries", 0))
        self.send_json(HTTPStatus.OK, result)

    def api_log(self, name: str) -> None:
        resolve_run(self.server.runs_dir, name, must_exist=False)
        self.send_json(HTTPStatus.OK, {"run": name,
                                       "log": self.server.trainings.log_tail(name)})


def _start(asked: int, offset: int) -> int:
    """Where the records sent begin: ``asked``, or 0 when the file was rewritten meanwhile
    (read_metrics then reads from 0 and ends before ``asked``; the page starts the run's curves
    again)."""
    return 0 if offset < asked else asked


def _offset(text: str) -> int:
    if not text.isdigit() or len(text) > 15:
        raise HTTPError(HTTPStatus.BAD_REQUEST, "offset must be a whole number of bytes")
    return int(text)


def _jsonable(value: Any) -> Any:
    return str(value)


#: (method, route) -> handler; NAME is a run's name, resolved inside the runs folder
ROUTES = {
    ("GET", "runs"): Handler.api_runs,
    ("GET", "runs/NAME/metrics"): Handler.api_metrics,
    ("GET", "runs/NAME/events"): Handler.api_events,
    ("GET", "runs/NAME/spec"): Handler.api_spec,
    ("GET", "runs/NAME/metrics.jsonl"): Handler.api_download,
    ("GET", "runs/NAME/log"): Handler.api_log,
    ("POST", "runs"): Handler.api_start,
    ("POST", "validate"): Handler.api_validate,
    ("POST", "runs/NAME/stop"): Handler.api_stop,
    ("POST", "runs/NAME/sample"): Handler.api_sample,
}
