"""The `plan` command: every option for a model on a device and host, sized and simulated, and
the one to run. Wiring only: options in, `evidence.plan.plan`, table or JSON out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from moe_prefetch.evidence.fitting import DEFAULT_CONTEXT
from moe_prefetch.evidence.scenario import DEFAULT_WARMUP

from .app import Command, app, given, stdout


@app.command(cls=Command)
def plan(
    model: Annotated[
        str, typer.Option(help="Checkpoint folder, 'demo', 'demo-fine', or shape:NAME (a real model's shape).")
    ] = ...,
    profile: Annotated[
        str, typer.Option(help="Device profile (`profiles`), or 'local': the one `calibrate` measured here.")
    ] = ...,
    host: Annotated[
        str | None,
        typer.Option(help="Host profile (`profiles`), or 'local' (default: the shipped ddr4-3200-2ch desktop)."),
    ] = None,
    host_memory: Annotated[
        str | None, typer.Option(help="Installed host memory, such as 64GB (default: the host profile's).")
    ] = None,
    context: Annotated[
        int | None, typer.Option(help=f"Tokens of KV cache to reserve (default {DEFAULT_CONTEXT}).")
    ] = None,
    routing: Annotated[
        str | None,
        typer.Option(
            help="Routing to replay: own (a small checkpoint's), demo, demo-fine or random "
            "(default: the model's own when small, else the closest demo the trace allows)."
        ),
    ] = None,
    tokens: Annotated[int | None, typer.Option(help="Decode tokens measured per option (default 32).")] = None,
    warmup: Annotated[
        int | None, typer.Option(help=f"Decode tokens before measuring (default {DEFAULT_WARMUP}).")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write {options, recommended} JSON here.")] = None,
):
    """What to run on this card with this RAM: every experts_dtype x on_miss x predictor sized to the
    device and host, simulated, with a recommendation and its `moe-prefetch run` command."""
    from moe_prefetch.errors import ConfigError
    from moe_prefetch.evidence.fitting import parse_bytes
    from moe_prefetch.evidence.plan import plan as make_plan
    from moe_prefetch.runtime import profiles as hw

    device = hw.load_profile(profile)
    host_profile = None if host is None else hw.load_host_profile(host)
    if routing is not None and routing not in ("own", "demo", "demo-fine", "random"):
        raise ConfigError(f"unknown routing {routing!r}; choose own, demo, demo-fine or random")
    if routing == "own" and model.startswith("shape:"):
        raise ConfigError("a shape has no routing of its own; use --routing demo, demo-fine or random")
    for name, value in (("--tokens", tokens), ("--warmup", warmup), ("--context", context)):
        if value is not None and value < (0 if name == "--warmup" else 1):
            raise ConfigError(f"{name} {value} is out of range; give a positive number of tokens")
    out = stdout()
    result = make_plan(
        model,
        device,
        host_profile,
        routing=routing,
        host_memory=parse_bytes(host_memory),
        progress=lambda o: out.print(
            f"  {o['experts_dtype']:<5} {o['on_miss']:<5} {o['predictor']:<15} "
            + (f"{o['simulated_tokens_per_s']:.1f} tok/s (simulated)" if o["simulated_tokens_per_s"] else "-")
            + ("" if o["fits"] else "  does not fit"),
            markup=False,
            highlight=False,
        ),
        **given(context=context, tokens=tokens, warmup=warmup),
    )
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=1))
    out.print(_table(result))
    out.print(f"note: {result['note']}", style="dim", markup=False, highlight=False)
    rec = result["recommended"]
    if rec is None:
        out.print(
            f"nothing fits {result['profile']} with host {result['host']}: "
            + next(o["why_not"] for o in result["options"] if o["why_not"]),
            style="yellow",
            markup=False,
            highlight=False,
        )
        raise typer.Exit(1)
    out.print(f"recommended: {rec['reason']}", markup=False, highlight=False)
    out.print(f"  {rec['command']}", markup=False, highlight=False)


def _table(result: dict) -> Table:
    gib = 2**30
    table = Table(
        title=f"plan {result['model']} on {result['profile']} with host {result['host']} "
        f"(context {result['context']}, routing {result['routing']}; simulated, steady state after "
        f"{result['warmup']} tokens)",
        box=box.SIMPLE_HEAD,
    )
    for column in ("experts", "on miss", "predictor"):
        table.add_column(column, no_wrap=True)
    for column in ("slots", "device\nGiB", "host\nGiB", "fits", "sim\ntok/s", "bound", "config\nbound", "of\noracle"):
        table.add_column(column, justify="right")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for o in result["options"]:
        table.add_row(
            o["experts_dtype"],
            o["on_miss"],
            o["predictor"],
            str(o["cache_slots"]),
            f"{o['device_bytes'] / gib:.1f}",
            f"{o['host_bytes'] / gib:.1f}",
            "yes" if o["fits"] else "no",
            fmt(o["simulated_tokens_per_s"], ".1f") if o["fits"] else "-",
            fmt(o["bound_tokens_per_s"], ".1f") if o["fits"] else "-",
            fmt(o["config_bound_tokens_per_s"], ".1f") if o["fits"] else "-",
            fmt(o.get("oracle_share"), ".0%") if o["fits"] else "-",
        )
    return table
