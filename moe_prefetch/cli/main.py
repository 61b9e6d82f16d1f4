"""The `moe-prefetch` command: wiring only.

Each command parses options, builds the library's configs (never restating their
defaults), calls the library and prints. User mistakes, typed `MoePrefetchError`s and
click usage errors alike, become one line `error: ...` on stderr and exit code 2, in one
place: `_Group`. Tracebacks only with MOE_PREFETCH_DEBUG=1. Rich honours NO_COLOR.
More commands register on the same `app` (e.g. from moe_prefetch/cli/predictor_cmds.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from moe_prefetch import profiles as hw
from moe_prefetch import profiling
from moe_prefetch.config import PREDICTORS, RuntimeConfig
from moe_prefetch.errors import ConfigError, MoePrefetchError

try:  # recent typer vendors click as typer._click; older releases raise click's own classes
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException, UsageError

DEBUG_ENV = "MOE_PREFETCH_DEBUG"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


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
            message = str(err)
        message = " ".join(line.strip() for line in message.splitlines())  # one line, always
        _stderr().print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_USAGE) from None
    except Exception as err:
        if _debug():
            raise
        _stderr().print(
            f"error: unexpected {type(err).__name__}: {err} (set {DEBUG_ENV}=1 for the traceback)",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None


class _Group(TyperGroup):
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


def _stdout() -> Console:
    return Console(width=None if sys.stdout.isatty() else 120)  # pipes and logs: no 80-column wrap


def _stderr() -> Console:
    return Console(stderr=True, width=None if sys.stderr.isatty() else 120)


@app.callback()
def _root(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what the library decides.")] = False):
    from rich.logging import RichHandler
    from transformers.utils import logging as hf_logging

    logger = logging.getLogger("moe_prefetch")
    for handler in [h for h in logger.handlers if getattr(h, "_moe_prefetch_cli", False)]:
        logger.removeHandler(handler)
    handler = RichHandler(console=_stderr(), show_time=False, show_path=False)
    handler._moe_prefetch_cli = True
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    hf_logging.set_verbosity_error()  # transformers' generation chatter is not ours to show


# -- run -------------------------------------------------------------------------------
def _default(name: str) -> str:
    """The library's default, for help texts (the CLI never restates it)."""
    return f"(default {getattr(RuntimeConfig, name)})"


@app.command()
def run(
    model: Annotated[str, typer.Option(help="Checkpoint folder, or 'demo' for the shipped demo model.")] = "demo",
    prompt: Annotated[str | None, typer.Option(help="Prompt text.")] = None,
    prompt_file: Annotated[Path | None, typer.Option(help="Read the prompt from this file.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Tokens to generate.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature; 0 is greedy.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed for sampling.")] = None,
    device: Annotated[str | None, typer.Option(help=f"auto, cuda, cuda:N or cpu {_default('device')}.")] = None,
    cache_budget: Annotated[
        str | None, typer.Option(help="Cache size: '6GiB', '512MB' or '75%' of free memory.")
    ] = None,
    cache_slots: Annotated[int | None, typer.Option(help="Expert slots in the device cache (at least top_k).")] = None,
    profile: Annotated[
        str | None, typer.Option(help="Size the cache as on this hardware profile (`profiles`).")
    ] = None,
    predictor: Annotated[str | None, typer.Option(help=f"{', '.join(PREDICTORS)} {_default('predictor')}.")] = None,
    lookahead: Annotated[
        int | None, typer.Option(help=f"Layers ahead to prefetch, 1..8 {_default('lookahead')}.")
    ] = None,
    predictor_path: Annotated[Path | None, typer.Option(help="Trained predictor file (m2r2 adapters).")] = None,
    report: Annotated[Path | None, typer.Option(help="Write run.json and report.html into this folder.")] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Only the generated text, no status or summary.")
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print {text, summary, report} as JSON; no streaming.")
    ] = False,
):
    """Generate text with experts offloaded, streaming it, then summarise what the cache did."""
    from moe_prefetch.loading import resolve_path

    from .generate import GenerationSettings, load_tokenizer, read_prompt, record_run

    chosen = [
        n
        for n, v in (("--cache-budget", cache_budget), ("--cache-slots", cache_slots), ("--profile", profile))
        if v is not None
    ]
    if len(chosen) > 1:
        raise ConfigError(f"give one of --cache-budget, --cache-slots or --profile, not {' and '.join(chosen)}")
    options = _given(
        device=device,
        cache_budget=cache_budget,
        cache_slots=cache_slots,
        predictor=predictor,
        lookahead=lookahead,
        predictor_path=None if predictor_path is None else str(predictor_path),
    )
    RuntimeConfig(**options)  # validate every option before anything slow
    settings = GenerationSettings(**_given(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed))
    folder = resolve_path(model)
    tokenizer = load_tokenizer(folder)
    if profile is not None:
        options["cache_slots"] = hw.slots_on(hw.load_profile(profile), hw.model_size(folder))
    text = read_prompt(prompt, prompt_file, ask=lambda: typer.prompt("prompt"))
    show_status = not (quiet or json_out) and sys.stderr.isatty()
    record = record_run(
        folder,
        options,
        tokenizer,
        text,
        settings,
        show_text=not json_out,
        show_status=show_status,
        config={"model": model, "profile": profile},
    )
    paths = profiling.write_report(report, record) if report is not None else None
    if json_out:
        summary = {"text": record["text"], "summary": record["summary"], "report": str(paths[0]) if paths else None}
        typer.echo(json.dumps(summary, indent=1))
    elif not quiet:
        err = _stderr()
        if record["interrupted"]:
            err.print(f"interrupted after {len(record['tokens'])} tokens", style="yellow")
        err.print(profiling.tables(record)[0])
        if paths:
            err.print(f"report: {paths[1]} (data: {paths[0]})", markup=False, highlight=False)
    if record["interrupted"]:
        raise typer.Exit(EXIT_INTERRUPTED)


def _given(**values) -> dict:
    """Only the options the user gave, so the library's defaults apply to the rest."""
    return {k: v for k, v in values.items() if v is not None}


# -- report ----------------------------------------------------------------------------
@app.command()
def report(
    run_json: Annotated[Path, typer.Argument(help="run.json written by `run --report` (or its folder).")],
    html: Annotated[Path | None, typer.Option(help="Also render the HTML report to this file.")] = None,
):
    """Show a recorded run as tables, and optionally re-render its HTML report."""
    record = profiling.load_run(run_json)
    out = _stdout()
    for table in profiling.tables(record):
        out.print(table)
    if html is not None:
        out.print(f"wrote {profiling.write_html(html, record)}", markup=False, highlight=False)


# -- profiles --------------------------------------------------------------------------
@app.command("profiles")
def profiles_cmd(name: Annotated[str | None, typer.Argument(help="Show this profile in full.")] = None):
    """List hardware profiles, or show one with its sources."""
    out = _stdout()
    if name is not None:
        p = hw.load_profile(name)
        table = Table(title=f"{p.name}: {p.description}", show_header=False)
        for key, value in (
            ("device memory", profiling.fmt_bytes(p.device_memory_bytes)),
            ("usable", f"{p.usable_fraction:.0%} = {profiling.fmt_bytes(p.usable_bytes)}"),
            ("H2D bandwidth", f"{p.h2d_bandwidth_bytes_per_s / 1e9:.1f} GB/s"),
            ("memory bandwidth", f"{p.hbm_bandwidth_bytes_per_s / 1e12:.2f} TB/s"),
            ("BF16 compute", f"{p.peak_bf16_flops / 1e12:.1f} TFLOP/s"),
            ("interconnect", p.interconnect),
            ("file", str(p.path)),
        ):
            table.add_row(key, value)
        out.print(table)
        for key, source in p.sources.items():
            out.print(f"[bold]{key}[/bold]: {source}", highlight=False)
        return
    table = Table(title="hardware profiles", box=box.SIMPLE_HEAD)
    for col in ("name", "memory\nGiB", "usable", "H2D\nGB/s", "HBM\nTB/s", "BF16\nTFLOP/s", "link"):
        table.add_column(col, no_wrap=col != "link", justify="left" if col in ("name", "link") else "right")
    for p in hw.list_profiles():
        table.add_row(
            p.name,
            f"{p.device_memory_bytes / 2**30:.0f}",
            f"{p.usable_fraction:.0%}",
            f"{p.h2d_bandwidth_bytes_per_s / 1e9:.0f}",
            f"{p.hbm_bandwidth_bytes_per_s / 1e12:.2f}",
            f"{p.peak_bf16_flops / 1e12:.0f}",
            p.interconnect.split(" (")[0],
        )
    out.print(table)
    out.print(f"searched: {', '.join(str(d) for d in hw.profile_dirs())}", markup=False, highlight=False)


# -- calibrate ---------------------------------------------------------------------------
@app.command()
def calibrate(
    out: Annotated[
        Path | None, typer.Option(help="Profile file to write (default ~/.config/moe-prefetch/profiles/NAME.toml).")
    ] = None,
    device: Annotated[str, typer.Option(help="CUDA device to measure: cuda or cuda:N.")] = "cuda",
    name: Annotated[str | None, typer.Option(help="Profile name (default: the GPU's, or --out's file name).")] = None,
):
    """Measure this GPU (pinned H2D bandwidth by copy size, free memory, ...) into a profile."""
    if out is not None and name is not None and out.stem != name:
        raise ConfigError(f"--name {name!r} must match the file name of --out ({out.stem!r}); drop one of them")
    if out is not None:
        name = out.stem
    profile, measured = hw.calibrate(device=device, name=name)
    path = hw.write_profile(profile, out if out is not None else hw.user_dir() / f"{profile.name}.toml")
    table = Table(title=f"pinned host->device copies on {measured['device']}")
    table.add_column("copy size", justify="right")
    table.add_column("GB/s", justify="right")
    for mib, rate in sorted(measured["h2d_by_mib"].items()):
        table.add_row(f"{mib} MiB", f"{rate / 1e9:.2f}")
    console = _stdout()
    console.print(table)
    console.print(
        f"free {profiling.fmt_bytes(measured['free_bytes'])} of "
        f"{profiling.fmt_bytes(measured['total_bytes'])}; wrote {path}",
        markup=False,
        highlight=False,
    )


# -- inspect -----------------------------------------------------------------------------
@app.command()
def inspect(
    model: Annotated[str, typer.Option(help="Checkpoint folder, or 'demo'.")] = "demo",
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """Describe a model's experts and the cache it needs, without loading its weights."""
    size = hw.model_size(model)
    slots, why = size.recommended_slots
    fits = [hw.fit(p, size) for p in hw.list_profiles()]
    if json_out:
        typer.echo(
            json.dumps(
                {
                    "model": {
                        **dataclasses.asdict(size),
                        "total_experts": size.total_experts,
                        "expert_total_bytes": size.expert_total_bytes,
                        "min_slots": size.min_slots,
                        "recommended_slots": slots,
                        "recommended_reason": why,
                        "all_miss_bytes_per_token": size.all_miss_bytes_per_token,
                    },
                    "profiles": [dataclasses.asdict(f) for f in fits],
                },
                indent=1,
            )
        )
        return
    b = profiling.fmt_bytes
    table = Table(title=f"{size.architecture} ({size.model_type}) at {size.path}", show_header=False)
    for key, value in (
        ("layers / MoE layers", f"{size.num_layers} / {size.moe_layers}"),
        ("experts per layer, top-k", f"{size.experts_per_layer}, top-{size.top_k}"),
        ("bytes per expert", f"{b(size.expert_bytes)} ({size.dtype})"),
        ("all experts", f"{size.total_experts} = {b(size.expert_total_bytes)}"),
        ("non-expert weights", b(size.non_expert_bytes)),
        ("smallest cache", f"{size.min_slots} slots = {b(size.min_slots * size.expert_bytes)} (top_k)"),
        ("recommended cache", f"{slots} slots = {b(slots * size.expert_bytes)} ({why})"),
        ("all-miss bytes per token", b(size.all_miss_bytes_per_token)),
    ):
        table.add_row(key, value)
    per_profile = Table(title="on each hardware profile")
    for col in ("profile", "room for experts", "slots", "fit", "all-miss ms/token"):
        per_profile.add_column(col)
    for f in fits:
        per_profile.add_row(
            f.profile, b(max(f.room_bytes, 0)), str(f.slots), f.verdict, f"{1e3 * f.all_miss_s_per_token:.3g}"
        )
    out = _stdout()
    out.print(table)
    out.print(per_profile)


def main() -> None:
    """Console entry point (`moe-prefetch`); errors are mapped by `_Group`."""
    app(prog_name="moe-prefetch")


from . import predictor_cmds  # noqa: E402, F401  (registers train-predictor, eval-predictor, bench, simulate)

if __name__ == "__main__":
    main()
