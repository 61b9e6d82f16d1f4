"""`serve` on the demo model, in this process on a free local port, driven by the real `openai`
client: greedy text equals `moe-prefetch run`'s on the same prompt (completions and chat,
streamed and not), /metrics moves, every bad input gets its status and OpenAI's error shape,
a full queue answers 503, and a client that leaves mid-stream frees the model."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
from typer.testing import CliRunner

from moe_prefetch.cli.main import app
from moe_prefetch.serve.engine import Engine
from moe_prefetch.serve.server import Server

openai = pytest.importorskip("openai", reason="the serve tests need the openai client: pip install -e '.[test]'")
httpx = pytest.importorskip("httpx2", reason="comes with openai")

KEY = "test-key"
SLOTS = 16
PROMPT = "def add(a, b):"
# A chat template of the simplest kind (the demo's tokenizer has none).
TEMPLATE = (
    "{% for m in messages %}# {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}# assistant:{% endif %}"
)
MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "A codec class."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    template = tmp_path_factory.mktemp("serve") / "chat.jinja"
    template.write_text(TEMPLATE)
    engine = Engine.load("demo", {"device": "cpu", "cache_slots": SLOTS}, chat_template=template)
    srv = Server(engine, port=0, api_key=KEY, max_waiting=1, max_body=64 * 1024).start()
    yield srv
    srv.close()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def run_text(*args: str) -> str:
    """`moe-prefetch run --json` on the demo: the text it generated."""
    result = CliRunner().invoke(
        app, ["run", "--model", "demo", "--device", "cpu", "--cache-slots", str(SLOTS), "--json", *args]
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{") :])["text"]


def chat_ids(server) -> list[int]:
    """The chat prompt's token ids, as transformers renders a chat template."""
    tok = server.engine.tokenizer
    return tok.apply_chat_template(MESSAGES, chat_template=TEMPLATE, tokenize=True, add_generation_prompt=True)[
        "input_ids"
    ]


def metric(server, name: str, labels: str = "") -> float:
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    match = re.search(rf"^moe_prefetch_{name}{re.escape(labels)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


# -- greedy output equals run's --------------------------------------------------------------
def test_completion_equals_run_streamed_and_not(client, server):
    expected = run_text("--prompt", PROMPT, "--max-new-tokens", "24")
    whole = client.completions.create(model="demo", prompt=PROMPT, max_tokens=24, temperature=0)
    assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "length"
    prompt_tokens = len(server.engine.tokenizer(PROMPT)["input_ids"])
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (prompt_tokens, 24)
    assert whole.usage.total_tokens == prompt_tokens + 24
    events = list(
        client.completions.create(
            model="demo",
            prompt=PROMPT,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    pieces = [e.choices[0].text for e in events if e.choices]
    assert len(pieces) == 24 + 1  # one event per token, then the one that closes with finish_reason
    assert "".join(pieces) == expected and events[-2].choices[0].finish_reason == "length"
    assert events[-1].usage.completion_tokens == 24  # include_usage: the counts come last


def test_chat_completion_equals_run_streamed_and_not(client, server):
    ids = chat_ids(server)
    expected = run_text("--prompt-ids", ",".join(map(str, ids)), "--max-new-tokens", "16")
    whole = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=16, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == expected
    assert whole.usage.prompt_tokens == len(ids) and whole.usage.completion_tokens == 16
    stream = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=16, temperature=0, stream=True)
    chunks = list(stream)
    assert len(chunks) == 16 + 1 and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_sampling_with_a_seed_equals_run_and_repeats(client):
    expected = run_text("--prompt", PROMPT, "--max-new-tokens", "12", "--temperature", "0.9", "--seed", "7")
    texts = [
        client.completions.create(model="demo", prompt=PROMPT, max_tokens=12, temperature=0.9, seed=7).choices[0].text
        for _ in range(2)
    ]
    assert texts == [expected, expected]


def test_stop_sequences_cut_the_text_streamed_and_not(client):
    greedy = client.completions.create(model="demo", prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    stop = greedy[8:11]  # a piece from the middle, likely spread over more than one token
    cut = greedy[: greedy.index(stop)]
    whole = client.completions.create(model="demo", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop, "\x00"])
    assert whole.choices[0].text == cut and whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens < 24
    events = list(
        client.completions.create(model="demo", prompt=PROMPT, max_tokens=24, temperature=0, stop=stop, stream=True)
    )
    assert "".join(e.choices[0].text for e in events) == cut and events[-1].choices[0].finish_reason == "stop"


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list()] == ["demo"]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"  # no key needed


def test_metrics_change_after_a_request(client, server):
    before = {
        name: metric(server, name)
        for name in ("generated_tokens_total", "prompt_tokens_total", "expert_hits_total", "link_bytes_total")
    }
    answered = metric(server, "requests_total", '{endpoint="/v1/completions",status="200"}')
    reply = client.completions.create(model="demo", prompt="import os\n", max_tokens=5, temperature=0)
    assert metric(server, "generated_tokens_total") == before["generated_tokens_total"] + 5
    assert metric(server, "prompt_tokens_total") == before["prompt_tokens_total"] + reply.usage.prompt_tokens
    assert metric(server, "requests_total", '{endpoint="/v1/completions",status="200"}') == answered + 1
    moved = metric(server, "expert_hits_total") + metric(server, "link_bytes_total")
    assert moved > before["expert_hits_total"] + before["link_bytes_total"]  # the runtime's counters moved
    assert metric(server, "tokens_per_second") > 0 and 0 <= metric(server, "hit_rate") <= 1


# -- bad input: status and error shape ----------------------------------------------------------
def raw(server, method: str, path: str, body=None, *, key: str | None = KEY, content: bytes | None = None):
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    if body is not None:
        content = json.dumps(body).encode()
    return httpx.request(method, f"{server.url}{path}", content=content, headers=headers, timeout=60)


GOOD = {"model": "demo", "prompt": PROMPT, "max_tokens": 2}
LONG = "x = 1\n" * 400  # longer than the demo's 512-token context


@pytest.mark.parametrize(
    "path,body,content,key,status,param,code",
    [
        ("/v1/completions", None, b'{"model": "demo", "prompt": ', KEY, 400, None, None),
        ("/v1/completions", None, b"[1, 2]", KEY, 400, None, None),
        ("/v1/completions", {**GOOD, "model": "gpt-4"}, None, KEY, 404, "model", "model_not_found"),
        ("/v1/chat/completions", {"model": "demo"}, None, KEY, 400, "messages", None),
        ("/v1/chat/completions", {"model": "demo", "messages": []}, None, KEY, 400, "messages", None),
        (
            "/v1/chat/completions",
            {"model": "demo", "messages": [{"role": "robot", "content": "x"}]},
            None,
            KEY,
            400,
            "messages[0].role",
            None,
        ),
        ("/v1/completions", {"model": "demo"}, None, KEY, 400, "prompt", None),
        ("/v1/completions", {"prompt": PROMPT}, None, KEY, 400, "model", None),
        ("/v1/completions", {**GOOD, "max_tokens": 0}, None, KEY, 400, "max_tokens", None),
        ("/v1/completions", {**GOOD, "max_tokens": "ten"}, None, KEY, 400, "max_tokens", None),
        ("/v1/completions", {**GOOD, "max_tokens": 600}, None, KEY, 400, "max_tokens", "context_length_exceeded"),
        ("/v1/completions", {**GOOD, "prompt": LONG}, None, KEY, 400, "prompt", "context_length_exceeded"),
        (
            "/v1/chat/completions",
            {"model": "demo", "messages": [{"role": "user", "content": LONG}]},
            None,
            KEY,
            400,
            "messages",
            "context_length_exceeded",
        ),
        ("/v1/completions", {**GOOD, "temperature": 3}, None, KEY, 400, "temperature", None),
        ("/v1/completions", {**GOOD, "top_p": 0}, None, KEY, 400, "top_p", None),
        ("/v1/completions", {**GOOD, "n": 2}, None, KEY, 400, "n", None),
        ("/v1/completions", {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, None, KEY, 400, "stop", None),
        ("/v1/completions", {**GOOD, "prompt": [1, 99999]}, None, KEY, 400, "prompt", None),
        ("/v1/completions", {**GOOD, "stream": "yes"}, None, KEY, 400, "stream", None),
        ("/v1/completions", GOOD, None, "wrong-key", 401, None, "invalid_api_key"),
        ("/v1/completions", GOOD, None, None, 401, None, "invalid_api_key"),
        ("/v1/completions", {**GOOD, "prompt": "x" * 70_000}, None, KEY, 413, None, "request_too_large"),
        ("/v1/nothing", GOOD, None, KEY, 404, None, "not_found"),
    ],
)
def test_bad_input_gets_its_status_and_openai_error_shape(server, path, body, content, key, status, param, code):
    reply = raw(server, "POST", path, body, key=key, content=content)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code)
    assert error["type"] == ("authentication_error" if status == 401 else "invalid_request_error")
    assert raw(server, "POST", "/v1/completions", GOOD).status_code == 200  # and the server goes on


def test_wrong_method_and_unknown_model_through_the_client(client, server):
    assert raw(server, "GET", "/v1/completions").status_code == 405
    with pytest.raises(openai.NotFoundError, match="serves 'demo'"):
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="out of range"):
        client.completions.create(model="demo", prompt=PROMPT, max_tokens=1, temperature=2.5)


def test_chat_without_a_template_is_a_400_that_says_so(client, server, monkeypatch):
    monkeypatch.setattr(server.engine, "chat_template", None)
    with pytest.raises(openai.BadRequestError, match="has no chat template") as err:
        client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=2)
    assert err.value.status_code == 400 and err.value.code == "no_chat_template"


# -- one at a time: the queue and disconnects -------------------------------------------------
def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_queue_past_its_bound_gets_503_and_the_waiting_one_is_served(client, server):
    long = client.completions.create(model="demo", prompt=PROMPT, max_tokens=400, temperature=0, stream=True)
    next(iter(long))  # generating now: it holds the model
    waited = {}
    waiting = threading.Thread(
        target=lambda: waited.update(reply=client.completions.create(model="demo", prompt="import", max_tokens=3))
    )
    waiting.start()
    wait_for(lambda: server.turns.waiting == 1)  # the bound (max_waiting=1) is reached
    refused = raw(server, "POST", "/v1/completions", GOOD)
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["code"] == "queue_full"
    long.close()  # leaves mid-stream: the waiting request gets the model
    waiting.join(60)
    assert waited["reply"].usage.completion_tokens == 3


def test_a_disconnect_mid_stream_stops_generation_and_frees_the_model(client, server):
    cut = metric(server, "generations_total", '{finish="disconnected"}')
    tokens = metric(server, "generated_tokens_total")
    stream = client.completions.create(model="demo", prompt=PROMPT, max_tokens=480, temperature=0, stream=True)
    events = iter(stream)
    next(events), next(events)
    stream.close()
    started = time.monotonic()
    reply = client.completions.create(model="demo", prompt="import", max_tokens=2, temperature=0)
    assert reply.usage.completion_tokens == 2 and time.monotonic() - started < 20
    assert metric(server, "generations_total", '{finish="disconnected"}') == cut + 1
    # the left generation stopped early: far fewer than its 480 tokens were made
    assert metric(server, "generated_tokens_total") - tokens - 2 < 240


def test_a_failure_in_generation_is_a_500_and_the_server_goes_on(client, server, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("device fell off")

    monkeypatch.setattr(server.engine, "generate", broken)
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model="demo", prompt=PROMPT, max_tokens=2)
    assert err.value.status_code == 500 and err.value.body["type"] == "server_error"
    with pytest.raises(openai.APIError, match="the server failed"):
        list(client.completions.create(model="demo", prompt=PROMPT, max_tokens=2, stream=True))
    assert "device fell off" in caplog.text  # the log has the cause
    monkeypatch.undo()
    assert client.completions.create(model="demo", prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2
