"""Where a routed expert runs: on the device (resident, or after waiting for its upload) or on
the host CPU from the host store. Tensor-free, shared by the runtime and the simulator.

The choice is per expert and per layer call, by expected finish time (`on_miss="auto"`):

  host lane:    call overhead + max(expert bytes / host DRAM bandwidth, FLOPs / host FLOP/s),
                plus one pass's fixed cost for the layer's first host expert
  wait lane:    remaining upload time over the link + the same work on the device

Expert bytes on the host are per format: the stored bytes at the kernel's cost per byte
(`experts.host_kernels.host_bytes`: bf16 as stored, packed int8 and int4, MXFP4 and FP8 by
row-chunk lookups, each at its measured cost per stored byte), or the decode's traffic for
formats the lane decodes first.

At batch-1 decode a cold expert is one token of work: reading it once from DRAM on the host
costs a fraction of copying it over PCIe, so it runs on the host. A prefill chunk with many
tokens on one expert is FLOP-bound: the device wins even after the copy, so it waits (and
runs in waves when the pool is small). Prefill is not decided as a whole, though: each expert
is priced behind the copies already queued in its layer call, so in a cold layer that misses
many experts at once, one that few tokens chose finishes first on the host and runs there (run
reports count the host lane for prefill and decode apart). `on_miss="wait"` is the pre-hybrid behaviour (every
miss waits for its copy); `"host"` sends every miss to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

ON_MISS = ("wait", "host", "auto")


@dataclass(frozen=True)
class LaneCosts:
    """The speeds the placement compares, from hardware profiles (`profiles.lane_costs`) or
    `DEFAULT_COSTS`."""

    link_bytes_per_s: float  # host->device copies (pinned)
    host_bytes_per_s: float  # DRAM bytes/s one expert call achieves on the host lane
    host_flops: float  # host FLOP/s for the expert matmuls
    host_call_s: float  # fixed overhead per expert call on the host
    device_bytes_per_s: float  # device memory bandwidth
    device_flops: float  # device FLOP/s
    # Where the device lane is the same CPU (a CPU device), running part of a layer on the host
    # lane costs one more call of the stock kernel: paid once per layer call that splits.
    split_call_s: float = 0.0
    # The host lane's fixed cost per layer call with host experts (runtime/host_lane.py: the
    # pairs, one gate over all of them, the weighted sum): paid once, by the first host expert.
    host_layer_s: float = 0.0


# The host lane's pass, measured on one core of the workplace's 2-core EPYC (CPU time of
# HostLane.run on demo-fine's tiny experts, 1 against 8 experts: 67 us per pass, 22 us per expert
# beyond it; the latter is below every profile's `expert_call_overhead_s`, which stays as cited).
HOST_LAYER_S = 60e-6


# No profile given: a PCIe 4.0 x16 link (~25 GB/s pinned), desktop DDR4-3200 dual channel
# (~35 GB/s achieved of 51 peak) with ~8 cores of AVX2 (~0.3 TFLOP/s fp32), and a mid-range GPU
# (~900 GB/s, ~80 TFLOP/s bf16). Conservative on the host side: a wrong guess there sends a
# miss to the link, which is the pre-hybrid behaviour, not worse.
DEFAULT_COSTS = LaneCosts(
    link_bytes_per_s=25e9,
    host_bytes_per_s=35e9,
    host_flops=3e11,
    host_call_s=30e-6,
    device_bytes_per_s=900e9,
    device_flops=80e12,
    host_layer_s=HOST_LAYER_S,
)


def device_call_s(device_bytes: float, params: float, pairs: int, bytes_per_s: float, flops: float, experts: int = 1):
    """The one device-time model for experts, shared by the placement and the simulator's
    roofline: `experts` experts' bytes read once (stored bytes plus decode traffic) against the
    FLOPs of `pairs` (token, expert) pairs on them, whichever takes longer."""
    return max(experts * device_bytes / bytes_per_s, 2 * params * pairs / flops)


class Placement:
    """Per-expert lane times for one expert size, and the on-miss rule."""

    def __init__(
        self,
        costs: LaneCosts,
        expert_bytes: int,
        expert_params: int,
        on_miss: str = "auto",
        host_bytes: int | None = None,
        device_bytes: int | None = None,
    ):
        if on_miss not in ON_MISS:
            raise ValueError(f"on_miss={on_miss!r}; choose one of {', '.join(ON_MISS)}")
        self.costs = costs
        self.expert_bytes = expert_bytes  # as stored and moved over the link
        # DRAM bytes one host-lane call touches: the stored expert, plus its decoded copy written
        # and read back when compressed (`compression.Codec.host_bytes`).
        self.host_bytes = expert_bytes if host_bytes is None else host_bytes
        # Memory bytes one device call touches: the stored expert, plus the decode's traffic when
        # compressed (`compression.Codec.device_bytes`); the simulator's roofline charges the same.
        # On a CPU device a compressed expert in a slot is decoded by the CPU (`Codec.host_bytes`),
        # so a use there never costs less than on the host lane and no upload can pay.
        self.device_bytes = expert_bytes if device_bytes is None else device_bytes
        self.expert_params = expert_params
        self.on_miss = on_miss

    def host_s(self, tokens: int) -> float:
        c = self.costs
        return c.host_call_s + max(self.host_bytes / c.host_bytes_per_s, 2 * self.expert_params * tokens / c.host_flops)

    def device_s(self, tokens: int) -> float:
        c = self.costs
        return device_call_s(self.device_bytes, self.expert_params, tokens, c.device_bytes_per_s, c.device_flops)

    def link_s(self) -> float:
        return self.expert_bytes / self.costs.link_bytes_per_s

    def on_host(
        self, tokens: int, in_flight: bool, host_busy: float = 0.0, link_busy: float = 0.0, left: float = 1.0
    ) -> bool:
        """Whether a routed expert that is not resident runs on the host: the finish time of
        each option, behind the work already placed on that lane in this layer call (`host_busy`
        seconds of host compute, `link_busy` seconds of uploads). An upload already in flight
        costs the share `left` of its copy still to move, as its loader reports it (1.0, the
        full copy, where the loader does not know: it may be queued behind other copies)."""
        if self.on_miss == "wait":
            return False
        if self.on_miss == "host":
            return True
        wait = link_busy + self.link_s() * (left if in_flight else 1.0) + self.device_s(tokens)
        split = self.host_pass_s() if host_busy == 0 else 0.0  # the layer's first host expert
        return host_busy + split + self.host_s(tokens) < wait

    def host_pass_s(self) -> float:
        """What a layer call pays once for running any expert on the host: the lane's pass, and
        on a CPU device the second stock-kernel call of the split layer."""
        return self.costs.split_call_s + self.costs.host_layer_s
