"""moe-prefetch: run Mixture-of-Experts models on GPUs too small to hold them.

Experts live in host memory; a fixed pool of device slots serves as an LRU cache fed by an
asynchronous loader; predictors stage the experts later layers will need ahead of time.
"""

from .config import RuntimeConfig, parse_size
from .errors import (
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
from .integration import attach
from .loading import load
from .runtime import Runtime

__version__ = "0.1.0"

__all__ = [
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
    "load",
    "parse_size",
]
