"""The names an expert can be stored as (`experts_dtype`). Torch-free, so the settings
(`runtime.config`) and the CLI's help can name them without loading torch; `compression.make_codec`
turns each into a codec."""

EXPERTS_DTYPES = ("auto", "bf16", "fp16", "fp32", "int8", "int4")
