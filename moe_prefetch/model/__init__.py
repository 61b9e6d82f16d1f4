"""The face toward transformers and checkpoints: `attach`/`detach` (`integration`), `load`
(`loading`, through transformers' own key conversion: `checkpoint`, `skeleton`, `folders`),
guards on an attached model, the quantize-once copy, and the offline runs that start from a
checkpoint folder (`offline`: train or score predictors on a loaded model); `generation`: the
settings and the one `model.generate` call that `run` and `serve` share.

Layer: above `predict`, `runtime`, `experts` and `errors`; never imports evidence, report, serve or cli.
"""
