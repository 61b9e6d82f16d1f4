"""Guards: what users (and transformers' own tests) do to a model, made safe while it is attached.

An attached model's expert Parameters are empty and its experts live in the runtime (host
store, device slots). Every way of reaching the experts other than a forward either works
through the runtime or stops with one clear error naming the fix:

  state_dict / save_pretrained   the full experts, read from the host store (never empty tensors)
  set_experts_implementation     refused: the runtime is the implementation; detach first
  backward through the experts   refused when it happens; forwards with grad enabled still work
  .to / .half / .float / .cuda   refused when they would change the experts' dtype or device
  torch.compile                  the runtime's entry points are opaque to dynamo (a graph break),
                                 so compiled code never guards on the cache's Python state

`install` sets all of them up and returns the function that removes them; run it before
anything else when detaching, so the runtime's own `model.to` and experts switch go through.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ..errors import AttachedModelError

logger = logging.getLogger(__name__)

DETACH = "detach first: runtime.detach()"
# Runtime methods the model's hooks and experts call. Inside them the runtime reads and writes
# Python state (slot table, step counter, predictor history) that dynamo would otherwise guard
# on, recompiling on every token.
ENTRY_POINTS = ("experts_forward", "on_layer_start", "on_router_input")


def install(model, runtime) -> Callable[[], None]:
    """Guard the attached `model` (see the module docstring); returns the undo function."""
    undos = [
        _opaque_entry_points(runtime),
        _refuse_experts_switch(model),
        _full_state_dict(runtime),
        _refuse_conversions(model, runtime),
    ]

    def undo() -> None:
        for step in reversed(undos):
            step()

    return undo


class _InferenceOnly(torch.autograd.Function):
    """Carries the experts' output into the autograd graph with a backward that refuses: the
    experts run from slots the loader overwrites, so a gradient through them cannot be had."""

    @staticmethod
    def forward(ctx, hidden_states, top_k_weights, run):
        return run()  # autograd.Function.forward runs without grad: no activations are kept

    @staticmethod
    def backward(ctx, grad):
        raise AttachedModelError(
            "moe-prefetch runs the experts for inference only and cannot backpropagate through them; "
            f"{DETACH} to train, or run under torch.no_grad()"
        )


def _opaque_entry_points(runtime) -> Callable[[], None]:
    names = [name for name in ENTRY_POINTS if hasattr(runtime, name)]
    experts_forward = runtime.experts_forward

    def guarded_experts_forward(layer, hidden_states, top_k_index, top_k_weights):
        if torch.is_grad_enabled() and (hidden_states.requires_grad or top_k_weights.requires_grad):
            # A forward with grad enabled (plain `model(ids)`) must work and equal stock; only a
            # backward through the experts is refused, when it happens.
            return _InferenceOnly.apply(
                hidden_states,
                top_k_weights,
                lambda: experts_forward(layer, hidden_states, top_k_index, top_k_weights),
            )
        return experts_forward(layer, hidden_states, top_k_index, top_k_weights)

    for name in names:
        method = guarded_experts_forward if name == "experts_forward" else getattr(runtime, name)
        runtime.__dict__[name] = torch.compiler.disable(method)

    def undo() -> None:
        for name in names:
            runtime.__dict__.pop(name, None)

    return undo


def _refuse_experts_switch(model) -> Callable[[], None]:
    # transformers applies the switch through every PreTrainedModel inside the model too.
    owners = [m for m in model.modules() if hasattr(m, "set_experts_implementation")]

    def refuse(owner):
        def set_experts_implementation(experts_implementation):
            # The experts modules dispatch on private config copies set to the runtime (the
            # model's own config is left untouched); asking for the runtime changes nothing.
            if experts_implementation in ("moe_prefetch", {"": "moe_prefetch"}):
                return
            raise AttachedModelError(
                f"this model's experts are run by the moe-prefetch runtime; {DETACH}, "
                f"then set_experts_implementation({experts_implementation!r})"
            )

        return set_experts_implementation

    for owner in owners:
        owner.__dict__["set_experts_implementation"] = refuse(owner)

    def undo() -> None:
        for owner in owners:
            owner.__dict__.pop("set_experts_implementation", None)

    return undo


def _full_state_dict(runtime) -> Callable[[], None]:
    """The experts' entries of `state_dict()` (hence of `save_pretrained`) come from the host
    store, stacked as the model's own fused parameters. That is a second host copy of the
    experts while the state dict is alive."""
    store = runtime.store

    def hook_for(layer):
        def hook(module, state_dict, prefix, local_metadata) -> None:
            rows = [store.expert((layer.layer_idx, e)) for e in range(layer.num_experts)]
            for name in rows[0]:
                if prefix + name in state_dict:
                    state_dict[prefix + name] = torch.stack([row[name] for row in rows])

        return hook

    handles = [layer.experts.register_state_dict_post_hook(hook_for(layer)) for layer in runtime.layers]

    def undo() -> None:
        for handle in handles:
            handle.remove()

    return undo


def _refuse_conversions(model, runtime) -> Callable[[], None]:
    """Every dtype or device conversion of a module (`to`, `half`, `bfloat16`, `float`, `cuda`,
    `cpu`, `type`) goes through `Module._apply(fn)`. Apply `fn` to an empty tensor shaped like
    the experts' storage first: if it would change their dtype or device, refuse, because the
    host store and the slots would stay as they are while the rest of the model moved."""
    experts = {id(layer.experts) for layer in runtime.layers}
    names = {name for name, module in model.named_modules() if id(module) in experts}
    # the experts modules and every module above them (a conversion of any of those reaches them)
    guarded = [
        module
        for name, module in model.named_modules()
        if not name or any(n == name or n.startswith(name + ".") for n in names)
    ]
    dtype, device = runtime.spec.dtype, runtime.device

    def guard(module):
        def _apply(fn, recurse=True):
            probe = torch.empty(0, dtype=dtype, device=device)
            try:
                after = fn(probe)
            except Exception:
                after = probe  # not a conversion this guard understands: let torch decide
            if isinstance(after, torch.Tensor) and (after.dtype != dtype or after.device != probe.device):
                raise AttachedModelError(
                    f"the moe-prefetch runtime holds this model's experts as {str(dtype).removeprefix('torch.')} "
                    f"on {device}; changing them to {str(after.dtype).removeprefix('torch.')} on {after.device} "
                    f"is not supported while attached; {DETACH}, convert, then attach again"
                )
            return type(module)._apply(module, fn, recurse)

        return _apply

    for module in guarded:
        module.__dict__["_apply"] = guard(module)

    def undo() -> None:
        for module in guarded:
            module.__dict__.pop("_apply", None)

    return undo
