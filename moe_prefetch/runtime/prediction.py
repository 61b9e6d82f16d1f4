"""What a predictor hands the runtime: a `Guess` per target layer, still on the device, and the
`Prediction` the runtime and the scheduler act on once `settle` has read it.

A predictor runs on the device and returns `Guess`es whose expert ids may still be device
tensors; the runtime reads them together with the next layer's routing (one transfer per
MoE layer) and `settle` turns each into a ranked list of expert ids. The types live here, in
the runtime, so that predictors (predict/, above) import them and the runtime never imports a
predictor.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

Prediction = tuple[int, int, list[int]]  # (target layer_idx, distance d, expert ids best first)


def rank(indices, limit: int) -> list[int]:
    """Experts named in `indices` (a host array or tensor), most votes first, at most `limit`."""
    named = np.asarray(indices).reshape(-1).tolist()
    if len(set(named)) == len(named):  # one vote each (a single token's top-k): the order as named
        return named[:limit]
    return [int(e) for e, _ in Counter(named).most_common(limit)]


@dataclass
class Guess:
    """What a predictor says about one target layer before the runtime has read it.

    `indices` are the router's top-k choices [T, k] (a device tensor) or expert ids already
    ranked (a list); `limit` caps how many are kept; `extra` (a device tensor) lists experts by
    router score, best first, of which the first `margin` not already chosen are added."""

    target: int
    distance: int
    indices: torch.Tensor | list[int]
    limit: int
    extra: torch.Tensor | None = None
    margin: int = 0

    def tensors(self) -> list[torch.Tensor]:
        """The device tensors the runtime must read for this guess, in order."""
        out = [self.indices] if isinstance(self.indices, torch.Tensor) else []
        return out + ([self.extra] if self.extra is not None else [])


def settle(guess: Guess, values: list[np.ndarray]) -> Prediction:
    """A `Guess` and the host copies of its `tensors()`, as (target, distance, expert ids)."""
    values = list(values)
    if isinstance(guess.indices, torch.Tensor):
        experts = rank(values.pop(0), guess.limit)
    else:
        experts = list(guess.indices)
    if guess.extra is not None:
        chosen = set(experts)
        experts += [int(e) for e in values.pop(0).reshape(-1) if int(e) not in chosen][: guess.margin]
    return (guess.target, guess.distance, experts)
