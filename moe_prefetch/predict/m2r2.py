"""M2R2 accelerated residuals (after arXiv 2502.02040, reconstructed; see docs/m2r2.md).

Beside the frozen model, one small adapter per (layer l, target MoE layer t) maps the
residual entering layer l to an "accelerated" residual a(l, t) = h_l + adapter(h_l) that
aligns with the residual layer t's router will see. Layer t's own norm and router applied
to a(l, t) then predict t's experts while layer l is still running.

The adapter is low rank and scale-equivariant: delta = up(silu(down(h / rms(h)))) * rms(h).
`up` starts at zero, so an untrained adapter is exactly next-gate speculation; training can
only move away from it where that helps. Loss per pair, on frozen-model activations:
  KL(router_t(x_t) || router_t(norm_t(a)))             match the router's distribution
  + align * |norm_t(a) - x_t|^2 / |x_t|^2               residual alignment
where x_t is the (normed) input layer t's router actually saw.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import PredictorError
from ..experts.layout import MoELayer
from ..runtime.config import M2R2_FILENAME, train_adapters_hint
from .predictors import NextGatePredictor
from .residuals import Residuals

logger = logging.getLogger(__name__)

FORMAT = "moe-prefetch/m2r2"
VERSION = "1"
FILENAME = M2R2_FILENAME
SOURCES = ("router-input", "residual")
DATA_KEY = {"router-input": "router_in", "residual": "hidden"}  # Residuals field per source


class Adapter(nn.Module):
    """Low-rank, scale-equivariant residual update; the identity when `up` is zero."""

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, hidden_size, bias=False)
        nn.init.normal_(self.down.weight, std=hidden_size**-0.5)
        nn.init.zeros_(self.up.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        scale = h.float().pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        delta = self.up(F.silu(self.down((h.float() / scale).to(self.down.weight.dtype)))).float() * scale
        return (h.float() + delta).to(h.dtype)


@dataclass(frozen=True)
class TrainSettings:
    lookahead: int = 3
    rank: int = 16
    steps: int = 1500
    batch_tokens: int = 1024
    lr: float = 3e-3
    align: float = 0.1
    seed: int = 0
    # Where the accelerated residual starts: "router-input", the normed post-attention residual
    # of MoE layer l (what its own router sees), or "residual", the input of decoder layer l.
    # router-input sees layer l's attention, so it predicts better at the same lead time.
    source: str = "router-input"

    def __post_init__(self):
        if not 1 <= self.lookahead <= 8 or self.rank < 1 or self.steps < 1 or self.batch_tokens < 1 or self.lr <= 0:
            raise ValueError(f"bad training settings {self}; lookahead 1..8, rank/steps/batch >= 1, lr > 0")
        if self.source not in SOURCES:
            raise ValueError(f"source {self.source!r} must be one of {', '.join(SOURCES)}")


def pairs(
    num_layers: int, layers: list[MoELayer], lookahead: int, source: str = "residual"
) -> list[tuple[int, int, int]]:
    """(source layer l, target MoE layer t, distance d) for d = 1..lookahead. Router-input
    sources exist only at MoE layers; residual sources at every decoder layer."""
    out = []
    sources = [layer.layer_idx for layer in layers] if source == "router-input" else range(num_layers)
    for source in sources:
        after = [layer.layer_idx for layer in layers if layer.layer_idx > source]
        out += [(source, target, d) for d, target in enumerate(after[:lookahead], start=1)]
    return out


def router_logits(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """The router's raw scores for normed inputs `x`: used for the training loss and to rank
    extra experts beyond top-k; the routing decision itself always comes from the module."""
    bias = getattr(layer.router, "bias", None)
    bias = bias.float() if isinstance(bias, torch.Tensor) else None
    return F.linear(x.float(), layer.router.weight.float(), bias)


def fingerprint(model, layers: list[MoELayer]) -> str:
    """Hash of the model's shape-defining config and every router weight."""
    config = model.config
    digest = hashlib.sha256()
    shape = {k: getattr(config, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")}
    shape["experts"] = [(layer.layer_idx, layer.num_experts, layer.top_k) for layer in layers]
    digest.update(json.dumps(shape, sort_keys=True).encode())
    for layer in layers:
        digest.update(layer.router.weight.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class Adapters(nn.Module):
    def __init__(self, hidden_size: int, rank: int, keys: list[tuple[int, int]], source: str = "residual"):
        super().__init__()
        self.rank = rank
        self.keys = keys
        self.source = source
        self.blocks = nn.ModuleDict({f"{l}_{t}": Adapter(hidden_size, rank) for l, t in keys})

    def get(self, source: int, target: int) -> Adapter | None:
        return self.blocks[f"{source}_{target}"] if f"{source}_{target}" in self.blocks else None


def train_adapters(
    model,
    layers: list[MoELayer],
    data: Residuals,
    settings: TrainSettings,
    progress=None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 100,
) -> tuple[Adapters, dict]:
    """Train one adapter per (l, t) pair on collected residuals; returns adapters and metrics.

    The model is frozen; only adapter weights get gradients. The last 10% of sequences are
    held out and reported (recall of the router's top-k, adapters vs next-gate)."""
    torch.manual_seed(settings.seed)
    num_layers = max(data.hidden) + 1
    todo = pairs(num_layers, layers, settings.lookahead, settings.source)
    hidden_size = data.get("hidden", 0).shape[-1]
    adapters = Adapters(hidden_size, settings.rank, [(l, t) for l, t, _ in todo], settings.source)
    by_idx = {layer.layer_idx: layer for layer in layers}
    seq = data.seq_ids[0]
    cut = int(seq.max().item() * 0.9)
    train_rows = (seq <= cut).nonzero().squeeze(-1) if cut > 0 else torch.arange(seq.numel())
    val_rows = (seq > cut).nonzero().squeeze(-1)
    norms = {t: by_idx[t].norm for _, t, _ in todo}
    opt = torch.optim.AdamW(adapters.parameters(), lr=settings.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, settings.steps) / settings.steps))
    )
    gen = torch.Generator().manual_seed(settings.seed)
    start = time.perf_counter()
    # Norms and routers live where the model lives; training runs on CPU copies of their weights.
    frozen = {t: (_cpu_copy(norms[t]), _cpu_router(by_idx[t])) for _, t, _ in todo}
    last, first_step = 0.0, 0
    if checkpoint is not None and Path(checkpoint).is_file():
        first_step = _resume(checkpoint, settings, adapters, opt, sched, gen)
        logger.info("resuming M2R2 training from step %d (%s)", first_step, checkpoint)
    done = first_step  # steps whose update is complete
    try:
        for step in range(first_step, settings.steps):
            last = _train_step(todo, adapters, frozen, data, train_rows, gen, settings, opt, sched)
            done = step + 1
            if progress is not None:
                progress(step, last)
            if checkpoint is not None and done % checkpoint_every == 0:
                _save_checkpoint(checkpoint, settings, adapters, opt, sched, gen, done)
    except KeyboardInterrupt:
        if checkpoint is not None:  # resume later from exactly here
            _save_checkpoint(checkpoint, settings, adapters, opt, sched, gen, done)
        raise
    if checkpoint is not None:
        Path(checkpoint).unlink(missing_ok=True)
    metrics = {
        "final_loss": last,
        "train_seconds": time.perf_counter() - start,
        "train_tokens": int(train_rows.numel()),
        "val_tokens": int(val_rows.numel()),
    }
    if val_rows.numel():
        metrics["val_recall"] = _val_recall(adapters, todo, data, val_rows, frozen, by_idx)
    return adapters, metrics


def _train_step(todo, adapters, frozen, data, train_rows, gen, settings, opt, sched) -> float:
    rows = train_rows[torch.randint(0, train_rows.numel(), (settings.batch_tokens,), generator=gen)]
    loss = torch.zeros(())
    for source, target, _ in todo:
        h = data.get(DATA_KEY[settings.source], source)[rows]
        x = data.get("router_in", target)[rows]
        norm, router = frozen[target]
        pred_in = norm(adapters.get(source, target)(h))
        with torch.no_grad():
            target_logp = F.log_softmax(router(x), dim=-1)
        kl = F.kl_div(F.log_softmax(router(pred_in), dim=-1), target_logp, log_target=True, reduction="batchmean")
        align = (pred_in - x).pow(2).sum(-1).div(x.pow(2).sum(-1).clamp_min(1e-6)).mean()
        loss = loss + kl + settings.align * align
    loss = loss / len(todo)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def _save_checkpoint(path, settings, adapters, opt, sched, gen, step) -> None:
    """Atomic: a temp file, then rename, so an interrupt never leaves half a checkpoint."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    state = {
        "settings": asdict(settings),
        "step": step,
        "adapters": adapters.state_dict(),
        "opt": opt.state_dict(),
        "sched": sched.state_dict(),
        "rng": gen.get_state(),
    }
    torch.save(state, tmp)
    tmp.replace(path)


def _resume(path, settings, adapters, opt, sched, gen) -> int:
    state = torch.load(path, weights_only=False)
    if state["settings"] != asdict(settings):
        raise PredictorError(f"checkpoint {path} was made with other settings; delete it or rerun with the same ones")
    adapters.load_state_dict(state["adapters"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    gen.set_state(state["rng"])
    return int(state["step"])


def _cpu_copy(module: nn.Module) -> nn.Module:
    import copy

    clone = copy.deepcopy(module).float().cpu()
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


def _cpu_router(layer: MoELayer):
    weight = layer.router.weight.detach().float().cpu()
    bias = getattr(layer.router, "bias", None)
    bias = bias.detach().float().cpu() if isinstance(bias, torch.Tensor) else None
    return lambda x: F.linear(x.float(), weight, bias)


def _val_recall(adapters, todo, data, rows, frozen, by_idx) -> dict:
    """Top-k-by-logits recall on held-out rows, per distance: adapters vs untrained (next-gate)."""
    # a block, not a decorator: mutmut (make mutate) leaves decorated functions alone
    with torch.no_grad():
        out: dict[str, dict[int, list[float]]] = {"m2r2": {}, "next-gate": {}}
        for source, target, d in todo:
            norm, router = frozen[target]
            k = by_idx[target].top_k
            actual = torch.topk(router(data.get("router_in", target)[rows]), k, dim=-1).indices
            h = data.get(DATA_KEY[adapters.source], source)[rows]  # next-gate from the same point
            for name, x in (("m2r2", adapters.get(source, target)(h)), ("next-gate", h)):
                pred = torch.topk(router(norm(x)), k, dim=-1).indices
                hit = (pred.unsqueeze(-1) == actual.unsqueeze(-2)).any(-1).float().mean().item()
                out[name].setdefault(d, []).append(hit)
        return {name: {d: sum(v) / len(v) for d, v in per_d.items()} for name, per_d in out.items()}


def save_adapters(
    path: str | Path,
    adapters: Adapters,
    model,
    layers: list[MoELayer],
    settings: TrainSettings,
    metrics: dict,
    data_files: list[str],
) -> Path:
    """Write adapters as safetensors with the model fingerprint and training settings."""
    path = Path(path)
    tensors = {
        f"{key}.{name}": p.detach().contiguous().cpu()
        for key, block in adapters.blocks.items()
        for name, p in block.state_dict().items()
    }
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": fingerprint(model, layers),
        "model_type": str(model.config.model_type),
        "hidden_size": str(model.config.hidden_size),
        "settings": json.dumps(asdict(settings)),
        "metrics": json.dumps(metrics),
        "data": json.dumps([str(f) for f in data_files]),
        "pairs": json.dumps(adapters.keys),
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)  # atomic: never a half-written adapters file
    return path


def load_adapters(path: str | Path, model, layers: list[MoELayer]) -> tuple[Adapters, dict]:
    """Read adapters and check they were made for this model."""
    path = Path(path)
    hint = train_adapters_hint(path)
    if not path.is_file():
        raise PredictorError(f"no M2R2 adapters at {path}; {hint}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise PredictorError(f"{path} is not a readable adapters file ({err}); {hint}") from None
    if meta.get("format") != FORMAT:
        raise PredictorError(f"{path} is not an M2R2 adapters file; {hint}")
    mine = fingerprint(model, layers)
    if meta.get("fingerprint") != mine:
        raise PredictorError(
            f"{path} was trained for another model (fingerprint {meta.get('fingerprint')}, this model {mine}); {hint}"
        )
    settings = TrainSettings(**{"source": "residual", **json.loads(meta["settings"])})  # v1 files predate source
    keys = [tuple(k) for k in json.loads(meta["pairs"])]
    adapters = Adapters(int(meta["hidden_size"]), settings.rank, keys, settings.source)
    state = {}
    for name, tensor in tensors.items():
        key, rest = name.split(".", 1)
        state[f"blocks.{key}.{rest}"] = tensor
    adapters.load_state_dict(state)
    adapters.eval()
    return adapters, {**meta, "settings": settings}


class M2R2Predictor(NextGatePredictor):
    """Next-gate on the accelerated residual a(l, t) instead of h_l."""

    name = "m2r2"

    def __init__(self, runtime, adapters: Adapters, trained_lookahead: int, **kwargs):
        super().__init__(runtime, **kwargs)
        if self.lookahead > trained_lookahead:
            raise PredictorError(
                f"adapters were trained for lookahead {trained_lookahead}; use lookahead <= {trained_lookahead} "
                "or retrain with a larger --lookahead"
            )
        device = runtime.device if runtime is not None else torch.device("cpu")
        dtype = runtime.layers[0].router.weight.dtype if runtime is not None else torch.float32
        self.adapters = adapters.to(device=device, dtype=dtype)
        self.source = adapters.source

    @classmethod
    def from_config(cls, config, runtime, **kwargs):
        if config.predictor_path is None:
            raise PredictorError(
                f"predictor 'm2r2' needs adapters: pass predictor_path= ({FILENAME}) or {train_adapters_hint(FILENAME)}"
            )
        adapters, meta = load_adapters(config.predictor_path, runtime.model, runtime.layers)
        return cls(runtime, adapters, meta["settings"].lookahead, **kwargs)

    def residual_for(self, layer_idx, target, d, hidden):
        adapter = self.adapters.get(layer_idx, target.layer_idx)
        return hidden if adapter is None else adapter(hidden)
