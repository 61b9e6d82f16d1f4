"""The report's rates are the records' rates: decode tokens/s, H2D bytes/s and the decode hit
rate in run.json's summary, recomputed from the token, loader and trace records beside them."""

import json
import re
from types import SimpleNamespace

import pytest
from test_cli import make_checkpoint, run_args
from typer.testing import CliRunner

from moe_prefetch.cli.main import app
from moe_prefetch.errors import ReportError
from moe_prefetch.report.profiling import (
    COUNTERS,
    REQUIRED,
    RunRecorder,
    _write_atomic,
    build_run,
    load_run,
    model_record,
    summarize,
    upgrade,
    write_html,
    write_report,
)
from moe_prefetch.runtime import lanes


@pytest.fixture(scope="module", params=["wait", "host"])
def run(request, tmp_path_factory):
    """A CLI run of a tiny Mixtral with 5 slots: misses wait for their copies, or run on the host.
    The host case takes a desktop host profile's lanes, where a use on the device saves host time,
    so experts are still uploaded and there are copies to rate (on a CPU device's own lanes,
    on_miss="host" copies nothing: no copy could pay)."""
    ckpt = make_checkpoint(tmp_path_factory.mktemp("model"))
    out = tmp_path_factory.mktemp("report")
    args = run_args(ckpt, "--cache-slots", "5", "--predictor", "next-gate", "--on-miss", request.param)
    if request.param == "host":
        args = [*args, "--host", "ddr4-3200-2ch"]
    result = CliRunner().invoke(app, [*args, "--report", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads((out / "run.json").read_text())


@pytest.mark.e2e
def test_decode_tokens_per_second_is_tokens_after_the_first_over_their_wall_time(run):
    decode = run["tokens"][1:]
    assert len(decode) > 2
    wall = sum(token["wall_s"] for token in decode)  # each token's own time, not the clock `t`
    assert run["summary"]["decode_tokens_per_s"] == pytest.approx(len(decode) / wall, rel=1e-9)
    assert run["summary"]["decode_wall_s"] == pytest.approx(wall, rel=1e-9)


@pytest.mark.e2e
def test_h2d_rate_on_cpu_is_bytes_copied_over_the_loader_busy_time(run):
    """With timed copies, bytes over the time the loader was busy; with none (every miss served on
    the host lane), the bytes loaded over the run's wall time."""
    loads = [e for e in run["loads"] if "start" in e and "end" in e]
    summary = run["summary"]
    assert run["measured_on"] == "cpu"
    if run["stats"]["on_miss"] == "wait":
        assert loads, "every miss waits for a copy"
    if not loads:
        assert summary["h2d_basis"] == "bytes over wall time"
        expected = run["stats"]["bytes_loaded"] / run["tokens"][-1]["t"]
        assert summary["h2d_bytes_per_s"] == pytest.approx(expected, rel=1e-9)
        return
    copied = sum(e["bytes"] for e in loads)
    assert 0 < copied <= run["stats"]["bytes_loaded"]  # a copy still in flight at the end has no `end`
    busy = sum(e["end"] - e["start"] for e in loads)
    assert summary["h2d_basis"] == "bytes over loader busy time"
    assert summary["h2d_bytes_per_s"] == pytest.approx(copied / busy, rel=1e-9)


@pytest.mark.e2e
def test_decode_hit_rate_leaves_out_the_prefill(run):
    """Device hits over every expert routed in steps 1.. (wherever it ran), from the trace; the
    prefill (step 0) misses nearly everything and would pull the rate down."""
    decode = [r for r in run["trace"] if r["step"] >= 1]
    hits = sum(r["hits"] for r in decode)
    routed = sum(r["hits"] + r["misses"] + len(r["host"]) for r in decode)
    assert routed > 0
    assert run["summary"]["decode_hit_rate"] == pytest.approx(hits / routed, rel=1e-9)
    prefill = [r for r in run["trace"] if r["step"] == 0]
    assert sum(r["misses"] + len(r["host"]) for r in prefill) > 0, "the prefill routes experts that are not resident"


# -- the recorder and the summary on records written by hand ----------------------------------------
class FakeRuntime:
    """What RunRecorder reads: counters per layer that the test advances, a loader's copies,
    and a slot table."""

    def __init__(self):
        self.layers = [SimpleNamespace(layer_idx=0), SimpleNamespace(layer_idx=2)]
        self.loader = SimpleNamespace(events=[{"tag": (0, 1), "bytes": 8}])
        self.cache = SimpleNamespace(key_of=[None, None, None, None], num_slots=4)
        self.t0 = 100.0
        self.counts = {0: dict.fromkeys(COUNTERS, 0), 2: dict.fromkeys(COUNTERS, 0)}
        self.calls = []

    def record(self, on):
        self.calls.append(("record", on))

    def reset_stats(self):
        self.calls.append(("reset_stats",))

    def stats(self, flush=False):
        self.calls.append(("stats", flush))
        return {"per_layer": [{"layer_idx": l, **dict(c)} for l, c in self.counts.items()]}


def test_the_recorder_counts_each_tokens_own_share_and_the_slots_each_layer_holds():
    runtime = FakeRuntime()
    recorder = RunRecorder(runtime)
    assert recorder.loads() == [{"tag": [0, 1], "bytes": 8}]  # before start: every copy
    assert (recorder.tokens, recorder.occupancy, recorder.stats, recorder.interrupted) == ([], [], {}, False)
    recorder.start()
    assert runtime.calls == [("record", True), ("reset_stats",)]
    assert recorder.clock_start == pytest.approx(recorder.t_start - 100.0)
    runtime.loader.events += [{"tag": (2, 3), "bytes": 16}, {"tag": None, "bytes": 4}, {"bytes": 2}]
    assert recorder.loads() == [{"tag": [2, 3], "bytes": 16}, {"tag": None, "bytes": 4}, {"bytes": 2, "tag": None}]
    runtime.counts[0].update(hits=2, misses=3, host_seconds=0.5)
    runtime.counts[2].update(hits=1, bytes_loaded=100)
    runtime.cache.key_of = [(0, 1), (2, 5), (0, 4), None]
    first = recorder.token()
    assert runtime.calls[-1] == ("stats", True)
    assert (first["step"], first["hits"], first["misses"], first["bytes_loaded"], first["host_seconds"]) == (
        0,
        3,
        3,
        100,
        0.5,
    )
    assert first["per_layer"][0] == {"layer_idx": 0, **dict.fromkeys(COUNTERS, 0), "hits": 2, "misses": 3} | {
        "host_seconds": 0.5
    }
    assert 0 <= first["wall_s"] <= first["t"] < 60  # seconds since start(), not a clock reading
    runtime.counts[0]["hits"] += 4  # the second token's own
    second = recorder.token()
    assert (second["step"], second["hits"], second["misses"]) == (1, 4, 0)
    assert second["t"] >= first["t"] and second["wall_s"] == pytest.approx(second["t"] - first["t"])
    assert recorder.occupancy == [[2, 1, 1], [2, 1, 1]]  # slots of layer 0, of layer 2, then empty
    assert recorder.stats["per_layer"][0]["hits"] == 6
    recorder.finish(interrupted=True)
    assert recorder.interrupted and recorder.t_end >= recorder.t_start


def _token(t, stall=0.0, hits=0, misses=0, host=0, host_s=0.0, used=0, **extra):
    return dict(t=t, stall_seconds=stall, hits=hits, misses=misses, host_experts=host, host_seconds=host_s, **extra) | (
        {"prefetch_used": used} if used else {}
    )


def _run(measured_on="cpu", loads=(), tokens=None, **stats):
    tokens = tokens or [
        _token(1.0, stall=0.5, hits=1, misses=9, host=2, host_s=0.25),  # prefill
        _token(1.5, stall=0.1, hits=6, misses=1, host=1, host_s=0.125, used=2),
        _token(2.5, stall=0.2, hits=5, misses=0, host=3, host_s=0.5),
    ]
    return {
        "measured_on": measured_on,
        "tokens": tokens,
        "loads": list(loads),
        "memory": dict(device_bytes=10, rss_bytes=20, device_pool_bytes=4, non_expert_bytes=6, host_store_bytes=30),
        "stats": {"hits": 12, "misses": 10, "host_experts": 6, "host_seconds": 0.875, "prefetch_used": 2}
        | {"prefetch_issued": 8, "bytes_loaded": 3000, "on_miss": "host", "experts_dtype": "bf16", "expert_bytes": 300}
        | stats,
        "interrupted": 1,
    }


def test_the_summary_is_counted_from_the_records():
    s = summarize(_run(loads=[{"start": 0.0, "end": 0.5, "bytes": 100}, {"start": 1.0, "end": 1.5, "bytes": 300}]))
    assert (s["tokens_generated"], s["time_to_first_token_s"]) == (3, 1.0)
    assert (s["decode_wall_s"], s["decode_tokens_per_s"]) == (1.5, pytest.approx(2 / 1.5))
    assert s["hit_rate"] == pytest.approx(12 / (12 + 10 + 6))
    assert s["decode_hit_rate"] == pytest.approx(11 / (11 + 1 + 4))
    assert (s["host_experts"], s["host_seconds"]) == (6, 0.875)
    assert (s["prefill_host_experts"], s["decode_host_experts"]) == (2, 4)
    assert (s["prefill_host_seconds"], s["decode_host_seconds"]) == (0.25, 0.625)
    assert s["prefill_ran"] == {"device": 1, "uploaded": 0, "waited": 9, "host": 2}
    assert s["decode_ran"] == {"device": 9, "uploaded": 2, "waited": 1, "host": 4}
    assert s["decode_lanes_per_token"] is None and s["on_miss"] == "host"
    assert s["prefetch_precision"] == pytest.approx(2 / 8)
    assert s["prefetch_recall"] == pytest.approx(2 / (2 + 10 + 6))
    assert s["decode_stall_s"] == pytest.approx(0.3) and s["stall_share"] == pytest.approx(0.3 / 1.5)
    assert (s["bytes_loaded"], s["experts_dtype"], s["stored_expert_bytes"]) == (3000, "bf16", 300)
    assert (s["h2d_bytes_per_s"], s["h2d_basis"]) == (400 / 1.0, "bytes over loader busy time")
    assert (s["device_bytes"], s["rss_bytes"], s["device_peak_bytes"]) == (10, 20, None)
    assert (s["device_pool_bytes"], s["non_expert_bytes"], s["host_store_bytes"]) == (4, 6, 30)
    assert s["interrupted"] is True


def test_the_summary_of_a_run_without_timed_copies_or_decode():
    s = summarize(_run(measured_on="cuda", loads=[{"start": 0.0, "end": 0.5, "bytes": 100}]))
    assert (s["h2d_bytes_per_s"], s["h2d_basis"]) == (3000 / 2.5, "bytes over wall time")  # CUDA: not timed here
    run = _run(loads=[{"start": 0.0, "bytes": 100}], tokens=[_token(2.0, hits=1)])  # a copy still in flight
    run["stats"] |= {"prefetch_issued": 0}
    del run["stats"]["on_miss"]
    s = summarize(run)
    assert (s["h2d_bytes_per_s"], s["h2d_basis"]) == (3000 / 2.0, "bytes over wall time")
    assert (s["decode_wall_s"], s["decode_tokens_per_s"], s["stall_share"], s["decode_hit_rate"]) == (
        0.0,
        None,
        None,
        None,
    )
    assert (s["prefetch_precision"], s["on_miss"], s["interrupted"]) == (None, "wait", True)
    two = _run(tokens=[_token(1.0), _token(1.25, hits=2)])  # one decode token: its own wall time
    assert summarize(two)["decode_wall_s"] == 0.25
    old = _run(tokens=[_token(1.0), _token(1.5, hits=2)])  # records from before the host lane was counted
    for token in old["tokens"]:
        del token["host_experts"], token["host_seconds"]
    del old["stats"]["host_experts"], old["stats"]["host_seconds"], old["memory"]
    s = summarize(old)
    assert (s["decode_hit_rate"], s["hit_rate"], s["host_experts"], s["decode_host_seconds"]) == (1.0, 12 / 22, 0, 0.0)
    assert s["device_bytes"] is None and s["host_seconds"] == 0.0
    assert (s["prefill_host_experts"], s["prefill_host_seconds"], s["decode_host_experts"]) == (0, 0.0, 0)
    empty = _run(tokens=[{}])
    empty["tokens"] = []
    s = summarize(empty)
    assert (s["tokens_generated"], s["time_to_first_token_s"], s["h2d_bytes_per_s"]) == (0, None, None)


def test_reports_are_written_whole_and_read_back_with_checks(tmp_path):
    run = {"schema": "moe-prefetch/run", "version": 2, **dict.fromkeys(REQUIRED, 0), "measured_on": "cpu"}
    path = tmp_path / "run.json"
    _write_atomic(path, json.dumps(run))
    assert load_run(tmp_path) == run == load_run(path)  # a folder, or the file
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temporary file left
    for broken, message in [
        ({**run, "schema": "other"}, 'not a moe-prefetch run \\(no "schema": "moe-prefetch/run"\\)'),
        ({**run, "version": 3}, "run schema version 3; this moe-prefetch reads up to 2: upgrade moe-prefetch"),
        ({**run, "version": "2"}, "run schema version '2'"),
        ({k: v for k, v in run.items() if k not in ("trace", "loads")}, "corrupt \\(missing loads, trace\\)$"),
        ({**run, "measured_on": "gpu"}, "missing a valid measured_on"),
        ([run], "not a moe-prefetch run"),
    ]:
        path.write_text(json.dumps(broken))
        with pytest.raises(ReportError, match=message):
            load_run(path)
    path.write_text("{")
    with pytest.raises(ReportError, match="is not a readable JSON file"):
        load_run(path)
    with pytest.raises(ReportError, match="does not exist; pass the run.json written by `moe-prefetch run --report`"):
        load_run(tmp_path / "none.json")
    with pytest.raises(ReportError, match="cannot write .*: No such file or directory; choose a writable location"):
        _write_atomic(tmp_path / "no" / "run.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_a_version_1_run_is_read_in_version_2_terms():
    layers = [{"layer_idx": 0, "lanes": {"device_s": 1.0}}, {"layer_idx": 1}]  # a layer without lanes too
    run = _run() | {"version": 1, "layers": layers, "summary": {}}
    run["tokens"][1]["per_layer"] = [{"layer_idx": 0, "hits": 3, "misses": 1}]
    upgraded = upgrade(run)
    assert upgraded is run and (run["version"], run["upgraded_from"]) == (2, 1)
    assert "lanes" not in run["layers"][0]
    assert run["layers"][0]["decode_ran"] == {"device": 3, "uploaded": 0, "waited": 1, "host": 0}
    assert run["summary"] == summarize(run)
    current = _run() | {"version": 2, "summary": {"kept": 1}}
    assert upgrade(current)["summary"] == {"kept": 1} and "upgraded_from" not in current


class _Tick:
    """A streamer that is the recorder's tick, as the CLI's: the first call carries the prompt."""

    def __init__(self, recorder):
        self.recorder, self.prompt = recorder, True

    def put(self, value):
        if self.prompt:
            self.prompt = False
        else:
            self.recorder.token()

    def end(self):
        pass


def _record(device: str):
    """A tiny Mixtral with a slot for each of its 16 experts (20 asked), tokens recorded as
    `moe-prefetch run` records them, and its run (a fraction of a second on CPU)."""
    import torch
    from tiny_models import make_model, prompt

    import moe_prefetch

    model = make_model("mixtral")
    runtime = moe_prefetch.attach(model, device=device, cache_slots=20, predictor="next-gate")  # 16 experts
    recorder = RunRecorder(runtime)
    recorder.start()
    ids = prompt(1, 2, seed=5).to(runtime.device)  # short: the pool never fills, so empty slots show in "final"
    model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, streamer=_Tick(recorder)
    )
    recorder.finish()
    run = build_run(recorder, model=model_record(runtime, "tiny/mixtral"), config={"cache_slots": 20}, text="hi")
    return runtime, recorder, run


@pytest.fixture
def recorded():
    """`_record` on the CPU (the CLI's run above takes seconds). One per test: mutmut ties a
    function to the tests that call it, fixtures included."""
    runtime, recorder, run = _record("cpu")
    yield runtime, recorder, run
    runtime.detach()


@pytest.mark.gpu
def test_a_cuda_run_says_so_and_records_the_device_peak():
    runtime, _, run = _record("cuda")
    try:
        assert run["measured_on"] == "cuda" and run["lane_basis"]["summary"].startswith("stall from CUDA events")
        assert run["memory"]["device_peak_bytes"] > 0 and run["summary"]["device_peak_bytes"] > 0
    finally:
        runtime.detach()


def test_the_run_records_the_model_and_its_memory(recorded):
    runtime, _, run = recorded
    assert run["model"] == {
        "path": "tiny/mixtral",
        "model_type": "mixtral",
        "dtype": "float32",
        "moe_layers": 2,
        "layer_ids": [0, 1],
        "experts_per_layer": 8,
        "top_k": 2,
        "expert_bytes": runtime.spec.nbytes,
        "experts_dtype": runtime.codec.name,
        "experts_format": runtime.codec.describe(),
        "stored_expert_bytes": runtime.codec.nbytes,
        "num_layers": 2,
    }
    memory = run["memory"]
    non_expert = sum(p.numel() * p.element_size() for p in runtime.model.parameters())
    assert (memory["device_pool_bytes"], memory["non_expert_bytes"]) == (16 * runtime.codec.nbytes, non_expert)
    assert memory["device_bytes"] == 16 * runtime.codec.nbytes + non_expert and memory["device_peak_bytes"] is None
    assert memory["host_store_bytes"] == runtime.store.nbytes and memory["rss_bytes"] > 2**20


def test_the_run_keeps_every_record_a_figure_is_drawn_from(recorded):
    runtime, recorder, run = recorded
    assert (run["schema"], run["version"], run["measured_on"], run["interrupted"]) == (
        "moe-prefetch/run",
        2,
        "cpu",
        False,
    )
    assert (run["config"], run["text"], run["stall_timing"]) == (
        {"cache_slots": 20},
        "hi",
        runtime.stats()["stall_timing"],
    )
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", run["created"])
    assert run["lane_basis"]["summary"].startswith("cpu clock")
    assert len(run["tokens"]) == 4 and run["tokens"] is recorder.tokens
    assert run["loads"] == recorder.loads() and run["trace"] == [dict(r) for r in runtime.trace]
    assert run["step_starts"] == list(runtime.step_starts) and run["predictions"] == [
        dict(p) for p in runtime.predictions
    ]
    assert run["predictions"] and "trace" not in run["replay"] and "predictions" not in run["replay"]
    assert run["replay"]["cache_slots"] == 16 and "step_starts" not in run["replay"]
    assert None in run["occupancy"]["final"]  # empty slots stay empty in the record
    assert run["occupancy"] == {
        "slots": 16,
        "layer_ids": [0, 1],
        "per_token": recorder.occupancy,
        "final": [list(k) if k is not None else None for k in runtime.cache.key_of],
    }
    stats = runtime.stats()
    for layer, row in zip(run["layers"], stats["per_layer"]):
        assert (layer["layer_idx"], layer["num_experts"], layer["top_k"]) == (row["layer_idx"], 8, 2)
        assert all(layer[k] == row[k] for k in COUNTERS)
        routed = row["hits"] + row["misses"] + row["host_experts"]
        assert layer["hit_rate"] == pytest.approx(row["hits"] / routed)
        assert layer["ran"]["waited"] == row["misses"]
        assert layer["decode_ran"] == lanes.layer_decode(recorder.tokens, row["layer_idx"])["decode_ran"]
    decode_ran = [sum(layer["decode_ran"][k] for layer in run["layers"]) for k in ("device", "waited")]
    assert decode_ran == [run["summary"]["decode_ran"][k] for k in ("device", "waited")] and sum(decode_ran) > 0
    assert run["summary"] == summarize(run)


def test_a_report_folder_gets_run_json_and_the_page(recorded, tmp_path):
    _, _, run = recorded
    folder = tmp_path / "runs" / "one"  # parents made
    json_path, html_path = write_report(folder, run)
    assert (json_path, html_path) == (folder / "run.json", folder / "report.html")
    assert json_path.read_text().startswith('{\n "schema": "moe-prefetch/run"')  # indent 1
    assert load_run(folder)["tokens"] == json.loads(json.dumps(run["tokens"]))
    page = html_path.read_text()
    assert page.lstrip().lower().startswith("<!doctype html") and "</html>" in page
    assert write_report(folder, run) == (json_path, html_path)  # an existing folder is fine
    assert write_html(tmp_path / "page.html", run) == tmp_path / "page.html"
    assert (tmp_path / "page.html").read_text() == page
    (tmp_path / "file").write_text("")
    with pytest.raises(ReportError, match="cannot create report folder .*file/sub: Not a directory$"):
        write_report(tmp_path / "file" / "sub", run)
