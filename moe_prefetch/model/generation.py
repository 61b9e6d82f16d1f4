"""Generation on a loaded model: the settings, the tokenizer from a folder, and the one call to
`model.generate` that `run` and `serve` share, so both produce the same tokens from the same
prompt and settings.

Tokens come out one at a time through a streamer; a `should_stop` callback, asked after every
token, ends generation at the next token (a client that went away, a server shutting down).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, ConfigError

# Files a tokenizer folder holds one of (fast, sentencepiece, BPE and WordPiece vocabularies).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt")


@dataclass(frozen=True)
class GenerationSettings:
    """How to sample. temperature 0 means greedy decoding; top_p 1 keeps every token."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= 1_000_000:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} must be in 1..1000000")
        if not 0.0 <= self.temperature <= 100.0:
            raise ConfigError(f"temperature={self.temperature} must be in [0, 100]; 0 is greedy")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1]; 1 keeps every token")

    def generate_kwargs(self) -> dict:
        """The sampling keywords of `model.generate` (greedy passes none, so the model's
        generation config cannot turn sampling on)."""
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.temperature > 0}
        if self.temperature > 0:
            kwargs["temperature"] = self.temperature
            if self.top_p < 1.0:
                kwargs["top_p"] = self.top_p
        return kwargs


def load_tokenizer(source: Path, *, required: bool = True, fix: str = "save the model's tokenizer beside its weights"):
    """The tokenizer in a folder (or a tokenizer.json file). A folder without one fails with a
    message ending in `fix`, or gives None when not `required`; transformers may return an empty
    tokenizer for a folder that has none, which would turn every prompt into zero tokens, so that
    counts as none."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    source = Path(source).expanduser()
    if source.is_dir() and not any((source / name).is_file() for name in TOKENIZER_FILES):
        # transformers' own message for this case names no file ("... from one of: )")
        if required:
            raise CheckpointError(f"{source} has no usable tokenizer (none of {', '.join(TOKENIZER_FILES)}); {fix}")
        return None
    try:
        if source.is_file():
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(source))
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
        usable = bool(tokenizer("def x", add_special_tokens=False)["input_ids"])
        reason = "it turns text into zero tokens"
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        usable, reason = False, str(err).splitlines()[0][:120] if str(err).strip() else type(err).__name__
    if usable:
        return tokenizer
    if required:
        raise CheckpointError(f"{source} has no usable tokenizer ({reason}); {fix}")
    return None


def pad_token_id(tokenizer) -> int | None:
    """What generate pads with: the tokenizer's pad token, else its end-of-sequence token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def token_streamer(on_token: Callable[[int], None]):
    """A streamer that hands each generated token id to `on_token` (the prompt is skipped)."""
    from transformers.generation.streamers import BaseStreamer

    class Tokens(BaseStreamer):
        prompt_seen = False

        def put(self, value) -> None:
            if not self.prompt_seen:  # generate's first call carries the prompt, not a new token
                self.prompt_seen = True
                return
            for token_id in value.reshape(-1).tolist():
                on_token(token_id)

        def end(self) -> None:
            pass

    return Tokens()


def generate(
    model,
    ids: list[int],
    settings: GenerationSettings,
    *,
    device,
    pad_token_id: int | None,
    streamer,
    should_stop: Callable[[], bool] | None = None,
):
    """`model.generate` from prompt token `ids` with `settings` (seeded, so sampling repeats),
    streaming to `streamer`. `should_stop()` is asked after every token; True ends generation
    within one more token. Returns generate's output (prompt and new tokens)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Stop(StoppingCriteria):
        # generate asks the criteria for token n+1 before it streams that token (on CUDA it
        # streams one step late), so a stop decided while token n streams ends generation
        # within the next token; the streamer may still get that one.
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), bool(should_stop()), dtype=torch.bool, device=input_ids.device)

    input_ids = torch.tensor([ids], device=device)
    extra = {"stopping_criteria": StoppingCriteriaList([Stop()])} if should_stop is not None else {}
    torch.manual_seed(settings.seed)
    return model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        **settings.generate_kwargs(),
        pad_token_id=pad_token_id,
        streamer=streamer,
        **extra,
    )
