"""Where routed experts ran and the time on each lane: in run.json, the terminal summary and report.html."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest
import torch
from tiny_models import paced_mixtral

import moe_prefetch
from moe_prefetch.report import html as report_html
from moe_prefetch.report import text as report_text
from moe_prefetch.report.profiling import RunRecorder, build_run, model_record
from moe_prefetch.runtime import lanes

SVG = "{http://www.w3.org/2000/svg}"


class Ticks:
    """What `generate` calls with each new token (the streamer interface): the prompt comes first."""

    def __init__(self, recorder: RunRecorder):
        self.recorder, self.prompt = recorder, True

    def put(self, value) -> None:
        if self.prompt:
            self.prompt = False
        else:
            self.recorder.token()

    def end(self) -> None:
        pass


def recorded(on_miss: str, tokens: int = 16) -> dict:
    """A run.json record of a tiny Mixtral on CPU whose copies are paced to 80 MB/s."""
    model = paced_mixtral()
    runtime = moe_prefetch.attach(
        model, device="cpu", cache_slots=8, predictor="next-gate", link_bandwidth=80e6, on_miss=on_miss
    )
    try:
        recorder = RunRecorder(runtime)
        ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
        recorder.start()
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False, streamer=Ticks(recorder)
        )
        recorder.finish()
        return build_run(recorder, model=model_record(runtime, "tiny-mixtral"), config={"prompt_tokens": 8})
    finally:
        runtime.detach()


@pytest.fixture(scope="module", params=["wait", "auto"])
def run(request):
    return recorded(request.param)


def test_run_json_says_where_each_routed_expert_ran(run):
    tokens, layers, stats = run["tokens"], run["layers"], run["stats"]
    # Every routed expert of the trace is counted once, in one of the four places.
    routed = sum(len(r["experts"]) for r in run["trace"])
    assert sum(sum(t["ran"].values()) for t in tokens) == routed
    assert sum(t["ran"]["uploaded"] for t in tokens) == stats["prefetch_used"]
    assert sum(t["ran"]["host"] for t in tokens) == stats["host_experts"]
    for token in tokens:
        assert token["ran"] == {k: sum(p["ran"][k] for p in token["per_layer"]) for k in lanes.RAN}
        assert token["ran"]["device"] + token["ran"]["uploaded"] == token["hits"]
    for layer in layers:
        own = [p for t in tokens for p in t["per_layer"] if p["layer_idx"] == layer["layer_idx"]]
        assert layer["ran"] == {k: sum(p["ran"][k] for p in own) for k in lanes.RAN}
    assert stats["ran"] == {k: sum(t["ran"][k] for t in tokens) for k in lanes.RAN}
    if stats["on_miss"] == "wait":
        assert stats["ran"]["waited"] > 0 and stats["ran"]["host"] == 0
    else:  # on a CPU device auto runs decode misses on the host, then uploads them; a next use hits
        assert stats["ran"]["host"] > 0 and stats["ran"]["uploaded"] > 0


def test_lanes_per_token_on_cpu(run):
    tokens = run["tokens"]
    assert run["lane_basis"] == lanes.basis("cpu", None)
    host_by_step = {}
    for r in run["trace"]:
        host_by_step[r["step"]] = host_by_step.get(r["step"], 0.0) + r["host_s"]
    for token in tokens:
        lane = token["lanes"]
        # One thread runs both lanes on a CPU device: wall = device + host + stall, all exposed but the device.
        assert lane["device_s"] + lane["host_s"] + token["stall_seconds"] == pytest.approx(token["wall_s"])
        assert lane["exposed_s"] == pytest.approx(token["stall_seconds"] + lane["host_s"])
        assert lane["host_s"] == pytest.approx(host_by_step.get(token["step"], 0.0))  # the trace's own timing
        assert lane["device_s"] > 0
        per_layer = [p["lanes"] for p in token["per_layer"]]
        assert sum(p["link_s"] for p in per_layer) == pytest.approx(lane["link_s"])  # every copy is for a layer
        assert sum(p["device_s"] for p in per_layer) <= lane["device_s"]  # MoE calls, within the token
        assert 0 <= lane["link_s"] <= token["wall_s"] + 1e-9  # one loader thread: copies do not overlap
    # The tokens' windows tile the recording: together they hold the copies' seconds, at most once.
    link = sum(t["lanes"]["link_s"] for t in tokens)
    assert 0 < link <= sum(e["end"] - e["start"] for e in run["loads"]) + 1e-9
    # Each layer's row sums its tokens.
    for layer in run["layers"]:
        own = [p["lanes"] for t in tokens for p in t["per_layer"] if p["layer_idx"] == layer["layer_idx"]]
        for key in lanes.LANES:
            assert layer["lanes"][key] == pytest.approx(sum(p[key] for p in own))
    decode = tokens[1:]
    mean = run["summary"]["decode_lanes_per_token"]
    for key in lanes.LANES:
        assert mean[key] == pytest.approx(sum(t["lanes"][key] for t in decode) / len(decode))


def test_token_lanes_clip_copies_to_each_token_and_layer():
    # Two tokens: (0, 1] and (1, 3] on the trace clock. A copy for layer 0 runs 0.5-1.5: half in each.
    counters = dict.fromkeys(("hits", "misses", "prefetch_used", "host_experts", "bytes_loaded"), 0)
    tokens = [
        {"step": 0, "t": 1.0, "wall_s": 1.0, "stall_seconds": 0.25, "host_seconds": 0.125, **counters},
        {"step": 1, "t": 3.0, "wall_s": 2.0, "stall_seconds": 0.0, "host_seconds": 0.5, **counters},
    ]
    for token in tokens:
        token["per_layer"] = [
            {"layer_idx": 0, "stall_seconds": token["stall_seconds"], "host_seconds": token["host_seconds"], **counters}
        ]
    trace = [{"step": 1, "layer_idx": 0, "start": 1.5, "end": 2.5, "wait_s": 0.0, "host_s": 0.5}]
    loads = [
        {"tag": [0, 3], "start": 0.5, "end": 1.5, "bytes": 100},
        {"tag": [1, 2], "start": 2.0, "end": 2.25, "bytes": 100},
    ]
    lanes.token_lanes(tokens, trace, loads, measured_on="cpu", clock_start=0.0, link_bytes_per_s=None)
    assert tokens[0]["lanes"] == {"device_s": 0.625, "host_s": 0.125, "link_s": 0.5, "exposed_s": 0.375}
    assert tokens[1]["lanes"] == {"device_s": 1.5, "host_s": 0.5, "link_s": 0.75, "exposed_s": 0.5}
    assert tokens[1]["per_layer"][0]["lanes"] == {"device_s": 0.5, "host_s": 0.5, "link_s": 0.5, "exposed_s": 0.5}
    # On CUDA copies are not timed one by one: link = bytes over the link speed; no per-layer device time.
    tokens[1]["bytes_loaded"] = tokens[1]["per_layer"][0]["bytes_loaded"] = 4000
    lanes.token_lanes(tokens, trace, [], measured_on="cuda", clock_start=0.0, link_bytes_per_s=1000.0)
    assert tokens[1]["lanes"]["link_s"] == 4.0 and tokens[1]["per_layer"][0]["lanes"]["device_s"] is None
    assert "upper bound" in lanes.basis("cuda", 1e9)["exposed_s"]


def test_terminal_summary_prints_the_split_and_the_lanes(run):
    rows = dict(report_text.summary_rows(run))
    ran, mean = run["summary"]["decode_ran"], run["summary"]["decode_lanes_per_token"]
    assert rows["where routed experts ran (decode)"] == (
        f"device hit {ran['device']}, uploaded then hit {ran['uploaded']}, "
        f"waited for the link {ran['waited']}, host {ran['host']}"
    )
    assert f"host {1e3 * mean['host_s']:.2f} ms" in rows["lanes per decode token"]
    assert f"exposed {1e3 * mean['exposed_s']:.2f} ms" in rows["lanes per decode token"]
    split = report_text.tables(run)[-1]
    assert split.row_count == len(run["layers"])


def _svgs(page: str) -> list[ET.Element]:
    return [ET.fromstring(m) for m in re.findall(r"<svg .*?</svg>", page, flags=re.S)]


def test_report_html_draws_the_lanes_of_every_token(run):
    page = report_html.render_html(run)
    charts = [svg for svg in _svgs(page) if svg.find(f".//{SVG}g[@class='lanes']") is not None]
    assert len(charts) == 1
    groups = charts[0].findall(f".//{SVG}g[@class='lanes']")
    decode = run["tokens"][1:]
    assert [int(g.get("data-step")) for g in groups] == [t["step"] for t in decode]
    for group, token in zip(groups, decode):
        bars = group.findall(f"{SVG}rect")
        assert [b.get("data-lane") for b in bars] == list(lanes.LANES)
        assert [float(b.get("data-seconds")) for b in bars] == [token["lanes"][k] for k in lanes.LANES]
        assert {b.get("fill") for b in bars} == {color for _, _, color in report_html.LANE_SERIES}
    tallest = max((b for g in groups for b in g.findall(f"{SVG}rect")), key=lambda b: float(b.get("data-seconds")))
    assert float(tallest.get("height")) > 100  # drawn to scale: the largest bar nearly fills the plot
    # The per-layer split table: one row per layer with its counts from run.json.
    table = re.search(r'<table class="split">(.*?)</table>', page, flags=re.S).group(1)
    rows = re.findall(r"<tr>((?:<td>.*?</td>)+)</tr>", table)
    assert len(rows) == len(run["layers"])
    for row, layer in zip(rows, run["layers"]):
        cells = re.findall(r"<td>(.*?)</td>", row)
        assert [int(c) for c in cells[:5]] == [layer["layer_idx"], *(layer["ran"][k] for k in lanes.RAN)]
        assert cells[5:] == [f"{1e3 * layer['lanes'][k]:.2f}" for k in lanes.LANES]
