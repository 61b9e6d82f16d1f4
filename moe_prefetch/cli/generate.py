"""`run`'s moving parts: the prompt, the tokenizer, streaming generation and the live view.

Text goes to stdout as it is decoded. The status line (tokens/s, hit rate, stall share)
goes to stderr, and only when stderr is a terminal. When stdout is the same terminal the
text is drawn inside the live region (a terminal cannot hold a fixed status line under
freely written text) and printed in full once generation ends.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text
from transformers import TextStreamer

from moe_prefetch.errors import CheckpointError, ConfigError
from moe_prefetch.profiling import RunRecorder, build_run, model_record


@dataclass(frozen=True)
class GenerationSettings:
    """How `run` samples. temperature 0 means greedy decoding."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= 1_000_000:
            raise ConfigError(f"--max-new-tokens {self.max_new_tokens} must be in 1..1000000")
        if not 0.0 <= self.temperature <= 100.0:
            raise ConfigError(f"--temperature {self.temperature} must be in [0, 100]; 0 is greedy")


def read_prompt(prompt: str | None, prompt_file: Path | None, ask) -> str:
    """--prompt, --prompt-file, an interactive question on a terminal, or piped stdin."""
    if prompt is not None and prompt_file is not None:
        raise ConfigError("give --prompt or --prompt-file, not both")
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


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(
            f"{folder} has no usable tokenizer ({str(err).splitlines()[0][:120]}); "
            "save the model's tokenizer into the folder (tokenizer.json)"
        ) from None


class LiveView:
    """Generated text on stdout, a status line on stderr (terminals only)."""

    def __init__(self, *, show_text: bool, show_status: bool):
        self.show_text = show_text
        self.parts: list[str] = []
        self.err = Console(stderr=True)
        self.inline = show_status and show_text and sys.stdout.isatty()
        self.live = Live(console=self.err, refresh_per_second=8, transient=True) if show_status else None
        self.status = Text("loading…", style="dim")

    def __enter__(self) -> LiveView:
        if self.live is not None:
            self.live.update(self._render())
            self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.stop()
        if self.inline:
            sys.stdout.write("".join(self.parts))
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
        lines = "".join(self.parts).split("\n")[-max(self.err.height - 3, 1) :]
        return Group(Text("\n".join(lines)), self.status)


class _Streamer(TextStreamer):
    """Decodes tokens as generate() produces them; each one is also a recorder tick."""

    def __init__(self, tokenizer, recorder: RunRecorder, view: LiveView):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.recorder = recorder
        self.view = view

    def put(self, value) -> None:
        if not self.next_tokens_are_prompt:  # the first call carries the prompt, not a new token
            self.recorder.token()
            self.view.update(self.recorder)
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.view.text(text)


def generate(
    model, runtime, tokenizer, prompt: str, settings: GenerationSettings, view: LiveView
) -> tuple[RunRecorder, int]:
    """Generate with streaming, recording every token; returns the recorder and the prompt's
    length in tokens. Ctrl-C stops at once and returns what ran, `recorder.interrupted` set."""
    import torch

    inputs = tokenizer(prompt, return_tensors="pt").to(runtime.device)
    recorder = RunRecorder(runtime)
    streamer = _Streamer(tokenizer, recorder, view)
    kwargs = {"max_new_tokens": settings.max_new_tokens, "do_sample": settings.temperature > 0}
    if settings.temperature > 0:
        kwargs["temperature"] = settings.temperature
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(settings.seed)
    recorder.start()
    try:
        model.generate(**inputs, **kwargs, pad_token_id=pad, streamer=streamer)
    except KeyboardInterrupt:
        streamer.end()
        recorder.finish(interrupted=True)
    else:
        recorder.finish()
    return recorder, int(inputs["input_ids"].shape[-1])


def record_run(
    folder: Path,
    options: dict,
    tokenizer,
    prompt: str,
    settings: GenerationSettings,
    *,
    show_text: bool,
    show_status: bool,
    config: dict,
) -> dict:
    """Load the model with `options`, generate while showing text and status, and return
    the run record (profiling's run.json schema). The model is detached before returning."""
    import moe_prefetch

    model, runtime = moe_prefetch.load(folder, **options)
    try:
        with LiveView(show_text=show_text, show_status=show_status) as view:
            recorder, prompt_tokens = generate(model, runtime, tokenizer, prompt, settings, view)
        config = {
            **config,
            "prompt": prompt,
            "prompt_tokens": prompt_tokens,
            "runtime": asdict(runtime.config),
            "generation": asdict(settings),
        }
        return build_run(recorder, model=model_record(runtime, str(folder)), config=config, text="".join(view.parts))
    finally:
        runtime.detach()
