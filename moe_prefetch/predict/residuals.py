"""Collect what predictors learn from and are scored against, by running a model over text.

For every decoder layer l: the residual entering it (h_l). For every MoE layer: the input
its router saw (already normed) and the experts the router chose. The model runs with its
own routers and experts (stock, or attached to a runtime: both route identically).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..experts.layout import decoder_layers, find_moe_layers


@dataclass
class Residuals:
    hidden: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer_idx -> [T, H] chunks
    router_in: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # MoE layer_idx -> [T, H]
    chosen: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # MoE layer_idx -> [T, k]
    seq_ids: list[torch.Tensor] = field(default_factory=list)  # which sequence each token came from

    def cat(self) -> Residuals:
        join = lambda d: {k: [torch.cat(v)] for k, v in d.items()}  # noqa: E731
        return Residuals(join(self.hidden), join(self.router_in), join(self.chosen), [torch.cat(self.seq_ids)])

    def get(self, kind: str, layer_idx: int) -> torch.Tensor:
        return getattr(self, kind)[layer_idx][0]

    @property
    def num_tokens(self) -> int:
        return int(sum(s.numel() for s in self.seq_ids))


def chunk_ids(tokenizer, text: str, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Tokenize `text` into rows of `seq_len` tokens, [rows, seq_len]."""
    # verbose=False: the whole text is longer than the model context on purpose; it is chunked next
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False)["input_ids"][0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    rows = ids.numel() // seq_len
    if rows == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one sequence of {seq_len}; give more text")
    return ids[: rows * seq_len].view(rows, seq_len)


@torch.no_grad()
def collect(model, input_ids: torch.Tensor, batch_size: int = 4, progress=None) -> Residuals:
    """Run `model` over `input_ids` [rows, seq_len]; return residuals and routing per layer."""
    layers = find_moe_layers(model)
    out = Residuals()
    handles = []

    def keep_hidden(idx):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            out.hidden.setdefault(idx, []).append(hidden.reshape(-1, hidden.shape[-1]).float().cpu())

        return hook

    def keep_routing(idx):
        def hook(module, args, output):
            out.router_in.setdefault(idx, []).append(args[0].reshape(-1, args[0].shape[-1]).float().cpu())
            outputs = output if isinstance(output, tuple) else (output,)
            chosen = next(t for t in outputs if isinstance(t, torch.Tensor) and not t.is_floating_point())
            out.chosen.setdefault(idx, []).append(
                chosen.reshape(args[0].reshape(-1, args[0].shape[-1]).shape[0], -1).cpu()
            )

        return hook

    for idx, layer in enumerate(decoder_layers(model)):
        handles.append(layer.register_forward_pre_hook(keep_hidden(idx), with_kwargs=True))
    for layer in layers:
        handles.append(layer.router.register_forward_hook(keep_routing(layer.layer_idx)))
    device = next(p.device for p in model.parameters() if p.numel())
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start : start + batch_size]
            model(batch.to(device), use_cache=False)
            rows = torch.arange(start, start + batch.shape[0]).repeat_interleave(batch.shape[1])
            out.seq_ids.append(rows)
            if progress is not None:
                progress(batch.numel())
    finally:
        for handle in handles:
            handle.remove()
    return out.cat()


def read_texts(files) -> str:
    """Concatenate text files; a missing or unreadable one is a clear error."""
    from ..errors import ConfigError

    parts = []
    for file in files:
        try:
            parts.append(open(file, encoding="utf-8", errors="replace").read())
        except OSError as err:
            raise ConfigError(f"cannot read data file {file} ({err.strerror}); pass existing text files") from None
    return "\n".join(parts)


def collect_text(
    model, tokenizer, text: str, seq_len: int = 256, max_tokens: int | None = None, progress=None
) -> Residuals:
    """Tokenize `text` into sequences of `seq_len` and collect residuals and routing."""
    return collect(model, chunk_ids(tokenizer, text, seq_len, max_tokens), progress=progress)
