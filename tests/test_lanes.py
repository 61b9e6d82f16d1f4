"""Where routed experts ran and the time on each lane: in run.json, the terminal summary and report.html."""

from __future__ import annotations

import copy
import json
import re
import time
import xml.etree.ElementTree as ET

import pytest
import torch
from tiny_models import paced_mixtral

import moe_prefetch
from moe_prefetch.report import html as report_html
from moe_prefetch.report import profiling
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


def recorded(on_miss: str, tokens: int = 16, one_off_s: float = 0.0) -> dict:
    """A run.json record of a tiny Mixtral on CPU whose copies are paced to 80 MB/s. `one_off_s`:
    the expert kernel's first call (step 0, the first MoE layer) takes that much longer, as a
    first forward's one-off costs do (kernels' first calls, thread pools waking)."""
    model = paced_mixtral()
    runtime = moe_prefetch.attach(
        model, device="cpu", cache_slots=8, predictor="next-gate", link_bandwidth=80e6, on_miss=on_miss
    )
    try:
        if one_off_s:
            kernel, calls = runtime.kernel, []

            def first_call_is_slow(*args):
                if not calls:
                    time.sleep(one_off_s)
                calls.append(1)
                return kernel(*args)

            runtime.kernel = first_call_is_slow
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
    # Each layer's row sums its decode tokens (step 0, the prefill, is left out), and counts where
    # its routed experts ran in them.
    decode = tokens[1:]
    for layer in run["layers"]:
        own = [p for t in decode for p in t["per_layer"] if p["layer_idx"] == layer["layer_idx"]]
        assert "lanes" not in layer and layer["decode_ran"] == {k: sum(p["ran"][k] for p in own) for k in lanes.RAN}
        for key in lanes.LANES:
            assert layer["decode_lanes"][key] == pytest.approx(sum(p["lanes"][key] for p in own))
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
        assert [int(c) for c in cells[:5]] == [layer["layer_idx"], *(layer["decode_ran"][k] for k in lanes.RAN)]
        assert cells[5:] == [f"{1e3 * layer['decode_lanes'][k]:.2f}" for k in lanes.LANES]


def test_summary_counts_the_host_lane_in_prefill_and_decode_apart(run):
    """Issue 22, item 11: the host lane also serves prefill experts (placement.py), so the summary's
    host-lane count and its "where routed experts ran" rows are split the same way and add up."""
    s, tokens, stats = run["summary"], run["tokens"], run["stats"]
    assert s["prefill_host_experts"] == tokens[0]["host_experts"] == s["prefill_ran"]["host"]
    assert s["decode_host_experts"] == sum(t["host_experts"] for t in tokens[1:]) == s["decode_ran"]["host"]
    assert s["prefill_host_experts"] + s["decode_host_experts"] == s["host_experts"] == stats["host_experts"]
    assert s["prefill_host_seconds"] + s["decode_host_seconds"] == pytest.approx(stats["host_seconds"])
    assert {k: s["prefill_ran"][k] + s["decode_ran"][k] for k in lanes.RAN} == stats["ran"]
    rows = dict(report_text.summary_rows(run))
    assert rows["misses on host (prefill / decode)"].startswith(
        f"{s['prefill_host_experts']} / {s['decode_host_experts']} experts, "
    )
    assert rows["where routed experts ran (prefill)"] == report_text.ran_text(s["prefill_ran"])
    assert rows["where routed experts ran (decode)"].endswith(f"host {s['decode_host_experts']}")
    page = report_html.render_html(run)
    assert "where routed experts ran (prefill)" in page and "misses on host (prefill / decode)" in page


def test_summary_line_in_a_prefill_only_host_run_says_so():
    """The demo's case: host-lane experts all in prefill, none in decode. The old summary said
    "11 experts" beside "host 0" in decode; the split row says "11 / 0"."""
    run = recorded("auto", tokens=3)
    for token in run["tokens"][1:]:  # make it prefill-only whatever the placement chose in decode
        token["host_experts"], token["host_seconds"] = 0, 0.0
    run["tokens"][0]["host_experts"], run["tokens"][0]["host_seconds"] = 11, 0.01
    run["stats"]["host_experts"], run["stats"]["host_seconds"] = 11, 0.01
    run["summary"] = profiling.summarize(run)
    rows = dict(report_text.summary_rows(run))
    assert rows["misses on host (prefill / decode)"] == "11 / 0 experts, 0.010 / 0.000 s (on_miss auto)"
    assert rows["where routed experts ran (prefill)"].endswith("host 11")
    assert rows["where routed experts ran (decode)"].endswith("host 0")


def test_a_one_off_cost_in_the_first_step_stays_out_of_the_per_layer_lanes():
    """Issue 22, item 16: the per-layer lane table once showed the first forward's warm-up in the
    first MoE layer (223 ms against 20-50 ms). Each layer's lanes are over decode tokens now."""
    slow = 0.3
    run = recorded("wait", tokens=4, one_off_s=slow)
    first = run["layers"][0]
    prefill_part = next(p for p in run["tokens"][0]["per_layer"] if p["layer_idx"] == first["layer_idx"])
    assert prefill_part["lanes"]["device_s"] >= slow  # the cost happened, in step 0
    assert first["decode_lanes"]["device_s"] < slow / 3
    split = report_text.tables(run)[-1]
    device = [float(c) for c in split.columns[5]._cells]
    assert device[0] < 1e3 * slow / 3, "the terminal's per-layer table shows decode time"
    table = re.search(r'<table class="split">(.*?)</table>', report_html.render_html(run), flags=re.S).group(1)
    cells = re.findall(r"<td>(.*?)</td>", re.findall(r"<tr>((?:<td>.*?</td>)+)</tr>", table)[0])
    assert float(cells[5]) < 1e3 * slow / 3, "and so does the page's"


def test_prefetch_recall_is_over_the_experts_not_already_resident(run):
    """Issue 22, item 12: a run's prefetch recall and a predictor's recall@k are different measures,
    named apart. Prefetch recall: of the routed experts that were not resident (uploaded, waited,
    host), the share a prefetch or upload had staged."""
    ran, s = run["stats"]["ran"], run["summary"]
    assert ran["uploaded"] > 0
    assert s["prefetch_recall"] == pytest.approx(ran["uploaded"] / (ran["uploaded"] + ran["waited"] + ran["host"]))
    assert s["prefetch_recall"] == lanes.prefetch_recall(run["stats"])
    rows = dict(report_text.summary_rows(run))
    expected = f"{100 * s['prefetch_recall']:.1f}% of routed experts not already resident had been staged"
    assert rows["prefetch recall"] == expected
    page = report_html.render_html(run)
    assert "Prefetch recall = routed experts a prefetch or upload had staged" in page and "recall@k" in page
    assert lanes.prefetch_recall({"hits": 3, "prefetch_used": 0, "misses": 0}) is None  # all resident: no ratio


def test_eval_predictor_names_its_measure_recall_at_k():
    from moe_prefetch.predict.evaluate import format_table

    row = {"recall": 0.9, "precision_at_k_plus_margin": 0.5, "recall_at_k_plus_margin": 0.95}
    result = {"tokens": 10, "margin": 2, "predictors": {"m2r2": {"by_distance": {1: row}, "by_pair": []}}}
    text = format_table(result)
    assert "predictor recall@k" in text and "prefetch recall" not in text


def test_report_reads_a_version_1_run_in_this_version_s_terms(run, tmp_path):
    """run.json is versioned: a v1 run (prefetch recall over every demand access, whole-run lanes
    per layer, no prefill/decode split) is derived again from its records when read."""
    old = copy.deepcopy(run)
    old["version"] = 1
    stats = old["stats"]
    old["summary"]["prefetch_recall"] = stats["prefetch_used"] / (stats["hits"] + stats["misses"])
    for key in ("prefill_ran", "prefill_host_experts", "decode_host_experts"):
        del old["summary"][key]
    for layer in old["layers"]:
        layer["lanes"] = lanes.layer_totals(old["tokens"], layer["layer_idx"])
        del layer["decode_ran"], layer["decode_lanes"]
    (tmp_path / "run.json").write_text(json.dumps(old))
    again = profiling.load_run(tmp_path)
    assert again["version"] == profiling.VERSION and again["upgraded_from"] == 1
    assert again["summary"] == run["summary"]
    for layer, new in zip(again["layers"], run["layers"]):
        assert "lanes" not in layer and layer["decode_ran"] == new["decode_ran"]
        assert layer["decode_lanes"] == pytest.approx(new["decode_lanes"])
    assert report_text.tables(again)
