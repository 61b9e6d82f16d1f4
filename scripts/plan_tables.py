"""Render `moe-prefetch plan --json` files (docs/bench/plan/*.json) as the markdown tables of
docs/benchmarks.md section 0: per experts_dtype whether it fits, its cache and memory, and the
simulated tokens/s of on-demand loading, of the host lane, of the best runnable predictor and of
the oracle, beside the configuration's bound; then the recommendation and its command.

python scripts/plan_tables.py docs/bench/plan/*.json
"""

from __future__ import annotations

import json
import sys

GIB = 2**30


def fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def table(path: str) -> str:
    data = json.load(open(path))
    options = data["options"]
    memory = f", {data['host_memory'] / GIB:.0f} GiB" if data.get("host_memory") else ""
    lines = [
        f"**{data['model']}** on **{data['profile']}** with host **{data['host']}**{memory} (context "
        f"{data['context']}, routing {data['routing']}, {data['tokens']} tokens after {data['warmup']} of warm-up). "
        "Simulated.",
        "",
        "| experts | fits | slots | device GiB | host store GiB | wait, none | auto, none | auto, best predictor "
        "| auto, oracle | config bound |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dtype in dict.fromkeys(o["experts_dtype"] for o in options):
        mine = [o for o in options if o["experts_dtype"] == dtype]
        first = mine[0]
        if not first["fits"]:
            lines.append(
                f"| {dtype} | no: {first['why_not'].split(': ', 1)[-1]} | {first['cache_slots']} "
                f"| {first['device_bytes'] / GIB:.1f} | {first['host_bytes'] / GIB:.1f} | - | - | - | - | - |"
            )
            continue
        pick = {(o["on_miss"], o["predictor"]): o for o in mine}
        auto = [o for o in mine if o["on_miss"] == "auto" and o["predictor"] not in ("none", "oracle")]
        best = max(auto, key=lambda o: o["simulated_tokens_per_s"])
        lines.append(
            f"| {dtype} | yes | {first['cache_slots']} of {first['total_experts']} | {first['device_bytes'] / GIB:.1f} "
            f"| {first['host_bytes'] / GIB:.1f} | {fmt(pick[('wait', 'none')]['simulated_tokens_per_s'])} "
            f"| {fmt(pick[('auto', 'none')]['simulated_tokens_per_s'])} "
            f"| {fmt(best['simulated_tokens_per_s'])} ({best['predictor']}) "
            f"| {fmt(pick[('auto', 'oracle')]['simulated_tokens_per_s'])} "
            f"| {fmt(max(o['config_bound_tokens_per_s'] for o in mine))} |"
        )
    rec = data["recommended"]
    lines += ["", f"Recommended: {rec['reason']}.", "", f"`{rec['command']}`"]
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(table(path))
        print()
