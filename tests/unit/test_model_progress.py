"""Download progress: counts, the windowed rate and ETA on an injected clock, and its text forms."""

from __future__ import annotations

import io

from arks_ray.models.progress import (
    ReportSink,
    Snapshot,
    TerminalSink,
    Tracker,
    bar,
    describe,
    parse_report,
    report_line,
)

MIB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_rate_and_eta_come_from_the_recent_window() -> None:
    clock = Clock()
    tracker = Tracker(clock=clock)
    tracker.start(files_total=2, bytes_total=100 * MIB)
    for _ in range(10):
        clock.t += 1
        tracker.advance(5 * MIB)
    snap = tracker.snapshot()
    assert snap.bytes_done == 50 * MIB
    assert snap.rate_bytes_per_second == 5 * MIB
    assert snap.eta_seconds == 10
    # A stall: after the window passes, the rate reflects only the recent (slower) bytes.
    for _ in range(20):
        clock.t += 1
        tracker.advance(1 * MIB)
    assert tracker.snapshot().rate_bytes_per_second == 1 * MIB


def test_resumed_bytes_count_as_done_but_not_as_rate() -> None:
    clock = Clock()
    tracker = Tracker(clock=clock)
    tracker.start(files_total=1, bytes_total=10 * MIB, bytes_done=8 * MIB)
    clock.t += 2
    tracker.advance(1 * MIB)
    tracker.file_done()
    snap = tracker.snapshot()
    assert (snap.bytes_done, snap.files_done) == (9 * MIB, 1)
    assert snap.rate_bytes_per_second == MIB / 2


def test_describe_and_bar() -> None:
    snap = Snapshot(int(1.5 * (1 << 30)), 4 << 30, 3, 9, 85 * MIB, 95.0, 10.0)
    assert describe(snap) == "1.5 GiB / 4.0 GiB (38%), 3/9 files, 85.0 MiB/s, ETA 1m35s"
    assert bar(snap, width=8).startswith("[###.....] 1.5 GiB")
    assert describe(Snapshot(10, None, 0, None, None, None, 0.0)) == "10 B"


def test_report_lines_round_trip_and_the_last_one_wins() -> None:
    first = Snapshot(1, 10, 0, 2, 1.0, 9.0, 1.0)
    last = Snapshot(10, 10, 2, 2, 5.0, 0.0, 2.0)
    log = "\n".join(["noise", report_line(first), "arks-ray: x", report_line(last), "arks-progress {broken"])
    got = parse_report(log)
    assert got is not None
    assert (got.bytes_done, got.bytes_total, got.files_done, got.files_total) == (10, 10, 2, 2)
    assert parse_report("nothing here") is None


def test_report_sink_throttles_but_always_writes_the_final_state() -> None:
    clock, out = Clock(), io.StringIO()
    sink = ReportSink(out, every_s=5, clock=clock)
    snap = Snapshot(1, 2, 0, 1, None, None, 0.0)
    sink.update(snap)
    sink.update(snap)
    clock.t += 5
    sink.update(snap)
    sink.update(snap, final=True)
    assert out.getvalue().count("arks-progress ") == 3


def test_terminal_sink_redraws_in_place_on_a_tty() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    sink = TerminalSink(out, label="m")
    sink.update(Snapshot(1, 2, 0, 1, None, None, 0.0))
    sink.update(Snapshot(2, 2, 1, 1, None, None, 0.0), final=True)
    assert out.getvalue().count("\r\x1b[2K") == 2
    assert out.getvalue().endswith("1/1 files\n")
