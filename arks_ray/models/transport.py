"""The HTTP port of the downloader: ``Transport`` and its stdlib (urllib) adapter.

``arks_ray.models.fetch`` and ``arks_ray.models.sources`` use only ``Transport``. The adapter follows
redirects but drops ``Authorization`` when one leads to another host (a hub's token must not reach its
CDN), and maps network failures onto ``Retryable`` and HTTP errors onto ``DownloadError`` or
``Retryable``. URLs are never put into error messages: an S3 presigned URL carries its signature.
"""

from __future__ import annotations

import http.client
import io
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any, Protocol

from arks_ray.models.files import DownloadError, Retryable

RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}


@dataclass
class Response:
    """An open response: status, headers (lower-case names) and the body stream."""

    status: int
    headers: Mapping[str, str]
    body: IO[bytes]

    def close(self) -> None:
        self.body.close()


class Transport(Protocol):
    """GET with an optional byte offset (an HTTP Range request)."""

    def get(self, url: str, headers: Mapping[str, str], offset: int = 0, method: str = "GET") -> Response: ...


def where(url: str) -> str:
    """A URL safe to print: scheme, host and path, no query (signatures live there)."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{parts.path}"


class _NoCrossHostAuth(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
                         headers: Any, newurl: str) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            for name in [k for k in new.headers if k.lower() == "authorization"]:
                del new.headers[name]
            new.unredirected_hdrs.pop("Authorization", None)
        return new


class UrllibTransport:
    """The real transport: urllib, a socket timeout, no proxies unless the environment sets them."""

    def __init__(self, timeout_s: float = 60.0) -> None:
        self._timeout = timeout_s
        self._opener = urllib.request.build_opener(_NoCrossHostAuth())

    def get(self, url: str, headers: Mapping[str, str], offset: int = 0, method: str = "GET") -> Response:
        if not url.startswith(("http://", "https://")):
            raise DownloadError(f"not an http(s) URL: {where(url)}")
        req = urllib.request.Request(url, headers=dict(headers), method=method)  # noqa: S310 - checked above
        if offset:
            req.add_header("Range", f"bytes={offset}-")
        try:
            resp = self._opener.open(req, timeout=self._timeout)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 416:
                return Response(416, {k.lower(): v for k, v in exc.headers.items()}, io.BytesIO())
            error = Retryable if exc.code in RETRY_STATUSES else DownloadError
            raise error(f"HTTP {exc.code} from {where(url)}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            raise Retryable(f"cannot reach {where(url)}: {reason}") from None
        return Response(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp)

    def get_json(self, url: str, headers: Mapping[str, str]) -> Any:
        return get_json(self, url, headers)


def get_json(transport: Transport, url: str, headers: Mapping[str, str]) -> Any:
    resp = transport.get(url, headers)
    try:
        data = read_all(resp.body)
    finally:
        resp.close()
    try:
        return json.loads(data)
    except json.JSONDecodeError:
        raise DownloadError(f"{where(url)} did not answer JSON") from None


def read_all(body: IO[bytes]) -> bytes:
    try:
        return body.read()
    except (OSError, http.client.HTTPException) as exc:
        raise Retryable(f"connection lost: {exc}") from None

