"""Commands for predictors and performance: train-predictor, eval-predictor, bench (simulate: simulate_cmd.py).

Wiring only: options in, library call, table or JSON out. Registered on `app` (app.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from moe_prefetch.errors import ConfigError
from moe_prefetch.evidence.fitting import DEFAULT_CONTEXT
from moe_prefetch.evidence.scenario import DEFAULT_WARMUP
from moe_prefetch.report import text as report_text
from moe_prefetch.runtime.config import CACHE_POLICIES, M2R2_FILENAME, PREDICTORS, RuntimeConfig, train_adapters_hint

from .app import EXIT_INTERRUPTED, Command, app, given, stderr, stdout

# `--data` names for the demo model's own text: the Python standard library split as the demo
# was trained (moe_prefetch.predict.corpus), written once to a cache file, so a fresh clone needs no files.
DATA_SPLITS = {"demo-train": "train", "demo-heldout": "heldout"}
# moe_prefetch.evidence.bench.SHAPES' names, restated so `bench --help` does not load torch (a test keeps them equal).
SHAPE_NAMES = ("mixtral-8x7b", "qwen3-30b-a3b", "olmoe-1b-7b", "deepseek-v2-lite", "gpt-oss-20b")


def _write_json(path: Path, payload) -> None:
    """Atomic: temp file then rename, so an interrupted write never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)


def _csv(value: str, cast=str) -> list:
    try:
        return [cast(v.strip()) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"cannot parse {value!r}; give a comma-separated list such as 0.125,0.25,0.5") from None


def _data_files(data: list[Path]) -> list[Path]:
    """--data values: text files, or demo-train / demo-heldout (the demo's corpus splits)."""
    from moe_prefetch.predict.corpus import split_file

    return [split_file(DATA_SPLITS[str(d)]) if str(d) in DATA_SPLITS else d for d in data]


@app.command("train-predictor", cls=Command)
def train_predictor(
    model: Annotated[str, typer.Option(help="Checkpoint folder, 'demo' or 'demo-fine'.")] = "demo",
    data: Annotated[
        list[Path], typer.Option(help="Training text file, or demo-train (the demo's training text); repeatable.")
    ] = ...,
    out: Annotated[Path, typer.Option(help="Adapters file to write (safetensors).")] = ...,
    lookahead: Annotated[int, typer.Option(help="Layers ahead to predict (d = 1..D).")] = 3,
    rank: Annotated[int, typer.Option(help="Rank of each low-rank adapter.")] = 16,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 1500,
    max_tokens: Annotated[int, typer.Option(help="Tokens of text to collect residuals from.")] = 60_000,
    device: Annotated[str, typer.Option(help="auto, cuda or cpu.")] = "auto",
    source: Annotated[
        str, typer.Option(help="Prediction point: router-input (post-attention, better) or residual (layer input).")
    ] = "router-input",
):
    """Train M2R2 adapters for a model on text; resumes if a previous run was interrupted."""
    from moe_prefetch.model.offline import train_predictor as train

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr(),
        transient=False,
    )
    # The message goes out after the live display has stopped (printed inside it, by another
    # console, it could be overwritten by the display's last frame), unwrapped so the path and the
    # advice stay whole at any width.
    try:
        with progress:
            collect_task = progress.add_task("collect", total=max_tokens, info="")
            train_task = progress.add_task("train", total=steps, info="")
            metrics = train(
                model,
                _data_files(data),
                out,
                lookahead=lookahead,
                rank=rank,
                seed=seed,
                steps=steps,
                max_tokens=max_tokens,
                device=device,
                source=source,
                collect_progress=lambda n: progress.advance(collect_task, n),
                progress=lambda step, loss: progress.update(train_task, completed=step + 1, info=f"loss {loss:.4f}"),
            )
    except KeyboardInterrupt:
        stderr().print(
            f"interrupted: progress saved to {out}.ckpt; run the same command to resume",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    table = Table(title=f"M2R2 adapters -> {out}")
    table.add_column("d")
    table.add_column("next-gate recall@k (val)")
    table.add_column("m2r2 recall@k (val)")
    val = metrics.get("val_recall", {})
    for d in sorted(val.get("m2r2", {})):
        table.add_row(str(d), f"{val['next-gate'][d]:.3f}", f"{val['m2r2'][d]:.3f}")
    stdout().print(table)
    stdout().print(
        f"final loss {metrics['final_loss']:.4f}, {metrics['train_seconds']:.0f} s, "
        f"{metrics['train_tokens']} train tokens"
    )


@app.command("eval-predictor", cls=Command)
def eval_predictor(
    model: Annotated[str, typer.Option(help="Checkpoint folder, 'demo' or 'demo-fine'.")] = "demo",
    data: Annotated[
        list[Path], typer.Option(help="Held-out text file, or demo-heldout (the demo's held-out text); repeatable.")
    ] = ...,
    predictor_path: Annotated[Path | None, typer.Option(help="M2R2 adapters (default: the model folder's).")] = None,
    lookahead: Annotated[int, typer.Option(help="Distances d = 1..D to score.")] = 3,
    margin: Annotated[int, typer.Option(help="Extra experts for the k+margin precision/recall.")] = 2,
    max_tokens: Annotated[int, typer.Option(help="Held-out tokens to score.")] = 20_000,
    device: Annotated[str, typer.Option(help="auto, cuda or cpu.")] = "auto",
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the full result as JSON here.")] = None,
):
    """Predictor recall@k: the share of the router's actual top-k each predictor named, per distance and per layer."""
    from moe_prefetch.model.offline import eval_predictor as evaluate
    from moe_prefetch.predict.evaluate import format_table

    result = evaluate(
        model,
        _data_files(data),
        predictor_path=predictor_path,
        lookahead=lookahead,
        margin=margin,
        max_tokens=max_tokens,
        device=device,
    )
    stdout().print(format_table(result), markup=False, highlight=False)
    if json_out is not None:
        _write_json(json_out, result)


def _check_bench_options(
    model: str, preds: list[str] | None, fractions: list[float], tokens: int, lookahead: int, device
) -> tuple[Path | None, list[str], str | None]:
    """Every option, before the first configuration runs: a typo must not cost a run. Returns the
    checkpoint folder (None for a shape), the predictors to run and a note on any left out:
    `preds` None is the default, every predictor, m2r2 only where there are adapters to run it."""
    from moe_prefetch.model.folders import DEMOS, resolve_path

    chosen = list(PREDICTORS) if preds is None else preds
    unknown = [p for p in chosen if p not in PREDICTORS]
    if unknown or not chosen:
        raise ConfigError(
            f"unknown predictor(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(PREDICTORS)}"
        )
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise ConfigError(f"--cache-fractions {bad} must be shares in (0, 1], such as 0.125,0.25,0.5")
    if tokens < 1:
        raise ConfigError(f"--tokens {tokens} must be at least 1")
    RuntimeConfig(device=device, lookahead=lookahead)  # the runtime's own checks, with its messages
    if model.startswith("shape:"):
        if model.split(":", 1)[1] not in SHAPE_NAMES:
            raise ConfigError(f"unknown shape {model.split(':', 1)[1]!r}; choose one of {', '.join(SHAPE_NAMES)}")
        return None, chosen, None
    folder = resolve_path(model)
    adapters = folder / M2R2_FILENAME
    if "m2r2" not in chosen or adapters.is_file():
        return folder, chosen, None
    hint = train_adapters_hint(adapters, model if model in DEMOS else str(folder))
    if preds is not None:  # asked for by name: say how to get it
        raise ConfigError(f"m2r2 needs trained adapters at {adapters}; {hint}, or leave m2r2 out of --predictors")
    return folder, [p for p in chosen if p != "m2r2"], f"m2r2 left out: no adapters at {adapters}; {hint}"


def _weights_note(model: str, folder: Path | None) -> str:
    """What the weights are, as far as this command knows: the shipped demos are trained; any
    other folder's weights are whatever it holds (a model saved from a random init looks alike)."""
    from moe_prefetch.model.folders import DEMOS

    if folder is None:
        return "random weights: routing is random, numbers show expert-size effects only"
    if folder.resolve() in {d.resolve() for d in DEMOS.values()}:
        return "trained weights: a shipped demo"
    return "weights as loaded from the folder"


# The measured bench's cache shares when none are given (of every expert of the model as it runs here).
MEASURED_FRACTIONS = "0.125,0.25,0.5"


@app.command(cls=Command)
def bench(
    model: Annotated[
        str,
        typer.Option(
            help="Checkpoint folder, 'demo', 'demo-fine', or shape:NAME for a real model's shape at its real depth, "
            f"simulated (NAME is one of {', '.join(SHAPE_NAMES)})."
        ),
    ] = "demo",
    predictors: Annotated[
        str | None,
        typer.Option(
            help=f"Comma-separated predictors, from {', '.join(PREDICTORS)} (default: all; m2r2 only where the "
            "model has trained adapters)."
        ),
    ] = None,
    cache: Annotated[
        str | None,
        typer.Option(
            help="shape:NAME: 'fit' (the largest cache that fits each profile after weights, KV cache, buffers and "
            "the prefill peak; the default) or comma-separated shares of it, such as 0.5,fit."
        ),
    ] = None,
    cache_fractions: Annotated[
        str | None,
        typer.Option(
            help=f"Measured benches: shares of all experts held on the device here (default {MEASURED_FRACTIONS}). "
            "shape:NAME: what-if rows, a share of bf16 experts' memory, each saying whether it fits."
        ),
    ] = None,
    profiles: Annotated[
        str, typer.Option(help="Comma-separated hardware profiles to simulate.")
    ] = "rtx3060-12gb,rtx4090-24gb",
    host: Annotated[
        str | None,
        typer.Option(help="Host profile (CPU, DRAM, memory) for the host lane and the CPU lane (`profiles`)."),
    ] = None,
    host_memory: Annotated[
        str | None, typer.Option(help="Installed host memory, such as 64GB (default: the host profile's).")
    ] = None,
    context: Annotated[
        int | None, typer.Option(help=f"Tokens of KV cache reserved on the device (default {DEFAULT_CONTEXT}).")
    ] = None,
    tokens: Annotated[int, typer.Option(help="Decode tokens measured per configuration.")] = 32,
    warmup: Annotated[
        int | None,
        typer.Option(help=f"Decode tokens before measuring: the cold start (default {DEFAULT_WARMUP})."),
    ] = None,
    prompt: Annotated[str, typer.Option(help="Prompt text (demo and checkpoints).")] = "import os\n\ndef main(",
    lookahead: Annotated[int, typer.Option(help="Layers ahead to prefetch.")] = 2,
    shape_layers: Annotated[int, typer.Option(help="Decoder layers of a shape:NAME run with --routing measured.")] = 2,
    routing: Annotated[
        str | None,
        typer.Option(
            help="shape:NAME only. random (the default): uniform routing; demo or demo-fine: replay that demo's "
            "recorded routing and predictions over the shape's real layers (refused where it would expand the "
            "trace); all simulated. measured: run the random-weight model here with --shape-layers layers."
        ),
    ] = None,
    on_miss: Annotated[
        str,
        typer.Option(
            help="Comma-separated placements of a non-resident expert: wait (for its upload), host, auto. "
            "shape:NAME: every one is simulated; a measured bench runs the first."
        ),
    ] = "wait",
    cache_policy: Annotated[
        str,
        typer.Option(help=f"Comma-separated eviction policies to compare, from {', '.join(CACHE_POLICIES)}."),
    ] = "lru",
    experts_dtype: Annotated[
        str,
        typer.Option(
            help="Comma-separated expert formats: auto (the model's own), bf16, int8, int4. shape:NAME: every one "
            "is simulated; a measured bench runs the first."
        ),
    ] = "auto",
    device: Annotated[str, typer.Option(help="auto, cuda, cuda:N or cpu.")] = "auto",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write {rows, meta} JSON here.")] = None,
):
    """Every predictor at every cache size, measured side by side, plus simulated profiles sized to their memory."""
    from moe_prefetch.evidence.fitting import parse_bytes, parse_cache
    from moe_prefetch.runtime import profiles as hw

    profs = [hw.load_profile(name) for name in _csv(profiles)]
    host_profile = None if host is None else hw.load_host_profile(host)
    memory = parse_bytes(host_memory)
    routed = _check_routing(model, routing)
    if cache_fractions is None:
        cache_fractions = "" if routed else MEASURED_FRACTIONS  # shapes: what-ifs only when asked
    fractions = _csv(cache_fractions, float)
    given_preds = None if predictors is None else _csv(predictors)
    folder, preds, left_out = _check_bench_options(model, given_preds, fractions, tokens, lookahead, device)
    caches = [parse_cache(c) for c in _csv(cache)] if cache is not None else []
    if not routed and caches:
        raise ConfigError("--cache applies to shape:NAME benches; a measured bench runs --cache-fractions here")
    if routed and not caches and not fractions:
        caches = [parse_cache(None)]
    placements = _csv(on_miss)
    for placement in placements:
        RuntimeConfig(on_miss=placement)  # the runtime's own check and message
    policies = _csv(cache_policy)
    if not policies:
        raise ConfigError(f"--cache-policy is empty; give one or more of {', '.join(CACHE_POLICIES)}")
    for policy in policies:
        RuntimeConfig(cache_policy=policy)
    dtypes = _csv(experts_dtype)
    if not dtypes:
        raise ConfigError("--experts-dtype is empty; give one or more of auto, bf16, int8, int4")
    for dtype in dtypes:
        RuntimeConfig(experts_dtype=dtype)
    sizing = given(warmup=warmup, context=context, host_memory=memory)
    if sizing.get("warmup", 0) < 0:
        raise ConfigError(f"--warmup {warmup} must be 0 or more tokens")
    routing = routing or ("random" if routed else None)
    if (folder is None and routing in ("random", "measured")) and "m2r2" in preds:
        preds.remove("m2r2")
        left_out = "m2r2 left out: a random-weight shape has no adapters (--routing demo replays the demo's m2r2)"
    if not preds:
        raise ConfigError("no predictor left to bench; add none or next-gate to --predictors")
    out = stdout()
    if left_out:
        stderr().print(f"note: {left_out}", style="yellow", markup=False, highlight=False)

    import torch

    from moe_prefetch.evidence.bench import run_bench, run_routed_bench, shape_model
    from moe_prefetch.model.loading import load

    predictor_path = None
    if routed:
        result = run_routed_bench(
            model,
            routing,
            preds,
            tokens,
            profs,
            prompt=prompt,
            lookahead=lookahead,
            on_miss=placements,
            host=host_profile,
            policies=policies,
            experts_dtypes=dtypes,
            caches=caches,
            fractions=fractions,
            progress=lambda row: out.print(
                f"  {row['experts_dtype']:<4} {row['on_miss']:<5} {row['policy']:<4} {row['predictor']:<15} "
                f"cache {report_text.cache_label(row):<10} decode hit {report_text.pct(row['decode_hit_rate'])} "
                "(simulated)"
            ),
            **sizing,
        )
        note = (
            "uniform random routing, simulated"
            if routing == "random"
            else f"routing recorded from {routing}, repeated over the shape's layers: simulated only"
        )
    else:
        if folder is None:
            stock = shape_model(model.split(":", 1)[1], layers=shape_layers)
            ids = torch.randint(0, stock.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
            note = _weights_note(model, folder)
        else:
            from transformers import AutoTokenizer

            stock, runtime = load(folder, device="cpu", cache_slots=None)  # materialise, then bench attaches
            stock = runtime.detach()
            ids = AutoTokenizer.from_pretrained(str(folder))(prompt, return_tensors="pt")["input_ids"]
            predictor_path = str(folder / M2R2_FILENAME)
            note = _weights_note(model, folder)
        result = run_bench(
            stock,
            ids,
            preds,
            fractions,
            tokens,
            device=device,
            profiles=profs,
            predictor_path=predictor_path,
            lookahead=lookahead,
            on_miss=placements[0],
            policies=policies,
            experts_dtype=dtypes[0],
            host=host_profile,
            progress=lambda row: out.print(
                f"  {row['policy']:<4} {row['predictor']:<15} cache {row['cache_fraction']:<6} "
                f"hit {row['hit_rate']:.1%}  {report_text.rate(row['tokens_per_s'])} tok/s"
            ),
            **{"warmup": DEFAULT_WARMUP, **sizing},
        )
    result["meta"].update(
        model=model,
        note=note,
        predictors=preds,
        profiles=[p.name for p in profs],
        policies=policies,
        experts_dtypes=dtypes,
        host=None if host_profile is None else host_profile.name,
        host_memory=memory,
    )
    measured_on = result["meta"]["measured_on"]
    title = f"bench {model} ({note}; {'simulated' if measured_on == 'simulated' else f'measured on {measured_on}'})"
    # one policy or the model's own format: the column would repeat it (and narrow the rest)
    out.print(report_text.bench_table(result, title, policies=len(policies) > 1, formats=dtypes != ["auto"]))
    capped = sorted(
        {
            (p, round(cap, 1))
            for row in result["rows"]
            for p, cap in (row.get("cpu_bound") or {}).items()
            if cap and (row["simulated"].get(p) or 0) >= 0.95 * cap
        }
    )
    if capped:
        host_name = result["meta"]["host"] or "ddr4-3200-2ch (the default)"
        out.print(
            "note: simulated figures within 5% of "
            + ", ".join(f"{cap} tok/s on {p}" for p, cap in capped)
            + f" are the CPU lane's bound on host {host_name}: the framework's and the runtime's host time per "
            "layer, not the device, set the speed there",
            style="yellow",
            markup=False,
            highlight=False,
        )
    if json_out is not None:
        _write_json(json_out, result)


def _shape(model: str) -> str:
    """'shape:NAME' -> NAME, checked."""
    from moe_prefetch.evidence.bench import SHAPES

    name = model.split(":", 1)[1]
    if name not in SHAPES:
        raise ConfigError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    return name


def _check_routing(model: str, routing: str | None) -> bool:
    """True when the bench simulates a shape over `routing` (random, demo, demo-fine; the default
    for shape:NAME is random); False when it measures a run here (checkpoints, --routing measured)."""
    from moe_prefetch.evidence.routing import ROUTINGS

    if routing is not None and routing not in (*ROUTINGS, "measured"):
        raise ConfigError(f"unknown routing {routing!r}; choose one of {', '.join(ROUTINGS)} or measured")
    if not model.startswith("shape:"):
        if routing is not None:
            raise ConfigError(f"--routing applies to shape:NAME models; {model!r} routes by itself, drop --routing")
        return False
    return routing != "measured"
