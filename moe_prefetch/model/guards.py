"""Guards: what users (and transformers' own tests) do to a model, made safe while it is attached.

An attached model's expert Parameters are empty and its experts live in the runtime (host
store, device slots). Every way of reaching the experts other than a forward either works
through the runtime or stops with one clear error naming the fix:

  state_dict / save_pretrained   the full experts, read from the host store (never empty tensors)
  load_state_dict                checked whole before anything is written; non-expert tensors load
                                 as torch loads them, experts go into the host store (and the slots
                                 holding them), so the model computes with the new weights
  set_experts_implementation     refused (the runtime is the implementation; detach first), except
                                 a swap of grouped_mm and batched_mm, which generate makes to decode on
                                 CUDA: the runtime then runs that kernel on its slots, as stock would
  backward through the experts   refused when it happens; forwards with grad enabled still work
  .to / .half / .float / .cuda   refused when they would change the experts' dtype or device
  copy.deepcopy                  a detached copy with the stock weights (integration.py); `strip`
                                 takes this module's functions off it
  torch.compile                  the runtime's entry points are opaque to dynamo (a graph break),
                                 so compiled code never guards on the cache's Python state; with
                                 fullgraph=True that break is refused with an error saying what works
  generate(compile_config=...)   runs uncompiled (transformers' compile would capture CUDA graphs
                                 around the runtime's host work), with one warning saying so

`install` sets all of them up and returns the function that removes them; run it before
anything else when detaching, so the runtime's own `model.to` and experts switch go through.
Every function it puts on the model carries `MARK`, so `strip` can take them off a copy.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping

import torch
from torch.nn.modules.module import _IncompatibleKeys

from ..errors import AttachedModelError

logger = logging.getLogger(__name__)

DETACH = "detach first: runtime.detach()"
# Runtime methods the model's hooks and experts call. Inside them the runtime reads and writes
# Python state (slot table, step counter, predictor history) that dynamo would otherwise guard
# on, recompiling on every token.
ENTRY_POINTS = ("experts_forward", "on_layer_start", "on_router_input")
# Said by dynamo when it meets an entry point: how a graph break of ours is told from the model's own.
OPAQUE = "moe-prefetch runtime: routing-dependent host work, run eagerly between compiled graphs"
FULLGRAPH = (
    "torch.compile(fullgraph=True) cannot capture an attached model: the moe-prefetch runtime's host work "
    "(the routing read, the cache, the copies) runs eagerly between compiled graphs; compile with "
    "fullgraph=False (graph breaks at the runtime; the outputs equal the stock model's), or {detach} to compile "
    "the stock model whole"
)
MARK = "__moe_prefetch__"  # on every function attach puts on the model (guards and hooks)
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_state_dict_hooks", "_state_dict_pre_hooks")


def mark(fn: Callable) -> Callable:
    """Tag `fn` as put on the model by attach (see `strip`)."""
    setattr(fn, MARK, True)
    return fn


def strip(model) -> None:
    """Take off `model` (a deep copy of an attached model: functions are copied by reference) every
    marked function: instance attributes that shadow the class's methods, and hooks."""
    for module in model.modules():
        for name in [name for name, value in module.__dict__.items() if getattr(value, MARK, False)]:
            del module.__dict__[name]
        for hooks_name in _HOOK_DICTS:
            hooks = getattr(module, hooks_name, {})
            for key in [key for key, hook in hooks.items() if getattr(hook, MARK, False)]:
                del hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)


def install(model, runtime, on_switch: Callable[[], None]) -> Callable[[], None]:
    """Guard the attached `model` (see the module docstring); returns the undo function.
    `on_switch`: called after the model's experts implementation moved between grouped_mm and
    batched_mm (generate's decode switch), to point the runtime at that kernel."""
    undos = [
        _opaque_entry_points(runtime),
        _refuse_experts_switch(model, on_switch),
        _full_state_dict(runtime),
        _refuse_conversions(model, runtime),
        _load_through_store(model, runtime),
        _refuse_fullgraph(model, runtime),
        _warn_generate_compile(model),
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
        try:
            runtime.__dict__[name] = torch.compiler.disable(method, reason=OPAQUE)
        except TypeError:  # a torch without `reason`: the error is told apart by the method's name
            runtime.__dict__[name] = torch.compiler.disable(method)

    def undo() -> None:
        for name in names:
            runtime.__dict__.pop(name, None)

    return undo


# The stock kernels generate() swaps: grouped_mm -> batched_mm for decoding on a non-CPU device,
# and back after (transformers' `_optimize_model_for_decode`).
DECODE_SWITCH = frozenset({"grouped_mm", "batched_mm"})


def kernel_switch_only(current: Mapping[str, str | None], request) -> bool:
    """Whether `request` (as `set_experts_implementation` takes it) only swaps grouped_mm and
    batched_mm against `current` (`get_experts_implementation()`): the kernel the runtime calls
    on its slots can follow it, as the stock model would."""
    if isinstance(request, str):
        wanted = {key: request for key, value in current.items() if value is not None}
    elif isinstance(request, Mapping) and set(request) <= set(current):
        wanted = {key: request.get(key, value) for key, value in current.items()}
    else:
        return False
    return all(w == current[k] or {w, current[k]} <= DECODE_SWITCH for k, w in wanted.items())


def _refuse_experts_switch(model, on_switch: Callable[[], None]) -> Callable[[], None]:
    # transformers applies the switch through every PreTrainedModel inside the model too.
    owners = [m for m in model.modules() if hasattr(m, "set_experts_implementation")]

    def refuse(owner):
        stock_set = type(owner).set_experts_implementation.__get__(owner)

        def set_experts_implementation(experts_implementation):
            # The experts modules dispatch on private config copies set to the runtime (the
            # model's own config is left untouched); asking for the runtime changes nothing.
            if experts_implementation in ("moe_prefetch", {"": "moe_prefetch"}):
                return
            if kernel_switch_only(owner.get_experts_implementation(), experts_implementation):
                # generate() on CUDA decodes with batched_mm and switches back after: the model's
                # config follows (the private copies stay on the runtime) and so does the kernel the
                # runtime runs on its slots, so decoding computes as the stock model's does.
                stock_set(experts_implementation)
                on_switch()
                return
            raise AttachedModelError(
                f"this model's experts are run by the moe-prefetch runtime; {DETACH}, "
                f"then set_experts_implementation({experts_implementation!r})"
            )

        return set_experts_implementation

    for owner in owners:
        owner.__dict__["set_experts_implementation"] = mark(refuse(owner))

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

    handles = [layer.experts.register_state_dict_post_hook(mark(hook_for(layer))) for layer in runtime.layers]

    def undo() -> None:
        for handle in handles:
            handle.remove()

    return undo


def _refuse_conversions(model, runtime) -> Callable[[], None]:
    """Every dtype or device conversion of a module (`to`, `half`, `bfloat16`, `float`, `cuda`,
    `cpu`, `type`) goes through `Module._apply(fn)`. Apply `fn` to an empty tensor shaped like
    the experts' storage first: if it would change their dtype or device, refuse, because the
    host store and the slots would stay as they are while the rest of the model moved."""
    guarded = _holding_experts(model, runtime)
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
        module.__dict__["_apply"] = mark(guard(module))

    def undo() -> None:
        for module in guarded:
            module.__dict__.pop("_apply", None)

    return undo


def replace_forward(model, forward: Callable) -> Callable[[], None]:
    """Put `forward` on the model instance, in front of its class's (and of a forward someone else
    put there, such as accelerate's hooks); returns the undo that puts back what was there."""
    had, previous = "forward" in model.__dict__, model.__dict__.get("forward")
    model.__dict__["forward"] = forward

    def undo() -> None:
        if had:
            model.__dict__["forward"] = previous
        else:
            model.__dict__.pop("forward", None)

    return undo


def _untraced(fn: Callable) -> Callable:
    """`fn` with its own frame skipped by dynamo and the frames it calls compiled as before.
    `torch.compiler.disable(recursive=False)` says the same, but in torch 2.13 dynamo converts the
    frame of `fn` again at every call (one more frame in `torch._dynamo.utils.counters["frames"]`
    per decode step of the tiny Mixtral under torch.compile, where `skip` adds none after warm-up);
    dynamo's own `skip` marks the code once."""
    try:
        from torch._dynamo.decorators import skip
    except ImportError:  # not in this torch: the public form
        return torch.compiler.disable(fn, recursive=False)
    return skip(fn)


def _refuse_fullgraph(model, runtime) -> Callable[[], None]:
    """With fullgraph=True dynamo stops at the first entry point with its own words ("Skip calling
    torch.compiler.disable()d function"), which say nothing of what works. `torch.compile(model)`
    calls the model's forward from frames it does not trace; the forward runs in a frame dynamo
    skips (`_untraced`), so that error passes through it and becomes an AttachedModelError.
    `model.compile(fullgraph=True)` (Module.compile, which traces the call itself) is refused
    before anything is compiled, on every module holding experts."""
    forward = model.forward

    @functools.wraps(forward)  # inspect.signature (generate reads the forward's parameters) follows __wrapped__
    def guarded_forward(*args, **kwargs):
        try:
            return forward(*args, **kwargs)
        except Exception as err:
            if OPAQUE in str(err) or any(f"Runtime.{name}" in str(err) for name in ENTRY_POINTS):
                raise AttachedModelError(FULLGRAPH.format(detach=DETACH)) from err
            raise

    restore_forward = replace_forward(model, mark(_untraced(guarded_forward)))
    holders = _holding_experts(model, runtime)

    def refuse(module):
        def compile(*args, **kwargs):  # noqa: A001 (Module.compile)
            if kwargs.get("fullgraph"):
                raise AttachedModelError(FULLGRAPH.format(detach=DETACH))
            return type(module).compile(module, *args, **kwargs)

        return compile

    for module in holders:
        module.__dict__["compile"] = mark(refuse(module))

    def undo() -> None:
        for module in holders:
            module.__dict__.pop("compile", None)
        restore_forward()

    return undo


def _warn_generate_compile(model) -> Callable[[], None]:
    """transformers compiles the forward inside `generate` when asked (`compile_config`) or on its
    own (a static cache on CUDA), with CUDA graphs that would replay a fixed set of slots, copies
    and routing; attach sets `generation_config.disable_compile`, under which a compile request was
    dropped in silence. Now generate never compiles while attached, and says so once when asked."""
    if not hasattr(type(model), "_valid_auto_compile_criteria"):
        return lambda: None
    warned = []

    def _valid_auto_compile_criteria(model_kwargs, generation_config) -> bool:
        cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        asked = getattr(generation_config, "compile_config", None) is not None or (
            getattr(generation_config, "disable_compile", True) is False and getattr(cache, "is_compileable", False)
        )
        if asked and not warned:
            warned.append(True)
            logger.warning(
                "generate() was asked to compile, but an attached model runs uncompiled there (CUDA graphs cannot "
                "hold the moe-prefetch runtime's host work); torch.compile(model) with fullgraph=False compiles "
                "around the runtime with the stock outputs, or %s to compile the stock model",
                DETACH,
            )
        return False

    model.__dict__["_valid_auto_compile_criteria"] = mark(_valid_auto_compile_criteria)
    return lambda: model.__dict__.pop("_valid_auto_compile_criteria", None)


def _holding_experts(model, runtime) -> list:
    """The experts modules and every module above them: a call on any of those reaches them."""
    experts = {id(layer.experts) for layer in runtime.layers}
    names = {name for name, module in model.named_modules() if id(module) in experts}
    return [
        module
        for name, module in model.named_modules()
        if not name or any(n == name or n.startswith(name + ".") for n in names)
    ]


def _load_through_store(model, runtime) -> Callable[[], None]:
    """`load_state_dict` on any module holding experts (see `_load_state_dict`)."""
    guarded = _holding_experts(model, runtime)

    def guard(module):
        def load_state_dict(state_dict: Mapping, strict: bool = True, assign: bool = False):
            return _load_state_dict(module, runtime, state_dict, strict, assign)

        return load_state_dict

    for module in guarded:
        module.__dict__["load_state_dict"] = mark(guard(module))

    def undo() -> None:
        for module in guarded:
            module.__dict__.pop("load_state_dict", None)

    return undo


def _expected(module, runtime) -> tuple[dict, dict]:
    """What `module.state_dict()` holds: key -> shape (None for extra state, which has none), with
    the experts at their full stacked shape; and the experts' keys -> (MoE layer, parameter name)."""
    spec, layers = runtime.spec, {id(layer.experts): layer for layer in runtime.layers}
    shapes, experts = {}, {}
    for path, sub in module.named_modules(remove_duplicate=False):  # torch loads a shared module at each path
        prefix = f"{path}." if path else ""
        layer = layers.get(id(sub))
        for name, param in sub._parameters.items():
            if param is None:
                continue
            if layer is not None and name in spec.names:
                experts[prefix + name] = (layer, name)
                shapes[prefix + name] = (layer.num_experts, *spec.shapes[spec.names.index(name)])
            else:
                shapes[prefix + name] = tuple(param.shape)
        for name, buffer in sub._buffers.items():
            if buffer is not None and name not in sub._non_persistent_buffers_set:
                shapes[prefix + name] = tuple(buffer.shape)
        if type(sub).get_extra_state is not torch.nn.Module.get_extra_state:
            shapes[prefix + "_extra_state"] = None
    return shapes, experts


def _load_state_dict(module, runtime, state_dict: Mapping, strict: bool, assign: bool):
    """torch's `load_state_dict` for an attached model, all or nothing. torch copies tensor by
    tensor and reports size mismatches and (strict) missing or unexpected keys at the end, so a bad
    state dict leaves a model half loaded; here the whole of it is checked first and a failing one
    changes nothing. Then the experts are encoded (the store's codec), every copy from the store
    lands, the other tensors load through torch, and the experts are written into the host store
    and the slots holding them (`Runtime.replace_experts`)."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"Expected state_dict to be dict-like, got {type(state_dict)}.")
    shapes, experts = _expected(module, runtime)
    errors = []
    for key, shape in shapes.items():
        if shape is None or key not in state_dict:
            continue
        value = state_dict[key]
        if not torch.overrides.is_tensor_like(value):
            errors.append(f'the parameter named "{key}" is a {type(value).__name__}, not a tensor')
        elif tuple(value.shape) != shape and not (shape == () and tuple(value.shape) == (1,)):  # torch's legacy
            errors.append(
                f"size mismatch for {key}: copying a param with shape {tuple(value.shape)} from checkpoint, "
                f"the shape in current model is {shape}"
            )
    missing = [key for key in shapes if key not in state_dict]
    unexpected = [key for key in state_dict if key not in shapes]
    if strict and missing:
        errors.append(f"missing key(s) {', '.join(missing)}")
    if strict and unexpected:
        errors.append(f"unexpected key(s) {', '.join(unexpected)}")
    if errors:
        raise RuntimeError(
            f"Error(s) in loading state_dict for {type(module).__name__}: {'; '.join(errors)}; "
            "nothing was loaded (the attached model is unchanged)"
        )
    codec, encoded = runtime.codec, {}
    for key, (layer, name) in experts.items():
        if key in state_dict:
            stacked = state_dict[key].detach()
            for expert_id in range(layer.num_experts):
                encoded.setdefault((layer.layer_idx, expert_id), {}).update(codec.encode({name: stacked[expert_id]}))
    rest = OrderedDict((key, value) for key, value in state_dict.items() if key not in experts)
    if hasattr(state_dict, "_metadata"):
        rest._metadata = state_dict._metadata  # per-module versions torch's loading reads
    runtime.loader.drain()  # before anything is written: a failed copy (LoaderError) changes nothing
    type(module).load_state_dict(module, rest, strict=False, assign=assign)
    runtime.replace_experts(encoded)
    return _IncompatibleKeys(missing, unexpected)
