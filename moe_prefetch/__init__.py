"""moe-prefetch: run Mixture-of-Experts models on GPUs too small to hold them.

Experts live in host memory; a fixed pool of device slots serves as an LRU cache fed by an
asynchronous loader; predictors stage the experts later layers will need ahead of time.
"""

from .errors import (
    AttachedModelError,
    CacheCapacityError,
    CheckpointError,
    ConfigError,
    DeviceError,
    HostMemoryError,
    LoaderError,
    ModelNotFoundError,
    MoePrefetchError,
    PredictorError,
    ReportError,
    UnsupportedModelError,
)
from .runtime.config import RuntimeConfig, parse_size

__version__ = "0.1.0"


def __getattr__(name: str):
    # torch and transformers load only when the runtime is used, so `moe-prefetch --help` is quick.
    if name == "attach":
        from .model.integration import attach

        return attach
    if name == "load":
        from .model.loading import load

        return load
    if name == "compress_experts":
        from .experts.compression import compress_experts

        return compress_experts
    if name == "Runtime":
        from .runtime.runtime import Runtime

        return Runtime
    raise AttributeError(f"module 'moe_prefetch' has no attribute {name!r}")


__all__ = [
    "AttachedModelError",
    "CacheCapacityError",
    "CheckpointError",
    "ConfigError",
    "DeviceError",
    "HostMemoryError",
    "LoaderError",
    "ModelNotFoundError",
    "MoePrefetchError",
    "PredictorError",
    "ReportError",
    "Runtime",
    "RuntimeConfig",
    "UnsupportedModelError",
    "attach",
    "compress_experts",
    "load",
    "parse_size",
]
