"""The demo's held-out text as token windows, and a model's loss on it.

The windows are the ones the predictor tables are scored on (docs/benchmarks.md, section 2;
`scripts/train_demo_adapters.py`): the held-out split of the standard library
(`corpus.read_corpus("heldout")`), cut to `max_tokens * 8` characters, tokenized, and the first
`max_tokens` tokens split into rows of `seq_len`. Loss and recall for compressed experts
(`scripts/compression_quality.py`) are measured on the same text.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .corpus import read_corpus
from .residuals import chunk_ids

CHARS_PER_TOKEN = 8  # enough text for max_tokens: the demo tokenizer averages 3.6 chars a token here


def heldout_ids(tokenizer, max_tokens: int = 20_000, seq_len: int = 256) -> torch.Tensor:
    """The held-out split's first `max_tokens` tokens as rows `[rows, seq_len]`."""
    text = read_corpus("heldout", max_chars=max_tokens * CHARS_PER_TOKEN)
    return chunk_ids(tokenizer, text, seq_len, max_tokens)


@torch.no_grad()
def heldout_loss(model, ids: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats per token) of `model` over the rows of `ids`
    (as `scripts/train_demo_model.py` evaluates: each row predicts its own tokens 1..n)."""
    device = next(p.device for p in model.parameters() if p.numel())
    total, count = 0.0, 0
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start : start + batch_size].to(device)
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits.float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").item()
        count += batch[:, 1:].numel()
    return total / count
