"""Request metrics in the Prometheus text format (counts and latency histograms per route)."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


class Metrics:
    """Thread-safe request counters and latency histograms keyed by (method, route, status)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str, int], int] = defaultdict(int)
        self._buckets: dict[str, list[int]] = defaultdict(lambda: [0] * len(BUCKETS))
        self._sums: dict[str, float] = defaultdict(float)
        self._totals: dict[str, int] = defaultdict(int)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self._counts[(method, route, status)] += 1
            buckets = self._buckets[route]
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    buckets[i] += 1
            self._sums[route] += seconds
            self._totals[route] += 1

    def render(self, entries: dict[str, int]) -> str:
        """Prometheus exposition text, plus the library's entry count by role."""
        lines = [
            "# HELP spot_api_requests_total HTTP requests by method, route and status.",
            "# TYPE spot_api_requests_total counter",
        ]
        with self._lock:
            for (method, route, status), count in sorted(self._counts.items()):
                lines.append(
                    f'spot_api_requests_total{{method="{method}",route="{route}",status="{status}"}} {count}'
                )
            lines += [
                "# HELP spot_api_request_duration_seconds HTTP request latency by route.",
                "# TYPE spot_api_request_duration_seconds histogram",
            ]
            for route, buckets in sorted(self._buckets.items()):
                for bound, count in zip(BUCKETS, buckets, strict=True):
                    lines.append(
                        f'spot_api_request_duration_seconds_bucket{{route="{route}",le="{bound}"}} {count}'
                    )
                total = self._totals[route]
                lines.append(
                    f'spot_api_request_duration_seconds_bucket{{route="{route}",le="+Inf"}} {total}'
                )
                lines.append(
                    f'spot_api_request_duration_seconds_sum{{route="{route}"}} {self._sums[route]}'
                )
                lines.append(f'spot_api_request_duration_seconds_count{{route="{route}"}} {total}')
        lines += [
            "# HELP spot_library_entries Entries in the library by role.",
            "# TYPE spot_library_entries gauge",
        ]
        lines += [
            f'spot_library_entries{{role="{role}"}} {count}'
            for role, count in sorted(entries.items())
        ]
        return "\n".join(lines) + "\n"


class MetricsMiddleware:
    """ASGI middleware timing every HTTP request; the route label is the matched path template."""

    def __init__(
        self, app: ASGIApp, metrics: Metrics, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.app, self.metrics, self.clock = app, metrics, clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = self.clock(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"] if scope["method"] in METHODS else "OTHER"
            self.metrics.observe(method, route, status, self.clock() - start)
