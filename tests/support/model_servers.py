"""Real servers on loopback for the model downloader's tests and benchmark.

- ``FileServer``: a threaded ``http.server`` serving in-memory files with HTTP Range, that can cut a
  response halfway (once per path), corrupt bytes, ignore Range, count requests and slow down; it also
  answers the Hugging Face tree API and ModelScope's repo API for the files it holds.
- ``MotoServer``: moto's S3 server (``.venv-s3/bin/moto_server``, a virtualenv of its own because
  botocore pins python-dateutil<3 and kubernetes 37 needs >=3), a real S3 API over HTTP.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.support.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
MOTO = ROOT / ".venv-s3" / "bin" / "moto_server"


@dataclass
class Behaviour:
    cut_once: set[str] = field(default_factory=set)
    """Paths whose first GET stops after half the bytes (the connection is closed)."""
    corrupt: set[str] = field(default_factory=set)
    """Paths served with one byte flipped."""
    ignore_range: bool = False
    delay_s: float = 0.0
    """Sleep before each GET of a file (to make concurrent pulls overlap)."""


class FileServer:
    """Files at ``/files/<path>``; ``/api/models/<repo>/tree/<rev>`` (HF) and ``/api/v1/models/<id>/repo``
    (ModelScope) list them, with ``repo`` any path prefix the test picks."""

    def __init__(self, files: dict[str, bytes], behaviour: Behaviour | None = None,
                 token: str | None = None, redirect_to: str | None = None) -> None:
        self.files = files
        self.behaviour = behaviour or Behaviour()
        self.token = token
        self.redirect_to = redirect_to
        """Answer hub file URLs (``/resolve/``) with a 302 to ``<redirect_to>/files/<path>`` (a CDN)."""
        self.gets: Counter[str] = Counter()
        self.ranges: list[tuple[str, str | None]] = []
        self.auth_seen: list[str | None] = []
        self._cut: set[str] = set()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                return None

            def do_HEAD(self) -> None:
                self._serve(head=True)

            def do_GET(self) -> None:
                self._serve(head=False)

            def _serve(self, head: bool) -> None:
                url = urllib.parse.urlsplit(self.path)
                server.auth_seen.append(self.headers.get("Authorization"))
                if server.token and self.headers.get("Authorization") != f"Bearer {server.token}":
                    self._send(401, b"unauthorized")
                    return
                if url.path.startswith("/api/models/") and "/tree/" in url.path:
                    self._json([{"type": "file", "path": p, "size": len(b), "oid": "0" * 40,
                                 "lfs": {"oid": hashlib.sha256(b).hexdigest(), "size": len(b), "pointerSize": 130}}
                                for p, b in server.files.items()])
                    return
                if url.path.startswith("/api/v1/models/") and url.path.endswith("/repo/files"):
                    self._json({"Code": 200, "Data": {"Files": [
                        {"Path": p, "Name": p.rsplit("/", 1)[-1], "Type": "blob", "Size": len(b),
                         "Sha256": hashlib.sha256(b).hexdigest()} for p, b in server.files.items()]}})
                    return
                if url.path.startswith("/api/v1/models/") and url.path.endswith("/repo"):
                    name = urllib.parse.parse_qs(url.query)["FilePath"][0]
                elif "/resolve/" in url.path:
                    name = urllib.parse.unquote(url.path.split("/resolve/", 1)[1].split("/", 1)[1])
                    if server.redirect_to:
                        self.send_response(302)
                        self.send_header("Location", f"{server.redirect_to}/files/{urllib.parse.quote(name)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                else:
                    name = urllib.parse.unquote(url.path.removeprefix("/files/"))
                self._file(name, head)

            def _json(self, data: object) -> None:
                self._send(200, json.dumps(data).encode(), "application/json")

            def _send(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _file(self, name: str, head: bool) -> None:
                data = server.files.get(name)
                if data is None:
                    self._send(404, b"not found")
                    return
                if name in server.behaviour.corrupt:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                rng = None if server.behaviour.ignore_range else self.headers.get("Range")
                with server._lock:
                    if not head:
                        server.gets[name] += 1
                        server.ranges.append((name, rng))
                    cut = not head and name in server.behaviour.cut_once and name not in server._cut
                    if cut:
                        server._cut.add(name)
                if not head and server.behaviour.delay_s:
                    time.sleep(server.behaviour.delay_s)
                start = 0
                if rng:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self._send(416, b"")
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if head:
                    return
                body = data[start:]
                if cut:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class MotoServer:
    """moto's S3 server on a free loopback port."""

    def __init__(self) -> None:
        if not MOTO.exists():
            raise RuntimeError(f"{MOTO} is missing: run `make s3-venv`")
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> MotoServer:
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
        self.proc = subprocess.Popen([str(MOTO), "-H", "127.0.0.1", "-p", str(self.port)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=1).close()
                return self
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
