"""The engine's generation rules on a scripted model (no weights): how a generation ends (end
token, max_tokens, stop sequence, client gone, shutdown), what it counts, what it sends, and the
prompt and context checks. The real model's tokens are test_serve.py's."""

from __future__ import annotations

import types

import pytest
import torch

from moe_prefetch.serve import schema
from moe_prefetch.serve.engine import Engine

EOS = 0


class Tokenizer:
    """Byte-level: a token is a byte; id 0 is the end-of-text token (no text)."""

    pad_token_id = None
    eos_token_id = EOS
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": list(text.encode())}

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if i != EOS).decode("utf-8", errors="replace")


class ScriptedModel:
    """Generates `script` in order, the way transformers' loop does: the stopping criteria see
    a token before the streamer does, and generation ends after the token they stop at."""

    def __init__(self, script: bytes | list[int], eos=EOS, context=64):
        self.script = list(script)
        self.config = types.SimpleNamespace(
            get_text_config=lambda: types.SimpleNamespace(max_position_embeddings=context, vocab_size=256)
        )
        self.generation_config = types.SimpleNamespace(eos_token_id=eos)
        self.made = 0  # tokens computed, streamed or not

    def generate(self, input_ids, max_new_tokens, streamer, pad_token_id, stopping_criteria=(), **_):
        streamer.put(input_ids)
        ids = input_ids
        for step in range(max_new_tokens):
            token = torch.tensor([self.script[step % len(self.script)]])
            self.made += 1
            ids = torch.cat([ids, token[:, None]], dim=-1)
            stop = any(bool(c(ids, None)[0]) for c in stopping_criteria)
            streamer.put(token)
            if stop or token.item() == self.generation_config.eos_token_id:
                break
        streamer.end()
        return ids


def engine(script, **kw) -> Engine:
    runtime = types.SimpleNamespace(device="cpu", stats=lambda: {}, detach=lambda: None)
    return Engine(ScriptedModel(script, **kw), runtime, Tokenizer(), "scripted")


def sampling(max_tokens=None, stop=(), **kw) -> schema.Sampling:
    base = dict(max_tokens=max_tokens, temperature=0.0, top_p=1.0, stop=tuple(stop), seed=0, stream=False)
    return schema.Sampling(**{**base, "include_usage": False, **kw})


def generate(e: Engine, max_new: int, stop=(), gone=lambda: False):
    sent = []
    out = e.generate([1, 2], sampling(max_new, stop), max_new, on_text=sent.append, gone=gone)
    return out, sent


def test_an_end_token_finishes_with_stop_and_counts_it():
    e = engine(b"hello\x00world")
    out, sent = generate(e, 20)
    assert (out.text, out.finish_reason, out.ended) == ("hello", "stop", "stop")
    assert out.completion_tokens == 6 and len(sent) == 6 and "".join(sent) == "hello"  # one call per token


def test_max_tokens_finishes_with_length():
    out, sent = generate(engine(b"abcdefgh"), 5)
    assert (out.text, out.finish_reason, out.completion_tokens, out.prompt_tokens) == ("abcde", "length", 5, 2)


def test_the_last_allowed_token_being_the_end_token_is_stop():
    out, _ = generate(engine(b"abcd\x00"), 5)
    assert out.finish_reason == "stop" and out.completion_tokens == 5


def test_a_stop_sequence_ends_generation_within_a_token_and_sends_nothing_after():
    e = engine(b"one\ntwo\nthree\n")
    out, sent = generate(e, 40, stop=["\nt"])
    assert (out.text, out.finish_reason) == ("one", "stop")
    assert out.completion_tokens == 5 and "".join(sent) == "one"  # "one\nt": the stop completes at token 5
    assert e.model.made <= 6  # at most one token more was computed, and not sent


def test_a_client_that_goes_stops_generation_at_the_next_token():
    e = engine(b"abcdefghijklmnopqrstuvwxyz")
    calls = []
    out, sent = generate(e, 26, gone=lambda: calls.append(1) or len(calls) > 3)
    # gone() says so when asked at the 4th token, before it streams: 3 sent, the 4th the last made
    assert out.ended == "disconnected" and out.completion_tokens == 3 and e.model.made == 4
    assert "".join(sent) == "abc"


def test_shutdown_stops_generation_at_the_next_token():
    e = engine(b"abcdefghijklmnopqrstuvwxyz")
    sent = []

    def on_text(piece):
        sent.append(piece)
        if len(sent) == 2:
            e.stopping.set()

    out = e.generate([1], sampling(26), 26, on_text=on_text, gone=lambda: False)
    assert out.ended == "shutdown" and out.completion_tokens == 2 and e.model.made <= 3


def test_held_text_is_released_when_the_model_ends_on_its_own_rule():
    e = engine(b"ab\x00")
    e.eos = set()  # as if generation ended for a reason the engine does not know of
    out, sent = generate(e, 3, stop=["b!"])  # "b" is held back: it could begin "b!"
    assert out.text == "ab" and "".join(sent) == "ab"


# -- prompts and the context ------------------------------------------------------------------
def test_prompt_checks_name_the_model_and_the_context():
    e = engine(b"x", context=16)
    request = schema.parse_completion({"model": "other", "prompt": "hi"})
    with pytest.raises(schema.ApiError) as err:
        e.prompt_ids(request)
    assert err.value.status == 404 and "'scripted'" in err.value.message
    assert e.prompt_ids(schema.parse_completion({"model": "scripted", "prompt": "hi"})) == list(b"hi")
    assert e.new_tokens(10, sampling(None)) == 6  # no max_tokens: the rest of the context
    assert e.new_tokens(10, sampling(6)) == 6
    cases = ((10, 7, "prompt", "max_tokens"), (16, None, "messages", "messages"), (20, 4, "prompt", "prompt"))
    for prompt, max_tokens, prompt_param, param in cases:
        with pytest.raises(schema.ApiError) as err:
            e.new_tokens(prompt, sampling(max_tokens), prompt_param)
        assert err.value.code == "context_length_exceeded" and err.value.param == param
        assert "context is 16 tokens" in err.value.message


def test_token_id_prompts_are_checked_against_the_vocabulary():
    e = engine(b"x")
    with pytest.raises(schema.ApiError, match="vocabulary has 256"):
        e.prompt_ids(schema.parse_completion({"model": "scripted", "prompt": [1, 300]}))
    chat = schema.parse_chat({"model": "scripted", "messages": [{"role": "user", "content": "x"}]})
    with pytest.raises(schema.ApiError, match="no chat template") as err:
        e.prompt_ids(chat)
    assert err.value.code == "no_chat_template"
