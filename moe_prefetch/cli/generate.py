"""`run`'s moving parts: the prompt, the tokenizer, streaming generation and the live view.

Text goes to stdout as it is decoded. The status line (tokens/s, hit rate, stall share)
goes to stderr, and only when stderr is a terminal. When stdout is the same terminal the
text is drawn inside the live region (a terminal cannot hold a fixed status line under
freely written text) and printed in full once generation ends.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from moe_prefetch.errors import ConfigError
from moe_prefetch.model import generation
from moe_prefetch.model.generation import GenerationSettings
from moe_prefetch.report.profiling import RunRecorder, build_run, model_record

TOKENIZER_FIX = (
    "save the model's tokenizer beside its weights (tokenizer.save_pretrained(FOLDER)), "
    "pass --tokenizer FOLDER_OR_TOKENIZER_JSON, or give token ids with --prompt-ids 1,2,3"
)


def read_prompt(prompt: str | None, prompt_file: Path | None, ask) -> str:
    """--prompt, --prompt-file (the caller refuses both), a question on a terminal, or piped stdin."""
    if prompt_file is not None:
        try:
            text = prompt_file.expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            reason = getattr(err, "strerror", None) or err
            raise ConfigError(f"cannot read --prompt-file {prompt_file}: {reason}") from None
    elif prompt is not None:
        text = prompt
    elif sys.stdin is not None and sys.stdin.isatty():
        text = ask()
    else:
        text = sys.stdin.read() if sys.stdin is not None else ""
    if not text.strip():
        raise ConfigError("the prompt is empty; pass --prompt TEXT, --prompt-file FILE or pipe text on stdin")
    return text


def load_tokenizer(source: Path, *, required: bool = True):
    """The tokenizer in a folder or tokenizer.json (generation.load_tokenizer), naming run's options as the fix."""
    return generation.load_tokenizer(source, required=required, fix=TOKENIZER_FIX)


def parse_ids(value: str) -> list[int]:
    """--prompt-ids "1,2,3" (spaces allowed) into a list of token ids."""
    try:
        ids = [int(v) for v in value.replace(" ", ",").split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--prompt-ids {value!r} must be comma-separated token ids such as 1,2,3") from None
    if not ids or min(ids) < 0:
        raise ConfigError(f"--prompt-ids {value!r} must be one or more token ids >= 0, such as 1,2,3")
    return ids


def check_ids(ids: list[int], vocab_size: int | None, source: str) -> None:
    """Ids the model's embedding cannot look up fail here, naming both sides, not as an IndexError."""
    if vocab_size is not None and ids and max(ids) >= vocab_size:
        fix = (
            "give ids below that"
            if source == "--prompt-ids"
            else "the tokenizer belongs to another model; pass the model's own with --tokenizer"
        )
        raise ConfigError(
            f"{source} gives token id {max(ids)} but the model's vocabulary has {vocab_size} ids "
            f"(0..{vocab_size - 1}, vocab_size in config.json); {fix}"
        )


class IdsAsText:
    """Stands in for a tokenizer when there is none: token ids are shown as numbers."""

    pad_token_id = eos_token_id = None

    def decode(self, ids, **_) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        return "".join(f"{i} " for i in ids)  # a trailing space: the streamer prints up to the last one


class LiveView:
    """The prompt, then the generated text, on stdout; a status line on stderr (terminals only)."""

    def __init__(self, *, show_text: bool, show_status: bool, prompt: str = ""):
        self.show_text = show_text
        self.prompt = prompt  # echoed so the continuation reads in context
        self.parts: list[str] = []
        self.err = Console(stderr=True)
        self.inline = show_status and show_text and sys.stdout.isatty()
        self.live = Live(console=self.err, refresh_per_second=8, transient=True) if show_status else None
        self.status = Text("loading…", style="dim")

    def __enter__(self) -> LiveView:
        if self.show_text and not self.inline:
            sys.stdout.write(self.prompt)
            sys.stdout.flush()
        if self.live is not None:
            self.live.update(self._render())
            self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.stop()
        if self.inline:
            sys.stdout.write(self.prompt + "".join(self.parts))
        if self.show_text:
            sys.stdout.write("\n")
            sys.stdout.flush()

    def text(self, chunk: str) -> None:
        self.parts.append(chunk)
        if self.show_text and not self.inline:
            sys.stdout.write(chunk)
            sys.stdout.flush()
        elif self.inline:
            self.live.update(self._render())

    def update(self, recorder: RunRecorder) -> None:
        if self.live is None:
            return
        stats, tokens = recorder.stats, recorder.tokens
        decode_s = tokens[-1]["t"] - tokens[0]["t"] if len(tokens) > 1 else 0.0
        stall = sum(t["stall_seconds"] for t in tokens[1:])
        parts = [f"{len(tokens)} tokens"]
        if decode_s > 0:
            parts += [f"{(len(tokens) - 1) / decode_s:.1f} tok/s", f"stalled {stall / decode_s:.0%}"]
        demand = stats.get("hits", 0) + stats.get("misses", 0)
        if demand:
            parts.append(f"hit rate {stats['hits'] / demand:.0%}")
        parts.append(f"{stats.get('device', '?')}, {stats.get('predictor', '?')} predictor")
        self.status = Text(" · ".join(parts), style="dim")
        self.live.update(self._render())

    def _render(self):
        if not self.inline:
            return self.status
        # Only the tail that fits: a live region taller than the terminal cannot be redrawn.
        lines = (self.prompt + "".join(self.parts)).split("\n")[-max(self.err.height - 3, 1) :]
        return Group(Text("\n".join(lines)), self.status)


def _streamer(tokenizer, recorder: RunRecorder, view: LiveView):
    """A TextStreamer that is also the recorder's tick (transformers loads only when generating)."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def put(self, value) -> None:
            if not self.next_tokens_are_prompt:  # the first call carries the prompt, not a new token
                recorder.token()
                view.update(recorder)
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                view.text(text)

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def generate(model, runtime, tokenizer, ids: list[int], settings: GenerationSettings, view: LiveView) -> RunRecorder:
    """Generate from prompt token `ids` with streaming, recording every token. Ctrl-C stops at
    once and returns what ran, `recorder.interrupted` set. `tokenizer` may be `IdsAsText`."""
    recorder = RunRecorder(runtime)
    streamer = _streamer(tokenizer, recorder, view)
    recorder.start()
    try:
        generation.generate(
            model,
            ids,
            settings,
            device=runtime.device,
            pad_token_id=generation.pad_token_id(tokenizer),
            streamer=streamer,
        )
    except KeyboardInterrupt:
        streamer.end()
        recorder.finish(interrupted=True)
    else:
        recorder.finish()
    return recorder


def record_run(
    folder: Path,
    options: dict,
    tokenizer,
    prompt: str,
    ids: list[int],
    settings: GenerationSettings,
    *,
    echo_prompt: bool,
    show_text: bool,
    show_status: bool,
    config: dict,
) -> dict:
    """Load the model with `options`, generate from `ids` (`prompt` is their text, echoed first
    if `echo_prompt`) while showing text and status, and return the run record (profiling's run.json schema).
    The model is detached before returning."""
    import moe_prefetch
    from moe_prefetch.runtime.sizing import PREFILL_CHUNK

    # The pool is sized after the KV cache of this run's length and the prefill of one chunk
    # (sizing.reserve): prompts are fed PREFILL_CHUNK tokens at a time, as `plan` sized them.
    options = {"max_length": len(ids) + settings.max_new_tokens, "prefill_chunk": PREFILL_CHUNK, **options}
    model, runtime = moe_prefetch.load(folder, **options)
    try:
        with LiveView(show_text=show_text, show_status=show_status, prompt=prompt if echo_prompt else "") as view:
            recorder = generate(model, runtime, tokenizer, ids, settings, view)
        config = {
            **config,
            "prompt": prompt,
            "prompt_tokens": len(ids),
            "runtime": asdict(runtime.config),
            "generation": asdict(settings),
        }
        return build_run(recorder, model=model_record(runtime, str(folder)), config=config, text="".join(view.parts))
    finally:
        runtime.detach()
