"""Environment for subprocess workers that run on fake CPU devices; import before jax.

XLA's CPU collectives abort the process when one device thread reaches a collective more than
20 + 40 s after another (warn-stuck, then terminate timeouts). On a 2-core CI runner with a
second pytest worker busy, 8 device threads can lag that much (CI, 2026-12-05: an all-gather in
the Pallas-interpret step of _mesh_worker.py). The test's own subprocess timeout bounds the run.
"""

import os

COLLECTIVE_TIMEOUT_S = 900


def use_fake_cpu_devices(n: int) -> None:
    """Set XLA_FLAGS and JAX_PLATFORMS for ``n`` fake CPU devices; call before importing jax."""
    os.environ["XLA_FLAGS"] = " ".join(
        [
            f"--xla_force_host_platform_device_count={n}",
            "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120",
            f"--xla_cpu_collective_call_terminate_timeout_seconds={COLLECTIVE_TIMEOUT_S}",
        ]
    )
    os.environ["JAX_PLATFORMS"] = "cpu"  # fake CPU devices, also on a host with a GPU
