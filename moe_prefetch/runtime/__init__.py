"""The per-layer machinery: the host store and device slot pool, the slot cache and its
policies, the loader, the scheduler and placement (tensor-free, shared with the simulator),
uploads, the settings (`config`, `sizing`), what predictors hand the runtime (`prediction`),
the hardware profiles the placement prices lanes with (`profiles` and the shipped
`hardware_profiles/` files), the lane accounting (`lanes`) and the `Runtime` itself.

Layer: above `experts` and `errors`; imports nothing from predict, model, evidence, report, serve or cli.
"""
