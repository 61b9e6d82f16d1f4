"""Evidence about speed: the trace simulator, bench, routing replay, what fits on a hardware
profile (`plan`) and measuring a device or host into a profile (`calibration`). Every
configuration it reports is sized to the hardware it names.

Layer: above `model`, `predict`, `runtime`, `experts` and `errors`; never imports report, serve or cli.
"""
