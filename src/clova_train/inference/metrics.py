"""The server's counters and latency histograms, written in Prometheus' text exposition format."""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

# Seconds; generation requests span milliseconds (a tiny model, a few tokens) to minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    esc = lambda v: v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")  # noqa: E731
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in pairs) + "}"


class Metrics:
    """Thread-safe counters, gauges (read at scrape time) and histograms."""

    def __init__(self):
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}
        self._counters: dict[str, dict[tuple, float]] = defaultdict(dict)
        self._hists: dict[str, dict[tuple, list]] = defaultdict(dict)
        self._gauges: dict[str, callable] = {}

    def describe(self, name: str, kind: str, text: str) -> None:
        self._help[name] = (kind, text)

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._counters[name]
            series[key] = series.get(key, 0.0) + value

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            h = self._hists[name].setdefault(key, [[0] * len(LATENCY_BUCKETS), 0, 0.0])
            i = bisect.bisect_left(LATENCY_BUCKETS, seconds)
            if i < len(LATENCY_BUCKETS):
                h[0][i] += 1
            h[1] += 1
            h[2] += seconds

    def gauge(self, name: str, read) -> None:
        """``read()`` gives the gauge's value at each scrape."""
        self._gauges[name] = read

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._counters[name].get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        lines: list[str] = []

        def head(name: str, default_kind: str) -> None:
            kind, text = self._help.get(name, (default_kind, name))
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} {kind}")

        with self._lock:
            for name, series in sorted(self._counters.items()):
                head(name, "counter")
                for key, v in sorted(series.items()):
                    lines.append(f"{name}{_labels(key)} {v:g}")
            for name, series in sorted(self._hists.items()):
                head(name, "histogram")
                for key, (counts, n, total) in sorted(series.items()):
                    running = 0
                    for le, c in zip(LATENCY_BUCKETS, counts):
                        running += c
                        lines.append(f"{name}_bucket{_labels(key + (('le', f'{le:g}'),))} {running}")
                    lines.append(f"{name}_bucket{_labels(key + (('le', '+Inf'),))} {n}")
                    lines.append(f"{name}_sum{_labels(key)} {total:.6f}")
                    lines.append(f"{name}_count{_labels(key)} {n}")
        for name, read in sorted(self._gauges.items()):
            head(name, "gauge")
            lines.append(f"{name} {read():g}")
        return "\n".join(lines) + "\n"
