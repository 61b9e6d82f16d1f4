"""The options `run` and `serve` share: the model, its tokenizer and every runtime setting, as
typer parameter types, and the one function that turns them into `load`'s keywords.

A command declares `cache_slots: options.CacheSlots = None` and passes what it got to
`runtime_options`; the help texts and the checks live here once. Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moe_prefetch.errors import ConfigError
from moe_prefetch.experts.dtypes import EXPERTS_DTYPES
from moe_prefetch.runtime import profiles as hw
from moe_prefetch.runtime.config import CACHE_POLICIES, PREDICTORS, RuntimeConfig

from .app import given


def default(name: str, owner=RuntimeConfig) -> str:
    """The library's default, for help texts (the CLI never restates it)."""
    return f"(default {getattr(owner, name)})"


Model = Annotated[str, typer.Option(help="Checkpoint folder, or 'demo' for the shipped demo model.")]
Tokenizer = Annotated[
    Path | None,
    typer.Option(help="Tokenizer folder or tokenizer.json, when the model folder has none (default: the model's)."),
]
Device = Annotated[str | None, typer.Option(help=f"auto, cuda, cuda:N or cpu {default('device')}.")]
CacheBudget = Annotated[str | None, typer.Option(help="Cache size: '6GiB', '512MB' or '75%' of free memory.")]
CacheSlots = Annotated[
    int | None,
    typer.Option(
        help="Expert slots in the device cache, at least top_k (default: as many as free device memory allows)."
    ),
]
Profile = Annotated[str | None, typer.Option(help="Size the cache as on this hardware profile (`profiles`).")]
CachePolicy = Annotated[
    str | None, typer.Option(help=f"Eviction policy: {', '.join(CACHE_POLICIES)} {default('cache_policy')}.")
]
Host = Annotated[str | None, typer.Option(help="Host profile (CPU and DRAM) for placing missed experts (`profiles`).")]
Predictor = Annotated[str | None, typer.Option(help=f"{', '.join(PREDICTORS)} {default('predictor')}.")]
Lookahead = Annotated[int | None, typer.Option(help=f"Layers ahead to prefetch, 1..8 {default('lookahead')}.")]
PredictorPath = Annotated[Path | None, typer.Option(help="Trained predictor file (m2r2 adapters).")]
OnMiss = Annotated[
    str | None,
    typer.Option(help=f"Where a non-resident expert runs: wait (for its upload), host, auto {default('on_miss')}."),
]
ExpertsDtype = Annotated[
    str | None,
    typer.Option(
        help=f"How experts are stored, moved and cached: {', '.join(EXPERTS_DTYPES)}; int8/int4 quantize "
        f"once and keep a copy (`quantize`) {default('experts_dtype')}."
    ),
]


def runtime_options(
    *,
    device: str | None,
    cache_budget: str | None,
    cache_slots: int | None,
    profile: str | None,
    cache_policy: str | None,
    host: str | None,
    predictor: str | None,
    lookahead: int | None,
    predictor_path: Path | None,
    on_miss: str | None,
    experts_dtype: str | None,
) -> tuple[dict, RuntimeConfig]:
    """`load`'s keywords from the options given (the library's defaults apply to the rest), every
    one checked before anything slow; `--profile` is applied later by `size_for_profile`, once
    the model's folder is known."""
    chosen = [
        n
        for n, v in (("--cache-budget", cache_budget), ("--cache-slots", cache_slots), ("--profile", profile))
        if v is not None
    ]
    if len(chosen) > 1:
        raise ConfigError(f"give one of --cache-budget, --cache-slots or --profile, not {' and '.join(chosen)}")
    options = given(
        device=device,
        cache_budget=cache_budget,
        cache_slots=cache_slots,
        cache_policy=cache_policy,
        predictor=predictor,
        lookahead=lookahead,
        predictor_path=None if predictor_path is None else str(predictor_path),
        on_miss=on_miss,
        host_profile=host,
        experts_dtype=experts_dtype,
    )
    config = RuntimeConfig(**options)
    if host is not None:
        hw.load_host_profile(host)  # an unknown name fails here, naming the known ones
    if profile is not None:
        hw.load_profile(profile)  # likewise
    return options, config


def size_for_profile(options: dict, config: RuntimeConfig, profile: str | None, folder: Path) -> dict:
    """`options` with the cache sized as on `profile`: the largest that fits after the weights,
    the KV cache of the default context, the working buffers and the prefill peak (`fitting.fit`)."""
    if profile is None:
        return options
    from moe_prefetch.errors import CacheCapacityError
    from moe_prefetch.evidence.anatomy import anatomy
    from moe_prefetch.evidence.fitting import fit

    sized = fit(anatomy(str(folder)), config.experts_dtype, hw.load_profile(profile))
    if not sized.fits_device:
        raise CacheCapacityError(f"{sized.why_not}; pick a larger profile or --experts-dtype int4")
    return {**options, "cache_slots": sized.cache_slots}
