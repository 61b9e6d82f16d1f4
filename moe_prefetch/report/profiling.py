"""Run records and reports: what happened while a model generated, and how to show it.

  RunRecorder.token()  -- after every generated token: counter deltas per layer, slot table
        |
  build_run()          -- + runtime.trace, loader.events, stats -> one versioned dict (run.json);
        |                 lanes.py adds where each routed expert ran and the seconds per lane
        |
  summarize(run)       -- headline numbers, derived only from the records in the run
  text.tables         -- rich tables for a terminal (returned, never printed here)
  html.render_html    -- one self-contained page of inline SVG, no scripts, no network

Every report states whether its numbers were measured on CUDA, measured on CPU, or
simulated, and the run keeps every record a figure is drawn from.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import psutil

from ..errors import ReportError
from ..runtime import lanes
from .html import render_html
from .text import MEASURED_ON

logger = logging.getLogger(__name__)

SCHEMA = "moe-prefetch/run"
# 2: summary.prefetch_recall counts over the routed experts not already resident (it was over every
# demand access), the summary splits the host lane into prefill and decode, and each layer's lanes
# and split are over decode tokens (layers[].decode_lanes, .decode_ran; v1 had whole-run "lanes").
# `load_run` derives all of it again from a v1 run's records.
VERSION = 2
REQUIRED = (
    "measured_on",
    "stall_timing",
    "model",
    "config",
    "summary",
    "stats",
    "tokens",
    "layers",
    "loads",
    "trace",
    "occupancy",
)
COUNTERS = (
    "hits",
    "misses",
    "prefetch_issued",
    "prefetch_used",
    "prefetch_wasted",
    "prefetch_dropped",
    "evictions",
    "bytes_loaded",
    "stall_seconds",
    "host_experts",
    "host_seconds",
)


class RunRecorder:
    """Counts what each generated token cost. Call `start()` right before generating,
    `token()` as each token arrives (the first one ends prefill), `finish()` at the end."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.tokens: list[dict] = []
        self.occupancy: list[list[int]] = []  # per token: slots held per MoE layer, then empty slots
        self.stats: dict = {}  # the latest runtime.stats(), for live displays
        self.interrupted = False
        self.t_start = self.t_end = self.clock_start = 0.0
        self._first_load = 0
        self._last: dict[int, dict] = {}
        self._last_t = 0.0

    def start(self) -> None:
        self.runtime.record(True)  # a report needs every copy and trace record, not a window
        self.runtime.reset_stats()
        self._first_load = len(self.runtime.loader.events)  # copies before this belong to earlier work
        self.t_start = self._last_t = time.perf_counter()
        self.clock_start = self.t_start - self.runtime.t0  # the same moment on the trace's clock

    def token(self) -> dict:
        now = time.perf_counter()
        self.stats = self.runtime.stats(flush=True)  # per-token stall: wait for its CUDA events
        per_layer = []
        for layer in self.stats["per_layer"]:
            before = self._last.get(layer["layer_idx"], {})
            per_layer.append({"layer_idx": layer["layer_idx"], **{k: layer[k] - before.get(k, 0) for k in COUNTERS}})
        self._last = {layer["layer_idx"]: layer for layer in self.stats["per_layer"]}
        record = {
            "step": len(self.tokens),
            "t": now - self.t_start,
            "wall_s": now - self._last_t,
            **{k: sum(layer[k] for layer in per_layer) for k in COUNTERS},
            "per_layer": per_layer,
        }
        self._last_t = now
        self.tokens.append(record)
        held = {layer.layer_idx: 0 for layer in self.runtime.layers}
        for key in self.runtime.cache.key_of:
            if key is not None:
                held[key[0]] += 1
        self.occupancy.append([*held.values(), self.runtime.cache.num_slots - sum(held.values())])
        return record

    def finish(self, interrupted: bool = False) -> None:
        self.t_end = time.perf_counter()
        self.interrupted = interrupted

    def loads(self) -> list[dict]:
        """The loader's copies since `start`, on the trace's clock, tags as lists (JSON)."""
        return [
            dict(event, tag=list(event["tag"]) if event.get("tag") is not None else None)
            for event in self.runtime.loader.events[self._first_load :]
        ]


def model_record(runtime, path: str) -> dict:
    layers = runtime.layers
    return {
        "path": str(path),
        "model_type": str(getattr(runtime.model.config, "model_type", "?")),
        "dtype": str(runtime.spec.dtype).removeprefix("torch."),
        "moe_layers": len(layers),
        "layer_ids": [layer.layer_idx for layer in layers],
        "experts_per_layer": max(l.num_experts for l in layers),
        "top_k": max(layer.top_k for layer in layers),
        "expert_bytes": runtime.spec.nbytes,  # decoded, in the model's dtype
        # How the experts ran: stored, moved and cached in this format, this many bytes each.
        "experts_dtype": runtime.codec.name,
        "experts_format": runtime.codec.describe(),
        "stored_expert_bytes": runtime.codec.nbytes,
        "num_layers": int(getattr(runtime.model.config, "num_hidden_layers", 0)) or None,
    }


def memory_record(runtime) -> dict:
    """Device: slot pool + non-expert weights (the model's expert parameters are emptied on
    attach, so its parameters are exactly the non-expert ones); host: store and process RSS."""
    non_expert = sum(p.numel() * p.element_size() for p in runtime.model.parameters())
    pool = runtime.cache.num_slots * runtime.codec.nbytes  # slots hold experts as stored
    peak = None
    if runtime.device.type == "cuda":
        import torch

        peak = int(torch.cuda.max_memory_allocated(runtime.device))
    return {
        "device_pool_bytes": pool,
        "non_expert_bytes": non_expert,
        "device_bytes": pool + non_expert,
        "device_peak_bytes": peak,
        "host_store_bytes": runtime.store.nbytes,
        "rss_bytes": psutil.Process().memory_info().rss,
    }


def build_run(recorder: RunRecorder, *, model: dict, config: dict, text: str | None = None) -> dict:
    """The whole run as one JSON-ready dict (schema moe-prefetch/run, version `VERSION`)."""
    runtime = recorder.runtime
    stats = runtime.stats()
    measured_on = "cuda" if runtime.device.type == "cuda" else "cpu"
    trace, loads = [dict(r) for r in runtime.trace], recorder.loads()
    link_bytes_per_s = runtime.placement.costs.link_bytes_per_s
    lanes.token_lanes(
        recorder.tokens,
        trace,
        loads,
        measured_on=measured_on,
        clock_start=recorder.clock_start,
        link_bytes_per_s=link_bytes_per_s,
    )
    layer_info = {layer.layer_idx: layer for layer in runtime.layers}
    layers = [
        {
            "layer_idx": row["layer_idx"],
            "num_experts": layer_info[row["layer_idx"]].num_experts,
            "top_k": layer_info[row["layer_idx"]].top_k,
            **{k: row[k] for k in COUNTERS},
            "hit_rate": _ratio(row["hits"], row["hits"] + row["misses"] + row["host_experts"]),
            "ran": lanes.ran(row),  # over the whole run, as the counters beside it
            # decode only: step 0 holds the prefill and the first forward's one-off costs
            **lanes.layer_decode(recorder.tokens, row["layer_idx"]),
        }
        for row in stats["per_layer"]
    ]
    from ..evidence.sim import replay_payload  # the simulator needs torch; reading and writing runs does not

    run = {
        "schema": SCHEMA,
        "version": VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "measured_on": measured_on,
        "stall_timing": stats["stall_timing"],
        # How each lane's seconds (tokens[].lanes, layers[].lanes) were obtained here.
        "lane_basis": lanes.basis(measured_on, link_bytes_per_s),
        "interrupted": recorder.interrupted,
        "model": model,
        "config": config,
        "text": text,
        "memory": memory_record(runtime),
        "stats": stats,
        "tokens": recorder.tokens,
        "layers": layers,
        "loads": loads,
        "trace": trace,
        # With trace and model, what the simulator needs to replay this run (moe_prefetch.evidence.sim).
        "step_starts": list(getattr(runtime, "step_starts", [])),
        "predictions": [dict(p) for p in getattr(runtime, "predictions", [])],
        # Sizes and layout the simulator needs besides the trace (`moe-prefetch simulate`).
        "replay": {
            k: v for k, v in replay_payload(runtime).items() if k not in ("trace", "step_starts", "predictions")
        },
        "occupancy": {
            "slots": runtime.cache.num_slots,
            "layer_ids": [l.layer_idx for l in runtime.layers],
            "per_token": recorder.occupancy,
            "final": [list(k) if k is not None else None for k in runtime.cache.key_of],
        },
    }
    run["summary"] = summarize(run)
    return run


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def summarize(run: dict) -> dict:
    """Headline numbers, each derived from the run's records.

    prefetch_recall: of the routed experts not already on the device, the share a prefetch or
    upload had staged (`lanes.prefetch_recall`; not a predictor's offline recall@k).
    stall_share: decode stall over decode wall time. Prefill = the first token (its forward
    runs the prompt), decode = every token after it; where experts ran and the host lane are
    counted for each apart."""
    stats, tokens, loads = run["stats"], run["tokens"], run["loads"]
    prefill, decode = tokens[:1], tokens[1:]
    decode_wall = tokens[-1]["t"] - tokens[0]["t"] if len(tokens) > 1 else 0.0
    decode_stall = sum(t["stall_seconds"] for t in decode)
    decode_hits, decode_misses = sum(t["hits"] for t in decode), sum(t["misses"] for t in decode)
    decode_host = sum(t.get("host_experts", 0) for t in decode)
    host_experts = stats.get("host_experts", 0)
    timed = [e for e in loads if "start" in e and "end" in e]
    if run["measured_on"] == "cpu" and timed:
        busy = sum(e["end"] - e["start"] for e in timed)
        h2d, h2d_basis = _ratio(sum(e["bytes"] for e in timed), busy), "bytes over loader busy time"
    else:
        h2d, h2d_basis = _ratio(stats["bytes_loaded"], tokens[-1]["t"] if tokens else 0.0), "bytes over wall time"
    memory = run.get("memory", {})
    return {
        "tokens_generated": len(tokens),
        "time_to_first_token_s": tokens[0]["t"] if tokens else None,
        "decode_tokens_per_s": _ratio(len(decode), decode_wall),
        "decode_wall_s": decode_wall,
        # device hits over every routed expert, wherever it ran (misses wait or run on the host)
        "hit_rate": _ratio(stats["hits"], stats["hits"] + stats["misses"] + host_experts),
        "decode_hit_rate": _ratio(decode_hits, decode_hits + decode_misses + decode_host),
        "host_experts": host_experts,
        "host_seconds": stats.get("host_seconds", 0.0),
        # the host lane serves prefill experts too (placement.py: behind a queue of copies, an
        # expert few tokens chose finishes first there), so each phase is counted apart
        "prefill_host_experts": sum(t.get("host_experts", 0) for t in prefill),
        "decode_host_experts": decode_host,
        "prefill_host_seconds": sum(t.get("host_seconds", 0.0) for t in prefill),
        "decode_host_seconds": sum(t.get("host_seconds", 0.0) for t in decode),
        # where the routed experts ran, and (decode) each lane's mean seconds per token
        "prefill_ran": lanes.total_ran(prefill),
        "decode_ran": lanes.total_ran(decode),
        "decode_lanes_per_token": lanes.mean_lanes(decode),
        "on_miss": stats.get("on_miss", "wait"),
        "prefetch_precision": _ratio(stats["prefetch_used"], stats["prefetch_issued"]),
        "prefetch_recall": lanes.prefetch_recall(stats),
        "decode_stall_s": decode_stall,
        "stall_share": _ratio(decode_stall, decode_wall),
        "bytes_loaded": stats["bytes_loaded"],
        "experts_dtype": stats.get("experts_dtype"),
        "stored_expert_bytes": stats.get("expert_bytes"),  # as stored and moved
        "h2d_bytes_per_s": h2d,
        "h2d_basis": h2d_basis,
        **{
            k: memory.get(k)
            for k in (
                "device_bytes",
                "device_pool_bytes",
                "non_expert_bytes",
                "device_peak_bytes",
                "host_store_bytes",
                "rss_bytes",
            )
        },
        "interrupted": bool(run.get("interrupted")),
    }


# -- files ---------------------------------------------------------------------------
def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise ReportError(f"cannot write {path}: {err.strerror or err}; choose a writable location") from None


def write_report(folder: str | Path, run: dict) -> tuple[Path, Path]:
    """Write run.json and report.html into `folder` (created), each atomically."""
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ReportError(f"cannot create report folder {folder}: {err.strerror or err}") from None
    json_path, html_path = folder / "run.json", folder / "report.html"
    _write_atomic(json_path, json.dumps(run, indent=1, default=str))
    _write_atomic(html_path, render_html(run))
    return json_path, html_path


def write_html(path: str | Path, run: dict) -> Path:
    path = Path(path).expanduser()
    _write_atomic(path, render_html(run))
    return path


def load_run(path: str | Path) -> dict:
    """Read and check a run.json (or a report folder holding one). Raises ReportError."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "run.json"
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{path} does not exist; pass the run.json written by `moe-prefetch run --report`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(f"{path} is not a readable JSON file ({err})") from None
    if not isinstance(run, dict) or run.get("schema") != SCHEMA:
        raise ReportError(f'{path} is not a moe-prefetch run (no "schema": "{SCHEMA}")')
    if not isinstance(run.get("version"), int) or run["version"] > VERSION:
        raise ReportError(
            f"{path} has run schema version {run.get('version')!r}; this moe-prefetch reads up to "
            f"{VERSION}: upgrade moe-prefetch"
        )
    missing = [k for k in REQUIRED if k not in run]
    if missing or run["measured_on"] not in MEASURED_ON:
        raise ReportError(f"{path} is incomplete or corrupt (missing {', '.join(missing) or 'a valid measured_on'})")
    return upgrade(run)


def upgrade(run: dict) -> dict:
    """A run of an older schema version in this version's terms, derived again from its records
    (tokens, stats, loads), so `report` shows old and new runs alike. Returns `run`, changed in place."""
    if run["version"] < 2:
        for layer in run["layers"]:
            layer.pop("lanes", None)  # v1: over the whole run, prefill and warm-up included
            layer.update(lanes.layer_decode(run["tokens"], layer["layer_idx"]))
        run["summary"] = summarize(run)
        run["upgraded_from"], run["version"] = run["version"], 2
    return run
