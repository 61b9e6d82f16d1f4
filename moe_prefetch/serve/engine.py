"""The one model a server holds: its prompts (plain or through the chat template), the context
check, and one generation at a time through the library's `generate`, the call `run` makes, so
greedy tokens are run's.

Generation runs on the thread of the request that holds the turn (queue.py). It never raises
out of `model.generate` to stop early, which would leave the runtime mid-token: a client that
went away, a stop sequence or a shutdown makes `should_stop` true and generation ends within
the next token, with the runtime's state whole for the next request.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moe_prefetch.model import generation
from moe_prefetch.model.generation import GenerationSettings

from .schema import ApiError, ChatRequest, CompletionRequest, Sampling, invalid
from .text import TextStream

log = logging.getLogger(__name__)

TOKENIZER_FIX = "save the model's tokenizer beside its weights, or pass --tokenizer FOLDER_OR_TOKENIZER_JSON"


@dataclass(frozen=True)
class Outcome:
    """How one generation went. `finish_reason` is OpenAI's (stop, length); `ended` also says
    when it was cut short (disconnected, shutdown)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    ended: str
    seconds: float
    decode_s: float


class Engine:
    """A loaded model with its runtime and tokenizer, served under `name`."""

    def __init__(self, model, runtime, tokenizer, name: str, chat_template: str | None = None):
        self.model, self.runtime, self.tokenizer, self.name = model, runtime, tokenizer, name
        self.chat_template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
        text_config = model.config.get_text_config()
        self.context_length = getattr(text_config, "max_position_embeddings", None)
        self.vocab_size = getattr(text_config, "vocab_size", None)
        self.created = int(time.time())
        # generate stops at its generation config's end tokens (not the tokenizer's): so do we
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        # The fast tokenizers are not safe to use from two threads at once ("Already borrowed"):
        # a waiting request tokenizes its prompt while the running one decodes its tokens.
        self._tokenizer_lock = threading.Lock()
        self.stopping = threading.Event()  # set at shutdown: the running generation ends at its next token

    @classmethod
    def load(
        cls,
        model: str,
        options: dict,
        *,
        tokenizer: Path | None = None,
        chat_template: Path | None = None,
    ) -> Engine:
        """Load `model` (a folder, 'demo' or 'demo-fine') with `load`'s keyword `options`."""
        import moe_prefetch
        from moe_prefetch.errors import ConfigError
        from moe_prefetch.model.folders import resolve_path
        from moe_prefetch.runtime.sizing import PREFILL_CHUNK

        folder = resolve_path(model)
        tok = generation.load_tokenizer(tokenizer or folder, fix=TOKENIZER_FIX)
        template = None
        if chat_template is not None:
            try:
                template = Path(chat_template).expanduser().read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                reason = getattr(err, "strerror", None) or err
                raise ConfigError(f"cannot read --chat-template {chat_template}: {reason}") from None
        # Prompts fed in chunks of PREFILL_CHUNK tokens: the reserve holds one chunk, as `plan` sized it.
        options = {"prefill_chunk": PREFILL_CHUNK, **options}
        loaded, runtime = moe_prefetch.load(folder, **options)
        name = model if model in ("demo", "demo-fine") else folder.name
        return cls(loaded, runtime, tok, name, chat_template=template)

    # -- prompts ---------------------------------------------------------------------------
    def prompt_ids(self, request: CompletionRequest | ChatRequest) -> list[int]:
        """The request's prompt as token ids: a completion's text as `run` tokenizes it, or its
        ids; a chat's messages through the chat template."""
        if request.model != self.name:
            raise ApiError(
                404,
                f"the model {request.model!r} does not exist here; this server serves {self.name!r}",
                param="model",
                code="model_not_found",
            )
        if isinstance(request, ChatRequest):
            return self._chat_ids(request.messages)
        if isinstance(request.prompt, list):
            if self.vocab_size is not None and max(request.prompt) >= self.vocab_size:
                raise invalid(
                    "prompt",
                    f"'prompt' holds token id {max(request.prompt)} but the vocabulary has {self.vocab_size} "
                    f"ids (0..{self.vocab_size - 1})",
                )
            return list(request.prompt)
        with self._tokenizer_lock:
            ids = self.tokenizer(request.prompt)["input_ids"]
        if not ids:
            raise invalid("prompt", "'prompt' became 0 tokens; send a longer prompt")
        return ids

    def _chat_ids(self, messages: list[dict]) -> list[int]:
        if not self.chat_template:
            raise invalid(
                "messages",
                f"the model {self.name!r} has no chat template (its tokenizer_config.json names none), so "
                "/v1/chat/completions cannot turn messages into a prompt; use /v1/completions, or start the "
                "server with --chat-template FILE",
                code="no_chat_template",
            )
        from jinja2 import TemplateError

        try:
            with self._tokenizer_lock:
                text = self.tokenizer.apply_chat_template(
                    messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
                )
                # the template writes any special tokens itself (as transformers tokenizes chats)
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        except TemplateError as err:  # a template's own raise_exception: "roles must alternate", ...
            raise invalid("messages", f"the chat template refused the messages: {err}") from None
        if not ids:
            raise invalid("messages", "the messages became 0 tokens through the chat template")
        return ids

    def new_tokens(self, prompt_tokens: int, sampling: Sampling, prompt_param: str = "prompt") -> int:
        """How many tokens to generate: `max_tokens`, or up to the end of the context; a prompt
        (plus max_tokens) past the context is a 400, as OpenAI answers it, naming `max_tokens` or,
        when the prompt alone is too long, `prompt_param` (a chat's is "messages")."""
        if self.context_length is None:
            if sampling.max_tokens is None:
                raise invalid("max_tokens", "this model names no context length; give 'max_tokens'")
            return sampling.max_tokens
        room = self.context_length - prompt_tokens
        wanted = sampling.max_tokens if sampling.max_tokens is not None else room
        if room < 1 or wanted > room:
            asked = f" and max_tokens {sampling.max_tokens}" if sampling.max_tokens is not None else ""
            raise invalid(
                "max_tokens" if room >= 1 else prompt_param,
                f"this model's context is {self.context_length} tokens; the prompt has {prompt_tokens}{asked}, "
                f"{prompt_tokens + max(wanted, 1)} in all; shorten the prompt or lower max_tokens",
                code="context_length_exceeded",
            )
        return wanted

    # -- generation ------------------------------------------------------------------------
    def generate(
        self,
        ids: list[int],
        sampling: Sampling,
        max_new_tokens: int,
        *,
        on_text: Callable[[str], None],
        gone: Callable[[], bool],
        on_token: Callable[[], None] = lambda: None,
    ) -> Outcome:
        """Generate from `ids`, handing each token's text to `on_text` (one call per token, text
        possibly ""). `gone()` is asked after every token; True ends generation within the next. Call only
        while holding the turn."""
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(62)  # OpenAI: no seed, no repeat
        settings = GenerationSettings(
            max_new_tokens=max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p, seed=seed
        )
        text = TextStream(self._decode, sampling.stop)
        tokens: list[int] = []
        parts: list[str] = []
        state = {"ended": None, "first": None}

        def token(token_id: int) -> None:
            if state["ended"] is not None:
                return  # generation was told to stop; this is the one more token it made
            if state["first"] is None:
                state["first"] = time.perf_counter()
            tokens.append(token_id)
            on_token()
            piece = text.add(token_id)
            if len(tokens) == max_new_tokens or token_id in self.eos:
                piece += text.finish()  # the last token: release what was held back
            parts.append(piece)
            on_text(piece)
            if text.stopped:
                state["ended"] = "stop"

        def should_stop() -> bool:
            if state["ended"] is None:
                if self.stopping.is_set():
                    state["ended"] = "shutdown"
                elif gone():
                    state["ended"] = "disconnected"
            return state["ended"] is not None

        started = time.perf_counter()
        generation.generate(
            self.model,
            ids,
            settings,
            device=self.runtime.device,
            pad_token_id=generation.pad_token_id(self.tokenizer),
            streamer=generation.token_streamer(token),
            should_stop=should_stop,
        )
        ended = time.perf_counter()
        cut = state["ended"] if state["ended"] in ("disconnected", "shutdown") else None
        if cut is None and not text.stopped:
            tail = text.finish()  # generation ended on a rule of the model's own (its last token released it already)
            if tail:
                parts.append(tail)
                on_text(tail)
        at_length = len(tokens) >= max_new_tokens and not text.stopped and tokens[-1] not in self.eos
        finish = "length" if at_length else "stop"
        return Outcome(
            text="".join(parts),
            prompt_tokens=len(ids),
            completion_tokens=len(tokens),
            finish_reason=finish,
            ended=cut or finish,
            seconds=ended - started,
            decode_s=ended - state["first"] if state["first"] is not None else 0.0,
        )

    def _decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def stats(self) -> dict:
        """The runtime's counters; only the thread holding the turn may ask (stats drain the loader)."""
        return self.runtime.stats()

    def close(self) -> None:
        """Give back the device slots, the loader and the host store."""
        self.runtime.detach()
