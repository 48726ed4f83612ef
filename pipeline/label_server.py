"""The HTTP side of `rlhf label serve`: a standard-library server (no web framework to install)
with two JSON endpoints and three static files.

    GET  /                  the page (pipeline/label_static/)
    GET  /api/next          {"labelled", "total", "position", "comparison": {"id", "prompt", "A", "B"} | null}
    POST /api/label         {"id", "label": "A"|"B"|"tie"|"both_bad", "note"?} -> the next /api/next state

Model names never reach the page. A malformed POST gets a 4xx and writes nothing.
"""
from __future__ import annotations

import ipaddress
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from pipeline.label_records import LABELS, Comparison, label_record, read_labels, save_label

MAX_BODY = 16 * 1024  # a choice is an id, a label and a short note
MAX_NOTE = 2000
STATIC_DIR = Path(__file__).resolve().parent / "label_static"


# ---- the labelling session (thread-safe; the HTTP layer only parses and routes) ----

class LabelSession:
    """The ordered comparisons, the labels file, and which comparisons it already holds."""

    def __init__(self, comparisons: list[Comparison], out: str | Path):
        self.comparisons = comparisons
        self.by_id = {c.id: c for c in comparisons}
        self.out = Path(out)
        self.done = {r["meta"]["comparison_id"] for r in read_labels(self.out)}
        self._lock = threading.Lock()

    def state(self) -> dict:
        """What the page shows next: the first comparison in order without a label."""
        with self._lock:
            labelled = sum(c.id in self.done for c in self.comparisons)
            for pos, c in enumerate(self.comparisons, 1):
                if c.id not in self.done:
                    shown = {"id": c.id, "prompt": c.prompt, "A": c.response_a, "B": c.response_b}
                    return {"labelled": labelled, "total": len(self.comparisons), "position": pos, "comparison": shown}
            return {"labelled": labelled, "total": len(self.comparisons), "position": None, "comparison": None}

    def submit(self, payload) -> tuple[int, dict]:
        """Validate one choice and append it. Returns (HTTP status, body); nothing is written on 4xx."""
        if not isinstance(payload, dict):
            return 400, {"error": "expected a JSON object"}
        unknown = set(payload) - {"id", "label", "note"}
        if unknown:
            return 400, {"error": f"unknown field(s): {', '.join(sorted(unknown))}"}
        cid, label, note = payload.get("id"), payload.get("label"), payload.get("note", "")
        if label not in LABELS:
            return 400, {"error": f"label must be one of {', '.join(LABELS)}"}
        if not isinstance(note, str) or len(note) > MAX_NOTE:
            return 400, {"error": f"note must be a string of at most {MAX_NOTE} characters"}
        if not isinstance(cid, str) or cid not in self.by_id:
            return 404, {"error": "unknown comparison id"}
        with self._lock:
            if cid in self.done:
                return 409, {"error": "this comparison is already labelled"}
            try:
                save_label(self.out, label_record(self.by_id[cid], label, note.strip()))
            except OSError as e:  # e.g. a full disk: say so on the page, keep the comparison open
                return 500, {"error": f"could not write {self.out}: {e.strerror or e}"}
            self.done.add(cid)
        return 200, self.state()


# ---- HTTP ----

_STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
           "/static/label.js": ("label.js", "text/javascript; charset=utf-8"),
           "/static/label.css": ("label.css", "text/css; charset=utf-8")}
# Model text is untrusted: the page sets it with textContent, and the CSP forbids inline script as
# a second line of defence.
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


class _Handler(BaseHTTPRequestHandler):
    server_version = "rlhf-label"
    session: LabelSession  # set on the subclass made in make_server
    check_host: bool

    def log_message(self, fmt, *args):  # quiet: the terminal shows only the startup line and errors
        pass

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in _SECURITY_HEADERS.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"), "application/json; charset=utf-8")

    def _host_ok(self) -> bool:
        # A loopback server only answers to loopback names, so a web page on another origin cannot
        # reach it through DNS rebinding.
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0]
        return not self.check_host or is_loopback(host)

    def do_GET(self):
        if not self._host_ok():
            return self._json(403, {"error": "bad Host header"})
        path = self.path.split("?", 1)[0]
        if path == "/api/next":
            return self._json(200, self.session.state())
        if path in _STATIC:
            name, ctype = _STATIC[path]
            return self._send(200, (STATIC_DIR / name).read_bytes(), ctype)
        self._json(404, {"error": "not found"})

    def do_POST(self):
        if not self._host_ok():
            return self._json(403, {"error": "bad Host header"})
        if self.path != "/api/label":
            return self._json(404, {"error": "not found"})
        # JSON only: a cross-site form cannot send it without a CORS preflight, which we never grant.
        if (self.headers.get("Content-Type") or "").split(";")[0].strip().lower() != "application/json":
            return self._json(415, {"error": "Content-Type must be application/json"})
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._json(411, {"error": "Content-Length required"})
        if length < 0 or length > MAX_BODY:
            self.close_connection = True  # do not read an oversize body
            return self._json(413, {"error": f"body larger than {MAX_BODY} bytes"})
        try:
            payload = json.loads(self.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return self._json(400, {"error": "body is not valid JSON"})
        status, body = self.session.submit(payload)
        self._json(status, body)


def make_server(session: LabelSession, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    handler = type("Handler", (_Handler,), {"session": session, "check_host": is_loopback(host)})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
