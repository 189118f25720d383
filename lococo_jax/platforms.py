"""Which platform a computation targets, and the public figures of the TPU chips it may run on.

The platform of a run is the platform of the devices it is compiled for (a mesh's devices, an
ahead-of-time topology's devices), not the host's default backend: a CPU host lowering for a
TPU slice must put the compiled Pallas kernel in the program, not the interpreted one. The
training builder and experiments/aot_compile.py call ``platform_of`` and set
``CompressionConfig.fusion_platform`` from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import jax

PLATFORMS = ("cpu", "gpu", "tpu")


def normalize_platform(name: str) -> str:
    """'cuda' and 'rocm' (jax's GPU platform names) -> 'gpu'; 'cpu', 'gpu', 'tpu' unchanged."""
    name = "gpu" if name in ("cuda", "rocm") else name
    if name not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS} (or cuda, rocm), got {name!r}")
    return name


def platform_of(target: Any) -> str:
    """The platform ('cpu' | 'gpu' | 'tpu') of a Mesh, an AbstractMesh, a device or a list of
    devices. All devices must share it (a mesh spanning platforms is an error)."""
    if isinstance(target, jax.sharding.AbstractMesh):
        return normalize_platform(target.abstract_device.platform)
    if isinstance(target, jax.sharding.Mesh):
        devices: Iterable[Any] = target.devices.flat
    elif hasattr(target, "platform"):
        devices = [target]
    else:
        devices = list(target)
    found = {normalize_platform(d.platform) for d in devices}
    if len(found) != 1:
        raise ValueError(f"devices must share one platform, got {sorted(found) or 'none'}")
    return found.pop()


def context_platform() -> str | None:
    """The platform of the mesh set with ``jax.set_mesh`` (None when no mesh is set or it names
    no devices)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.abstract_device is None:
        return None
    return normalize_platform(mesh.abstract_device.platform)


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """Per-chip figures. hbm_bytes: HBM capacity; peak_bf16_flops: dense bf16 FLOP/s;
    hbm_bw: HBM bytes/s; cores: TensorCores per chip (one jax device per chip, megacore)."""

    name: str
    device_kind: str  # jax's Device.device_kind
    hbm_bytes: int
    peak_bf16_flops: float
    hbm_bw: float
    cores: int = 1


GiB, GB = 1024**3, 1000**3
# Public figures from Google Cloud's TPU system architecture pages
# (https://cloud.google.com/tpu/docs/v4, .../v5e, .../v5p, .../v6e), per chip:
#   v4:  275 TFLOPs bf16, 32 GiB HBM2, 1200 GBps
#   v5e: 197 TFLOPs bf16, 16 GB HBM2, 819 GBps
#   v5p: 459 TFLOPs bf16, 95 GB HBM2e, 2765 GBps
#   v6e: 918 TFLOPs bf16, 32 GB HBM, 1638 GBps (Trillium)
# The pages write GB for the v5e/v5p/v6e capacities; the memory XLA can allocate is what
# compiled.memory_analysis() is compared with, so we take the binary reading (16 GiB etc.),
# which is what the runtime reports as bytes_limit on those chips (less a small reserve).
CHIPS: dict[str, ChipSpec] = {
    "v4": ChipSpec("v4", "TPU v4", 32 * GiB, 275e12, 1200 * GB, cores=2),
    "v5e": ChipSpec("v5e", "TPU v5 lite", 16 * GiB, 197e12, 819 * GB),
    "v5p": ChipSpec("v5p", "TPU v5", 95 * GiB, 459e12, 2765 * GB, cores=2),
    "v6e": ChipSpec("v6e", "TPU v6 lite", 32 * GiB, 918e12, 1638 * GB),
}


def chip_of(device: Any) -> ChipSpec:
    """The ChipSpec of a TPU device (by its device_kind)."""
    for spec in CHIPS.values():
        if device.device_kind == spec.device_kind:
            return spec
    raise ValueError(f"no chip figures for device_kind {device.device_kind!r}; known: {CHIPS}")
