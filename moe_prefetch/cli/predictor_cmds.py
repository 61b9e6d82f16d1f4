"""Commands for predictors and performance: train-predictor, eval-predictor, bench, simulate.

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

from moe_prefetch.errors import ConfigError, ReportError
from moe_prefetch.report import text as report_text
from moe_prefetch.runtime.config import CACHE_POLICIES, M2R2_FILENAME, PREDICTORS, RuntimeConfig, train_adapters_hint
from moe_prefetch.runtime.placement import ON_MISS

from .app import EXIT_INTERRUPTED, Command, app, stderr, stdout

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
    with progress:
        collect_task = progress.add_task("collect", total=max_tokens, info="")
        train_task = progress.add_task("train", total=steps, info="")
        try:
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
            stderr().print(f"interrupted: progress saved to {out}.ckpt; run the same command to resume")
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
    if bad or not fractions:
        raise ConfigError(f"--cache-fractions {bad or '(none given)'} must be shares in (0, 1], such as 0.125,0.25,0.5")
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


@app.command(cls=Command)
def bench(
    model: Annotated[
        str,
        typer.Option(
            help="Checkpoint folder, 'demo', 'demo-fine', or shape:NAME for a model with a real model's expert "
            "size (random weights; with --routing, a demo's recorded routing); "
            f"NAME is one of {', '.join(SHAPE_NAMES)}."
        ),
    ] = "demo",
    predictors: Annotated[
        str | None,
        typer.Option(
            help=f"Comma-separated predictors, from {', '.join(PREDICTORS)} (default: all; m2r2 only where the "
            "model has trained adapters)."
        ),
    ] = None,
    cache_fractions: Annotated[
        str, typer.Option(help="Comma-separated shares of all experts held on the device.")
    ] = "0.125,0.25,0.5",
    profiles: Annotated[
        str, typer.Option(help="Comma-separated hardware profiles to simulate.")
    ] = "rtx3060-12gb,rtx4090-24gb",
    host: Annotated[
        str | None, typer.Option(help="Host profile (CPU and DRAM) for placing missed experts (`profiles`).")
    ] = None,
    tokens: Annotated[int, typer.Option(help="Tokens to generate per configuration.")] = 32,
    prompt: Annotated[str, typer.Option(help="Prompt text (demo and checkpoints).")] = "import os\n\ndef main(",
    lookahead: Annotated[int, typer.Option(help="Layers ahead to prefetch.")] = 2,
    shape_layers: Annotated[int, typer.Option(help="Decoder layers of a shape:NAME model.")] = 2,
    routing: Annotated[
        str | None,
        typer.Option(
            help="shape:NAME only. demo or demo-fine: replay that demo's recorded routing and predictions over "
            "the shape's real layers (simulated only); random: run the random-weight model (the default)."
        ),
    ] = None,
    on_miss: Annotated[
        str,
        typer.Option(
            help="Comma-separated placements of a non-resident expert: wait (for its upload), host, auto. "
            "With --routing every one is simulated; a measured bench runs the first."
        ),
    ] = "wait",
    cache_policy: Annotated[
        str,
        typer.Option(help=f"Comma-separated eviction policies to compare, from {', '.join(CACHE_POLICIES)}."),
    ] = "lru",
    experts_dtype: Annotated[
        str,
        typer.Option(
            help="Comma-separated expert formats: auto (the model's own), bf16, int8, int4. A cache share is then "
            "of the memory bf16 experts would take, so compressed experts get more slots. With --routing every "
            "one is simulated; a measured bench runs the first."
        ),
    ] = "auto",
    device: Annotated[str, typer.Option(help="auto, cuda, cuda:N or cpu.")] = "auto",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write {rows, meta} JSON here.")] = None,
):
    """Every predictor at every cache size, measured side by side, plus simulated profiles."""
    from moe_prefetch.runtime import profiles as hw

    profs = [hw.load_profile(name) for name in _csv(profiles)]
    host_profile = None if host is None else hw.load_host_profile(host)
    fractions = _csv(cache_fractions, float)
    given_preds = None if predictors is None else _csv(predictors)
    folder, preds, left_out = _check_bench_options(model, given_preds, fractions, tokens, lookahead, device)
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
    routed = _check_routing(model, routing)
    if folder is None and not routed and "m2r2" in preds:
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
        routed = run_routed_bench(
            _shape(model),
            routing,
            preds,
            fractions,
            tokens,
            profs,
            prompt=prompt,
            lookahead=lookahead,
            on_miss=placements,
            host=host_profile,
            policies=policies,
            experts_dtypes=dtypes,
            progress=lambda row: out.print(
                f"  {row['experts_dtype']:<4} {row['on_miss']:<5} {row['policy']:<4} {row['predictor']:<15} "
                f"cache {row['cache_fraction']:<6} "
                f"decode hit {row['decode_hit_rate']:.1%} (simulated)"
            ),
        )
        note = f"routing recorded from {routing}, repeated over the shape's layers: simulated only"
    elif folder is None:
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
    result = routed or run_bench(
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
        progress=lambda row: out.print(
            f"  {row['policy']:<4} {row['predictor']:<15} cache {row['cache_fraction']:<6} "
            f"hit {row['hit_rate']:.1%}  {report_text.rate(row['tokens_per_s'])} tok/s"
        ),
    )
    result["meta"].update(
        model=model,
        note=note,
        predictors=preds,
        profiles=[p.name for p in profs],
        policies=policies,
        experts_dtypes=dtypes,
    )
    # TODO(issue 10): pass host=host_profile to run_bench once it simulates the host lane; until then
    # the host is recorded, not used.
    result["meta"]["host"] = None if host_profile is None else host_profile.name
    measured_on = result["meta"]["measured_on"]
    title = f"bench {model} ({note}; {'simulated' if measured_on == 'simulated' else f'measured on {measured_on}'})"
    # one policy or the model's own format: the column would repeat it (and narrow the rest)
    out.print(report_text.bench_table(result, title, policies=len(policies) > 1, formats=dtypes != ["auto"]))
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
    """True when `routing` asks for a demo's recorded routing on a shape."""
    from moe_prefetch.evidence.routing import ROUTINGS

    if routing is None:
        return False
    if routing not in ROUTINGS:
        raise ConfigError(f"unknown routing {routing!r}; choose one of {', '.join(ROUTINGS)}")
    if not model.startswith("shape:"):
        raise ConfigError(f"--routing applies to shape:NAME models; {model!r} routes by itself, drop --routing")
    return routing != "random"


@app.command(cls=Command)
def simulate(
    trace: Annotated[Path | None, typer.Option(help="run.json written by `run --report`, or its folder.")] = None,
    profile: Annotated[str, typer.Option(help="Hardware profile to simulate (`profiles` lists them).")] = ...,
    host: Annotated[
        str | None, typer.Option(help="Host profile (CPU and DRAM) for placing missed experts (`profiles`).")
    ] = None,
    cache_slots: Annotated[int | None, typer.Option(help="Slots (default: as in the run; shapes: 1/4).")] = None,
    predictor: Annotated[
        str | None,
        typer.Option(
            help="recorded (the run's own), none, previous-token or oracle; shapes: also next-gate, m2r2 "
            "(default: recorded; with --shape, m2r2 on a demo's routing and none on random routing)."
        ),
    ] = None,
    shape: Annotated[str | None, typer.Option(help="Simulate this reference shape instead of --trace.")] = None,
    routing: Annotated[str, typer.Option(help="With --shape: demo, demo-fine or random.")] = "random",
    tokens: Annotated[int, typer.Option(help="With --shape: decode tokens to replay.")] = 32,
    lookahead: Annotated[int, typer.Option(help="With --shape: layers ahead to prefetch.")] = 2,
    on_miss: Annotated[
        str, typer.Option(help=f"Where a non-resident expert runs: {', '.join(ON_MISS)} (wait: for its upload).")
    ] = "auto",
    cache_policy: Annotated[str, typer.Option(help=f"Eviction policy: {', '.join(CACHE_POLICIES)}.")] = "lru",
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """Replay a recorded run (or a shape with demo or random routing) through the scheduler on a profile."""
    from moe_prefetch.runtime import profiles as hw

    if (trace is None) == (shape is None):
        raise ConfigError("give --trace RUN_JSON or --shape NAME (with --routing), one of the two")
    RuntimeConfig(on_miss=on_miss, cache_policy=cache_policy)  # the runtime's own checks and messages
    host_profile = None if host is None else hw.load_host_profile(host)
    device = hw.load_profile(profile)
    lanes = dict(on_miss=on_miss, costs=hw.default_lane_costs(device, host_profile), policy=cache_policy)
    if shape is not None:
        predictor = predictor or ("none" if routing == "random" else "m2r2")  # a demo's routing: its own m2r2
        result = _simulate_shape(shape, routing, device, cache_slots, predictor, tokens, lookahead, lanes)
    else:
        result = _simulate_trace(trace, device, cache_slots, predictor or "recorded", lanes)
    result["host"] = None if host_profile is None else host_profile.name
    if json_out:
        stdout().print_json(json.dumps(result))
        return
    out = stdout()
    tok = result["median_token_s"]
    out.print(
        f"simulated on {profile}: {result['tokens_per_s']:.1f} tokens/s over {result['decode_tokens']} decode "
        f"tokens (median {tok * 1e3:.2f} ms/token), {result['cache_slots']} slots, predictor {result['predictor']}"
    )
    out.print(
        f"  per token: compute {result['compute_s_per_token'] * 1e3:.3f} ms, exposed transfer "
        f"{result['exposed_transfer_s_per_token'] * 1e3:.3f} ms ({result['stall_share']:.1%} of the time)"
    )
    out.print(
        f"  hit rate {result['hit_rate']:.1%}, prefetches issued {result['prefetch_issued']}, "
        f"used {result['prefetch_used']}, {result['bytes_loaded'] / 1e9:.3f} GB moved"
    )
    out.print(
        f"  on miss {result['on_miss']}, policy {result['policy']}: host lane "
        f"{result['host_s_per_token'] * 1e3:.3f} ms/token ({result['host_experts']} experts on the host)"
    )
    bound = result["bound_tokens_per_s"]
    if bound:
        out.print(
            f"  three-lane bound {bound:.1f} tokens/s ({bound / result['tokens_per_s']:.2f}x the simulated speed): "
            "each token's misses split ideally between the host lane and the link"
        )


def _simulate_shape(name, routing, profile, cache_slots, predictor, tokens, lookahead, lanes) -> dict:
    from moe_prefetch.evidence.routing import PREDICTORS, RECORDED

    if name not in SHAPE_NAMES:
        raise ConfigError(f"unknown shape {name!r}; choose one of {', '.join(SHAPE_NAMES)}")
    _check_routing(f"shape:{name}", routing)
    if predictor not in PREDICTORS:
        raise ConfigError(f"with --shape, --predictor is one of {', '.join(PREDICTORS)}; got {predictor!r}")
    if routing == "random" and predictor in RECORDED:
        raise ConfigError(f"random routing has no {predictor} predictions; use --routing demo-fine (or demo)")

    from moe_prefetch.evidence.bench import shape_replay, shape_routing  # torch: only once every option is checked
    from moe_prefetch.evidence.sim import simulate_replay

    sizes, mapped, _ = shape_routing(name, routing, [predictor], tokens, lookahead=lookahead)
    total = sizes["num_experts"] * len(sizes["moe_layer_ids"])
    slots = cache_slots or max(sizes["top_k"], round(0.25 * total))
    replay = shape_replay(sizes, mapped, predictor, slots, lookahead)
    mode = "recorded" if predictor in RECORDED else predictor
    return {**simulate_replay(replay, profile, predictor=mode, **lanes), "predictor": predictor, "routing": routing}


def _simulate_trace(trace, profile, cache_slots, predictor, lanes) -> dict:
    from moe_prefetch.report.profiling import load_run

    if predictor not in ("recorded", "none", "previous-token", "oracle"):
        raise ConfigError(f"cannot replay predictor {predictor!r}; use recorded, none, previous-token or oracle")
    from moe_prefetch.evidence.sim import simulate_replay  # torch: only once the options are checked

    payload = load_run(trace)  # a file or the report folder, as `report` takes
    if not payload.get("replay"):
        raise ReportError(f"{trace} has no replay section; record it again with `moe-prefetch run --report DIR`")
    replay = {
        **payload["replay"],
        "trace": payload["trace"],
        "predictions": payload.get("predictions", []),
        "step_starts": payload.get("step_starts", []),
    }
    return simulate_replay(replay, profile, cache_slots=cache_slots, predictor=predictor, **lanes)
