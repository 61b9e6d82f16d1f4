"""Train and evaluate a demo model's M2R2 adapters; reproduces moe_prefetch/demo*/m2r2_adapters.safetensors.

Writes the Python-stdlib train and held-out splits (moe_prefetch.predict.corpus) to text files, then
runs the same library calls as `moe-prefetch train-predictor` and `eval-predictor`. With
`--analysis`, also breaks m2r2's held-out misses down by target layer, by how often the
target expert is used, and by the expert's rank in the router's top-k.

    python scripts/train_demo_adapters.py [--model demo|demo-fine] [--steps 1500] [--rank 16] [--lookahead 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # this checkout's package, not an installed one
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from moe_prefetch.model.loading import resolve_path  # noqa: E402
from moe_prefetch.model.offline import eval_predictor, train_predictor  # noqa: E402
from moe_prefetch.predict.corpus import read_corpus  # noqa: E402
from moe_prefetch.predict.evaluate import format_table  # noqa: E402
from moe_prefetch.predict.m2r2 import FILENAME  # noqa: E402

BUCKETS = 4  # expert-use quartiles per target layer, most used first


@torch.no_grad()
def miss_analysis(model_name: str, heldout: Path, adapters_path: Path, lookahead: int, max_tokens: int) -> dict:
    """Recall of the router's top-k for next-gate and m2r2 from the adapters' prediction point,
    per distance d: per target layer, per expert-use quartile and per rank in the top-k."""
    from transformers import AutoTokenizer

    from moe_prefetch.model.loading import load
    from moe_prefetch.predict.m2r2 import DATA_KEY, load_adapters, pairs
    from moe_prefetch.predict.predictors import route
    from moe_prefetch.predict.residuals import collect_text, read_texts

    folder = resolve_path(model_name)
    model, runtime = load(folder, device="cpu", predictor="none")
    try:
        adapters, _ = load_adapters(adapters_path, model, runtime.layers)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        data = collect_text(model, tokenizer, read_texts([heldout]), 256, max_tokens)
        by_idx = {layer.layer_idx: layer for layer in runtime.layers}
        out: dict = {"tokens": data.num_tokens}
        for name in ("next-gate", "m2r2"):
            rows: dict = {}
            for source, target, d in pairs(max(data.hidden) + 1, runtime.layers, lookahead, adapters.source):
                layer = by_idx[target]
                h = data.get(DATA_KEY[adapters.source], source)
                adapter = adapters.get(source, target) if name == "m2r2" else None
                pred = route(layer, adapter(h) if adapter is not None else h)
                actual = data.get("chosen", target)  # [N, k], best first
                hit = (actual.unsqueeze(-1) == pred.unsqueeze(-2)).any(-1).float()  # [N, k]
                counts = torch.bincount(actual.reshape(-1), minlength=layer.num_experts)
                order = torch.argsort(counts, descending=True)
                bucket_of = torch.empty_like(order)
                bucket_of[order] = torch.arange(len(order)) * BUCKETS // len(order)
                buckets = bucket_of[actual]
                row = rows.setdefault(d, {"by_target": {}, "by_bucket": [[0.0, 0.0] for _ in range(BUCKETS)]})
                row["by_target"][target] = hit.mean().item()
                row.setdefault("by_rank", []).append(hit.mean(0).tolist())
                row.setdefault("use_share", []).append(
                    [
                        counts[order[b * len(order) // BUCKETS : (b + 1) * len(order) // BUCKETS]].sum().item()
                        / counts.sum().item()
                        for b in range(BUCKETS)
                    ]
                )
                for b in range(BUCKETS):
                    row["by_bucket"][b][0] += hit[buckets == b].sum().item()
                    row["by_bucket"][b][1] += (buckets == b).sum().item()
            for row in rows.values():
                row["by_bucket"] = [h / n if n else 0.0 for h, n in row["by_bucket"]]
                row["by_rank"] = [sum(col) / len(col) for col in zip(*row["by_rank"])]
                row["use_share"] = [sum(col) / len(col) for col in zip(*row["use_share"])]
            out[name] = rows
    finally:
        runtime.detach()
    return out


def format_analysis(result: dict) -> str:
    lines = [f"held-out tokens: {result['tokens']}; expert-use quartiles per target layer, most used first"]
    for name in ("next-gate", "m2r2"):
        for d, row in sorted(result[name].items()):
            quart = " ".join(f"{r:.3f}" for r in row["by_bucket"])
            share = " ".join(f"{s:.2f}" for s in row["use_share"])
            ranks = " ".join(f"{r:.2f}" for r in row["by_rank"])
            lines.append(f"{name:<10} d={d}  by quartile {quart}  (share of routing {share})  by rank {ranks}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="demo, demo-fine or a checkpoint folder")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lookahead", type=int, default=3)
    parser.add_argument("--train-tokens", type=int, default=60_000)
    parser.add_argument("--eval-tokens", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: runs/MODEL-adapters")
    parser.add_argument("--out", type=Path, default=None, help="adapters file to write (default: the model's)")
    parser.add_argument("--analysis", action="store_true", help="also break m2r2's held-out misses down")
    parser.add_argument("--analysis-only", action="store_true", help="skip training and evaluation")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out_dir = args.out_dir or Path("runs") / f"{Path(args.model).name}-adapters"
    out = args.out or resolve_path(args.model) / FILENAME
    out_dir.mkdir(parents=True, exist_ok=True)
    train_txt, heldout_txt = out_dir / "train.txt", out_dir / "heldout.txt"
    train_txt.write_text(read_corpus("train", max_chars=args.train_tokens * 8))
    heldout_txt.write_text(read_corpus("heldout", max_chars=args.eval_tokens * 8))
    if not args.analysis_only:
        metrics = train_predictor(
            args.model,
            [train_txt],
            out,
            lookahead=args.lookahead,
            rank=args.rank,
            seed=args.seed,
            steps=args.steps,
            max_tokens=args.train_tokens,
            device="cpu",
            progress=lambda s, loss: s % 100 == 0 and print(f"step {s} loss {loss:.4f}", flush=True),
        )
        print(json.dumps(metrics, indent=1))
        result = eval_predictor(
            args.model,
            [heldout_txt],
            predictor_path=out,
            lookahead=args.lookahead,
            max_tokens=args.eval_tokens,
            device="cpu",
        )
        print(format_table(result))
        (out_dir / "eval.json").write_text(json.dumps(result, indent=1))
    if args.analysis or args.analysis_only:
        analysis = miss_analysis(args.model, heldout_txt, out, args.lookahead, args.eval_tokens)
        print(format_analysis(analysis))
        (out_dir / "analysis.json").write_text(json.dumps(analysis, indent=1))


if __name__ == "__main__":
    main()
