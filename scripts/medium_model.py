"""The medium model of the llama.cpp comparison (issue 19): a random Qwen3-MoE of 1.66B
parameters (hidden 1024, 16 layers, 64 experts, moe_intermediate 512, top-8), saved in bf16 with
the demo's tokenizer, and a decode-speed measurement of any model on it.

    python scripts/medium_model.py build FOLDER
    python scripts/medium_model.py host FOLDER --experts-dtype bf16 --threads 1 [--tokens 64]
    python scripts/medium_model.py stock FOLDER --threads 1

`host` loads it as the comparison does: `load(path, device="cpu", on_miss="host", cache_slots=8,
dtype=torch.bfloat16, experts_dtype=D)`; `stock` with transformers. Each prints one JSON line:
decode tokens/s after a warm-up, its CPU time over wall time, and where the time went.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import time
from pathlib import Path

import torch

PROMPT_IDS = [(i * 997 + 13) % 4000 + 5 for i in range(19)]  # the same 19 ids for every engine
MEDIUM = dict(
    hidden_size=1024,
    num_hidden_layers=16,
    num_local_experts=64,
    moe_intermediate_size=512,
    intermediate_size=512,
    num_experts_per_tok=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=64,
    vocab_size=4096,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    norm_topk_prob=True,
)


def build(folder: Path) -> None:
    """Write the medium model (random, seed 0, bf16) and the demo's tokenizer into `folder`."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from moe_prefetch.model.folders import resolve_path

    if (folder / "config.json").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = Qwen3MoeConfig(**MEDIUM, num_experts=MEDIUM["num_local_experts"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    demo = resolve_path("demo-fine")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo / name, folder / name)


def decode(model, tokens: int, warmup: int = 8, onednn: bool = True, profiler=None) -> dict:
    """Greedy decode after the prompt: `warmup` tokens untimed, then `tokens` timed (with
    `onednn` False, oneDNN is off from the first decode step on, and on again after; a
    `profiler` context, entered after the warm-up, sees the timed decode steps only)."""
    ids = torch.tensor([PROMPT_IDS])
    was = torch.backends.mkldnn.enabled
    with torch.no_grad():
        out = model(ids, use_cache=True)
        torch.backends.mkldnn.enabled = was and onednn
        for i in range(warmup + tokens):
            if i == warmup:
                if profiler is not None:
                    profiler.__enter__()
                wall, cpu = time.perf_counter(), time.process_time()
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(nxt, past_key_values=out.past_key_values, use_cache=True)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if profiler is not None:
            profiler.__exit__(None, None, None)
    torch.backends.mkldnn.enabled = was
    threads = torch.get_num_threads()
    return {
        "tokens": tokens,
        "tok_s": tokens / wall,
        "cpu_per_wall": cpu / wall / threads,
        "cpu_s_per_token": cpu / tokens,
    }


def _stub_the_lane(runtime) -> None:
    """The host lane computes nothing: each pass returns zeros of its output's shape, so the
    token's time is the rest of the model (attention, norms, head, transformers' Python) and the
    runtime's own work. Tokens then differ from a real run; only the time is of interest."""

    def stub(layer, host, routing, hidden, weights):
        return torch.zeros((hidden.shape[0], hidden.shape[-1]), dtype=torch.float32)

    runtime.host_lane.run = stub


def _time_the_lane(runtime) -> dict:
    """CPU time of the host lane's one-row passes (decode steps), beside the runtime's wall times:
    on a shared machine wall time counts the other programs too."""
    lane, run, spent = runtime.host_lane, runtime.host_lane.run, {"s": 0.0, "passes": 0}

    def timed(layer, host, routing, hidden, weights):
        if hidden.shape[0] != 1:
            return run(layer, host, routing, hidden, weights)
        start = time.process_time()
        try:
            return run(layer, host, routing, hidden, weights)
        finally:
            spent["s"] += time.process_time() - start
            spent["passes"] += 1

    lane.run = timed
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["build", "host", "stock"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--experts-dtype", default="bf16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--profile", action="store_true", help="print the torch profiler's top ops")
    parser.add_argument(
        "--no-onednn",
        action="store_true",
        help="oneDNN off for the whole decode (after the prompt), whatever the engine: torch's own gemv "
        "(the host lane does this itself since cpu_decode_gemv; this is for stock)",
    )
    parser.add_argument(
        "--stub-experts",
        action="store_true",
        help="host: the lane returns zeros without computing (what the rest of a token costs, measured directly)",
    )
    parser.add_argument(
        "--no-decode-gemv",
        action="store_true",
        help="host: load with cpu_decode_gemv=False (oneDNN's one-row matmuls outside the lane, as before)",
    )
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    if args.what == "build":
        build(args.folder)
        return
    torch.set_num_threads(args.threads)
    result = {"engine": args.what, "threads": args.threads, "experts_dtype": args.experts_dtype}
    if args.stub_experts:
        result["stub_experts"] = True
    if args.what == "stock":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.bfloat16).eval()
        runtime = None
    else:
        import moe_prefetch

        model, runtime = moe_prefetch.load(
            str(args.folder),
            device="cpu",
            on_miss="host",
            cache_slots=8,
            dtype=torch.bfloat16,
            experts_dtype=args.experts_dtype,
            host_threads=args.threads,
            cpu_decode_gemv=not args.no_decode_gemv,
        )
        if args.stub_experts:
            _stub_the_lane(runtime)
        lane_cpu = _time_the_lane(runtime)
    result.update(decode(model, args.tokens, onednn=not args.no_onednn), onednn=not args.no_onednn)
    if runtime is not None:
        stats = runtime.stats()
        # decode steps only (step 0 is the prompt, whose passes carry 19 tokens each)
        steps = {r["step"] for r in runtime.trace if r["step"] > 0}
        per_token = sum(r["host_s"] for r in runtime.trace if r["step"] > 0) / max(1, len(steps))
        result.update(
            decode_gemv=stats["decode_gemv"],
            decode_gemv_reason=stats["decode_gemv_reason"],
            decode_gemv_steps=stats["decode_gemv_steps"],
            host_kernels=stats["host_kernels"],
            expert_bytes=stats["expert_bytes"],
            host_experts=stats["host_experts"],
            uploads=stats["uploads"],
            host_s_per_token=per_token,
            # the lane's CPU time in one-row passes (the timed steps and the warm-up), per token
            host_cpu_s_per_token=lane_cpu["s"] / max(1, lane_cpu["passes"]) * len(runtime.layers),
            # expert bytes the host lane read per second of its own time
            expert_gb_s=stats["expert_bytes"] * runtime.layers[0].top_k * len(runtime.layers) / per_token / 1e9,
            # the runtime's own CPU-side work per MoE layer (routing read, plan, bookkeeping): a
            # layer call's time without its host lane (no expert runs elsewhere here)
            runtime_us_per_layer=1e6
            * statistics.median(r["end"] - r["start"] - r["host_s"] - r["wait_s"] for r in runtime.trace),
        )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        prof = profile(activities=[ProfilerActivity.CPU])
        decode(model, 8, warmup=2, onednn=not args.no_onednn, profiler=prof)  # 8 decode steps, no prompt
        print("8 decode steps:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
