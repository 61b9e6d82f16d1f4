"""The parts of `serve` without a model or a socket: streamed text and stop sequences, the
bounded line of requests, the request checks and the Prometheus text."""

from __future__ import annotations

import re
import threading
import time

import pytest

from moe_prefetch.serve import schema
from moe_prefetch.serve.metrics import Metrics
from moe_prefetch.serve.queue import Closed, Gone, QueueFull, Turns
from moe_prefetch.serve.text import TextStream


# -- text ----------------------------------------------------------------------------------------
def utf8(ids: list[int]) -> str:
    """A byte-level 'tokenizer': each id is one byte, decoded as a byte-level BPE does."""
    return bytes(ids).decode("utf-8", errors="replace")


def stream(text: str, stop=()) -> tuple[list[str], TextStream]:
    s = TextStream(utf8, tuple(stop))
    pieces = [s.add(b) for b in text.encode()]
    pieces.append(s.finish())
    return pieces, s


@pytest.mark.parametrize("text", ["def f(x):\n    return x", "naïve café — 日本語 ✓", "🙂🙂 x"])
def test_pieces_add_up_to_the_text_and_never_split_a_character(text):
    pieces, _ = stream(text)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)  # a multi-byte character waits for its last byte
    assert len(pieces) == len(text.encode()) + 1  # one piece per token (possibly empty), then the tail


@pytest.mark.parametrize(
    "text,stop,sent",
    [
        ("hello world\nmore", ["\n"], "hello world"),
        ("abcSTOPdef", ["STOP"], "abc"),
        ("abcSTdef", ["STOP"], "abcSTdef"),  # a start of the stop sequence that never completes is sent
        ("xx ends with ST", ["STOP"], "xx ends with ST"),  # held back, then released at the end
        ("a</s>b<|end|>c", ["<|end|>", "</s>"], "a"),  # the earliest of several
        ("é|é", ["|é"], "é"),
    ],
)
def test_stop_sequences_cut_before_the_stop_and_no_part_of_it_is_sent(text, stop, sent):
    pieces, s = stream(text, stop)
    assert "".join(pieces) == sent
    assert s.stopped == (sent != text)
    sofar = ""
    for piece in pieces:  # at no point has a client seen text past what it finally gets
        sofar += piece
        assert sent.startswith(sofar)


# -- the line of requests ------------------------------------------------------------------------
def hold(turns: Turns, entered: threading.Event, release: threading.Event, log: list, name: str, **kw):
    def run():
        try:
            with turns.turn(**kw):
                log.append(name)
                entered.set()
                release.wait(10)
        except (QueueFull, Closed, Gone) as err:
            log.append((name, type(err).__name__))
            entered.set()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_one_turn_at_a_time_in_order_and_past_the_bound_refused():
    turns, log, release = Turns(max_waiting=2), [], threading.Event()
    first = threading.Event()
    threads = [hold(turns, first, release, log, "a")]
    first.wait(5)
    assert turns.busy and log == ["a"]
    for waiting, name in enumerate(("b", "c"), start=1):
        threads.append(hold(turns, threading.Event(), release, log, name))
        wait_until(lambda n=waiting: turns.waiting == n)
    with pytest.raises(QueueFull) as full:
        with turns.turn():
            pass
    assert full.value.waiting == 2 and full.value.retry_after_s >= 1
    release.set()
    for t in threads:
        t.join(10)
    assert log == ["a", "b", "c"] and not turns.busy and turns.waiting == 0


def test_zero_waiting_refuses_while_busy_and_a_free_model_is_taken_at_once():
    turns = Turns(max_waiting=0)
    with turns.turn():
        with pytest.raises(QueueFull):
            with turns.turn():
                pass
    with turns.turn():  # free again
        assert turns.busy


def test_waiting_requests_leave_when_their_client_goes_or_the_server_closes():
    turns, log, release = Turns(max_waiting=3), [], threading.Event()
    entered = threading.Event()
    a = hold(turns, entered, release, log, "a")
    entered.wait(5)
    gone = threading.Event()
    b = hold(turns, threading.Event(), release, log, "b", gone=gone.is_set)
    c = hold(turns, threading.Event(), release, log, "c")
    wait_until(lambda: turns.waiting == 2)
    gone.set()
    b.join(5)
    assert ("b", "Gone") in log and turns.waiting == 1
    turns.close()
    c.join(5)
    assert ("c", "Closed") in log
    with pytest.raises(Closed):
        with turns.turn():
            pass
    release.set()
    a.join(5)
    assert log[0] == "a"  # the turn being held ran on


# -- request checks ------------------------------------------------------------------------------
def test_requests_are_read_with_openai_defaults():
    req = schema.parse_completion({"model": "m", "prompt": ["just one"], "stop": "\n"})
    assert req.prompt == "just one" and req.sampling.stop == ("\n",)
    assert (req.sampling.max_tokens, req.sampling.temperature, req.sampling.top_p) == (16, 1.0, 1.0)
    chat = schema.parse_chat(
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "max_completion_tokens": 5,
            "logprobs": False,
            "n": 1,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    assert chat.messages == [{"role": "user", "content": "ab"}] and chat.sampling.max_tokens == 5
    assert chat.sampling.max_tokens == 5 and chat.sampling.include_usage and chat.sampling.stream
    assert schema.parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}]}).sampling.max_tokens is None
    assert schema.parse_completion({"model": "m", "prompt": [[1, 2, 3]]}).prompt == [1, 2, 3]


@pytest.mark.parametrize(
    "body,param",
    [
        ({"model": "m", "prompt": ["a", "b"]}, "prompt"),  # batch 1
        ({"model": "m", "prompt": ""}, "prompt"),
        ({"model": "m", "prompt": "a", "max_tokens": True}, "max_tokens"),
        ({"model": "m", "prompt": "a", "seed": 1.5}, "seed"),
        ({"model": "m", "prompt": "a", "echo": True}, "echo"),
        ({"model": "m", "prompt": "a", "logprobs": 3}, "logprobs"),
        ({"model": "m", "prompt": "a", "stop": [""]}, "stop"),
        ({"model": "m", "prompt": "a", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"model": "m", "prompt": "a", "presence_penalty": 0.5}, "presence_penalty"),
    ],
)
def test_completion_refusals_name_the_parameter(body, param):
    with pytest.raises(schema.ApiError) as err:
        schema.parse_completion(body)
    assert err.value.status == 400 and err.value.param == param and param in err.value.message


@pytest.mark.parametrize(
    "messages,param",
    [
        ("hi", "messages"),
        ([{"content": "x"}], "messages[0].role"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content"),
    ],
)
def test_chat_refusals_name_the_message(messages, param):
    with pytest.raises(schema.ApiError) as err:
        schema.parse_chat({"model": "m", "messages": messages})
    assert err.value.param == param and err.value.body()["error"]["param"] == param


def test_chat_tools_are_refused_but_their_neutral_values_pass():
    base = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    schema.parse_chat({**base, "tools": [], "response_format": {"type": "text"}, "logit_bias": {}})
    with pytest.raises(schema.ApiError, match="tools"):
        schema.parse_chat({**base, "tools": [{"type": "function", "function": {"name": "f"}}]})


# -- metrics -------------------------------------------------------------------------------------
# a label value is quoted, with backslash escapes (\\, \", \n)
SAMPLE = re.compile(r'^moe_prefetch_[a-z_]+(\{([a-z_]+="(\\.|[^"\\])*",?)+\})? -?[0-9.e+-]+$')


def test_metrics_are_prometheus_text_with_help_and_type_for_each():
    m = Metrics({"model": 'a "quoted"\nname'})
    m.request("/v1/completions", 200)
    m.request("/v1/completions", 503)
    for _ in range(5):
        m.token()
    m.generation(prompt_tokens=7, tokens=5, seconds=0.5, decode_s=0.4, finish="length")
    m.runtime({"hits": 3, "misses": 1, "host_experts": 4, "bytes_loaded": 1024, "stall_seconds": 0.25})
    text = m.render(waiting=2, busy=True)
    names = set()
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            names.add(line.split()[2])
            continue
        assert SAMPLE.match(line), line
        assert line.split("{")[0].split()[0] in names  # declared before its samples
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert values["moe_prefetch_generated_tokens_total"] == "5"
    assert values['moe_prefetch_requests_total{endpoint="/v1/completions",status="503"}'] == "1"
    assert values["moe_prefetch_queue_length"] == "2" and values["moe_prefetch_busy"] == "1"
    assert float(values["moe_prefetch_tokens_per_second"]) == pytest.approx(4 / 0.4)
    assert float(values["moe_prefetch_host_lane_share"]) == pytest.approx(0.5)
    assert values["moe_prefetch_link_bytes_total"] == "1024"
    assert 'model="a \\"quoted\\"\\nname"' in text
