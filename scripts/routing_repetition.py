"""How much repeating a short routing trace across layers overstates cross-layer regularity.

For each demo, one recorded run (`moe_prefetch.evidence.routing.record`) is replayed on 6 layers of
the matching shape's sizes (mixtral-8x7b for demo, olmoe-1b-7b for demo-fine: same experts
and top-k, so no expert mapping) in two ways: the demo's 6 layers as they are, and a p-layer
slice of the same trace repeated to 6 layers (p = 1, 2, 3; every slice, averaged), as
`--routing` does for deeper shapes. The difference is what repetition adds or takes away.

    python scripts/routing_repetition.py [--tokens 64] [--json docs/bench/repetition.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # this checkout's package, not an installed one
    sys.path.insert(0, str(REPO))

from moe_prefetch.evidence import routing  # noqa: E402
from moe_prefetch.evidence.bench import shape_replay, shape_sizes  # noqa: E402
from moe_prefetch.evidence.sim import simulate_replay  # noqa: E402
from moe_prefetch.runtime import profiles as hw  # noqa: E402

PAIRS = {"demo": "mixtral-8x7b", "demo-fine": "olmoe-1b-7b"}
PREDICTORS = ["none", "next-gate", "m2r2", "oracle"]


def variants(recording: dict, periods=(1, 2, 3)):
    """(label, recording to repeat onto 6 layers) for the whole trace and every p-layer slice."""
    ids = recording["moe_layer_ids"]
    yield "6 layers as recorded", [recording]
    for p in periods:
        yield (
            f"{p}-layer slices x {len(ids) // p}",
            [routing.sub_recording(recording, ids[s : s + p]) for s in range(len(ids) - p + 1)],
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--lookahead", type=int, default=2)
    parser.add_argument("--profile", default="rtx4090-24gb")
    parser.add_argument("--fractions", default="0.25,0.5")
    parser.add_argument("--demos", default="demo,demo-fine")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    profile = hw.load_profile(args.profile)
    fractions = [float(f) for f in args.fractions.split(",")]
    results = []
    for demo in args.demos.split(","):
        sizes = shape_sizes(PAIRS[demo], layers=6)
        recording = routing.record(demo, ["next-gate", "m2r2"], args.tokens, "import os\n\ndef main(", args.lookahead)
        total = sizes["num_experts"] * len(sizes["moe_layer_ids"])
        for label, recs in variants(recording):
            mapped = [
                routing.repeat_onto(r, sizes["moe_layer_ids"], sizes["num_experts"], sizes["top_k"]) for r in recs
            ]
            corr = [routing.novelty_correlation(m["trace"]) for m in mapped]
            row = {
                "demo": demo,
                "variant": label,
                "novelty_correlation": sum(c["mean_novelty_correlation"] for c in corr) / len(corr),
                "identical_pairs": sum(c["identical_pairs"] for c in corr) / len(corr),
                "sim": {},
            }
            for fraction in fractions:
                slots = max(sizes["top_k"], round(fraction * total))
                for predictor in PREDICTORS:
                    mode = "recorded" if predictor in routing.RECORDED else predictor
                    sims = [
                        simulate_replay(
                            shape_replay(sizes, m, predictor, slots, args.lookahead), profile, predictor=mode
                        )
                        for m in mapped
                    ]
                    # hit rates only: a 6-layer slice's tok/s would say nothing about a real model's
                    row["sim"][f"{predictor}@{fraction:g}"] = {
                        "decode_hit_rate": sum(s["decode_hit_rate"] for s in sims) / len(sims),
                    }
            results.append(row)
            print(json.dumps(row), flush=True)
    print()
    keys = [f"{p}@{f:g}" for f in fractions for p in PREDICTORS]
    print(
        "| demo | trace on 6 layers | novelty corr. | identical layer pairs | "
        + " | ".join(f"{k} hit" for k in keys)
        + " |"
    )
    print("|---" * (4 + len(keys)) + "|")
    for r in results:
        print(
            f"| {r['demo']} | {r['variant']} | {r['novelty_correlation']:.2f} | {r['identical_pairs']:.2f} | "
            + " | ".join(f"{r['sim'][k]['decode_hit_rate']:.3f}" for k in keys)
            + " |"
        )
    if args.json:
        args.json.write_text(json.dumps({"profile": args.profile, "tokens": args.tokens, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
