#!/usr/bin/env bash
# Reproduces docs/bench/*.json: the demo models (trained), the five reference shapes with a
# demo's recorded routing (simulated at their real depth, each configuration sized to the
# profile: the largest cache that fits), the five reference shapes with random weights (fewer
# layers, measured), and the plans of docs/benchmarks.md section 0. CPU by default; pass
# DEVICE=cuda on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
DEVICE=${DEVICE:-cpu}
PROFILES=rtx3060-12gb,rtx4090-24gb
"$BIN/moe-prefetch" bench --model demo --device "$DEVICE" --tokens 32 --warmup 0 --lookahead 2 \
  --predictors none,previous-token,next-gate,m2r2,oracle --cache-fractions 0.125,0.25,0.5,0.75 \
  --profiles "$PROFILES" --json docs/bench/demo.json
# routing-driven shapes: the matching demo's routing (8 experts top-2: demo; the rest: demo-fine)
for shape in mixtral-8x7b:demo olmoe-1b-7b:demo-fine qwen3-30b-a3b:demo-fine deepseek-v2-lite:demo-fine \
  gpt-oss-20b:demo-fine; do
  name=${shape%%:*}; routing=${shape##*:}
  "$BIN/moe-prefetch" bench --model "shape:$name" --routing "$routing" --tokens 32 --lookahead 2 \
    --predictors none,next-gate,m2r2,oracle --on-miss wait,auto --experts-dtype bf16,int8,int4 \
    --profiles "$PROFILES" --host ddr5-6000-2ch --json "docs/bench/$name.$routing.json"
done
"$BIN/python" scripts/routing_repetition.py --json docs/bench/repetition.json
# section 5c: placement, prediction and eviction on Mixtral at the fitting caches, a 128 GiB desktop
"$BIN/moe-prefetch" bench --model shape:mixtral-8x7b --routing demo --on-miss wait,auto \
  --predictors none,next-gate,m2r2,oracle --experts-dtype bf16,int8,int4 --profiles rtx3060-12gb,rtx4090-24gb,h100-80gb \
  --host ddr4-3200-2ch --host-memory 128GiB --cache-policy lru,lfu --json docs/bench/hybrid-mixtral-8x7b.json
# random weights (random routing), measured; smallest first; mixtral-8x7b (352 MiB experts) needs ~15 GB of RAM on its own
for shape in olmoe-1b-7b:4 qwen3-30b-a3b:4 deepseek-v2-lite:4 gpt-oss-20b:2 mixtral-8x7b:2; do
  name=${shape%%:*}; layers=${shape##*:}
  "$BIN/moe-prefetch" bench --model "shape:$name" --routing measured --shape-layers "$layers" --device "$DEVICE" \
    --tokens 8 --warmup 0 --lookahead 1 --predictors none,previous-token,next-gate,oracle \
    --cache-fractions 0.125,0.25,0.5 --profiles "$PROFILES" --json "docs/bench/$name.json"
done
# section 0: what fits a consumer card and its desktop, and how fast (simulated)
for combo in qwen3-30b-a3b:rtx3060-12gb:ddr4-3200-2ch qwen3-30b-a3b:rtx4090-24gb:ddr5-6000-2ch \
  gpt-oss-20b:rtx3060-12gb:ddr4-3200-2ch gpt-oss-20b:rtx4090-24gb:ddr5-6000-2ch \
  mixtral-8x7b:rtx3060-12gb:ddr4-3200-2ch mixtral-8x7b:rtx4090-24gb:ddr5-6000-2ch; do
  IFS=: read -r name profile host <<<"$combo"
  "$BIN/moe-prefetch" plan --model "shape:$name" --profile "$profile" --host "$host" \
    --json "docs/bench/plan/$name.$profile.$host.json"
done
for name in mixtral-8x7b qwen3-30b-a3b; do  # the same desktop with 64 GiB
  "$BIN/moe-prefetch" plan --model "shape:$name" --profile rtx3060-12gb --host ddr4-3200-2ch --host-memory 64GiB \
    --json "docs/bench/plan/$name.rtx3060-12gb.ddr4-3200-2ch.64GiB.json"
done
