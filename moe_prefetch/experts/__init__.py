"""What an expert is and how it is stored: where experts sit in a transformers model (`layout`),
the codecs an expert is stored as (`dtypes`, `compression`: bf16, int8, int4; `native`: MXFP4,
FP8) and the CPU kernels that compute on the stored bytes (`host_kernels`).

Layer: above `errors` only. Imports nothing else of moe_prefetch.
"""
