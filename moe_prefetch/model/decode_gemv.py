"""One-row decode steps of a half-precision model on a CPU device run torch's own gemv, not oneDNN.

Why: at one row (batch 1 decode) oneDNN's bf16 matmul took 419 us of CPU time per 2048 x 1024
weight where torch's own gemv took 211 (one thread, measured on CPU: the workplace's EPYC); at
two rows they tie and from four on oneDNN wins (4 rows: 454 against 782 us). The host lane
already switches oneDNN off around its own matmuls (runtime/host_lane.py), but the rest of a
decode token (attention projections, routers, the head: 81 one-row matmuls a token of the
medium model) still went through oneDNN: ~40% of an int4 host-lane token (docs/benchmarks.md,
section 9). So while attached, a forward whose input is one row (batch x new tokens == 1) runs
with oneDNN off and turns it back on after, exceptions included; a prefill, a batch, a CUDA
device or an fp32 model are left alone. Nothing is switched at import time.

The switch is torch's one global flag. Concurrent forwards share one window (a count under a
lock): the first in saves the flag and the last out restores it, so overlapping forwards never
leave it off. Another thread's matmul inside the window takes the same path: a speed change,
not a result change beyond bf16 rounding (both kernels accumulate in fp32).
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import torch

from . import guards

DECODE_ROWS = 1  # rows up to which torch's gemv wins (measured above: 1 row 2x, 2 rows a tie)

_lock = threading.Lock()
_window = {"depth": 0, "saved": True}


@dataclass
class DecodeGemv:
    """Whether one-row decode steps run with oneDNN off, why, and how many did (`stats()`)."""

    enabled: bool
    reason: str
    steps: int = 0  # forwards run with oneDNN off

    def stats(self) -> dict:
        return {"decode_gemv": self.enabled, "decode_gemv_reason": self.reason, "decode_gemv_steps": self.steps}


def choose(wanted: bool, device: torch.device, dtype: torch.dtype) -> DecodeGemv:
    """Whether to switch, and the reason in words, from `RuntimeConfig.cpu_decode_gemv`, the
    device the model runs on and its (non-expert) weights' dtype."""
    if not wanted:
        return DecodeGemv(False, "off: cpu_decode_gemv=False (oneDNN as torch sets it)")
    if device.type != "cpu":
        return DecodeGemv(False, f"off: the model runs on {device}, not the CPU")
    if dtype not in (torch.bfloat16, torch.float16):
        name = str(dtype).removeprefix("torch.")
        return DecodeGemv(False, f"off: {name} weights (the one-row cost is oneDNN's bf16/fp16 matmul's)")
    if not torch.backends.mkldnn.is_available():
        return DecodeGemv(False, "off: this torch has no oneDNN")
    return DecodeGemv(
        True,
        f"on: CPU device, {str(dtype).removeprefix('torch.')} weights: one-row decode steps use torch's gemv "
        "(oneDNN's one-row matmul took ~2x the CPU time)",
    )


def rows_of(args: tuple, kwargs: dict) -> int | None:
    """Rows each matmul of this forward sees (batch x new tokens), or None when unknown."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(ids, torch.Tensor) and ids.dim() == 2:
        return ids.shape[0] * ids.shape[1]
    embeds = kwargs.get("inputs_embeds")
    if isinstance(embeds, torch.Tensor) and embeds.dim() == 3:
        return embeds.shape[0] * embeds.shape[1]
    return None


def _enter() -> None:
    with _lock:
        if _window["depth"] == 0:
            _window["saved"] = torch._C._get_mkldnn_enabled()
            torch._C._set_mkldnn_enabled(False)
        _window["depth"] += 1


def _leave() -> None:
    with _lock:
        _window["depth"] -= 1
        if _window["depth"] == 0:
            torch._C._set_mkldnn_enabled(_window["saved"])


def install(model, choice: DecodeGemv):
    """Wrap `model`'s forward (through the instance, as the other guards do) so one-row forwards
    run with oneDNN off; returns the undo function. Nothing is wrapped when `choice` is off."""
    if not choice.enabled:
        return lambda: None
    forward = model.forward

    @functools.wraps(forward)  # generate reads the forward's signature through __wrapped__
    def decode_gemv_forward(*args, **kwargs):
        rows = rows_of(args, kwargs)
        if rows is None or rows > DECODE_ROWS:
            return forward(*args, **kwargs)
        _enter()
        try:
            choice.steps += 1
            return forward(*args, **kwargs)
        finally:
            _leave()

    # dynamo skips this frame (the lock and the flag are not traceable) and compiles what it calls
    return guards.replace_forward(model, guards.mark(guards._untraced(decode_gemv_forward)))
