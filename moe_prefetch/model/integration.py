"""Plugs the runtime into a transformers model through its experts-implementation interface.

`attach` moves every expert out of the model into the host store, registers the
"moe_prefetch" experts function with `transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS`
and switches each of the model's experts modules to it. That function remaps expert ids to
slot ids and runs the model's own (stock) expert kernel on the slot tensors, so the
arithmetic is unchanged. Pre-hooks on the decoder layers hand the residual stream to the
predictor. `Runtime.detach` undoes all of it, restoring the original parameters; `copy.deepcopy`
of an attached model gives what detach would give, leaving the original attached.

The switch is made on a private copy of the config each experts module dispatches on, never
on the model's config: models often share one config object (a reference copy, a draft
model), and attaching or detaching one of them must not change what the others run.
"""

from __future__ import annotations

import copy
import functools
import logging
import time

import psutil
import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from ..errors import CacheCapacityError, ConfigError, DeviceError, PredictorError
from ..experts.compression import Codec, make_codec, scratch_bytes
from ..experts.layout import ExpertSpec, MoELayer, decoder_layers, find_moe_layers, spec_of, undecorated_forward
from ..predict.m2r2 import M2R2Predictor
from ..predict.predictors import NextGatePredictor, OraclePredictor, Predictor, PreviousTokenPredictor
from ..runtime import sizing
from ..runtime.cache import ExpertCache, make_policy
from ..runtime.config import RuntimeConfig, config_for, parse_size
from ..runtime.loader import make_loader
from ..runtime.pool import SlotPool
from ..runtime.runtime import Runtime
from ..runtime.sizing import budget_shortfall, fmt_bytes, warn_if_small_cache, work_bytes
from ..runtime.store import HostStore
from . import decode_gemv, guards

logger = logging.getLogger(__name__)

IMPLEMENTATION = "moe_prefetch"


def _experts_forward(self, hidden_states, top_k_index, top_k_weights):
    attached = self.__dict__.get("_moe_prefetch")
    if attached is None:
        # A module that dispatches here without being attached (its config was set to
        # "moe_prefetch" by hand, or saved that way): its own weights are intact, so the stock
        # kernel is exact.
        stock = ALL_EXPERTS_FUNCTIONS.get_interface(DEFAULT_KERNEL, undecorated_forward(type(self)))
        return stock(self, hidden_states, top_k_index, top_k_weights)
    runtime, layer = attached
    return runtime.experts_forward(layer, hidden_states, top_k_index, top_k_weights)


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, _experts_forward)
DEFAULT_KERNEL = "grouped_mm"  # transformers' default experts implementation


def stock_kernel(model, experts, config=None) -> tuple[str, object]:
    """The experts implementation the module runs without the runtime (by `config`, its own by
    default), and its function. Never the runtime's own: "moe_prefetch" falls back to the default."""
    name = getattr(experts.config if config is None else config, "_experts_implementation", None)
    if name in (None, IMPLEMENTATION):
        name = DEFAULT_KERNEL
    return name, ALL_EXPERTS_FUNCTIONS.get_interface(name, undecorated_forward(type(experts)))


def lane_costs_for(config: RuntimeConfig, target: torch.device):
    """The placement's lane speeds on CUDA: the shipped desktop defaults, with the host lane
    from `config.host_profile` when one is named. None on a CPU device (see runtime.default_costs)."""
    if target.type != "cuda" and config.host_profile is None:
        return None
    from ..runtime import profiles as hw

    host = None if config.host_profile is None else hw.load_host_profile(config.host_profile)
    return hw.default_lane_costs(host=host)


def host_threads_for(config: RuntimeConfig, target: torch.device, physical_cores: int | None) -> int | None:
    """Torch intra-op threads while attached, or None to leave torch's setting alone: on CUDA,
    `config.host_threads` or physical cores minus one (the GPU's driving thread and the loader's
    worker keep the last core); on a CPU device only when `host_threads` is given."""
    if config.host_threads is not None:
        return config.host_threads
    if target.type != "cuda" or not physical_cores:
        return None
    return max(1, physical_cores - 1)


def resolve_device(device: str) -> tuple[torch.device, str]:
    """The device to run on, and why it was chosen."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), "auto: CUDA is available"
        return torch.device("cpu"), "auto: no CUDA device, running on CPU"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device={device!r} but torch sees no CUDA device here; use device='cpu' or device='auto'")
    return torch.device(device), f"requested: {device}"


def free_device_memory(device: torch.device) -> int:
    """Bytes a new pool can take: free device memory plus the blocks PyTorch's caching
    allocator holds but no tensor uses (a detached runtime's pool, for one)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(0, cached))
    return int(psutil.virtual_memory().available)


def resolve_slots(
    config: RuntimeConfig,
    spec: ExpertSpec,
    layers: list[MoELayer],
    device: torch.device,
    free_bytes: int | None = None,
    codec: Codec | None = None,
    model_config=None,
    widths: list[int | None] | None = None,
) -> int:
    """Number of slots from cache_slots, cache_budget, or free device memory. A budget
    includes the pool's working buffer (top_k decoded experts, and their stored bytes and the
    decode scratch when compressed: see pool.py). A slot holds one expert as stored (`codec`).
    Sized from free memory, the pool leaves the reserve of `sizing.reserve` free first (with
    `model_config`: the KV cache of `config.max_batch` x `config.max_length` tokens, the
    prefill's peak, cuBLAS's workspaces), then `config.safety_margin` of the rest."""
    top_k = max(layer.top_k for layer in layers)
    codec = codec or make_codec(spec)
    slot_bytes = codec.nbytes
    scratch = scratch_bytes(codec, top_k) if device.type == "cuda" else 0  # the device decode's (pool.py)
    work = work_bytes(top_k, spec.nbytes, codec.nbytes, compressed=not codec.identity) + scratch
    total = sum(layer.num_experts for layer in layers)
    held = None  # the reserve, when the pool is sized from free memory
    if config.cache_slots is not None:
        slots = config.cache_slots
    else:
        free = free_device_memory(device) if free_bytes is None else free_bytes
        if config.cache_budget is not None:
            budget = parse_size(config.cache_budget, total=free, name="cache_budget")
            if budget > free:
                raise CacheCapacityError(
                    f"cache_budget={config.cache_budget!r} is {fmt_bytes(budget)}, larger than the "
                    f"{fmt_bytes(free)} free on {device}; lower cache_budget"
                )
        else:
            if model_config is not None:
                held = sizing.reserve(
                    model_config,
                    spec.dtype.itemsize,
                    top_k,
                    spec.numel,
                    config.max_length,
                    config.max_batch,
                    widths,
                    prefill_chunk=config.prefill_chunk,
                )
                logger.info("pool sized after %s", held.describe())
            budget = int(max(0, free - (held.total if held else 0)) * (1 - config.safety_margin))
        slots = min(total, max(0, budget - work) // slot_bytes)
    if slots < top_k:
        if config.cache_slots is not None:
            need = f"one layer needs {top_k} slots of {fmt_bytes(slot_bytes)} ({codec.name})"
            fix = f"cache_slots={slots} is below top_k={top_k}: {need}; raise cache_slots to >= {top_k}"
        else:
            what = (
                f"cache_budget={config.cache_budget!r} ({fmt_bytes(budget)})"
                if config.cache_budget is not None
                else f"the free memory on {device} ({fmt_bytes(budget)} after the reserve and the safety margin)"
            )
            fix = budget_shortfall(what, slots, top_k, slot_bytes, work, codec.name)
            if config.cache_budget is not None:
                fix += "; raise cache_budget"
            elif held is not None:
                fix += (
                    f"; {held.describe()}: lower max_length (now {held.max_length}) or max_batch, "
                    "free device memory, or use the CPU"
                )
            else:
                fix += "; free device memory or use the CPU"
        raise CacheCapacityError(fix)
    return min(slots, total)


def attach(
    model,
    device: str = "auto",
    cache_slots: int | None = None,
    cache_budget=None,
    predictor: str = "none",
    lookahead: int = 1,
    predictor_path: str | None = None,
    **options,
) -> Runtime:
    """Offload the experts of a transformers MoE model you already built.

    Its experts move out of the model into the host store, the rest moves to `device`, and a
    pool of `cache_slots` device slots (or as many as `cache_budget` or free memory allows)
    serves every MoE layer. `model(...)` and `model.generate(...)` keep working with the same
    outputs. Returns the `Runtime`; `runtime.detach()` restores the model exactly.
    """
    config = config_for(
        "attach",
        device=device,
        cache_slots=cache_slots,
        cache_budget=cache_budget,
        predictor=predictor,
        lookahead=lookahead,
        predictor_path=predictor_path,
        **options,
    )
    if getattr(model, "_moe_prefetch_runtime", None) is not None:
        raise ConfigError("this model is already attached; call runtime.detach() first")
    layers = find_moe_layers(model)
    spec = spec_of(layers)
    target, device_reason = resolve_device(config.device)
    if target.type == "cpu" and spec.dtype == torch.float16:
        logger.info("float16 experts on CPU run slowly; consider dtype=torch.float32 or bfloat16")
    keys = [(layer.layer_idx, e) for layer in layers for e in range(layer.num_experts)]
    store = HostStore(spec, keys, pin=target.type == "cuda", codec=make_codec(spec, config.experts_dtype))
    # Layer by layer, the experts move into the store and the model's copy is freed (its Parameter
    # objects stay, so references users hold remain valid and detach can refill them).
    store.absorb(layers)
    return wire(model, layers, spec, store, config, target, device_reason)


def wire(
    model,
    layers: list[MoELayer],
    spec: ExpertSpec,
    store: HostStore,
    config: RuntimeConfig,
    target: torch.device,
    device_reason: str,
) -> Runtime:
    """Empty the model's expert parameters (already copied into `store`), move the rest to
    `target`, build pool, cache and loader, and switch the model to the runtime."""
    saved = []
    original_device = next(p.device for p in model.parameters() if p.device.type != "meta")
    for layer in layers:
        for name, param in layer.experts.named_parameters(recurse=False):
            # A loaded model's experts were never materialised: detach gives them back in host
            # memory, never on the device (they would not fit there: that is why it was loaded).
            home = torch.device("cpu") if param.device.type == "meta" else param.device
            shape = param.shape
            if param.device.type == "meta":
                param = torch.nn.Parameter(torch.empty(0, dtype=param.dtype), requires_grad=False)
                layer.experts._parameters[name] = param
            else:
                param.data = torch.empty(0, dtype=param.dtype, device=param.device)
            saved.append((layer.layer_idx, name, param, shape, home))
    try:
        model.to(target)
        # after the move: free memory is what is left
        widths = sizing.kv_widths(decoder_layers(model))
        slots = resolve_slots(config, spec, layers, target, codec=store.codec, model_config=model.config, widths=widths)
        pool = SlotPool(spec, slots, target, work_slots=max(layer.top_k for layer in layers), codec=store.codec)
    except BaseException:
        model.to(original_device)  # refused: give the model its experts back, untouched (as in restore)
        _refill(saved, store, layers)
        raise
    cache = ExpertCache(
        slots, store.codec.nbytes, [layer.layer_idx for layer in layers], policy=make_policy(config.cache_policy)
    )
    t0 = time.perf_counter()  # one clock for the runtime's trace and the loader's copies
    costs = lane_costs_for(config, target)
    # The pool's device, with its index: the loader's worker thread must not take "cuda" as device 0.
    loader = make_loader(
        pool.buffer.device,
        slots,
        link_bandwidth=config.link_bandwidth,
        t0=t0,
        link_bytes_per_s=costs.link_bytes_per_s if costs is not None else None,
    )
    kernel_name, kernel = stock_kernel(model, layers[0].experts)
    configs = [layer.experts.__dict__.get("config") for layer in layers]
    generation = getattr(model, "generation_config", None)
    compile_was = getattr(generation, "disable_compile", None)
    chunk_was = getattr(generation, "prefill_chunk_size", None)
    threads_were = torch.get_num_threads()
    threads = host_threads_for(config, target, psutil.cpu_count(logical=False))
    hooks = []
    unguard = lambda: None  # noqa: E731 (replaced once the guards are installed)

    def restore() -> None:
        unguard()  # first: the guards refuse the experts switch and model.to below
        if threads is not None:
            torch.set_num_threads(threads_were)
        for hook in hooks:
            hook.remove()
        for layer, original in zip(layers, configs):
            layer.experts.__dict__["config"] = original
            layer.experts.__dict__.pop("_moe_prefetch", None)
        if generation is not None:
            generation.disable_compile = compile_was
            if config.prefill_chunk is not None:
                generation.prefill_chunk_size = chunk_was
        # The move first, while the expert Parameters are empty; then the experts go back to
        # their own home. A model loaded for CUDA keeps its experts on the host after detach
        # (its home there is the CPU): moving after the refill would put them all on the device.
        model.to(original_device)
        _refill(saved, store, layers)
        model.__dict__.pop("_moe_prefetch_runtime", None)
        model.__dict__.pop("__deepcopy__", None)

    runtime = Runtime(
        model=model,
        layers=layers,
        spec=spec,
        store=store,
        pool=pool,
        cache=cache,
        loader=loader,
        config=config,
        device=target,
        device_reason=device_reason,
        kernel=kernel,
        restore=restore,
        t0=t0,
        costs=costs,
    )
    for layer in layers:
        layer.experts.__dict__["_moe_prefetch"] = (runtime, layer)
    try:
        runtime.predictor = make_predictor(config, runtime)
    except BaseException:
        runtime.detach()  # a refused predictor must not leave the model without its experts
        raise
    # Layer 0's hook marks each forward (a token step); the others feed the predictor, and a
    # module with hooks takes torch's slower call path, so "none" hooks layer 0 only.
    every = runtime.predictor.name != "none" and runtime.predictor.source == "residual"
    for idx, decoder_layer in enumerate(decoder_layers(model)):
        if every or idx == 0:
            hooks.append(decoder_layer.register_forward_pre_hook(_residual_hook(runtime, idx), with_kwargs=True))
    if runtime.predictor.source == "router-input":
        for layer in layers:
            hooks.append(layer.router.register_forward_pre_hook(_router_hook(runtime, layer.layer_idx)))
    for layer, original in zip(layers, configs):
        view = copy.copy(original)  # private: the model's config, shared or not, stays untouched
        view._experts_implementation_internal = IMPLEMENTATION
        layer.experts.__dict__["config"] = view
    if generation is not None and not compile_was:
        # transformers compiles the forward on its own with a static cache on CUDA; the
        # runtime's routing-dependent host work cannot be captured in a graph.
        generation.disable_compile = True
        logger.info("generation_config.disable_compile set while attached (the runtime does not support compile)")
    if generation is not None and config.prefill_chunk is not None:
        # The reserve holds one chunk's activations (sizing.reserve): generate must feed no more.
        generation.prefill_chunk_size = config.prefill_chunk
    model.__dict__["_moe_prefetch_runtime"] = runtime

    def deepcopy_detached(memo: dict):
        """`copy.deepcopy(model)` while attached: a detached copy, as `runtime.detach()` would leave
        the model (experts gathered back from the store, stock implementation, no hooks or guards),
        while this model stays attached. The runtime is not copied: its loader thread, locks and
        device pool belong to this model (deepcopy failed on them: "cannot pickle '_thread.lock'")."""
        by_idx = {layer.layer_idx: layer for layer in layers}
        memo[id(runtime)] = None  # `_moe_prefetch` entries copy as (None, layer); removed below
        for layer_idx, name, param, shape, home in saved:
            stock = store.stacked(layer_idx, name, by_idx[layer_idx].num_experts).to(home).reshape(shape)
            memo[id(param)] = torch.nn.Parameter(stock, requires_grad=param.requires_grad)
        for layer, original in zip(layers, configs):
            memo[id(layer.experts.__dict__["config"])] = copy.deepcopy(original, memo)  # the private view
        del model.__dict__["__deepcopy__"]  # else deepcopy would call this again
        try:
            clone = copy.deepcopy(model, memo)
        finally:
            model.__dict__["__deepcopy__"] = deepcopy_detached
        guards.strip(clone)
        for module in clone.modules():
            module.__dict__.pop("_moe_prefetch", None)
        clone.__dict__.pop("_moe_prefetch_runtime", None)
        if generation is not None:
            clone.generation_config.disable_compile = compile_was
            if config.prefill_chunk is not None:
                clone.generation_config.prefill_chunk_size = chunk_was
        return clone.to(original_device)

    model.__dict__["__deepcopy__"] = guards.mark(deepcopy_detached)
    if threads is not None and threads != threads_were:
        torch.set_num_threads(threads)
        logger.info("host lane: %d torch threads while attached (was %d)", threads, threads_were)
    runtime.decode_gemv = decode_gemv.choose(config.cpu_decode_gemv, target, model.dtype)
    undo_gemv = decode_gemv.install(model, runtime.decode_gemv)  # innermost: the OOM message wraps it
    undo_memory = _name_the_setting_on_oom(model, runtime)

    def follow_switch() -> None:  # the model's config moved between grouped_mm and batched_mm
        runtime.use_kernel(stock_kernel(model, layers[0].experts, configs[0])[1])

    undo_guards = guards.install(model, runtime, follow_switch)
    unguard = lambda: (undo_guards(), undo_memory(), undo_gemv())  # noqa: E731

    warn_if_small_cache(runtime)  # attach and load both end here
    logger.info(
        "attached: %d MoE layers, %d slots of %.2f MiB (%s experts) on %s (%s); loader %s; host %s; stock kernel %s",
        len(layers),
        slots,
        store.codec.nbytes / 2**20,
        store.codec.describe(),
        target,
        device_reason,
        loader.kind,
        store.pin_reason,
        kernel_name,
    )
    return runtime


def out_of_memory_message(runtime, err: BaseException) -> str:
    """One line for an out-of-memory error in a forward of an attached model: the pool was sized
    before the run and never grows, so the fix is a smaller pool, or (sized automatically) a
    reserve for the run's real length."""
    config = runtime.config
    if config.cache_slots is not None:
        fix = f"lower cache_slots (now {config.cache_slots})"
    elif config.cache_budget is not None:
        fix = f"lower cache_budget (now {config.cache_budget!r})"
    else:
        length = config.max_length or sizing.default_max_length(runtime.model.config)
        fix = (
            f"set max_length (the pool was sized for {config.max_batch} x {length} tokens) to the longest "
            "prompt + new tokens, and max_batch to the batch, or give a smaller cache_budget"
        )
    pool = runtime.pool.nbytes if runtime.pool is not None else 0
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return (
        f"out of device memory in a forward on {runtime.device} beside the expert pool "
        f"({runtime.cache.num_slots} slots, {pool / 2**30:.2f} GiB): {fix} ({first})"
    )


def _name_the_setting_on_oom(model, runtime):
    """An out-of-memory error in a forward (generate's too) becomes one CacheCapacityError
    naming the setting to change. Through the instance's `forward`, restored on detach."""
    forward = model.forward

    @functools.wraps(forward)  # generate reads the forward's signature through __wrapped__
    def guarded(*args, **kwargs):
        try:
            return forward(*args, **kwargs)
        except torch.OutOfMemoryError as err:
            raise CacheCapacityError(out_of_memory_message(runtime, err)) from err

    return guards.replace_forward(model, guarded)


def _refill(saved, store: HostStore, layers: list[MoELayer]) -> None:
    """Put every expert back into its original Parameter object, on its original device."""
    by_idx = {layer.layer_idx: layer for layer in layers}
    for layer_idx, name, param, shape, param_device in saved:
        param.data = store.stacked(layer_idx, name, by_idx[layer_idx].num_experts).to(param_device).reshape(shape)


def _router_hook(runtime: Runtime, layer_idx: int):
    def hook(module, args):
        if args:
            runtime.on_router_input(layer_idx, args[0])

    return guards.mark(hook)


def _residual_hook(runtime: Runtime, layer_idx: int):
    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if hidden is not None:
            runtime.on_layer_start(layer_idx, hidden)

    return guards.mark(hook)


def make_predictor(config: RuntimeConfig, runtime, trace: list[dict] | None = None) -> Predictor:
    """Build the predictor named in `config` for `runtime`."""
    kwargs = {"lookahead": config.lookahead, "margin": config.prefetch_margin}
    if config.predictor in ("next-gate", "m2r2"):
        missing = [layer.layer_idx for layer in runtime.layers if layer.router is None]
        if missing:
            raise PredictorError(f"no router module found in layers {missing}; use --predictor none or previous-token")
    if config.predictor == "none":
        return Predictor(runtime, **kwargs)
    if config.predictor == "previous-token":
        return PreviousTokenPredictor(runtime, **kwargs)
    if config.predictor == "next-gate":
        return NextGatePredictor(runtime, **kwargs)
    if config.predictor == "oracle":
        return OraclePredictor(runtime, trace=trace, **kwargs)
    if config.predictor == "m2r2":
        return M2R2Predictor.from_config(config, runtime, **kwargs)
    raise PredictorError(f"unknown predictor {config.predictor!r}")
