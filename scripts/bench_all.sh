#!/usr/bin/env bash
# Reproduces docs/bench/*.json: the demo models (trained), the five reference shapes with a
# demo's recorded routing (simulated at their real depth), and the five reference shapes with
# random weights (fewer layers, measured). CPU by default; pass DEVICE=cuda on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
DEVICE=${DEVICE:-cpu}
PROFILES=rtx3060-12gb,rtx4090-24gb,a100-40gb,h100-80gb
"$BIN/moe-prefetch" bench --model demo --device "$DEVICE" --tokens 32 --lookahead 2 \
  --predictors none,previous-token,next-gate,m2r2,oracle --cache-fractions 0.125,0.25,0.5,0.75 \
  --profiles "$PROFILES" --json docs/bench/demo.json
# routing-driven shapes: the matching demo's routing (8 experts top-2: demo; the rest: demo-fine)
for shape in mixtral-8x7b:demo olmoe-1b-7b:demo-fine qwen3-30b-a3b:demo-fine deepseek-v2-lite:demo-fine \
  gpt-oss-20b:demo-fine; do
  name=${shape%%:*}; routing=${shape##*:}
  "$BIN/moe-prefetch" bench --model "shape:$name" --routing "$routing" --tokens 32 --lookahead 2 \
    --predictors none,previous-token,next-gate,m2r2,oracle --cache-fractions 0.125,0.25,0.5 \
    --profiles "$PROFILES" --json "docs/bench/$name.$routing.json"
done
"$BIN/python" scripts/routing_repetition.py --json docs/bench/repetition.json
# random weights (random routing), measured; smallest first; mixtral-8x7b (352 MiB experts) needs ~15 GB of RAM on its own
for shape in olmoe-1b-7b:4 qwen3-30b-a3b:4 deepseek-v2-lite:4 gpt-oss-20b:2 mixtral-8x7b:2; do
  name=${shape%%:*}; layers=${shape##*:}
  "$BIN/moe-prefetch" bench --model "shape:$name" --shape-layers "$layers" --device "$DEVICE" --tokens 8 \
    --lookahead 1 --predictors none,previous-token,next-gate,oracle --cache-fractions 0.125,0.25,0.5 \
    --profiles "$PROFILES" --json "docs/bench/$name.json"
done
