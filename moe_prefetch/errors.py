"""Typed errors. Each message names the problem and the fix, in one line."""


class MoePrefetchError(Exception):
    """Base of every error moe-prefetch raises on purpose."""


class ConfigError(MoePrefetchError, ValueError):
    """A setting is out of range or cannot be parsed."""


class ModelNotFoundError(MoePrefetchError, FileNotFoundError):
    """The path does not exist or is not a Hugging Face checkpoint folder."""


class CheckpointError(MoePrefetchError):
    """config.json or a safetensors file is corrupt, truncated or incomplete."""


class UnsupportedModelError(MoePrefetchError):
    """The model is dense, or its experts module does not use the experts interface."""


class CacheCapacityError(MoePrefetchError):
    """The slot pool is too small, or does not fit in device memory."""


class HostMemoryError(MoePrefetchError, MemoryError):
    """Host RAM cannot hold the expert store."""


class DeviceError(MoePrefetchError):
    """The requested device or dtype cannot be used here."""


class PredictorError(MoePrefetchError):
    """Unknown predictor, or adapters that are missing or made for another model."""


class AttachedModelError(MoePrefetchError, RuntimeError):
    """The operation would reach an attached model's experts in a way the runtime cannot serve."""


class LoaderError(MoePrefetchError):
    """A copy into a slot failed; raised in the caller at the next layer that needs it."""


class ReportError(MoePrefetchError):
    """A report file is missing or not a moe-prefetch run."""
