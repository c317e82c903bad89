"""Named networks, with where each figure comes from, and ``resolve_network`` (name, dict or Network -> Network).

Bandwidths are the nominal per-direction line rates of the standards; a real NCCL/MPI collective reaches
roughly 70-95% of them (nccl-tests busbw), so these presets are optimistic for bandwidth by that much.
Latencies (alpha) are typical small-message figures and the least certain numbers here: run
``python -m sim calibrate`` on your own machines and use the saved JSON instead.

| preset | bandwidth (per direction) | source of the bandwidth | alpha | source of alpha |
|---|---|---|---|---|
| ethernet-1g   | 1 Gbit/s     | IEEE 802.3ab (1000BASE-T)                       | 50 us | TCP/IP ping-pong on commodity GbE, ~30-60 us |
| ethernet-10g  | 10 Gbit/s    | IEEE 802.3ae                                    | 25 us | TCP/IP stack latency (kernel sockets), 10-30 us |
| ethernet-25g  | 25 Gbit/s    | IEEE 802.3by                                    | 20 us | as above |
| ethernet-100g | 100 Gbit/s   | IEEE 802.3ba                                    | 15 us | as above (TCP stack-bound, not wire-bound) |
| infiniband-100g | 100 Gbit/s | InfiniBand EDR 4x (IBTA; 25 Gb/s per lane)      | 1.5 us | OSU MPI latency on ConnectX-5 EDR, ~1-1.5 us |
| infiniband-200g | 200 Gbit/s | InfiniBand HDR 4x (IBTA; 50 Gb/s per lane)      | 1.5 us | OSU MPI latency on ConnectX-6 HDR, ~1 us |
| nvlink (V100) | 150 GB/s     | NVIDIA Tesla V100 whitepaper: 6 NVLink2 links, 300 GB/s total bidirectional | 5 us | NCCL per-step launch/protocol latency, a few us |
| nvlink-a100   | 300 GB/s     | NVIDIA A100 datasheet: NVLink3 600 GB/s total bidirectional | 5 us | as above |
| nvlink-h100   | 450 GB/s     | NVIDIA H100 datasheet: NVLink4 900 GB/s total bidirectional | 5 us | as above |
| pcie3         | 15.75 GB/s   | PCIe 3.0 x16: 8 GT/s x 16 lanes x 128/130 / 8   | 5 us | GPU-to-GPU copy latency over PCIe, a few us |
| pcie4         | 31.5 GB/s    | PCIe 4.0 x16: 16 GT/s x 16 lanes x 128/130 / 8  | 5 us | as above |

Two-level presets combine them: ``dgx1-ethernet-10g`` is 8 V100 per node on NVLink, nodes on 10 Gbit/s Ethernet;
``dgx-a100-infiniband-200g`` is 8 A100 per node on NVLink3, nodes on HDR InfiniBand.
A dict may start from a preset and override fields: ``{"preset": "ethernet-10g", "algorithm": "tree"}``, and
may name the intra-node link by preset: ``{"preset": "ethernet-10g", "devices_per_node": 8, "intra": "nvlink"}``.
"""
from __future__ import annotations

from compressors.options import closest
from .network import GBIT, GBYTE, Network

US = 1e-6

PRESETS: dict[str, Network] = {
    "ethernet-1g": Network(alpha=50 * US, bandwidth=1 * GBIT, name="ethernet-1g"),
    "ethernet-10g": Network(alpha=25 * US, bandwidth=10 * GBIT, name="ethernet-10g"),
    "ethernet-25g": Network(alpha=20 * US, bandwidth=25 * GBIT, name="ethernet-25g"),
    "ethernet-100g": Network(alpha=15 * US, bandwidth=100 * GBIT, name="ethernet-100g"),
    "infiniband-100g": Network(alpha=1.5 * US, bandwidth=100 * GBIT, name="infiniband-100g"),
    "infiniband-200g": Network(alpha=1.5 * US, bandwidth=200 * GBIT, name="infiniband-200g"),
    "nvlink": Network(alpha=5 * US, bandwidth=150 * GBYTE, name="nvlink"),
    "nvlink-a100": Network(alpha=5 * US, bandwidth=300 * GBYTE, name="nvlink-a100"),
    "nvlink-h100": Network(alpha=5 * US, bandwidth=450 * GBYTE, name="nvlink-h100"),
    "pcie3": Network(alpha=5 * US, bandwidth=15.75 * GBYTE, name="pcie3"),
    "pcie4": Network(alpha=5 * US, bandwidth=31.5 * GBYTE, name="pcie4"),
}


def _two_level(name: str, inter: str, intra: str, devices_per_node: int) -> Network:
    link = PRESETS[intra]
    return PRESETS[inter].with_(devices_per_node=devices_per_node, intra_alpha=link.alpha,
                                intra_bandwidth=link.bandwidth, name=name)


PRESETS["dgx1-ethernet-10g"] = _two_level("dgx1-ethernet-10g", "ethernet-10g", "nvlink", 8)
PRESETS["dgx-a100-infiniband-200g"] = _two_level("dgx-a100-infiniband-200g", "infiniband-200g", "nvlink-a100", 8)


def preset(name: str) -> Network:
    if not isinstance(name, str) or name not in PRESETS:
        hint = closest(name, PRESETS) if isinstance(name, str) else ""
        raise ValueError(f"network: preset={name!r} is invalid{hint}; allowed: {', '.join(PRESETS)}")
    return PRESETS[name]


def resolve_network(value) -> Network:
    """A Network, a preset name, a path to a saved JSON Network (``*.json``), or a dict (Network fields,
    optionally ``preset`` to start from and ``intra`` naming the intra-node link by preset)."""
    if isinstance(value, Network):
        return value
    if isinstance(value, str):
        if value.endswith(".json"):
            try:
                return Network.load(value)
            except (OSError, ValueError) as error:  # missing, unreadable, not JSON (or nested too deep), bad fields
                raise ValueError(f"network: network={value!r} is invalid; allowed: a readable JSON Network file "
                                 f"({type(error).__name__}: {error})") from error
        return preset(value)
    if isinstance(value, dict):
        data = dict(value)
        base = preset(data.pop("preset")).to_dict() if "preset" in data else {}
        if "intra" in data:
            link = preset(data.pop("intra"))
            base.update(intra_alpha=link.alpha, intra_bandwidth=link.bandwidth)
        base.update(data)
        return Network.from_dict(base)
    raise ValueError(f"network: network={value!r} is invalid; allowed: a Network, a preset name "
                     f"({', '.join(PRESETS)}), a .json path, or a dict of Network fields")
