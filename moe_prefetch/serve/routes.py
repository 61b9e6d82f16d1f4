"""The HTTP side: one handler per connection (HTTP/1.1, kept alive), its routes, and the
writing of JSON, errors and server-sent events.

    GET  /health                 {"status": "ok"} (no key needed)
    GET  /metrics                Prometheus text (metrics.py)
    GET  /v1/models              the one model
    POST /v1/completions         text in, text out
    POST /v1/chat/completions    messages through the chat template

A request checks its body first (schema.py), then its prompt against the model (engine.py),
and only then waits for its turn (queue.py), so a bad request never waits behind a good one.
A streamed response is `Transfer-Encoding: chunked` with one event per generated token and
`data: [DONE]` last; whether its client is still there is asked after every token.
"""

from __future__ import annotations

import hmac
import json
import logging
import select
import socket
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler

from . import schema
from .queue import Closed, Gone, QueueFull
from .schema import ApiError

log = logging.getLogger(__name__)


class Handler(BaseHTTPRequestHandler):
    """Routes one connection's requests; `self.server` is a `serve.server.Server`."""

    protocol_version = "HTTP/1.1"  # keep-alive: the openai client reuses its connections
    server_version = "moe-prefetch"
    timeout = 60  # seconds a connection may sit idle, or a client block a write, before it is dropped

    # -- dispatch --------------------------------------------------------------------------
    def do_GET(self) -> None:
        routes = {"/health": self._health, "/metrics": self._metrics, "/v1/models": self._models}
        self._dispatch(routes)

    def do_POST(self) -> None:
        routes = {"/v1/completions": self._completions, "/v1/chat/completions": self._chat}
        self._dispatch(routes)

    def _dispatch(self, routes: dict) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        self.endpoint = path if path in routes else "other"
        self.streaming = False  # a streamed response has sent its status and headers
        self.unread = self.headers.get("Content-Length", "0").strip() not in ("", "0")
        try:
            route = routes.get(path)
            if route is None:
                other = "POST" if self.command == "GET" else "GET"
                known = path in _ROUTES[other]
                raise ApiError(
                    405 if known else 404,
                    f"{self.command} {path} is not served; {other} it"
                    if known
                    else f"no route {path}; "
                    "the routes are /v1/models, /v1/completions, /v1/chat/completions, /metrics, /health",
                    code="method_not_allowed" if known else "not_found",
                )
            if path != "/health":
                self._check_key()
            route()
        except ApiError as err:
            if self.unread:
                self.close_connection = True  # its body is still in the socket, where the next request would be
            self._send_error(err)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client left; nothing more to say to it
        except Exception:  # a bug or a device error: the client hears of it, the log has the traceback
            log.exception("%s %s failed", self.command, path)
            self.close_connection = True
            failed = ApiError(500, "the server failed on this request; its log says why", type="server_error")
            try:
                if self.streaming:  # the 200 and some events are out: end the stream with the error
                    self._event(failed.body())
                    self._chunk(b"")
                else:
                    self._send_error(failed)
            except OSError:
                pass

    def _check_key(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        token = given[7:].strip() if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise ApiError(
                401,
                "incorrect API key provided" if token else "no API key given; send 'Authorization: Bearer KEY'",
                type="authentication_error",
                code="invalid_api_key",
            )

    # -- routes ----------------------------------------------------------------------------
    def _health(self) -> None:
        self._send_json(200, {"status": "ok", "model": self.server.engine.name})

    def _metrics(self) -> None:
        turns = self.server.turns
        text = self.server.metrics.render(waiting=turns.waiting, busy=turns.busy)
        self._send(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")

    def _models(self) -> None:
        engine = self.server.engine
        self._send_json(200, schema.models(engine.name, engine.created))

    def _completions(self) -> None:
        self._generate(schema.parse_completion(self._body()), chat=False)

    def _chat(self) -> None:
        self._generate(schema.parse_chat(self._body()), chat=True)

    def _generate(self, request, chat: bool) -> None:
        engine, sampling = self.server.engine, request.sampling
        ids = engine.prompt_ids(request)
        new_tokens = engine.new_tokens(len(ids), sampling, "messages" if chat else "prompt")
        reply = schema.Reply.new(f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", engine.name, chat)
        try:
            with self.server.turns.turn(gone=self._client_gone):
                if sampling.stream:
                    self._stream(reply, ids, sampling, new_tokens)
                else:
                    outcome = self._run(ids, sampling, new_tokens, on_text=lambda _: None, gone=self._client_gone)
                    if outcome.ended == "shutdown":
                        raise _shutdown(outcome)
                    counts = schema.usage(outcome.prompt_tokens, outcome.completion_tokens)
                    if outcome.ended != "disconnected":
                        self._send_json(200, reply.whole(outcome.text, outcome.finish_reason, counts))
        except QueueFull as full:
            raise ApiError(
                503,
                f"the model is busy and {full.waiting} requests are waiting (the bound, --queue); retry later",
                type="server_error",
                code="queue_full",
                headers={"Retry-After": str(full.retry_after_s)},
            ) from None
        except Closed:
            raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down") from None
        except Gone:
            self.close_connection = True  # left while waiting: nothing to answer

    def _run(self, ids, sampling, new_tokens, on_text, gone):
        """Generate while holding the turn, counting tokens live and the runtime's state after."""
        server = self.server
        try:
            outcome = server.engine.generate(
                ids, sampling, new_tokens, on_text=on_text, gone=gone, on_token=server.metrics.token
            )
        finally:
            server.metrics.runtime(server.engine.stats())  # only the turn's holder reads the runtime
        server.metrics.generation(
            outcome.prompt_tokens, outcome.completion_tokens, outcome.seconds, outcome.decode_s, outcome.ended
        )
        log.info(
            "%s: %d prompt + %d tokens in %.2fs (%s)",
            self.endpoint,
            outcome.prompt_tokens,
            outcome.completion_tokens,
            outcome.seconds,
            outcome.ended,
        )
        return outcome

    def _stream(self, reply: schema.Reply, ids, sampling, new_tokens) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.streaming = True
        self.server.metrics.request(self.endpoint, 200)
        state = {"first": True, "broken": False}

        def on_text(text: str) -> None:
            if state["broken"]:
                return
            try:
                self._event(reply.chunk(text, first=state["first"]))
                state["first"] = False
            except OSError:  # the client left: generation stops at its next token (gone() says so)
                state["broken"] = True

        outcome = self._run(ids, sampling, new_tokens, on_text, gone=lambda: state["broken"] or self._client_gone())
        if state["broken"] or outcome.ended == "disconnected":
            self.close_connection = True
            return
        if outcome.ended == "shutdown":
            self._event(_shutdown(outcome).body())  # the client raises it; no [DONE] after an error
        else:
            self._event(reply.chunk(None, outcome.finish_reason, first=state["first"]))
            if sampling.include_usage:
                self._event(reply.usage_chunk(schema.usage(outcome.prompt_tokens, outcome.completion_tokens)))
            self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")  # the end of the chunked body

    # -- reading and writing ---------------------------------------------------------------
    def _body(self) -> dict:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or length is None:
            self.close_connection = True
            raise ApiError(411, "send the body with a Content-Length header", code="length_required")
        try:
            size = int(length)
        except ValueError:
            self.close_connection = True
            raise ApiError(400, f"Content-Length {length!r} is not a number") from None
        if size > self.server.max_body:
            self.close_connection = True  # the body stays unread: this connection cannot go on
            raise ApiError(
                413,
                f"the body is {size} bytes; this server takes at most {self.server.max_body} (--max-body)",
                code="request_too_large",
            )
        body = self.rfile.read(size)
        self.unread = False
        return schema.parse_body(body)

    def _client_gone(self) -> bool:
        """Whether the client closed its side: the socket reads as ended. (Bytes waiting there,
        a next request already sent, mean it is still there.)"""
        sock = self.connection
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _event(self, data: dict) -> None:
        self._chunk(b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _send_json(self, status: int, data: dict, headers: dict | None = None) -> None:
        self._send(status, json.dumps(data, ensure_ascii=False).encode(), "application/json", headers)

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.server.metrics.request(getattr(self, "endpoint", "other"), status)

    def _send_error(self, err: ApiError) -> None:
        self._send_json(err.status, err.body(), err.headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (a malformed request line, an unknown method) in OpenAI's shape."""
        self.close_connection = True
        phrase = HTTPStatus(code).phrase if code in HTTPStatus._value2member_map_ else "error"
        text = message or explain or phrase
        self.endpoint = "other"
        where = f"{getattr(self, 'command', None) or 'request'} {getattr(self, 'path', '')}".strip()
        try:
            self._send_error(ApiError(code, f"{text} ({where})"))
        except OSError:
            pass

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's name)
        log.debug("%s %s", self.address_string(), format % args)


_ROUTES = {"GET": ("/health", "/metrics", "/v1/models"), "POST": ("/v1/completions", "/v1/chat/completions")}


def _shutdown(outcome) -> ApiError:
    return ApiError(
        503,
        f"the server is shutting down; this generation was stopped after {outcome.completion_tokens} tokens",
        type="server_error",
        code="shutting_down",
    )
