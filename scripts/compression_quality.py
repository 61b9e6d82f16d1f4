"""Quality of compressed experts on a demo model: held-out loss and m2r2 recall per experts_dtype.

Each row is the demo with its experts replaced by what the offloaded runtime computes with for
that `experts_dtype` (`compression.compress_experts`, all resident), scored on the held-out
windows the predictor tables use (`moe_prefetch.predict.heldout`). Loss is relative to the model's own
dtype (fp32 on CPU); the issue's bars are int8 within 0.5% and int4 within 3%. Int4 is measured
at several group sizes by setting `compression.INT4_GROUP` (256 is one group per row of the demo's
matrices: outside the issue's 32-128, for comparison). A control row adds Gaussian noise of each
expert matrix's own size: how much weight error the loss notices at all. Recall is docs/m2r2.md's metric
(share of the router's top-k named d MoE layers ahead), with the model's experts compressed and
the router and adapters in full precision; it is scored against the compressed model's own
routing, and "routing kept" is the share of the router's top-k that compressing left unchanged.

    python scripts/compression_quality.py [--model demo] [--tokens 20000] [--groups 32,64,128,256]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # this checkout's package, not an installed one
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from moe_prefetch.experts import compression  # noqa: E402
from moe_prefetch.experts.layout import find_moe_layers, spec_of  # noqa: E402
from moe_prefetch.model.loading import resolve_path  # noqa: E402
from moe_prefetch.predict.evaluate import evaluate_predictors  # noqa: E402
from moe_prefetch.predict.heldout import heldout_ids, heldout_loss  # noqa: E402
from moe_prefetch.predict.m2r2 import FILENAME, load_adapters  # noqa: E402
from moe_prefetch.predict.residuals import collect  # noqa: E402

BARS = {"int8": 0.005, "int4": 0.03}  # the bounds on relative held-out loss


def compressed(stock, experts_dtype: str, group: int | None = None):
    """A copy of `stock` with its experts as the runtime computes with them for `experts_dtype`
    (int4 at `group`, or `compression.INT4_GROUP`)."""
    saved = compression.INT4_GROUP
    compression.INT4_GROUP = group or saved
    try:
        return compression.compress_experts(copy.deepcopy(stock), experts_dtype)
    finally:
        compression.INT4_GROUP = saved


def expert_bytes(model, experts_dtype: str, group: int | None = None) -> int:
    saved = compression.INT4_GROUP
    compression.INT4_GROUP = group or saved
    try:
        return compression.make_codec(spec_of(find_moe_layers(model)), experts_dtype).nbytes
    finally:
        compression.INT4_GROUP = saved


def weight_error(stock, model) -> float:
    """Relative RMS error over all expert matrices of `model` against `stock`."""
    pairs = [
        (a.detach(), b.detach())
        for x, y in zip(find_moe_layers(stock), find_moe_layers(model))
        for a, b in zip(x.experts.parameters(), y.experts.parameters())
        if a.dim() == 3
    ]
    err = sum((a - b).pow(2).sum() for a, b in pairs) / sum(a.pow(2).sum() for a, _ in pairs)
    return err.sqrt().item()


def noised(stock, seed: int = 0):
    """Control, not a codec: every expert matrix plus Gaussian noise of its own standard deviation.
    Shows how much weight error the model's loss notices at all."""
    model = copy.deepcopy(stock)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in find_moe_layers(model):
            for p in layer.experts.parameters():
                if p.dim() == 3:
                    p.add_(torch.randn(p.shape, generator=g) * p.std())
    return model


def loss_rows(stock, ids: torch.Tensor, groups: list[int], control: bool = True) -> list[dict]:
    """Held-out loss of the model's own dtype, bf16, int8, int4 at each group size, and the
    noise control."""
    base = heldout_loss(stock, ids)
    own = str(spec_of(find_moe_layers(stock)).dtype).removeprefix("torch.")
    rows = [{"experts": f"{own} (model)", "bytes": expert_bytes(stock, "auto"), "loss": base, "rel": 0.0, "werr": 0.0}]
    variants = [("bf16", None), ("int8", None)] + [("int4", g) for g in groups]
    for dtype, group in variants:
        model = compressed(stock, dtype, group)
        loss = heldout_loss(model, ids)
        label = dtype if group is None else f"int4 g{group}" + (" (default)" if group == compression.INT4_GROUP else "")
        row = {
            "experts": label,
            "bytes": expert_bytes(stock, dtype, group),
            "loss": loss,
            "rel": loss / base - 1,
            "werr": weight_error(stock, model),
        }
        if dtype in BARS:
            row["bar"] = BARS[dtype]
            row["within"] = abs(row["rel"]) <= BARS[dtype]
        rows.append(row)
    if control:
        model = noised(stock)
        loss = heldout_loss(model, ids)
        rows.append(
            {
                "experts": "control: noise 1x std",
                "bytes": None,
                "loss": loss,
                "rel": loss / base - 1,
                "werr": weight_error(stock, model),
            }
        )
    return rows


def _sorted(data, layer_idx: int) -> torch.Tensor:
    return data.get("chosen", layer_idx).sort(-1).values


def recall_rows(stock, ids: torch.Tensor, adapters_path: Path, lookahead: int) -> tuple[list[dict], dict]:
    """Held-out recall per distance for next-gate and m2r2 from the adapters' prediction point,
    with the model's experts and with int4 experts (router and adapters unchanged)."""
    rows, kept = [], {}
    reference = None
    for label, model in (("model", stock), ("int4", compressed(stock, "int4"))):
        layers = find_moe_layers(model)
        adapters, _ = load_adapters(adapters_path, model, layers)
        data = collect(model, ids)
        if reference is None:
            reference = data
        else:  # share of the fp32 router's top-k that the compressed model's router still picks
            same = [
                (_sorted(data, layer.layer_idx) == _sorted(reference, layer.layer_idx)).float().mean().item()
                for layer in layers
            ]
            kept[label] = sum(same) / len(same)
        result = evaluate_predictors(model, data, lookahead=lookahead, adapters=adapters, margin=2)
        for name, r in result["predictors"].items():
            if name == "previous-token":
                continue
            rows.append({"experts": label, "predictor": name, **{d: v["recall"] for d, v in r["by_distance"].items()}})
    return rows, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="demo, demo-fine or a checkpoint folder")
    parser.add_argument("--tokens", type=int, default=20_000, help="held-out tokens (20000: the predictor tables)")
    parser.add_argument("--groups", default="32,64,128,256", help="int4 group sizes to measure")
    parser.add_argument("--lookahead", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    stock = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = heldout_ids(tokenizer, args.tokens)
    groups = [int(g) for g in args.groups.split(",") if g.strip()]
    print(f"{args.model}: held-out loss on {ids[:, 1:].numel():,} predicted tokens ({ids.shape[0]} x {ids.shape[1]})")
    losses = loss_rows(stock, ids, groups)
    print(f"{'experts':<24}{'bytes/expert':>14}{'weight err':>12}{'loss':>9}{'vs model':>11}{'bar':>7}")
    for row in losses:
        bar = f"{row['bar']:.1%}" if "bar" in row else ""
        verdict = "" if "within" not in row else ("  ok" if row["within"] else "  OVER")
        size = f"{row['bytes']:,}" if row["bytes"] else "-"
        print(
            f"{row['experts']:<24}{size:>14}{row['werr']:>12.4f}{row['loss']:>9.4f}{row['rel']:>+11.3%}{bar:>7}{verdict}"
        )
    recall, kept = recall_rows(stock, ids, folder / FILENAME, args.lookahead)
    ds = list(range(1, args.lookahead + 1))
    print(f"\nrecall of the router's top-k, d MoE layers ahead (int4 g{compression.INT4_GROUP}; router, adapters fp32)")
    print(f"{'experts':<8}{'predictor':<24}" + "".join(f"{'d=' + str(d):>8}" for d in ds))
    for row in recall:
        print(f"{row['experts']:<8}{row['predictor']:<24}" + "".join(f"{row.get(d, float('nan')):>8.3f}" for d in ds))
    print(f"routing kept by int4: {kept['int4']:.4f} of the model's top-k choices")
    if args.json:
        args.json.write_text(json.dumps({"loss": losses, "recall": recall, "routing_kept": kept}, indent=1))


if __name__ == "__main__":
    main()
