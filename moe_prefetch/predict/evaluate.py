"""Score predictors offline against the router's actual choices on held-out text.

recall(d), shown as "predictor recall@k": share of the router's top-k that a predictor named,
for target layers d MoE layers ahead of the layer the prediction was made at. Offline, on text:
not a run's "prefetch recall" (`lanes.prefetch_recall`: the routed experts a prefetch had
actually staged, which also depends on the cache, the link and timing). With `margin` m, predictors also
name k + m experts (next by router score, or by recency for previous-token) and we report
precision and recall of that larger set: what prefetching k + m per layer would buy.
The run from a checkpoint folder (load, collect, score) is `model.offline.eval_predictor`.
"""

from __future__ import annotations

import torch

from ..experts.layout import find_moe_layers
from .m2r2 import DATA_KEY, Adapters, pairs, router_logits
from .predictors import route
from .residuals import Residuals

PREDICTORS = ("previous-token", "next-gate", "m2r2")


def _overlap(pred: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
    """Per token: how many of `actual` [N, k] appear in `pred` [N, j]."""
    return (pred.unsqueeze(-1) == actual.unsqueeze(-2)).any(-2).sum(-1).float()


def _extend(layer, x_normed: torch.Tensor, chosen: torch.Tensor, total: int) -> torch.Tensor:
    """`chosen` [N, k] followed by the next-best experts by router score, `total` in all."""
    scores = router_logits(layer, x_normed).clone()
    scores.scatter_(1, chosen.to(scores.device), float("-inf"))
    extra = torch.topk(scores, total - chosen.shape[1], dim=-1).indices.cpu()
    return torch.cat([chosen.cpu(), extra], dim=1)


def evaluate_predictors(
    model, data: Residuals, lookahead: int = 3, adapters: Adapters | None = None, margin: int = 2, predictors=PREDICTORS
) -> dict:
    """Recall per distance and per (source, target) layer pair, plus precision/recall at k+margin."""
    # a block, not a decorator: mutmut (make mutate) leaves decorated functions alone
    with torch.no_grad():
        layers = find_moe_layers(model)
        by_idx = {layer.layer_idx: layer for layer in layers}
        device = layers[0].router.weight.device
        dtype = layers[0].router.weight.dtype
        seq = data.seq_ids[0]
        has_prev = torch.cat([torch.tensor([False]), seq[1:] == seq[:-1]])
        # token i-2 in token i's sequence (previous-token's margin); torch.roll alone would wrap
        # around the data and across sequences
        has_prev2 = torch.cat([torch.tensor([False, False]), seq[2:] == seq[:-2]])[: len(seq)]
        results = {}
        variants = [(name, "residual") for name in predictors if name != "m2r2"]
        if "m2r2" in predictors and adapters is not None:
            if adapters.source != "residual":  # next-gate from the same point, for a like-for-like row
                variants.append((f"next-gate@{adapters.source}", adapters.source))
            variants.append(("m2r2", adapters.source))
        for name, point in variants:
            sums: dict[int, list[float]] = {}
            per_pair = []
            for source, target, d in pairs(max(data.hidden) + 1, layers, lookahead, point):
                layer = by_idx[target]
                k = layer.top_k
                actual = data.get("chosen", target)
                rows = has_prev if name == "previous-token" else torch.ones_like(has_prev)
                actual = actual[rows]
                if name == "previous-token":
                    prev = data.get("chosen", target)[torch.roll(has_prev, -1)]  # token i-1 for each kept token i
                    # no token i-2 in the sequence: the margin names nothing (-1 is no expert)
                    prev2 = torch.roll(data.get("chosen", target), 2, 0).masked_fill(~has_prev2[:, None], -1)[rows]
                    pred_k, pred_m = prev, torch.cat([prev, prev2], 1)[:, : k + margin]
                else:
                    h = data.get(DATA_KEY[point], source)[rows].to(device=device, dtype=dtype)
                    if name == "m2r2":
                        adapter = adapters.get(source, target)
                        h = adapter.to(device=device, dtype=dtype)(h) if adapter is not None else h
                    pred_k = route(layer, h).cpu()
                    normed = layer.norm(h) if layer.norm is not None else h
                    pred_m = _extend(layer, normed, pred_k, min(layer.num_experts, k + margin))
                recall = (_overlap(pred_k, actual) / k).mean().item()
                hits_m = _overlap(pred_m, actual)
                per_pair.append(
                    {
                        "source": source,
                        "target": target,
                        "d": d,
                        "recall": recall,
                        "precision_at_k_plus_margin": (hits_m / pred_m.shape[1]).mean().item(),
                        "recall_at_k_plus_margin": (hits_m / k).mean().item(),
                    }
                )
                sums.setdefault(d, []).append(recall)
            by_d = {}
            for d in sorted(sums):
                rows_d = [p for p in per_pair if p["d"] == d]
                by_d[d] = {
                    key: sum(p[key] for p in rows_d) / len(rows_d)
                    for key in ("recall", "precision_at_k_plus_margin", "recall_at_k_plus_margin")
                }
            results[name] = {"by_distance": by_d, "by_pair": per_pair}
        return {"tokens": data.num_tokens, "lookahead": lookahead, "margin": margin, "predictors": results}


def format_table(result: dict) -> str:
    """Plain-text table: recall per predictor and distance, then k+margin precision/recall."""
    preds = result["predictors"]
    ds = sorted({d for r in preds.values() for d in r["by_distance"]})
    m = result["margin"]
    lines = [
        f"held-out tokens: {result['tokens']}   predictor recall@k: share of the router's top-k named "
        f"(k+{m}: precision / recall)"
    ]
    w = max(len(name) for name in [*preds, "predictor"]) + 2
    lines.append(f"{'predictor':<{w}}" + "".join(f"{'d=' + str(d):>24}" for d in ds))
    for name, r in preds.items():
        cells = []
        for d in ds:
            row = r["by_distance"].get(d)
            cells.append(
                ""
                if row is None
                else f"{row['recall']:.3f} ({row['precision_at_k_plus_margin']:.2f}/"
                f"{row['recall_at_k_plus_margin']:.2f})"
            )
        lines.append(f"{name:<{w}}" + "".join(f"{c:>24}" for c in cells))
    lines += ["", "predictor recall@k per target MoE layer (predicted d layers ahead)"]
    targets = sorted({p["target"] for r in preds.values() for p in r["by_pair"]})
    lines.append(f"{'predictor':<{w}}{'d':>3}" + "".join(f"{'L' + str(t):>8}" for t in targets))
    for name, r in preds.items():
        for d in ds:
            by_target = {p["target"]: p["recall"] for p in r["by_pair"] if p["d"] == d}
            lines.append(
                f"{name:<{w}}{d:>3}"
                + "".join(f"{by_target[t]:>8.3f}" if t in by_target else f"{'-':>8}" for t in targets)
            )
    return "\n".join(lines)
