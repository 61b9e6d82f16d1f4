"""What `GET /metrics` shows, in Prometheus' text format (version 0.0.4).

The server counts requests and tokens itself; what the cache did comes from the runtime's
`stats()`, which only the thread holding the model reads (it drains the loader's records),
after each generation, into a snapshot that the metrics thread renders. Every series is a
fixed set of numbers: nothing here grows with the number of requests served.
"""

from __future__ import annotations

import threading
import time

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "moe_prefetch_"

# runtime.stats() key -> (metric name, type, help); counters since the model was loaded
RUNTIME_SERIES = (
    ("hits", "expert_hits_total", "counter", "Routed experts found resident in a device slot."),
    ("misses", "expert_misses_total", "counter", "Routed experts that waited for their upload."),
    ("host_experts", "host_experts_total", "counter", "Routed experts computed on the host lane."),
    ("hit_rate", "hit_rate", "gauge", "Device hits over every routed expert, since load."),
    ("host_share", "host_lane_share", "gauge", "Share of routed experts computed on the host lane, since load."),
    ("stall_seconds", "stall_seconds_total", "counter", "Seconds compute waited for expert uploads."),
    ("host_seconds", "host_seconds_total", "counter", "Seconds spent computing experts on the host."),
    ("bytes_loaded", "link_bytes_total", "counter", "Expert bytes copied host to device."),
    ("evictions", "evictions_total", "counter", "Experts evicted from the device cache."),
    ("prefetch_issued", "prefetches_total", "counter", "Prefetches issued ahead of need."),
    ("cache_slots", "cache_slots", "gauge", "Expert slots in the device cache."),
)


class Metrics:
    """Thread-safe counters for the server, plus the runtime's latest snapshot."""

    def __init__(self, info: dict[str, str]):
        self.info = info  # model, device, experts_dtype, predictor: constant labels
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, int], int] = {}
        self._finished: dict[str, int] = {}
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.generation_seconds = 0.0
        self.tokens_per_second = 0.0  # the decode rate of the latest generation
        self._runtime: dict = {}
        self.started = time.time()

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            key = (endpoint, status)
            self._requests[key] = self._requests.get(key, 0) + 1

    def token(self) -> None:
        with self._lock:
            self.generated_tokens += 1

    def generation(self, prompt_tokens: int, tokens: int, seconds: float, decode_s: float, finish: str) -> None:
        """One generation ended (`finish`: stop, length, disconnected, shutdown)."""
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.generation_seconds += seconds
            self._finished[finish] = self._finished.get(finish, 0) + 1
            if tokens > 1 and decode_s > 0:
                self.tokens_per_second = (tokens - 1) / decode_s

    def runtime(self, stats: dict) -> None:
        """A snapshot of `runtime.stats()`, taken by the thread that holds the model."""
        routed = stats.get("hits", 0) + stats.get("misses", 0) + stats.get("host_experts", 0)
        snapshot = {key: stats.get(key, 0) for key, *_ in RUNTIME_SERIES if key in stats}
        snapshot["host_share"] = stats.get("host_experts", 0) / routed if routed else 0.0
        with self._lock:
            self._runtime = snapshot

    def render(self, *, waiting: int, busy: bool) -> str:
        with self._lock:
            lines: list[str] = []

            def series(name: str, kind: str, help: str, samples: list[tuple[dict, float]]) -> None:
                lines.append(f"# HELP {PREFIX}{name} {help}")
                lines.append(f"# TYPE {PREFIX}{name} {kind}")
                for labels, value in samples:
                    lines.append(f"{PREFIX}{name}{_labels(labels)} {_value(value)}")

            series("info", "gauge", "The model served and how its experts are kept.", [(self.info, 1)])
            requests = [({"endpoint": e, "status": str(s)}, n) for (e, s), n in sorted(self._requests.items())]
            series("requests_total", "counter", "HTTP requests answered, by endpoint and status.", requests)
            finished = [({"finish": f}, n) for f, n in sorted(self._finished.items())]
            series("generations_total", "counter", "Generations ended, by how they ended.", finished)
            prompt = [({}, self.prompt_tokens)]
            series("prompt_tokens_total", "counter", "Prompt tokens of finished generations.", prompt)
            series("generated_tokens_total", "counter", "Tokens generated.", [({}, self.generated_tokens)])
            series("generation_seconds_total", "counter", "Seconds spent generating.", [({}, self.generation_seconds)])
            series(
                "tokens_per_second",
                "gauge",
                "Decode tokens per second of the latest generation.",
                [({}, self.tokens_per_second)],
            )
            series("queue_length", "gauge", "Requests waiting for the model.", [({}, waiting)])
            series("busy", "gauge", "1 while a generation holds the model.", [({}, int(busy))])
            for key, name, kind, help in RUNTIME_SERIES:
                if key in self._runtime:
                    series(name, kind, help, [({}, self._runtime[key])])
            series("uptime_seconds", "gauge", "Seconds since the server started.", [({}, time.time() - self.started)])
            return "\n".join(lines) + "\n"


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    escape = lambda v: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")  # noqa: E731
    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"


def _value(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)
