"""The host lane beside llama.cpp's CPU MoE path (issue 19), run by `make compare-llamacpp`.

Builds the medium model (scripts/medium_model.py) and takes demo-fine, converts both to GGUF at
bf16 and q8_0 with llama.cpp's own convert_hf_to_gguf.py (from the llama-cpp-python sdist) and
q4_0 from the bf16 file with llama.cpp's quantizer, then measures decode tokens/s of llama.cpp
(llama-cpp-python, in its own venv) and of the host lane (`load(path, device="cpu",
on_miss="host", cache_slots=8, dtype=torch.bfloat16, experts_dtype=D)`) at the same bits (bf16,
8-bit: q8_0 / int8, 4-bit: q4_0 / int4), on the same prompt ids, by default the medium model on
one thread (issue 19's targets; `--models medium,demo-fine --threads 1,2` for the rest),
interleaved, after a warm-up, each run in a fresh process. The host lane runs as `load` sets it
up (one-row decode steps with oneDNN off: `cpu_decode_gemv`); `--host-onednn` adds a host-lane run
with `cpu_decode_gemv=False` beside it, to show what the switch gives. Every run records its CPU time over
wall time per thread; runs below 0.95 are discarded (the machine may be shared) and the table
takes the median of the rest. Prints a markdown table and writes `compare.json` in --work: every
run (with the host lane's stats: kernels, decode_gemv and its reason, where its time went), the
machine (CPU, load averages before each run, one-thread copy rate), the versions (torch,
transformers, llama-cpp-python, this commit), the arguments and the table's rows.

    python scripts/compare_llamacpp.py --work build/llamacpp --llama-python build/llamacpp/venv/bin/python \
        --llama-src build/llamacpp/src/llama_cpp_python-0.3.36/vendor/llama.cpp
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORMATS = {"bf16": ("bf16", "bf16"), "8-bit": ("q8_0", "int8"), "4-bit": ("q4_0", "int4")}  # gguf, experts_dtype
# Bits per expert weight as each engine stores it: q8_0 is 32 int8 + one fp16 scale per block,
# q4_0 32 nibbles + one fp16 scale; int8 one fp32 scale per row, int4 a bf16 scale and zero per 64.
GGUF_BITS = {"bf16": 16.0, "q8_0": 8.5, "q4_0": 4.5}
LLAMA_RUNNER = r"""
import json, sys, time
import numpy as np
import llama_cpp
from llama_cpp import Llama
path, amx = sys.argv[1], sys.argv[5] == "1"
threads, tokens, warmup = (int(a) for a in sys.argv[2:5])
ids = json.loads(sys.argv[6])
if amx:  # llama.cpp's AMX kernel crashed in MoE decode with q8_0/q4_0 (issue 19): no repacked buffers
    default = llama_cpp.llama_model_default_params
    def params():
        p = default()
        p.use_extra_bufts = False
        return p
    llama_cpp.llama_model_default_params = params
llm = Llama(model_path=path, n_ctx=256, n_batch=64, n_threads=threads, n_threads_batch=threads, verbose=False)
vocab = llm.n_vocab()
def last():
    return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,))))
llm.eval(ids)
for i in range(warmup + tokens):
    if i == warmup:
        wall, cpu = time.perf_counter(), time.process_time()
    llm.eval([last()])
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
print(json.dumps({"tok_s": tokens / wall, "cpu_per_wall": cpu / wall / threads, "cpu_s_per_token": cpu / tokens,
                  "llama_cpp_python": llama_cpp.__version__}))
"""


def run(cmd: list[str], env: dict | None = None) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{done.stderr[-3000:]}")
    return done.stdout


def convert(llama_src: Path, folder: Path, out: Path, outtype: str) -> None:
    """llama.cpp's convert_hf_to_gguf.py, with the BPE pre-tokenizer check answered "default":
    these checkpoints carry the demo's own tokenizer, which the script does not list, and the
    comparison feeds token ids, so the tokenizer's pre-tokenization is never used."""
    if out.exists():
        return
    code = (
        "import runpy, sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/gguf-py'];"
        "from conversion import base; base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'default';"
        "script = sys.argv[1] + '/convert_hf_to_gguf.py'; sys.argv = [script] + sys.argv[2:];"
        "runpy.run_path(script, run_name='__main__')"
    )
    partial = out.with_suffix(".partial")  # renamed once complete: an interrupted run is redone
    run([sys.executable, "-c", code, str(llama_src), str(folder), "--outtype", outtype, "--outfile", str(partial)])
    partial.rename(out)


def quantize(llama_python: str, src: Path, out: Path, ftype: str) -> None:
    """q4_0 (not a convert_hf_to_gguf.py output type) with llama.cpp's own quantizer."""
    if out.exists():
        return
    code = (
        "import sys, llama_cpp; p = llama_cpp.llama_model_quantize_default_params();"
        f"p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_{ftype.upper()};"
        "rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p); sys.exit(rc)"
    )
    partial = out.with_suffix(".partial")
    run([llama_python, "-c", code, str(src), str(partial)])
    partial.rename(out)


def copy_rate() -> float:
    """Bytes one thread copies per second (a 256 MiB copy: what one core's memory path gives)."""
    import torch

    torch.set_num_threads(1)
    src = torch.ones(256 << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return src.numel() / best


def amx_cpu() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def expert_bytes_per_token(config: dict, bits: float) -> float:
    """Expert weight bytes one decode token reads: top_k x MoE layers x 3 matrices of D x I."""
    per_expert = 3 * config["hidden_size"] * config["moe_intermediate_size"] * bits / 8
    return per_expert * config["num_experts_per_tok"] * config["num_hidden_layers"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "llamacpp")
    parser.add_argument("--llama-python")
    parser.add_argument("--llama-src", type=Path, help="vendor/llama.cpp of the sdist")
    parser.add_argument("--models", default="medium", help="medium, demo-fine (comma-separated)")
    parser.add_argument("--threads", default="1")
    parser.add_argument("--formats", default="bf16,8-bit,4-bit")
    parser.add_argument(
        "--host-onednn", action="store_true", help="also run the host lane with cpu_decode_gemv=False (oneDNN on)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--no-stock", action="store_true", help="skip stock transformers (bf16)")
    parser.add_argument("--table", type=Path, help="only print the table of an earlier compare.json")
    args = parser.parse_args()
    if args.table:
        summary = json.loads(args.table.read_text())
        configs = summary.get("configs") or {
            n: json.loads((Path(f) / "config.json").read_text()) for n, f in summary["folders"].items()
        }
        print(table(summary["runs"], configs, summary["copy_bytes_per_s"]))
        return
    sys.path.insert(0, str(ROOT / "scripts"))
    import medium_model

    from moe_prefetch.model.folders import resolve_path

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    amx = amx_cpu()
    folders = {"medium": args.work / "models" / "medium", "demo-fine": resolve_path("demo-fine")}
    medium_model.build(folders["medium"])
    ggufs = {}
    for name in args.models.split(","):
        base = args.work / "gguf" / f"{name}-bf16.gguf"
        base.parent.mkdir(parents=True, exist_ok=True)
        convert(args.llama_src, folders[name], base, "bf16")
        convert(args.llama_src, folders[name], args.work / "gguf" / f"{name}-q8_0.gguf", "q8_0")
        quantize(args.llama_python, base, args.work / "gguf" / f"{name}-q4_0.gguf", "q4_0")
        ggufs[name] = {g: args.work / "gguf" / f"{name}-{g}.gguf" for g in GGUF_BITS}
    prompt = json.dumps(medium_model.PROMPT_IDS)
    runs = []
    for _ in range(args.repeats):
        for name in args.models.split(","):
            for threads in [int(t) for t in args.threads.split(",")]:
                for label in args.formats.split(","):
                    gguf, dtype = FORMATS[label]
                    cases = [("llama.cpp", [args.llama_python, "-c", LLAMA_RUNNER, str(ggufs[name][gguf])])]
                    cases[0][1].extend([str(threads), str(args.tokens), str(args.warmup), "1" if amx else "0", prompt])
                    host = [sys.executable, str(ROOT / "scripts" / "medium_model.py"), "host", str(folders[name])]
                    cases.append(("host lane", [*host, "--experts-dtype", dtype, "--threads", str(threads)]))
                    if args.host_onednn:
                        cases.append(("host lane, oneDNN", [*cases[-1][1], "--no-decode-gemv"]))
                    if label == "bf16" and not args.no_stock:
                        stock = [sys.executable, str(ROOT / "scripts" / "medium_model.py"), "stock", str(folders[name])]
                        cases.append(("stock", [*stock, "--threads", str(threads)]))
                    for engine, cmd in cases:
                        if engine != "llama.cpp":
                            cmd = [*cmd, "--tokens", str(args.tokens)]
                        load = os.getloadavg()[0]  # the machine's load as the run starts
                        result = json.loads(run(cmd, env).strip().splitlines()[-1])
                        row = {**result, "model": name, "threads": threads, "format": label, "engine": engine}
                        row["load_before"] = load
                        runs.append(row)
                        print(json.dumps(row), flush=True)
    configs = {n: json.loads((folders[n] / "config.json").read_text()) for n in folders}
    folder_names = {n: str(f) for n, f in folders.items()}
    summary = {
        "copy_bytes_per_s": copy_rate(),
        "amx": amx,
        "cpu": _cpu(),
        "logical_cpus": os.cpu_count(),
        "versions": _versions(runs),
        "args": {k: str(v) for k, v in vars(args).items()},
        "folders": folder_names,
        "configs": configs,  # the models' config.json: --table needs no model folder
        "runs": runs,
    }
    text = table(runs, configs, summary["copy_bytes_per_s"])
    summary["table"] = text.splitlines()
    (args.work / "compare.json").write_text(json.dumps(summary, indent=1))
    print(text)


def _versions(runs: list[dict]) -> dict:
    import torch
    import transformers

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    llama = sorted({r["llama_cpp_python"] for r in runs if "llama_cpp_python" in r})
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "llama_cpp_python": llama,
        "commit": commit,
    }


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def table(runs: list[dict], configs: dict, copy: float) -> str:
    """Markdown: per model, threads and format, median tok/s of the kept runs (CPU/wall >= 0.95)
    of each engine (of all runs, marked noisy, where none was kept), the ratio host lane /
    llama.cpp, the same ratio by CPU seconds per token (all runs' medians: llama.cpp's over the
    host lane's), and expert GB/s at each engine's bits."""
    lines = [
        f"one-thread copy rate of this machine: {copy / 1e9:.1f} GB/s (bytes copied per second)",
        "",
        "| model | threads | experts | llama.cpp tok/s | host lane tok/s | host / llama.cpp | by CPU time "
        "| stock bf16 tok/s "
        "| host lane, oneDNN on, tok/s | llama.cpp expert GB/s | host lane expert GB/s | runs kept (llama / host) "
        "| CPU/wall (llama / host) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = list(FORMATS)
    keys = sorted(
        {(r["model"], r["threads"], r["format"]) for r in runs},
        key=lambda k: (k[0] != "medium", k[1], order.index(k[2])),
    )
    for model, threads, label in keys:
        cell, engines = {}, ("llama.cpp", "host lane", "stock", "host lane, oneDNN")
        rows = {
            e: [r for r in runs if (r["model"], r["threads"], r["format"], r["engine"]) == (model, threads, label, e)]
            for e in engines
        }
        kept = {e: [r for r in rows[e] if r["cpu_per_wall"] >= 0.95] for e in engines}
        # The ratio compares like with like: kept runs where both llama.cpp and the host lane have
        # some, else every run of every engine (a busy machine), marked noisy, so the table still
        # shows what was measured and the CPU/wall column says how noisy it was.
        clean = all(kept[e] for e in ("llama.cpp", "host lane"))
        for engine in engines:
            use = kept[engine] if clean and kept[engine] else rows[engine]
            cell[engine] = (
                statistics.median(r["tok_s"] for r in use) if use else None,
                f"{len(kept[engine])}/{len(rows[engine])}",
                "/".join(f"{r['cpu_per_wall']:.2f}" for r in rows[engine]),
                # CPU seconds per token, median of all runs: on a shared machine the work each
                # engine needs, where wall time also counts the other programs
                statistics.median(r["cpu_s_per_token"] for r in rows[engine])
                if rows[engine] and "cpu_s_per_token" in rows[engine][0]
                else None,
            )
        gguf, dtype = FORMATS[label]
        stored = [
            r["expert_bytes"]
            for r in runs
            if (r["model"], r["engine"], r.get("experts_dtype")) == (model, "host lane", dtype)
        ]
        c = configs[model]
        host_bits = 8 * stored[0] / (3 * c["hidden_size"] * c["moe_intermediate_size"]) if stored else 16.0
        llama, host, stock = cell["llama.cpp"][0], cell["host lane"][0], cell["stock"][0]
        noisy = not clean
        ratio = f"**{host / llama:.2f}x**{' (noisy)' if noisy else ''}" if llama and host else "-"
        cpu_llama, cpu_host = cell["llama.cpp"][3], cell["host lane"][3]
        by_cpu = f"{cpu_llama / cpu_host:.2f}x" if cpu_llama and cpu_host else "-"
        per_token = {bits: expert_bytes_per_token(c, bits) for bits in (GGUF_BITS[gguf], host_bits)}
        gbs = {
            "llama": f"{llama * per_token[GGUF_BITS[gguf]] / 1e9:.2f}" if llama else "-",
            "host": f"{host * per_token[host_bits] / 1e9:.2f}" if host else "-",
        }
        lines.append(
            f"| {model} | {threads} | {label} ({gguf} / {dtype}) | {_fmt(llama)} | {_fmt(host)} | {ratio} | {by_cpu} "
            f"| {_fmt(stock)} | {_fmt(cell['host lane, oneDNN'][0])} | {gbs['llama']} | {gbs['host']} "
            f"| {cell['llama.cpp'][1]} / {cell['host lane'][1]} "
            f"| {cell['llama.cpp'][2]} / {cell['host lane'][2]} |"
        )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return f"{value:.2f}" if value else "-"


if __name__ == "__main__":
    main()
