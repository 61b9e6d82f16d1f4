"""The `moe-prefetch` typer app, its consoles and the one place errors become messages.

Command modules (commands.py, predictor_cmds.py) register on `app`; main.py imports them
all. User mistakes, typed `MoePrefetchError`s and click usage errors alike, become one line
`error: ...` on stderr and exit code 2, in `_Group`. Tracebacks only with
MOE_PREFETCH_DEBUG=1. Rich honours NO_COLOR. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from typing import Annotated

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

from moe_prefetch.errors import MoePrefetchError

try:  # recent typer vendors click as typer._click; older releases raise click's own classes
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException, UsageError

DEBUG_ENV = "MOE_PREFETCH_DEBUG"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# Library messages name settings as keywords (`cache_budget='1KB'`, `device='cpu'`), which is
# right for `attach`/`load` callers; here the same settings are options, so say it that way.
_KEYWORDS = (
    "cache_slots",
    "cache_budget",
    "predictor_path",
    "device",
    "predictor",
    "lookahead",
    "experts_dtype",
    "max_new_tokens",
    "temperature",
    "seed",
)
_ASSIGNED = re.compile(rf"\b({'|'.join(_KEYWORDS)})=('[^']*'|\S+?)(?=[\s:;,)]|$)")
_BARE = re.compile(r"\b(cache_slots|cache_budget|predictor_path)\b")


def as_options(message: str) -> str:
    """`cache_budget='1KB' holds ...; raise cache_budget` -> `--cache-budget 1KB holds ...; raise --cache-budget`."""

    def option(m: re.Match) -> str:
        value = m[2].strip("'") if " " not in m[2] else m[2]  # keep the quotes the shell would need
        return f"--{m[1].replace('_', '-')} {value}"

    message = _ASSIGNED.sub(option, message)
    return _BARE.sub(lambda m: f"--{m[1].replace('_', '-')}", message)


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


@contextlib.contextmanager
def _mapped_errors():
    """The one place errors become messages."""
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except (MoePrefetchError, ClickException) as err:
        if _debug() or type(err).__name__ == "NoArgsIsHelpError":  # typer prints the help for that one
            raise
        if isinstance(err, ClickException):
            message = err.format_message()
            if isinstance(err, UsageError) and err.ctx is not None:
                message += f" (see {err.ctx.command_path} --help)"
        else:
            message = as_options(str(err))
        message = " ".join(line.strip() for line in message.splitlines())  # one line, always
        stderr().print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_USAGE) from None
    except Exception as err:
        if _debug():
            raise
        stderr().print(
            f"error: unexpected {type(err).__name__}: {err} (set {DEBUG_ENV}=1 for the traceback)",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None


class _FlagsTakeNoValue:
    """Flags show no `<bool>` type in help: `--quiet true` is refused, so none must be suggested."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False):
                param.metavar = ""
        return params


class Command(_FlagsTakeNoValue, TyperCommand):
    """Every command's class: `@app.command(cls=Command)`."""


class _Group(_FlagsTakeNoValue, TyperGroup):
    def make_context(self, *args, **kwargs):
        with _mapped_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _mapped_errors():
            return super().invoke(ctx)


app = typer.Typer(
    cls=_Group,
    name="moe-prefetch",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Run Mixture-of-Experts models on GPUs too small to hold them: experts in host memory, "
    "a device slot cache, predictive prefetch.",
)


def stdout() -> Console:
    return Console(width=None if sys.stdout.isatty() else 120)  # pipes and logs: no 80-column wrap


def stderr() -> Console:
    return Console(stderr=True, width=None if sys.stderr.isatty() else 120)


def given(**values) -> dict:
    """Only the options the user gave, so the library's defaults apply to the rest."""
    return {k: v for k, v in values.items() if v is not None}


class _Once(logging.Filter):
    """Passes each distinct message once per command: the same words again add nothing."""

    def __init__(self):
        super().__init__()
        self.seen: set[tuple[int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


@app.callback()
def _root(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what the library decides.")] = False):
    from rich.logging import RichHandler

    logger = logging.getLogger("moe_prefetch")
    for handler in [h for h in logger.handlers if getattr(h, "_moe_prefetch_cli", False)]:
        logger.removeHandler(handler)
    handler = RichHandler(console=stderr(), show_time=False, show_path=False)
    handler._moe_prefetch_cli = True
    handler.addFilter(_Once())  # a bench attaches many times: its small-cache warning is said once
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    # transformers' generation chatter is not ours to show. Importing transformers here would add
    # most of a second to `--help`, so tell it through its environment variable unless it is loaded.
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    else:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
