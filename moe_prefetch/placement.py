"""Placement: where a routed expert runs (device, host, or after its upload), by a cost model.

`LaneCosts` holds the speeds of the three lanes that model compares: the host-to-device link,
the host CPU computing an expert from the host store, and the device. `profiles.lane_costs`
builds one from a device profile and a host profile; `profiles.default_lane_costs` when none
is given.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LaneCosts:
    """Speeds of the link, host and device lanes, in SI units. A link of `math.inf` bytes/s
    means an upload costs nothing (unified memory: host and device share one DRAM)."""

    link_bytes_per_s: float  # host->device copies (pinned)
    host_bytes_per_s: float  # DRAM bytes/s one expert call achieves on the host lane
    host_flops: float  # host FLOP/s for the expert matmuls
    host_call_s: float  # fixed overhead per expert call on the host
    device_bytes_per_s: float  # device memory bandwidth
    device_flops: float  # device FLOP/s
