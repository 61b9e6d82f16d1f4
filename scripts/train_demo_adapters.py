"""Train and evaluate the demo model's M2R2 adapters; reproduces moe_prefetch/demo/m2r2_adapters.safetensors.

Writes the Python-stdlib train and held-out splits (moe_prefetch.corpus) to text files, then
runs the same library calls as `moe-prefetch train-predictor` and `eval-predictor`.

    python scripts/train_demo_adapters.py [--steps 1500] [--rank 16] [--lookahead 3] [--out-dir runs/demo-adapters]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from moe_prefetch.corpus import read_corpus
from moe_prefetch.evaluate import eval_predictor, format_table
from moe_prefetch.loading import DEMO_DIR
from moe_prefetch.m2r2 import FILENAME
from moe_prefetch.training import train_predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lookahead", type=int, default=3)
    parser.add_argument("--train-tokens", type=int, default=60_000)
    parser.add_argument("--eval-tokens", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=Path("runs/demo-adapters"))
    parser.add_argument("--out", type=Path, default=DEMO_DIR / FILENAME, help="adapters file to write")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.manual_seed(args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    train_txt, heldout_txt = args.out_dir / "train.txt", args.out_dir / "heldout.txt"
    train_txt.write_text(read_corpus("train", max_chars=args.train_tokens * 8))
    heldout_txt.write_text(read_corpus("heldout", max_chars=args.eval_tokens * 8))
    out = args.out
    metrics = train_predictor(
        "demo",
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
        "demo", [heldout_txt], predictor_path=out, lookahead=args.lookahead, max_tokens=args.eval_tokens, device="cpu"
    )
    print(format_table(result))
    (args.out_dir / "eval.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
