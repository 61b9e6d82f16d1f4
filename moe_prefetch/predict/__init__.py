"""Routing predictors (none, previous-token, next-gate, m2r2, oracle) behind one interface, the
M2R2 adapters and their training, the residuals they learn from, their offline scoring, and the
text they are trained and scored on (`corpus`, `heldout`). Predictors call the model's own
router modules and hand the runtime `runtime.prediction.Guess`es.

Layer: above `runtime`, `experts` and `errors`; never imports model, evidence, report, serve or cli
(loading a checkpoint to train or score on is `model.offline`'s job).
"""
