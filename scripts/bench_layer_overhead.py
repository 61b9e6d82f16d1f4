"""The runtime's CPU time per MoE layer over stock, at Qwen3-30B-A3B's counts (issue 20, item 9).

A Qwen3-MoE-shaped model with tiny matrices (48 layers x 128 experts, top-8 by default, hidden
32, fp32, one torch thread), so a decode step is almost all per-layer host work: the stock
model's Python and launches, plus whatever the runtime adds. Each configuration runs a stock
copy and an attached copy in alternating blocks of decode steps; per MoE layer (medians of the
per-step figures, divided by the MoE layers) it prints:
  own CPU   the compute thread's CPU time inside the runtime's entry points (experts call,
            hooks) less the expert compute inside them: the runtime's own host work;
  CPU, wall the whole step's process CPU time (the loader thread's included) and wall time,
            runtime minus stock. On CPU stock's grouped_mm costs ~1 us per expert, routed or
            not, while the runtime's kernel sees only the routed slots: these can be negative;
  rest CPU  the step's CPU time less expert compute, runtime minus stock (indirect costs too);
and each block's CPU time / wall (below ~0.95 another process held the core: CPU time is then
the steadier figure). Last, where a stock layer's CPU time goes (attention, router, experts,
the rest): what piecewise CUDA graphs around the experts call could take off the CPU.

Configurations (`--configs`, comma-separated):
  resident       every expert has a slot and is warm: nothing loads while timed;
  resident-slow  the same with the all-resident fast path switched off (`Runtime.fast_path`);
  wait           a quarter of the experts cached, misses wait for their copy;
  host           a quarter cached, misses computed on the host lane (on_miss="host");
  next-gate      a quarter cached, next-gate predictions 2 layers ahead, misses wait.
`--profile NAME` runs one configuration under cProfile (CPU time) instead and prints the top functions.
Usage: python scripts/bench_layer_overhead.py [--layers 48] [--experts 128] [--top-k 8]
       [--tokens 16] [--blocks 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import functools
import json
import logging
import pstats
import statistics
import time

import torch
from bench_resident import decode_times  # scripts/ is on sys.path when a script runs
from bench_scale import build_stock
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

import moe_prefetch
from moe_prefetch.model.guards import ENTRY_POINTS
from moe_prefetch.model.integration import DEFAULT_KERNEL

CONFIGS = ("resident", "resident-slow", "wait", "host", "next-gate")


def attach_config(stock, name: str):
    """An attached copy of `stock` set up as configuration `name`, warmed; returns (model, runtime)."""
    model = copy.deepcopy(stock)
    cfg = stock.config
    total = cfg.num_hidden_layers * cfg.num_experts
    if name.startswith("resident"):
        runtime = moe_prefetch.attach(model, device="cpu", cache_slots=total)
        with torch.no_grad():  # a long prefill routes to (nearly) every expert once; then they stay
            model(torch.randint(0, cfg.vocab_size, (4, 256)))
        runtime.fast_path = name == "resident"
    else:
        options = {"wait": {}, "host": {"on_miss": "host"}, "next-gate": {"predictor": "next-gate", "lookahead": 2}}
        runtime = moe_prefetch.attach(model, device="cpu", cache_slots=total // 4, **options[name])
    return model, runtime


class Clock:
    """The compute thread's CPU seconds inside the functions it wraps (`time.thread_time`: the
    loader thread's copies, a copy engine's work on a GPU, are not counted). Calls do not nest
    within one clock."""

    def __init__(self) -> None:
        self.cpu_s = 0.0

    def wrap(self, fn):
        @functools.wraps(fn)  # keeps __name__: the runtime checks for grouped_mm by name
        def timed(*args, **kwargs):
            began = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.cpu_s += time.thread_time() - began

        return timed


class KernelClock(Clock):
    """CPU seconds inside expert compute (the stock kernel, the host lane), so that it can be
    taken out of both sides: on CPU, stock's grouped_mm over 128 experts costs ~1 us per group,
    empty or not, while the runtime's kernel sees only the routed slots, which would hide the
    runtime's own host work behind a cheaper kernel. On a GPU both launch one kernel. `entry`
    (runtime only) times the runtime's entry points (the experts call and the hooks), kernel
    included, so entry - kernel is the runtime's own work."""

    def __init__(self) -> None:
        super().__init__()
        self.entry = Clock()


def time_stock_kernel(stock, clock: KernelClock) -> None:
    """Route `stock`'s experts through `clock` (a private config view per experts module, as
    attach does), computing exactly what the stock kernel computes."""
    name = "bench_timed_" + DEFAULT_KERNEL
    ALL_EXPERTS_FUNCTIONS.register(name, clock.wrap(ALL_EXPERTS_FUNCTIONS[DEFAULT_KERNEL]))
    for module in stock.modules():
        if type(module).__name__.endswith("Experts"):
            view = copy.copy(module.config)
            view._experts_implementation_internal = name
            module.__dict__["config"] = view


def time_runtime_kernel(runtime, clock: KernelClock) -> None:
    runtime.use_kernel(clock.wrap(runtime.kernel))
    runtime.host_lane.run = clock.wrap(runtime.host_lane.run)
    for name in ENTRY_POINTS:  # the model's hooks and experts call look these up on the instance
        setattr(runtime, name, clock.entry.wrap(getattr(runtime, name)))


def decode(model, clock: KernelClock, tokens: int, seed: int, out: dict) -> None:
    """`tokens` decode steps after an 8-token prompt; appends each step's wall, CPU and kernel
    CPU seconds to `out`."""
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        past = model(ids, use_cache=True)
        for _ in range(tokens):
            nxt = past.logits[:, -1:].argmax(-1)
            wall, cpu, kernel, entry = time.perf_counter(), time.process_time(), clock.cpu_s, clock.entry.cpu_s
            past = model(nxt, past_key_values=past.past_key_values, use_cache=True)
            out["wall"].append(time.perf_counter() - wall)
            out["cpu"].append(time.process_time() - cpu)
            out["kernel"].append(clock.cpu_s - kernel)
            out["own"].append(clock.entry.cpu_s - entry - (clock.cpu_s - kernel))


def measure(stock, stock_clock, model, clock, runtime, tokens: int, blocks: int) -> dict:
    """Median per-step figures of stock and of `model`, over alternating blocks."""
    sides = [{"wall": [], "cpu": [], "kernel": [], "own": []} for _ in range(2)]
    decode(stock, stock_clock, 4, 99, {"wall": [], "cpu": [], "kernel": [], "own": []})
    decode(model, clock, 4, 99, {"wall": [], "cpu": [], "kernel": [], "own": []})
    runtime.reset_stats()
    shares = []
    for block in range(blocks):
        began, began_cpu = time.perf_counter(), time.process_time()
        decode(stock, stock_clock, tokens, block, sides[0])
        decode(model, clock, tokens, block, sides[1])
        shares.append((time.process_time() - began_cpu) / (time.perf_counter() - began))
    stats = runtime.stats()
    fig = {"cpu_share": shares}
    for side, figures in zip(("stock", "ours"), sides):
        for what, values in figures.items():
            fig[f"{side}_{what}_s"] = statistics.median(values)
        # the step's host work besides expert compute, per step, then the median
        fig[f"{side}_rest_s"] = statistics.median(c - k for c, k in zip(figures["cpu"], figures["kernel"]))
    fig.update(
        hit_rate=stats["hit_rate"],
        misses=stats["misses"],
        host_experts=stats["host_experts"],
        fast_path_calls=stats.get("fast_path_calls", 0),
    )
    return fig


def profile(stock, name: str, tokens: int, top: int) -> None:
    model, runtime = attach_config(stock, name)
    decode_times(model, 4, seed=99, prompt_len=8)
    prof = cProfile.Profile(time.thread_time)  # CPU time: a wait on the loader is not work
    prof.enable()
    decode_times(model, tokens, seed=0, prompt_len=8)
    prof.disable()
    runtime.detach()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def stock_anatomy(stock, tokens: int) -> dict:
    """Where a stock decode step's CPU time goes, per decoder layer (medians over `tokens` steps,
    in us): attention (the `self_attn` module), router (`mlp.gate`), experts (`mlp.experts`) and
    the rest of the layer (norms, residuals, the MoE block's own code). What piecewise CUDA graphs
    could take off the CPU is attention + router + most of the rest; the experts call stays eager."""
    model = copy.deepcopy(stock)
    clocks = {name: Clock() for name in ("layer", "attention", "router", "experts")}
    for layer in model.model.layers:
        layer.forward = clocks["layer"].wrap(layer.forward)
        layer.self_attn.forward = clocks["attention"].wrap(layer.self_attn.forward)
        layer.mlp.gate.forward = clocks["router"].wrap(layer.mlp.gate.forward)
        layer.mlp.experts.forward = clocks["experts"].wrap(layer.mlp.experts.forward)
    steps = {name: [] for name in clocks}
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        past = model(ids, use_cache=True)
        for _ in range(tokens):
            before = {name: clock.cpu_s for name, clock in clocks.items()}
            past = model(past.logits[:, -1:].argmax(-1), past_key_values=past.past_key_values, use_cache=True)
            for name, clock in clocks.items():
                steps[name].append(clock.cpu_s - before[name])
    per_layer = {name: statistics.median(v) / len(model.model.layers) * 1e6 for name, v in steps.items()}
    per_layer["rest"] = per_layer["layer"] - per_layer["attention"] - per_layer["router"] - per_layer["experts"]
    return per_layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--json", help="write the figures here as JSON")
    parser.add_argument("--profile", choices=CONFIGS, help="profile one configuration with cProfile instead")
    parser.add_argument("--top", type=int, default=30, help="functions listed by --profile")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)  # per-layer Python is what is timed, not matmul threads
    stock = build_stock(args.layers, args.experts, args.top_k)
    if args.profile:
        profile(stock, args.profile, args.tokens, args.top)
        return
    print(
        f"model: Qwen3-MoE-shaped, hidden 32, {args.layers} layers x {args.experts} experts, top-{args.top_k}, "
        f"fp32, 1 torch thread; {args.blocks} alternating blocks of {args.tokens} decode steps; measured on CPU"
    )
    print(
        f"{'configuration':<14} {'own CPU us':>10} {'CPU us':>8} {'wall us':>8} {'rest CPU us':>11} "
        f"{'stock CPU ms/step':>17}  notes"
    )
    reference, stock_clock = copy.deepcopy(stock), KernelClock()  # `stock` stays pristine for attach
    time_stock_kernel(reference, stock_clock)
    results = {}
    for name in args.configs.split(","):
        model, runtime = attach_config(stock, name)
        clock = KernelClock()
        time_runtime_kernel(runtime, clock)
        fig = measure(reference, stock_clock, model, clock, runtime, args.tokens, args.blocks)
        runtime.detach()
        per_layer = 1e6 / args.layers
        fig["cpu_us_per_layer"] = (fig["ours_cpu_s"] - fig["stock_cpu_s"]) * per_layer
        fig["wall_us_per_layer"] = (fig["ours_wall_s"] - fig["stock_wall_s"]) * per_layer
        fig["rest_us_per_layer"] = (fig["ours_rest_s"] - fig["stock_rest_s"]) * per_layer
        fig["own_us_per_layer"] = fig["ours_own_s"] * per_layer
        results[name] = fig
        shares = "/".join(f"{s:.2f}" for s in fig["cpu_share"])
        print(
            f"{name:<14} {fig['own_us_per_layer']:>10.0f} {fig['cpu_us_per_layer']:>8.0f} "
            f"{fig['wall_us_per_layer']:>8.0f} {fig['rest_us_per_layer']:>11.0f} {fig['stock_cpu_s'] * 1e3:>17.2f}  "
            f"hit rate {fig['hit_rate']:.2f}, "
            f"host experts {fig['host_experts']}, fast path {fig['fast_path_calls']}, expert compute CPU ms/step "
            f"stock {fig['stock_kernel_s'] * 1e3:.2f} ours {fig['ours_kernel_s'] * 1e3:.2f}; "
            f"CPU/wall per block {shares}",
            flush=True,
        )
    anatomy = stock_anatomy(stock, args.tokens * 2)
    print(
        "stock CPU per decoder layer (us): "
        + ", ".join(f"{name} {us:.0f}" for name, us in anatomy.items())
        + " (layer includes the others; experts: the stock kernel over every expert on CPU)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "stock_anatomy_us": anatomy}, f, indent=2)


if __name__ == "__main__":
    main()
