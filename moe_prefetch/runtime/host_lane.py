"""The host lane: one pass per MoE layer over every host-served (expert, token) pair, on the
host store's stored bytes.

    pairs    routing [T, k] -> the pairs whose expert runs here, grouped by expert (numpy, once)
    up       per expert: one kernel on its rows          x [P, D] -> [P, 2I]   (host_kernels.py)
    gate     once for all pairs: `_apply_gate` / `act_fn`          -> [P, I]
    down     per expert: one kernel on its rows                     -> [P, D]
    combine  once: post-expert norm, x routing weight in fp32, index_add into acc [T, D] fp32
    (P: pairs on the host lane, T tokens, k top_k, D hidden, I intermediate)

Only the matmuls are per expert: two kernel calls each, nothing for an expert no pair routed
to (the stock `grouped_mm` issues a matmul per group of the whole layer, empty ones included,
and the runtime's earlier per-expert path paid ~0.5 ms of small ops per expert). Threads:
each matmul splits its output rows over torch's intra-op pool, the one pool the process has,
so the lane never runs more threads than torch is set to (no second pool to oversubscribe).
Results are summed in fp32 in expert order, so they do not depend on timing.
"""

from __future__ import annotations

import numpy as np
import torch

from ..experts import cpu_kernels
from ..experts.compression import Codec
from ..experts.host_kernels import KERNEL_NAMES, Projection, decode_reason, plan, projections
from ..experts.layout import MoELayer
from .store import HostStore


class HostLane:
    """Runs host-served experts of any layer; per-expert views of the store are made on first
    use and kept (work grows with the experts routed, never with the pool)."""

    def __init__(self, store: HostStore, codec: Codec, layers: list[MoELayer]):
        self.store, self.codec = store, codec
        self.kinds = {layer.layer_idx: plan(codec, layer.experts) for layer in layers}
        self._modules = {layer.layer_idx: layer.experts for layer in layers}
        self._projections = {}
        for layer in layers:
            transposed = getattr(layer.experts, "is_transposed", False)
            self._projections[layer.layer_idx] = {
                name: Projection(codec, name, kind, transposed) for name, kind in self.kinds[layer.layer_idx].items()
            }
        # Half-precision matrix-vector products on the stored weights go to torch's own gemv, not
        # oneDNN: at one row oneDNN's bf16 path costs ~18 us per call and reads a 3 MB expert at
        # about half the speed (docs/benchmarks.md, section 9); from a few rows on oneDNN is
        # several times faster (64 rows: 1.0 against 6.8 ms), so only one-row passes switch. The
        # switch is torch's one global flag, set only around the lane's matmuls and restored
        # after; another thread's matmul in that window would take the same path (a speed, not a
        # result, change).
        half = codec.spec.dtype in (torch.bfloat16, torch.float16)
        self._native_gemv = {
            idx: half and any(k in ("dense", "decode") for k in kinds.values()) for idx, kinds in self.kinds.items()
        }
        self._parts: dict[tuple[int, int], dict] = {}
        # Why the compiled int8 / int4 kernels run or not, as it stood when the projections chose
        # (asked only where there are such projections: a bf16 lane never builds them).
        compressed = any(k in ("int8", "int4") for kinds in self.kinds.values() for k in kinds.values())
        self.kernels_reason = cpu_kernels.status().reason if compressed else "no int8 or int4 parameters"
        self.calls = dict.fromkeys(KERNEL_NAMES, 0)  # kernel calls per kind
        self.passes = 0

    def describe(self) -> dict[str, str]:
        """Which kernel ran each parameter (the first layer's; all layers share one spec): torch's
        in words or a compiled one by name ("int8-c-avx512", experts/cpu_kernels.py), and for a
        decoded one, why no kernel reads its stored bytes."""
        layer_idx = next(iter(self._projections))
        module = self._modules[layer_idx]
        return {
            name: proj.kernel_name + (f" ({decode_reason(self.codec, name, module)})" if proj.kind == "decode" else "")
            for name, proj in self._projections[layer_idx].items()
        }

    def _expert_parts(self, layer_idx: int, expert_id: int) -> dict:
        key = (layer_idx, expert_id)
        parts = self._parts.get(key)
        if parts is None:
            row = self.store[key]
            parts = self.codec.spec.views(row) if self.codec.identity else self.codec.typed(row)
            if not self.codec.identity:
                projs = self._projections[layer_idx]
                parts = {name: projs[name].prepare(p) for name, p in parts.items()}
            self._parts[key] = parts
        return parts

    def run(
        self, layer: MoELayer, host: list[int], routing: np.ndarray, hidden: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """The experts `host` of `layer` on the pairs `routing` [T, k] sends them: returns their
        weighted sum per token, [T, D] in fp32. `hidden` [T, D] and `weights` [T, k] on the host."""
        self.passes += 1
        module, layer_idx = layer.experts, layer.layer_idx
        top_k = routing.shape[-1]
        # Pairs (token * k + slot) per host expert, in token order. Plain Python: at decode sizes
        # (k pairs) it costs a few microseconds where numpy's calls cost ~10 each.
        wanted, by_expert = set(host), {}
        for pair, expert_id in enumerate(routing.reshape(-1).tolist()):
            if expert_id in wanted:
                by_expert.setdefault(expert_id, []).append(pair)
        experts = sorted(by_expert)
        pairs = [p for e in experts for p in by_expert[e]]
        counts = [len(by_expert[e]) for e in experts]
        dtype = self.codec.spec.dtype
        decode = hidden.shape[0] == 1  # every pair is token 0: no gather, no scatter
        if decode:
            xs = [hidden.to(dtype)] * len(experts)
        else:
            rows = torch.tensor([p // top_k for p in pairs])
            xs = hidden.index_select(0, rows).to(dtype).split(counts)
        parts = [self._expert_parts(layer_idx, e) for e in experts]
        native = self._native_gemv[layer_idx] and max(counts) == 1  # one row per matmul: a gemv
        if native:
            was = torch._C._get_mkldnn_enabled()
            torch._C._set_mkldnn_enabled(False)
        try:
            out = self._experts(layer_idx, module, parts, xs, counts)
        finally:
            if native:
                torch._C._set_mkldnn_enabled(was)
        scale = weights.reshape(-1)[torch.tensor(pairs)].float().unsqueeze(-1)
        if decode:
            return (out.float() * scale).sum(0, keepdim=True)
        acc = torch.zeros((hidden.shape[0], out.shape[-1]), dtype=torch.float32)
        return acc.index_add_(0, rows, out.float() * scale)

    def _experts(self, layer_idx: int, module, parts: list, xs, counts: list[int]) -> torch.Tensor:
        """Up projection per expert, the gate once, down projection per expert: [P, D]."""
        projs = self._projections[layer_idx]
        up_name, down_name = projections(module)
        up, down = projs[up_name], projs[down_name]
        bias = getattr(module, "has_bias", False)
        ups = [up(x, p[up_name]) for x, p in zip(xs, parts)]
        if bias:
            ups = [u + projs[f"{up_name}_bias"].bias(p[f"{up_name}_bias"]) for u, p in zip(ups, parts)]
        h = torch.cat(ups) if len(ups) > 1 else ups[0]  # [P, 2I]
        h = module._apply_gate(h) if getattr(module, "has_gate", True) else module.act_fn(h)
        downs = [down(x, p[down_name]) for x, p in zip(h.split(counts), parts)]
        if bias:
            downs = [d + projs["down_proj_bias"].bias(p["down_proj_bias"]) for d, p in zip(downs, parts)]
        self.calls[up.kind] += len(parts)
        self.calls[down.kind] += len(parts)
        out = torch.cat(downs) if len(downs) > 1 else downs[0]  # [P, D]
        if getattr(module, "has_post_expert_norm", False):
            out = module.post_expert_norm(out)
        return out

    def forget(self, keys) -> None:
        """Drop what was prepared from the stored bytes of experts `keys` (their weights were
        replaced: `Runtime.replace_experts`); their next use views the store again."""
        for key in keys:
            self._parts.pop(key, None)

    def close(self) -> None:
        """Drop every view of the store (its memory goes back once none is left)."""
        self._parts.clear()
        for projs in self._projections.values():
            for proj in projs.values():
                proj._buffer = None
