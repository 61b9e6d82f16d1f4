"""What an expert on the device is worth: the expected-value side of uploads as investments.

With misses served on the host (`placement`), the link carries only uploads, and an upload
pays when the host time it saves exceeds what it costs (`Scheduler._invest`):

  worth(key) = expected uses before eviction x (host time per use - device time per use)
  upload key when worth(key) - worth(victim) > price of the link time of one copy

Expected uses come from two sources, both per (layer_idx, expert_id):
- use frequency: a use count decayed by `decay` per token, read as a rate per token
  (count x (1 - decay)) over a `horizon` of tokens (how long an upload stays resident);
- predictions (every lookahead distance): a prediction for a layer still to run this token
  adds the chance it is right (the measured share of predicted experts their layer then
  routed), counted only when the upload can land before that layer runs (`in_time`).

On a slow link a single predicted use does not pay for a full copy (a Mixtral expert takes
~29 ms over PCIe 3.0 and saves ~13 ms of DDR4 host time per use), so the scheduler prices link
time by how busy the link is: free while the upload queue is empty, a full copy's worth when
it is full. Tensor-free, driven by the scheduler for the runtime and the simulator alike.
"""

from __future__ import annotations

from .cache import Key

# A token's use counts decay by this factor per token (a memory of ~20 tokens): which experts
# are hot changes slowly even where a layer keeps only ~20% of its experts from one token to
# the next (the demo's routing), and the pool should hold the hot ones. Chosen by the hybrid
# bench (docs/benchmarks.md 5c): 0.7 and 0.85 measured lower on every profile.
USE_DECAY = 0.95
# Tokens an upload is expected to stay resident (the pool turns over in a few tokens at 25%).
HORIZON_TOKENS = 4.0
# Until predictions have been scored, assume half are right.
PRIOR_PRECISION = 0.5


class UploadValue:
    """Decayed use counts and prediction precision; `uses(key)` is the expected number of uses
    of an expert before it would be evicted."""

    def __init__(self, decay: float = USE_DECAY, horizon: float = HORIZON_TOKENS):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay={decay!r} must be in [0, 1)")
        if horizon <= 0:
            raise ValueError(f"horizon={horizon!r} must be positive (tokens)")
        self.decay = decay
        self.horizon = horizon
        self.step = 0
        self._count: dict[Key, tuple[float, int]] = {}  # key -> (decayed count, step it was decayed to)
        self._predicted: dict[int, dict[int, int]] = {}  # target layer -> {expert_id: distance}, this token
        self._said = self._right = 0  # predicted experts scored, and how many their layer routed

    def new_step(self) -> None:
        self.step += 1
        self._predicted.clear()

    def used(self, layer_idx: int, experts) -> None:
        """The layer ran with `experts` routed: count a use of each, score its predictions."""
        said = self._predicted.pop(layer_idx, None)
        if said:
            self._said += len(said)
            self._right += sum(1 for e in experts if e in said)
        for expert_id in experts:
            key = (layer_idx, expert_id)
            self._count[key] = (self.count(key) + 1.0, self.step)

    def predict(self, target: int, experts) -> None:
        """A prediction for layer `target` this token (the latest one for a target wins)."""
        self._predicted[target] = dict.fromkeys(experts, 0)

    def count(self, key: Key) -> float:
        entry = self._count.get(key)
        if entry is None:
            return 0.0
        count, step = entry
        return count * self.decay ** (self.step - step)

    @property
    def precision(self) -> float:
        """Share of predicted experts that their layer routed (a prior until scored)."""
        return (self._right + PRIOR_PRECISION * 4) / (self._said + 4)

    def predicted(self, key: Key) -> bool:
        return key[1] in self._predicted.get(key[0], ())

    def uses(self, key: Key, in_time: bool = True) -> float:
        """Expected uses of `key` over the horizon: its rate per token x horizon, plus the chance
        a prediction for a layer still to run is right (if the upload lands in time for it)."""
        future = self.count(key) * (1.0 - self.decay) * self.horizon
        if in_time and self.predicted(key):
            future += self.precision
        return future
