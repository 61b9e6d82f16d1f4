"""The commands around one model: run, report, profiles, calibrate, inspect, quantize.

Each parses options, builds the library's configs (never restating their defaults), calls
the library and prints. Registered on `app` (app.py); torch loads only inside a command
that needs it, so `--help`, `profiles` and `report` stay quick.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from moe_prefetch.errors import ConfigError
from moe_prefetch.evidence import plan
from moe_prefetch.experts.dtypes import EXPERTS_DTYPES
from moe_prefetch.model.generation import GenerationSettings
from moe_prefetch.report import profiling
from moe_prefetch.report import text as report_text
from moe_prefetch.runtime import profiles as hw
from moe_prefetch.runtime import sizing
from moe_prefetch.runtime.config import RuntimeConfig

from . import options
from .app import EXIT_INTERRUPTED, Command, app, given, stderr, stdout

# Shown before the demo's text, so odd output reads as a small model's, not as a bug.
DEMO_NOTE = (
    "demo model: a 12M-parameter Mixtral (6 layers, 8 experts, top-2) trained for 30 minutes on the Python "
    "standard library; it writes stdlib-like code that often repeats itself or makes no sense"
)


# -- run -------------------------------------------------------------------------------
@app.command(cls=Command)
def run(
    model: options.Model = "demo",
    prompt: Annotated[str | None, typer.Option(help="Prompt text.")] = None,
    prompt_file: Annotated[Path | None, typer.Option(help="Read the prompt from this file.")] = None,
    prompt_ids: Annotated[
        str | None, typer.Option(help="Prompt as token ids, e.g. 1,2,3 (for checkpoints without a tokenizer).")
    ] = None,
    tokenizer: options.Tokenizer = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(help=f"Tokens to generate {options.default('max_new_tokens', GenerationSettings)}.")
    ] = None,
    temperature: Annotated[
        float | None,
        typer.Option(help=f"Sampling temperature; 0 is greedy {options.default('temperature', GenerationSettings)}."),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help=f"Random seed for sampling {options.default('seed', GenerationSettings)}.")
    ] = None,
    device: options.Device = None,
    cache_budget: options.CacheBudget = None,
    cache_slots: options.CacheSlots = None,
    profile: options.Profile = None,
    cache_policy: options.CachePolicy = None,
    host: options.Host = None,
    predictor: options.Predictor = None,
    lookahead: options.Lookahead = None,
    predictor_path: options.PredictorPath = None,
    on_miss: options.OnMiss = None,
    experts_dtype: options.ExpertsDtype = None,
    report: Annotated[Path | None, typer.Option(help="Write run.json and report.html into this folder.")] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Only the generated text, no prompt, status or summary.")
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print {text, summary, report} as JSON; no streaming.")
    ] = False,
):
    """Generate text with experts offloaded, streaming it after the prompt, then summarise what the cache did."""
    load_options, runtime_config = options.runtime_options(
        device=device,
        cache_budget=cache_budget,
        cache_slots=cache_slots,
        profile=profile,
        cache_policy=cache_policy,
        host=host,
        predictor=predictor,
        lookahead=lookahead,
        predictor_path=predictor_path,
        on_miss=on_miss,
        experts_dtype=experts_dtype,
    )
    texts = [n for n, v in (("--prompt", prompt), ("--prompt-file", prompt_file), ("--prompt-ids", prompt_ids)) if v]
    if len(texts) > 1:
        raise ConfigError(f"give one of --prompt, --prompt-file or --prompt-ids, not {' and '.join(texts)}")
    settings = GenerationSettings(**given(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed))
    # Every option is checked: only now load torch and transformers (seconds), the model's
    # path first (torch-free), then whether it is a MoE at all, before its tokenizer.
    from moe_prefetch.model.folders import read_config, resolve_path

    folder = resolve_path(model)
    from moe_prefetch.model.skeleton import check_moe

    from .generate import IdsAsText, check_ids, load_tokenizer, parse_ids, read_prompt, record_run

    hf_config = read_config(folder)
    check_moe(hf_config)
    vocab_size = getattr(hf_config.get_text_config(), "vocab_size", None)
    if prompt_ids is not None:
        ids = parse_ids(prompt_ids)
        check_ids(ids, vocab_size, "--prompt-ids")
        tok = load_tokenizer(tokenizer or folder, required=tokenizer is not None) or IdsAsText()
        text = tok.decode(ids)
    else:
        tok = load_tokenizer(tokenizer or folder)
        text = read_prompt(prompt, prompt_file, ask=lambda: typer.prompt("prompt"))
        ids = tok(text)["input_ids"]
        if not ids:
            raise ConfigError(f"the prompt {text[:40]!r} became 0 tokens; give a longer prompt or --prompt-ids 1,2,3")
        check_ids(ids, vocab_size, f"the tokenizer of {tokenizer or folder}")
    load_options = options.size_for_profile(load_options, runtime_config, profile, folder)
    note = DEMO_NOTE if model == "demo" else None
    if note and not (quiet or json_out):
        stderr().print(note, style="dim", markup=False, highlight=False)
    show_status = not (quiet or json_out) and sys.stderr.isatty()
    record = record_run(
        folder,
        load_options,
        tok,
        text,
        ids,
        settings,
        echo_prompt=not quiet,
        show_text=not json_out,
        show_status=show_status,
        config={"model": model, "profile": profile, "model_note": note},
    )
    paths = profiling.write_report(report, record) if report is not None else None
    if json_out:
        summary = {"text": record["text"], "summary": record["summary"], "report": str(paths[0]) if paths else None}
        typer.echo(json.dumps(summary, indent=1))
    elif not quiet:
        err = stderr()
        if record["interrupted"]:
            err.print(f"interrupted after {len(record['tokens'])} tokens", style="yellow")
        err.print(report_text.tables(record)[0])
        if paths:
            err.print(f"report: {paths[1]} (data: {paths[0]})", markup=False, highlight=False)
    if record["interrupted"]:
        raise typer.Exit(EXIT_INTERRUPTED)


# -- report ----------------------------------------------------------------------------
@app.command(cls=Command)
def report(
    run_json: Annotated[Path, typer.Argument(help="run.json written by `run --report` (or its folder).")],
    html: Annotated[Path | None, typer.Option(help="Also render the HTML report to this file.")] = None,
):
    """Show a recorded run as tables, and optionally re-render its HTML report."""
    record = profiling.load_run(run_json)
    out = stdout()
    for table in report_text.tables(record):
        out.print(table)
    for line in report_text.notes(record):
        out.print(f"note: {line}", style="yellow", markup=False, highlight=False)
    if html is not None:
        out.print(f"wrote {profiling.write_html(html, record)}", markup=False, highlight=False)


# -- profiles --------------------------------------------------------------------------
@app.command("profiles", cls=Command)
def profiles_cmd(name: Annotated[str | None, typer.Argument(help="Show this profile in full.")] = None):
    """List hardware profiles (devices, then hosts), or show one with its sources."""
    out = stdout()
    if name is not None and _is_host_profile(name):
        _show_host(hw.load_host_profile(name))
        return
    if name is not None:
        p = hw.load_profile(name)
        table = Table(title=f"{p.name}: {p.description}", show_header=False)
        for key, value in (
            ("device memory", report_text.fmt_bytes(p.device_memory_bytes)),
            ("usable", f"{p.usable_fraction:.0%} = {report_text.fmt_bytes(p.usable_bytes)}"),
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
    hosts = Table(title="host profiles (--host)", box=box.SIMPLE_HEAD)
    for col in ("name", "cores", "DRAM peak\nGB/s", "copy\nGB/s", "expert\nGB/s", "host\nTFLOP/s", "call\nus", "link"):
        hosts.add_column(col, no_wrap=True, justify="left" if col in ("name", "link") else "right")
    for h in hw.list_host_profiles():
        hosts.add_row(
            h.name,
            str(h.physical_cores),
            f"{h.dram_peak_bytes_per_s / 1e9:.0f}",
            f"{h.dram_bandwidth_bytes_per_s / 1e9:.0f}",
            f"{h.expert_bytes_per_s / 1e9:.0f}",
            f"{h.host_flops / 1e12:.2f} {h.compute_dtype}",
            f"{h.expert_call_overhead_s * 1e6:.0f}",
            "unified (free)" if h.unified_memory else "device's",
        )
    out.print(hosts)
    out.print(
        f"searched: {', '.join(str(d) for d in hw.profile_dirs())} (hosts: host/ in each)",
        markup=False,
        highlight=False,
    )


def _is_host_profile(name: str) -> bool:
    """A host profile by that name (and no device profile by it: devices win a clash), or a .toml
    path with the host schema's keys."""
    if name.endswith(".toml") or os.sep in name:
        try:
            return "physical_cores" in tomllib.loads(Path(name).expanduser().read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            return False  # the device loader reports the file
    in_dirs = lambda dirs: any((d / f"{name}.toml").is_file() for d in dirs)  # noqa: E731
    return in_dirs(hw.host_profile_dirs()) and not in_dirs(hw.profile_dirs())


def _show_host(h: hw.HostProfile) -> None:
    table = Table(title=f"host {h.name}: {h.description}", show_header=False)
    for key, value in (
        ("physical cores", str(h.physical_cores)),
        ("DRAM peak", f"{h.dram_peak_bytes_per_s / 1e9:.1f} GB/s"),
        ("DRAM copy (achieved)", f"{h.dram_bandwidth_bytes_per_s / 1e9:.1f} GB/s"),
        ("one expert call", f"{h.expert_bytes_per_s / 1e9:.1f} GB/s of weights"),
        (f"expert matmuls ({h.compute_dtype})", f"{h.host_flops / 1e12:.2f} TFLOP/s"),
        ("per-call overhead", f"{h.expert_call_overhead_s * 1e6:.0f} us"),
        ("link", "free: unified memory" if h.unified_memory else "the device profile's H2D bandwidth"),
        ("file", str(h.path)),
    ):
        table.add_row(key, value)
    out = stdout()
    out.print(table)
    for key, source in h.sources.items():
        out.print(f"[bold]{key}[/bold]: {source}", highlight=False)


# -- calibrate ---------------------------------------------------------------------------
HOST_SIZES = ("small", "medium", "mixtral")  # calibration.HOST_SIZES' names, restated so --help skips torch


@app.command(cls=Command)
def calibrate(
    out: Annotated[
        Path | None, typer.Option(help="Profile file to write (default ~/.config/moe-prefetch/profiles/NAME.toml).")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="CUDA device to measure: cuda or cuda:N (default: cuda if there is one).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Profile name (default: the GPU's, or --out's file name).")] = None,
    host_out: Annotated[
        Path | None,
        typer.Option(help="Host profile file to write (default ~/.config/moe-prefetch/profiles/host/NAME.toml)."),
    ] = None,
    host_size: Annotated[
        str, typer.Option(help=f"Expert measured on the host: {', '.join(HOST_SIZES)} (small fits in caches).")
    ] = "mixtral",
    host_dtype: Annotated[
        str, typer.Option(help="Expert dtype on the host: bfloat16, float16 or float32.")
    ] = "bfloat16",
    host_threads: Annotated[
        int | None, typer.Option(help="Threads for the host measurements (default: physical cores minus one).")
    ] = None,
):
    """Measure this machine's host lane (one expert on the CPU against a plain copy) into a host profile,
    and this GPU (pinned H2D bandwidth by copy size, free memory, ...) into a profile when there is one."""
    import torch

    from moe_prefetch.evidence import calibration

    if out is not None and name is not None and out.stem != name:
        raise ConfigError(f"--name {name!r} must match the file name of --out ({out.stem!r}); drop one of them")
    if host_size not in HOST_SIZES:
        raise ConfigError(f"--host-size {host_size!r} must be one of {', '.join(HOST_SIZES)}")
    if out is not None:
        name = out.stem
    # The GPU part runs when there is a GPU, or was asked for (then a CPU-only machine is an error).
    gpu = torch.cuda.is_available() or device is not None or out is not None
    if gpu and (not torch.cuda.is_available() or not (device or "cuda").startswith("cuda")):
        # raises the one-line "needs a CUDA device" error, before any work
        calibration.calibrate(device=device or "cuda")
    host, host_measured = calibration.calibrate_host(
        size=host_size, dtype=host_dtype, name=None if host_out is None else host_out.stem, threads=host_threads
    )
    host_path = hw.write_host_profile(host, host_out or hw.user_dir() / "host" / f"{host.name}.toml")
    console = stdout()
    m = host_measured
    console.print(
        f"host lane on {m['cpu']} ({m['threads']} threads, {m['physical_cores']} physical cores): "
        f"{m['size']} expert {m['expert_shape'][0]}x{m['expert_shape'][1]} {m['dtype']} "
        f"{m['expert_bytes_per_s'] / 1e9:.2f} GB/s ({m['expert_call_s'] * 1e3:.2f} ms/call), "
        f"copy {m['copy_bytes_per_s'] / 1e9:.2f} GB/s, {m['host_flops'] / 1e9:.1f} GFLOP/s at "
        f"{m['flop_tokens']} tokens, {m['call_overhead_s'] * 1e6:.0f} us/call; stored bytes/s per format: "
        + ", ".join(f"{k} {v / 1e9:.2f} GB/s" for k, v in m["format_bytes_per_s"].items())
        + f"; wrote {host_path}",
        markup=False,
        highlight=False,
    )
    if not gpu:
        console.print("no CUDA device: measured the host lane only", markup=False, highlight=False)
        return
    profile, measured = calibration.calibrate(device=device or "cuda", name=name)
    path = hw.write_profile(profile, out if out is not None else hw.user_dir() / f"{profile.name}.toml")
    table = Table(title=f"pinned host->device copies on {measured['device']}")
    table.add_column("copy size", justify="right")
    table.add_column("GB/s", justify="right")
    for mib, rate in sorted(measured["h2d_by_mib"].items()):
        table.add_row(f"{mib} MiB", f"{rate / 1e9:.2f}")
    console.print(table)
    console.print(
        f"free {report_text.fmt_bytes(measured['free_bytes'])} of "
        f"{report_text.fmt_bytes(measured['total_bytes'])}; wrote {path}",
        markup=False,
        highlight=False,
    )


# -- inspect -----------------------------------------------------------------------------
# The experts_dtype choices `inspect` compares (fp16/fp32 are bf16's size or larger).
INSPECT_DTYPES = ("auto", "bf16", "int8", "int4")


@app.command(cls=Command)
def inspect(
    model: Annotated[
        str, typer.Option(help="Checkpoint folder, 'demo', or shape:NAME (a real model's shape).")
    ] = "demo",
    experts_dtype: Annotated[
        str | None,
        typer.Option(
            help=f"Size the experts as `run --experts-dtype` would store them: {', '.join(EXPERTS_DTYPES)} "
            f"{options.default('experts_dtype')}."
        ),
    ] = None,
    context: Annotated[
        int | None, typer.Option(help="Tokens of KV cache to reserve on each device (default 4096).")
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Host profile whose memory must hold the expert store (`profiles`).")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """Describe a model's experts and the cache it needs, and what fits on each profile (after its
    weights, KV cache, buffers and prefill peak), without loading its weights."""
    dtype = RuntimeConfig(**given(experts_dtype=experts_dtype)).experts_dtype  # checked before torch loads
    host_profile = None if host is None else hw.load_host_profile(host)
    from moe_prefetch.evidence.anatomy import anatomy
    from moe_prefetch.evidence.fitting import fit

    whole = plan.model_size(model)
    size = whole.for_dtype(dtype)
    body = anatomy(model)
    slots, why = size.recommended_slots
    profiles = hw.list_profiles()
    sizing_args = given(context=context)
    # Per experts_dtype: what fits on each profile with experts of that size (fitting.fit).
    by_dtype = {d: [fit(body, d, p, host_profile, **sizing_args) for p in profiles] for d in INSPECT_DTYPES}
    fits = (
        by_dtype[dtype] if dtype in by_dtype else [fit(body, dtype, p, host_profile, **sizing_args) for p in profiles]
    )
    if json_out:
        typer.echo(
            json.dumps(
                {
                    "model": {
                        **dataclasses.asdict(size),
                        "total_experts": size.total_experts,
                        "expert_total_bytes": size.expert_total_bytes,
                        "min_slots": size.min_slots,
                        "smallest_budget": size.smallest_budget(),
                        "smallest_budget_on_cpu": size.smallest_budget(cpu=True),
                        "work_bytes": size.work_bytes,
                        "recommended_slots": slots,
                        "recommended_reason": why,
                        "all_miss_bytes_per_token": size.all_miss_bytes_per_token,
                        "vocab_size": body.vocab_size,
                        "tied_head": body.tied,
                        "kv_bytes_per_token": body.kv_bytes_per_token(),
                    },
                    "profiles": [
                        {
                            **f.as_dict(),
                            "room_bytes": f.free_bytes,
                            "slots": f.max_slots,
                            "verdict": _verdict(f),
                            "by_experts_dtype": {
                                d: {
                                    "slots": by_dtype[d][i].max_slots,
                                    "verdict": _verdict(by_dtype[d][i]),
                                    "fits": by_dtype[d][i].fits,
                                }
                                for d in INSPECT_DTYPES
                            },
                        }
                        for i, f in enumerate(fits)
                    ],
                },
                indent=1,
            )
        )
        return
    b = report_text.fmt_bytes
    stored = size.dtype if dtype == "auto" else f"{dtype}, decoded to {size.dtype} for the kernel"
    title = f"{size.architecture} ({size.model_type}) at {size.path}, experts as {dtype}"
    table = Table(title=title, show_header=False)
    for key, value in (
        ("layers / MoE layers", f"{size.num_layers} / {size.moe_layers}"),
        ("experts per layer, top-k", f"{size.experts_per_layer}, top-{size.top_k}"),
        ("bytes per expert", f"{b(size.expert_bytes)} ({stored})"),
        ("all experts", f"{size.total_experts} = {b(size.expert_total_bytes)}"),
        (
            "non-expert weights",
            f"{b(body.non_expert_bytes)} (vocabulary {body.vocab_size}, {'tied' if body.tied else 'untied'} head)",
        ),
        ("KV cache", f"{b(body.kv_bytes_per_token())} per token; {b(fits[0].kv_bytes)} at context {fits[0].context}"),
        ("smallest cache", f"{size.min_slots} slots = {b(size.min_slots * size.expert_bytes)} (top_k)"),
        ("smallest --cache-budget", _smallest_budget(size)),
        ("recommended cache", f"{slots} slots = {b(slots * size.expert_bytes)} ({why})"),
        ("all-miss bytes per token", b(size.all_miss_bytes_per_token)),
    ):
        table.add_row(key, value)
    per_profile = Table(title=f"on each hardware profile (context {fits[0].context}, experts as {dtype})")
    for col in ("profile", "usable", "weights + KV + buffers", "room for experts", "slots", "fit"):
        per_profile.add_column(col)
    for f in fits:
        reserved = f.weights_bytes + f.kv_bytes + f.work_bytes + f.prefill_bytes
        per_profile.add_row(
            f.profile, b(f.usable_bytes), b(reserved), b(max(f.free_bytes, 0)), str(f.max_slots), _verdict(f)
        )
    dtypes = Table(title="by --experts-dtype: bytes per expert, and experts that fit on each profile")
    dtypes.add_column("", no_wrap=True)
    for d in INSPECT_DTYPES:
        dtypes.add_column(d if d != "auto" else f"auto ({size.dtype})", justify="right")
    dtypes.add_row("bytes per expert", *(b(size.expert_bytes_by_dtype[d]) for d in INSPECT_DTYPES))
    dtypes.add_row("all experts (host store)", *(b(size.for_dtype(d).expert_total_bytes) for d in INSPECT_DTYPES))
    for i, p in enumerate(profiles):
        dtypes.add_row(p.name, *(_fit_cell(by_dtype[d][i]) for d in INSPECT_DTYPES))
    out = stdout()
    out.print(table)
    out.print(per_profile)
    out.print(dtypes)
    if host_profile is not None:
        out.print(
            f"host {host_profile.name}: {b(fits[0].host_capacity)} pinnable; stores that fit: "
            + (", ".join(d for d in INSPECT_DTYPES if by_dtype[d][0].fits_host) or "none"),
            markup=False,
            highlight=False,
        )


def _smallest_budget(size: plan.ModelSize) -> str:
    """The smallest budget `run --cache-budget` accepts, with what it pays for, on a GPU and on a
    CPU device (float32 there): the figures load's check uses (sizing.budget_shortfall)."""
    b = report_text.fmt_bytes
    text = (
        f"{b(size.smallest_budget())} = {size.min_slots} slots ({b(size.min_slots * size.expert_bytes)}) + "
        f"{sizing.WORK_BUFFER} ({b(size.work_bytes)}), in {size.dtype}"
    )
    on_cpu = size.smallest_budget(cpu=True)
    if on_cpu != size.smallest_budget():
        text += f"; {b(on_cpu)} on a CPU device (float32)"
    return text


def _verdict(f) -> str:
    if f.max_slots < f.top_k:
        return "does not fit"
    if not f.fits_host:
        return "host too small"
    return "all resident" if f.max_slots >= f.total_experts else "offloaded"


def _fit_cell(f) -> str:
    verdict = _verdict(f)
    if verdict == "all resident":
        return f"all {f.total_experts}"
    return f"{f.max_slots} of {f.total_experts}" if verdict == "offloaded" else verdict


# -- quantize ----------------------------------------------------------------------------
@app.command(cls=Command)
def quantize(
    model: Annotated[str, typer.Option(help="Checkpoint folder, or 'demo'.")] = "demo",
    experts_dtype: Annotated[str, typer.Option(help="int8 (per channel) or int4 (groups of 64).")] = "int4",
    device: Annotated[
        str | None,
        typer.Option(help="The device the copy is for (its dtype decides how biases are kept) (default auto)."),
    ] = None,
):
    """Quantize a checkpoint's experts once, ahead of time: `run`/`load` with the same --experts-dtype then
    read the copy. Written beside the checkpoint, or under $MOE_PREFETCH_CACHE (~/.cache/moe-prefetch/quantized) when
    that folder is read-only."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from moe_prefetch.model.quantized_copy import quantize as quantize_experts

    RuntimeConfig(**given(experts_dtype=experts_dtype, device=device))  # a bad value fails before any work
    progress = Progress(
        TextColumn(f"quantizing experts to {experts_dtype}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=stderr(),
        transient=True,
    )
    with progress:
        task = progress.add_task("experts", total=None)

        try:
            info = quantize_experts(
                model,
                experts_dtype,
                **given(device=device),
                progress=lambda done, total: progress.update(task, completed=done, total=total),
            )
        except KeyboardInterrupt:
            stderr().print("interrupted: nothing was kept; run the same command again", style="yellow")
            raise typer.Exit(EXIT_INTERRUPTED) from None
    b = report_text.fmt_bytes
    verb = "already there, kept" if info.reused else "wrote"
    stdout().print(
        f"{verb} {info.path}: experts {b(info.source_bytes)} -> {b(info.copy_bytes)} {experts_dtype} "
        f"({info.copy_bytes / info.source_bytes:.1%})",
        markup=False,
        highlight=False,
    )
