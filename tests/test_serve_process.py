"""`moe-prefetch serve` as users start it, in its own process: it says where it listens, a small
bounded load (scripts/serve_load.py at a smaller size) is answered or refused with 503 with
none lost and memory flat, and SIGTERM mid-stream ends the stream with a well-formed error and
the process with exit code 0."""

from __future__ import annotations

import http.client
import importlib.util
import json
import signal
from pathlib import Path
from urllib.parse import urlsplit

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "serve_load.py"
spec = importlib.util.spec_from_file_location("serve_load", SCRIPT)
serve_load = importlib.util.module_from_spec(spec)
spec.loader.exec_module(serve_load)

KEY = "k3y"
# Memory a server may gain between the first and the last round: allocator noise, not growth
# with requests (measured +1 to +3 MiB over 4 rounds of 20 requests, scripts/serve_load.py).
RSS_SLACK = 24 * 2**20


def _start():
    return serve_load.ServerProcess(["--model", "demo", "--device", "cpu", "--queue", "1", "--api-key", KEY])


@pytest.fixture(scope="module")
def server():
    process = _start()
    yield process
    process.stop()


@pytest.fixture
def own_server():
    """A server of the test's own, for a test that stops it: the shared one must outlive every
    test of the module in any order (the suite also runs in random order, `make test-random`)."""
    process = _start()
    yield process
    process.stop()


def test_start_line_says_where_and_that_it_is_local(server):
    line = next(line for line in server.lines if " at http://" in line)
    assert line.startswith("serving demo at http://127.0.0.1:") and "this machine only" in line


def test_small_load_is_answered_or_refused_none_lost_memory_flat(server):
    rss, rounds = [], []
    for _ in range(3):
        rounds.append(serve_load.load(server.url, requests=8, clients=3, max_tokens=8, key=KEY))
        rss.append(server.rss)
    for r in rounds:
        assert r["lost"] == [] and r["answered"] + r["refused"] == 8 and r["answered"] >= 1
    assert sum(r["refused"] for r in rounds) >= 1  # 3 clients on 1 running + 1 waiting: some are refused
    assert rss[-1] - rss[0] < RSS_SLACK, [f"{b / 2**20:.1f} MiB" for b in rss]


def test_sigterm_mid_stream_ends_the_stream_cleanly_and_exits_0(own_server):
    server = own_server
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    body = {"model": "demo", "prompt": "def add(a, b):", "max_tokens": 400, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}"})
    reply = conn.getresponse()
    assert reply.status == 200
    assert reply.readline().startswith(b"data: ")  # generating
    server.proc.send_signal(signal.SIGTERM)
    rest = reply.read().decode()  # to the chunked body's end: IncompleteRead if it were cut off
    events = [line[6:] for line in rest.splitlines() if line.startswith("data: ")]
    last = json.loads(events[-1])
    assert last["error"]["code"] == "shutting_down" and "[DONE]" not in events
    assert len(events) < 400
    assert server.proc.wait(120) == 0
    assert server.lines[-1] == "stopped"
