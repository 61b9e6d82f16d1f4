"""Routing predictors: which experts layers l+1..l+D will use, given layer l's residual.

Every predictor calls the model's own router modules (with the norm that precedes them),
so each architecture's routing rule is honoured without special cases. Prediction changes
only what is resident, never what is computed.

A predictor runs on the device and returns `Guess`es (`runtime.prediction`) whose expert ids
may still be device tensors; the runtime reads them together with the next layer's routing (one
transfer per MoE layer) and `settle` turns each into a ranked list of expert ids.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..errors import PredictorError
from ..experts.layout import MoELayer
from ..runtime.prediction import Guess, rank

logger = logging.getLogger(__name__)


def silent(module: torch.nn.Module, x: torch.Tensor):
    """`module`'s arithmetic on `x` without its module hooks. transformers records router
    outputs (router_logits, hence aux_loss) with forward hooks, and the runtime's router-input
    prediction point is a pre-hook: a prediction must trigger neither."""
    return module.forward(x)


def route(layer: MoELayer, hidden: torch.Tensor) -> torch.Tensor:
    """Run `layer`'s own norm and router on `hidden` [..., H]; returns top-k indices [T, k]."""
    x = hidden.reshape(-1, hidden.shape[-1])
    if layer.norm is not None:
        x = silent(layer.norm, x)
    out = silent(layer.router, x)
    outputs = out if isinstance(out, tuple) else (out,)
    for tensor in outputs:
        if isinstance(tensor, torch.Tensor) and not tensor.is_floating_point():
            return tensor.reshape(x.shape[0], -1)
    raise PredictorError(f"the router of layer {layer.layer_idx} returned no expert indices; cannot predict")


class Predictor:
    """Base: predicts nothing. `predict` is called at the start of each decoder layer;
    `observe` after each MoE layer routes."""

    name = "none"
    # Where `predict` is called: "residual" = the input of each decoder layer; "router-input" =
    # the normed post-attention residual each MoE layer's router is about to see.
    source = "residual"

    def __init__(self, runtime, lookahead: int = 1, margin: int = 0):
        self.runtime = runtime
        self.layers: list[MoELayer] = runtime.layers if runtime is not None else []
        self.lookahead = lookahead
        self.margin = margin

    def targets(self, layer_idx: int) -> list[tuple[MoELayer, int]]:
        """The MoE layers at distance d = 1..lookahead after decoder layer `layer_idx`."""
        # Asked at every decoder layer: kept per (layer, lookahead, layers) rather than walking
        # every layer each time. Callers only read the list.
        key = (layer_idx, self.lookahead, id(self.layers), len(self.layers))
        found = self.__dict__.setdefault("_targets", {}).get(key)
        if found is None:
            after = [layer for layer in self.layers if layer.layer_idx > layer_idx]
            found = self._targets[key] = [(layer, d) for d, layer in enumerate(after[: self.lookahead], start=1)]
        return found

    def limit(self, layer: MoELayer, tokens: int) -> int:
        return min(layer.num_experts, layer.top_k * tokens + self.margin)

    def predict(self, layer_idx: int, hidden: torch.Tensor, step: int) -> list[Guess]:
        return []

    def observe(self, layer_idx: int, routing: np.ndarray, step: int) -> None:
        """`routing`: the layer's top_k_index as read to the host, [T, k]."""


class PreviousTokenPredictor(Predictor):
    """Layer l+d will use the experts it used for the previous token."""

    name = "previous-token"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.last: dict[int, list[int]] = {}

    def predict(self, layer_idx, hidden, step):
        return [
            Guess(layer.layer_idx, d, self.last[layer.layer_idx], limit=layer.num_experts)
            for layer, d in self.targets(layer_idx)
            if layer.layer_idx in self.last
        ]

    def observe(self, layer_idx, routing, step):
        self.last[layer_idx] = rank(routing, self.limit(self.runtime.by_layer[layer_idx], routing.shape[0]))


class NextGatePredictor(Predictor):
    """Eliseev & Mazur 2023: layer l+d's router applied to the residual entering layer l."""

    name = "next-gate"

    def residual_for(self, layer_idx: int, target: MoELayer, d: int, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    @torch.no_grad()
    def predict(self, layer_idx, hidden, step):
        out = []
        tokens = hidden.reshape(-1, hidden.shape[-1])
        for layer, d in self.targets(layer_idx):
            residual = self.residual_for(layer_idx, layer, d, tokens)
            guess = Guess(layer.layer_idx, d, route(layer, residual), self.limit(layer, tokens.shape[0]))
            if self.margin and tokens.shape[0] == 1:
                guess.extra, guess.margin = self._by_score(layer, residual), self.margin
            out.append(guess)
        return out

    def _by_score(self, layer: MoELayer, residual: torch.Tensor) -> torch.Tensor:
        """Experts by router score, best first, enough to find `margin` runners-up after the
        router's own choice: prefetching k + margin trades link bytes for recall, worth it when
        compute hides the copies."""
        x = silent(layer.norm, residual) if layer.norm is not None else residual
        bias = getattr(layer.router, "bias", None)
        scores = torch.nn.functional.linear(
            x.float(), layer.router.weight.float(), bias.float() if isinstance(bias, torch.Tensor) else None
        )[0]
        return torch.topk(scores, min(layer.top_k + self.margin, layer.num_experts)).indices


class OraclePredictor(Predictor):
    """Replays a recorded routing trace (`runtime.trace` records); the upper bound."""

    name = "oracle"

    def __init__(self, *args, trace: list[dict] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.by_step: dict[tuple[int, int], list[int]] = {}
        self.load_trace(trace or [])

    def load_trace(self, trace: list[dict]) -> None:
        """Replay `trace` (runtime.trace of an earlier run of the same prompt) from step 0."""
        self.by_step = {(record["step"], record["layer_idx"]): list(record["experts"]) for record in trace}

    def predict(self, layer_idx, hidden, step):
        return [
            Guess(layer.layer_idx, d, self.by_step[(step, layer.layer_idx)], limit=layer.num_experts)
            for layer, d in self.targets(layer_idx)
            if (step, layer.layer_idx) in self.by_step
        ]
