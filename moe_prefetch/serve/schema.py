"""The OpenAI wire format: requests checked into small dataclasses, responses built as dicts.

Only what one model at batch 1 can honour is accepted: one prompt, one choice (`n` 1), text
only. A known parameter this server does not implement is refused when it asks for something
(`logprobs: 5`, `n: 3`) and ignored at its neutral value (`logprobs: null`, `n: 1`), since
clients send those by default; unknown keys are ignored, as OpenAI-compatible servers do.
Every refusal is an `ApiError` whose body has OpenAI's shape and names the parameter.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

# Bounds from OpenAI's API reference.
TEMPERATURE_MAX = 2.0
STOP_MAX = 4
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat runs to the context
SEED_RANGE = (-(2**63), 2**63 - 1)  # what torch.manual_seed takes
ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """An error the client gets as `{"error": {message, type, param, code}}` with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str | None, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Sampling:
    """What a request asks of generation. `max_tokens` None: up to the end of the context."""

    max_tokens: int | None
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompt: str | list[int]  # text, or token ids
    sampling: Sampling


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict]  # {"role", "content": str}, ready for a chat template
    sampling: Sampling


def parse_body(body: bytes) -> dict:
    """The request's JSON object, or a 400 that says what is wrong with it."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise invalid(None, f"the body is not valid JSON ({err}); send a JSON object") from None
    if not isinstance(data, dict):
        raise invalid(None, f"the body must be a JSON object, not {type(data).__name__}")
    return data


def parse_completion(data: dict) -> CompletionRequest:
    prompt = data.get("prompt")
    if "prompt" not in data or prompt is None:
        raise invalid("prompt", "missing required parameter 'prompt'")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
            raise invalid(
                "prompt", "'prompt' must be a string or a list of token ids (one prompt per request: batch 1)"
            )
    elif not isinstance(prompt, str):
        raise invalid("prompt", f"'prompt' must be a string or a list of token ids, not {type(prompt).__name__}")
    if isinstance(prompt, str) and not prompt:
        raise invalid("prompt", "'prompt' is empty; send the text to continue")
    _refuse_unsupported(data, echo=False, best_of=1, suffix=None, logprobs=None)
    return CompletionRequest(
        model=_model(data), prompt=prompt, sampling=_sampling(data, default_max=COMPLETION_DEFAULT_MAX_TOKENS)
    )


def parse_chat(data: dict) -> ChatRequest:
    messages = data.get("messages")
    if messages is None:
        raise invalid("messages", "missing required parameter 'messages'")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "'messages' must be a non-empty list of {role, content} objects")
    _refuse_unsupported(data, logprobs=False, top_logprobs=None, tools=None, functions=None, response_format=None)
    return ChatRequest(
        model=_model(data),
        messages=[_message(m, i) for i, m in enumerate(messages)],
        sampling=_sampling(data, default_max=None),
    )


def _message(message, i: int) -> dict:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise invalid(where, f"'{where}' must be an object with 'role' and 'content'")
    role = message.get("role")
    if role not in ROLES:
        raise invalid(f"{where}.role", f"'{where}.role' is {role!r}; use one of {', '.join(ROLES)}")
    content = message.get("content")
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise invalid(f"{where}.content", f"'{where}.content' may hold only text parts; this model reads text")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise invalid(f"{where}.content", f"'{where}.content' must be a string or a list of text parts")
    return {"role": role, "content": content}


def _model(data: dict) -> str:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model", "missing required parameter 'model'; GET /v1/models lists the one served")
    return model


def _refuse_unsupported(data: dict, **neutral) -> None:
    """Parameters this server does not implement: refused unless absent or at `neutral[name]`
    (their value that asks for nothing; an empty list or object counts as neutral too)."""
    for name in ("n", "presence_penalty", "frequency_penalty", "logit_bias", *neutral):
        value = data.get(name)
        fine = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0}.get(name, neutral.get(name))
        if value is None or value == fine or value in ([], {}):
            continue
        if name == "response_format" and isinstance(value, dict) and value.get("type") == "text":
            continue
        raise invalid(name, f"'{name}' {json.dumps(value)[:40]} is not supported by this server; leave it out")


def _number(data: dict, name: str, default, lo: float, hi: float, *, integer: bool = False, lo_open: bool = False):
    value = data.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise invalid(name, f"'{name}' must be {'an integer' if integer else 'a number'}, not {json.dumps(value)}")
    if value < lo or value > hi or (lo_open and value == lo):
        low = "(" if lo_open else "["
        raise invalid(name, f"'{name}' {value} is out of range; use a value in {low}{lo}, {hi}]")
    return value


def _sampling(data: dict, default_max: int | None) -> Sampling:
    stream = data.get("stream", False) or False
    if not isinstance(stream, bool):
        raise invalid("stream", f"'stream' must be true or false, not {json.dumps(stream)}")
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise invalid("stream_options", "'stream_options' must be an object such as {\"include_usage\": true}")
    if options and not stream:
        raise invalid("stream_options", "'stream_options' is only allowed with 'stream': true")
    # chat's newer name wins; both are the number of tokens to generate
    name = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(data, name, default_max, 1, 1_000_000, integer=True)
    stop = data.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= STOP_MAX:
        stop = tuple(stop)
    else:
        raise invalid("stop", f"'stop' must be a string or a list of at most {STOP_MAX} strings")
    if any(not s for s in stop):
        raise invalid("stop", "'stop' holds an empty string; every stop sequence needs at least one character")
    return Sampling(
        max_tokens=max_tokens,
        temperature=float(_number(data, "temperature", 1.0, 0.0, TEMPERATURE_MAX)),
        top_p=float(_number(data, "top_p", 1.0, 0.0, 1.0, lo_open=True)),
        stop=stop,
        seed=_number(data, "seed", None, *SEED_RANGE, integer=True),
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
    )


# -- responses ---------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def models(name: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "moe-prefetch"}]}


@dataclass(frozen=True)
class Reply:
    """The fields every response and chunk of one request share."""

    id: str
    model: str
    created: int
    chat: bool

    @classmethod
    def new(cls, request_id: str, model: str, chat: bool) -> Reply:
        return cls(id=request_id, model=model, created=int(time.time()), chat=chat)

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "system_fingerprint": None}

    def whole(self, text: str, finish_reason: str, counts: dict) -> dict:
        """The response to a request without `stream`."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
            kind = "chat.completion"
        else:
            choice, kind = {"index": 0, "text": text, "logprobs": None}, "text_completion"
        return {**self._head(kind), "choices": [{**choice, "finish_reason": finish_reason}], "usage": counts}

    def chunk(self, text: str | None, finish_reason: str | None = None, *, first: bool = False) -> dict:
        """One server-sent event of a stream: a token's text, or (text None) the closing finish_reason."""
        if self.chat:
            delta = {} if text is None else {"content": text}
            if first:
                delta = {"role": "assistant", **delta}
            choice, kind = {"index": 0, "delta": delta, "logprobs": None}, "chat.completion.chunk"
        else:
            choice, kind = {"index": 0, "text": text or "", "logprobs": None}, "text_completion"
        return {**self._head(kind), "choices": [{**choice, "finish_reason": finish_reason}]}

    def usage_chunk(self, counts: dict) -> dict:
        """The last event when `stream_options.include_usage`: no choices, the counts."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(kind), "choices": [], "usage": counts}
