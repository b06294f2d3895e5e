"""Download progress: bytes and files done, rate and ETA, and its text forms. Pure apart from the sinks.

``Tracker`` is fed by ``arks_ray.models.fetch`` from several threads; the clock is injected. Its
``Snapshot`` is shown three ways:

- ``describe``: one line, the same words in the terminal, the Job log and ``ArksModel.status.progress``;
- ``bar``: a terminal progress bar (``TerminalSink`` redraws it in place on a TTY);
- ``report_line`` / ``parse_report``: ``arks-progress {json}`` lines in the Job's log, read back by the
  operator into ``ArksModel.status``.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TextIO

REPORT_PREFIX = "arks-progress "
RATE_WINDOW_S = 10.0


@dataclass(frozen=True)
class Snapshot:
    """Progress at one instant."""

    bytes_done: int
    bytes_total: int | None
    files_done: int
    files_total: int | None
    rate_bytes_per_second: float | None
    eta_seconds: float | None
    elapsed_seconds: float


class Sink(Protocol):
    """Where progress goes (a terminal, the Job log, nowhere)."""

    def update(self, snap: Snapshot, final: bool = False) -> None: ...


class NullSink:
    def update(self, snap: Snapshot, final: bool = False) -> None:
        return None


class Tracker:
    """Thread-safe counters with a sliding-window rate. ``advance`` may go negative (a restart from 0)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, sink: Sink | None = None,
                 every_s: float = 0.5) -> None:
        self._clock = clock
        self._sink = sink or NullSink()
        self._every = every_s
        self._lock = threading.Lock()
        self._start = clock()
        self._last_emit = -1e18
        self._samples: deque[tuple[float, int]] = deque()
        self.bytes_done = 0
        self.bytes_total: int | None = None
        self.files_done = 0
        self.files_total: int | None = None

    def start(self, files_total: int, bytes_total: int | None, bytes_done: int = 0) -> None:
        with self._lock:
            self.files_total, self.bytes_total, self.bytes_done = files_total, bytes_total, bytes_done
            now = self._clock()
            self._start = now
            self._samples.clear()
            self._samples.append((now, bytes_done))
        self._emit(force=True)

    def grow_total(self, size: int) -> None:
        """A file whose size was unknown until its response came (plain HTTP)."""
        with self._lock:
            self.bytes_total = (self.bytes_total or 0) + size

    def advance(self, n: int) -> None:
        with self._lock:
            self.bytes_done += n
        self._emit()

    def file_done(self) -> None:
        with self._lock:
            self.files_done += 1
        self._emit()

    def snapshot(self) -> Snapshot:
        with self._lock:
            now = self._clock()
            self._samples.append((now, self.bytes_done))
            while len(self._samples) > 2 and now - self._samples[0][0] > RATE_WINDOW_S:
                self._samples.popleft()
            t0, b0 = self._samples[0]
            rate = (self.bytes_done - b0) / (now - t0) if now - t0 > 0 else None
            eta = None
            if rate and rate > 0 and self.bytes_total is not None:
                eta = max(self.bytes_total - self.bytes_done, 0) / rate
            return Snapshot(self.bytes_done, self.bytes_total, self.files_done, self.files_total, rate, eta,
                            now - self._start)

    def finish(self) -> Snapshot:
        snap = self.snapshot()
        self._sink.update(snap, final=True)
        return snap

    def _emit(self, force: bool = False) -> None:
        now = self._clock()
        if not force and now - self._last_emit < self._every:
            return
        self._last_emit = now
        self._sink.update(self.snapshot())


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_seconds(s: float) -> str:
    s = round(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def describe(snap: Snapshot) -> str:
    """``1.2 GiB / 4.0 GiB (30%), 3/9 files, 85.0 MiB/s, ETA 33s``."""
    parts = [human_bytes(snap.bytes_done)]
    if snap.bytes_total:
        parts[0] += f" / {human_bytes(snap.bytes_total)} ({100 * snap.bytes_done / snap.bytes_total:.0f}%)"
    if snap.files_total is not None:
        parts.append(f"{snap.files_done}/{snap.files_total} files")
    if snap.rate_bytes_per_second is not None:
        parts.append(f"{human_bytes(snap.rate_bytes_per_second)}/s")
    if snap.eta_seconds is not None:
        parts.append(f"ETA {human_seconds(snap.eta_seconds)}")
    return ", ".join(parts)


def bar(snap: Snapshot, width: int = 30) -> str:
    frac = min(snap.bytes_done / snap.bytes_total, 1.0) if snap.bytes_total else 0.0
    filled = int(frac * width)
    return "[" + "#" * filled + "." * (width - filled) + "] " + describe(snap)


def report_line(snap: Snapshot) -> str:
    """One Job-log line the operator reads back (``parse_report``)."""
    data = asdict(snap)
    data.pop("elapsed_seconds")
    return REPORT_PREFIX + json.dumps({k: v for k, v in data.items() if v is not None}, separators=(",", ":"))


def parse_report(log: str) -> Snapshot | None:
    """The last progress report in a log tail, or None."""
    for line in reversed(log.splitlines()):
        line = line.strip()
        if not line.startswith(REPORT_PREFIX):
            continue
        try:
            data: Any = json.loads(line[len(REPORT_PREFIX):])
        except json.JSONDecodeError:
            continue
        if not isinstance(data, dict):
            continue
        try:
            return Snapshot(int(data.get("bytes_done", 0)), _int(data.get("bytes_total")),
                            int(data.get("files_done", 0)), _int(data.get("files_total")),
                            _float(data.get("rate_bytes_per_second")), _float(data.get("eta_seconds")), 0.0)
        except (TypeError, ValueError):
            continue
    return None


def _int(v: Any) -> int | None:
    return None if v is None else int(v)


def _float(v: Any) -> float | None:
    return None if v is None else float(v)


class TerminalSink:
    """A bar redrawn in place on a TTY; elsewhere a plain line at most every ``plain_every_s``."""

    def __init__(self, out: TextIO, label: str = "", plain_every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._out, self._label, self._every, self._clock = out, label, plain_every_s, clock
        self._tty = out.isatty()
        self._last = -1e18

    def update(self, snap: Snapshot, final: bool = False) -> None:
        prefix = f"{self._label}: " if self._label else ""
        if self._tty:
            self._out.write("\r\x1b[2K" + prefix + bar(snap) + ("\n" if final else ""))
            self._out.flush()
            return
        now = self._clock()
        if final or now - self._last >= self._every:
            self._last = now
            self._out.write(prefix + describe(snap) + "\n")
            self._out.flush()


class ReportSink:
    """The Job's log: a human line and a machine line, at most every ``every_s``."""

    def __init__(self, out: TextIO, every_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._out, self._every, self._clock = out, every_s, clock
        self._last = -1e18

    def update(self, snap: Snapshot, final: bool = False) -> None:
        now = self._clock()
        if final or now - self._last >= self._every:
            self._last = now
            self._out.write(f"arks-ray: {describe(snap)}\n{report_line(snap)}\n")
            self._out.flush()
