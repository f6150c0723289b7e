"""Per-node counters, rates, processing time and end-to-end latency."""

from __future__ import annotations

import math
import threading
import time
from typing import Any

__all__ = ["NodeStats"]


class _Window:
    __slots__ = (
        "bytes_in",
        "bytes_out",
        "errors",
        "lat_max",
        "lat_n",
        "lat_sum",
        "proc_max",
        "proc_sum",
        "processed",
        "published",
        "received",
        "skipped",
    )  # fmt: skip

    def __init__(self) -> None:
        self.received = self.processed = self.published = self.errors = self.skipped = 0
        self.bytes_in = self.bytes_out = 0
        self.proc_sum = self.proc_max = self.lat_sum = self.lat_max = 0.0
        self.lat_n = 0


class NodeStats:
    """Counts since start (``totals``) and over the current summary window.

    Updated by the node's loop thread; :meth:`snapshot` and :meth:`summary` may
    be called from any thread.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._total = _Window()
        self._window = _Window()
        self.started = self._window_start = time.monotonic()
        #: Also told each :meth:`processed` (``observe(seconds, latency)``), from the
        #: node's thread: the metrics' histograms. ``None``: nobody.
        self.observer: Any = None

    def _both(self) -> tuple[_Window, _Window]:
        return self._total, self._window

    def received(self, nbytes: int) -> None:
        with self._lock:
            for w in self._both():
                w.received += 1
                w.bytes_in += nbytes

    def skipped(self) -> None:
        with self._lock:
            for w in self._both():
                w.skipped += 1

    def published(self, nbytes: int) -> None:
        with self._lock:
            for w in self._both():
                w.published += 1
                w.bytes_out += nbytes

    def error(self) -> None:
        with self._lock:
            for w in self._both():
                w.errors += 1

    def processed(self, seconds: float, latency: float | None) -> None:
        """One message (or frame) handled in ``seconds``; ``latency`` since capture."""
        # A non-finite latency (a peer's NaN or inf capture timestamp) would poison
        # the averages for good: it is not counted. Checked before anything changes.
        if latency is not None and not math.isfinite(latency):
            latency = None
        with self._lock:
            for w in self._both():
                w.processed += 1
                w.proc_sum += seconds
                w.proc_max = max(w.proc_max, seconds)
                if latency is not None:
                    w.lat_n += 1
                    w.lat_sum += latency
                    w.lat_max = max(w.lat_max, latency)
        observer = self.observer
        if observer is not None:
            observer.observe(seconds, latency)

    def snapshot(self, reset_window: bool = False) -> dict[str, Any]:
        """Totals and window figures as a dict (rates per second, times in seconds)."""
        now = time.monotonic()
        with self._lock:
            t, w = self._total, self._window
            elapsed = max(now - self._window_start, 1e-9)
            out = {
                "received": t.received,
                "processed": t.processed,
                "published": t.published,
                "errors": t.errors,
                "skipped": t.skipped,
                "bytes_in": t.bytes_in,
                "bytes_out": t.bytes_out,
                "uptime": now - self.started,
                "window": elapsed,
                "in_rate": w.received / elapsed,
                "out_rate": w.published / elapsed,
                "in_mb_rate": w.bytes_in / elapsed / 1e6,
                "process_rate": w.processed / elapsed,
                "window_errors": w.errors,
                "proc_avg": w.proc_sum / w.processed if w.processed else None,
                "proc_max": w.proc_max if w.processed else None,
                "latency_avg": w.lat_sum / w.lat_n if w.lat_n else None,
                "latency_max": w.lat_max if w.lat_n else None,
                "latency_avg_total": t.lat_sum / t.lat_n if t.lat_n else None,
            }
            if reset_window:
                self._window = _Window()
                self._window_start = now
        return out

    def summary(self, reset_window: bool = True) -> str:
        """One line: rates, processing time, latency and errors over the window."""
        s = self.snapshot(reset_window)

        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v * 1e3:.1f}"

        return (
            f"{self.name}: in {s['in_rate']:.1f}/s ({s['in_mb_rate']:.1f} MB/s) "
            f"out {s['out_rate']:.1f}/s | proc avg {ms(s['proc_avg'])} max "
            f"{ms(s['proc_max'])} ms | latency avg {ms(s['latency_avg'])} max "
            f"{ms(s['latency_max'])} ms | errors {s['window_errors']} | totals in "
            f"{s['received']} out {s['published']} errors {s['errors']} "
            f"skipped {s['skipped']} over {s['window']:.0f} s"
        )
