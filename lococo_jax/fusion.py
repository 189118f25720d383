"""The LoCoCo policy's fusion call (DESIGN.md steps 5 and A K, A V), per shard under a mesh.

``fuse_rest`` runs kernels.lococo_fusion.conv_softmax_mix on the non-heavy-hitter entries of
every (batch element, KV head). Each such row is mixed on its own (the conv weights are shared,
replicated), so under a mesh the rows are split as the KV state is (batch over data x fsdp, KV
heads over tensor, see sharding.RULES) and the kernel runs on each device's own rows inside a
``shard_map``: a Pallas call is opaque to GSPMD, which would otherwise gather its operands and
run the whole kernel on every device.

The kernel is built for the platform of the devices the computation is compiled for:
``ccfg.fusion_platform`` when set (the training builder and experiments/aot_compile.py set it
from the mesh with platforms.platform_of), else the platform of the mesh set with
``jax.set_mesh``, else the default backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kernels.lococo_fusion import conv_softmax_mix
from lococo_jax import platforms, sharding
from lococo_jax.config import CompressionConfig


def fusion_platform(ccfg: CompressionConfig) -> str:
    """The platform the fusion kernel is built for (see the module docstring)."""
    return ccfg.fusion_platform or platforms.context_platform() or jax.default_backend()


def row_specs(mesh: jax.sharding.AbstractMesh, b: int, h: int) -> tuple[P, P]:
    """(spec of [b, h, ...] rows, spec of [b]) on ``mesh``: batch over data x fsdp and KV heads
    over tensor where they divide, replicated where not."""
    sizes = {a: s for a, s in mesh.shape.items() if a in sharding.AXES}
    spec = sharding.logical_to_spec(
        ("batch", "kv_heads"), (b, h), sizes, "fusion rows", replicate_indivisible=True
    )
    return P(spec[0], spec[1]), P(spec[0])


def fuse_rest(
    ccfg: CompressionConfig,
    k: jax.Array,
    v: jax.Array,
    layers: Sequence[tuple[jax.Array, jax.Array]],
    n_valid: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """k, v: [b, kv_heads, N, d] (the rest entries, valid ones first); layers: the conv
    [(w [ksize, cin, cout], b [cout])]; n_valid: [b] valid rest entries per batch element
    (clamped to >= 1). Returns (A k, A v), each [b, kv_heads, C, d] in k's dtype."""
    platform = fusion_platform(ccfg)
    b, h, n, d = k.shape

    def mix(k, v, layers, n_valid):  # on one shard: [bl, hl, N, d]
        bl, hl = k.shape[:2]
        ok, ov = conv_softmax_mix(
            k.reshape(bl * hl, n, d),
            v.reshape(bl * hl, n, d),
            layers,
            jnp.repeat(jnp.maximum(n_valid, 1), hl),
            activation=ccfg.activation,
            impl=ccfg.fusion_impl,  # 'auto': Pallas on a GPU/TPU target for one conv layer
            platform=platform,
        )
        c = ok.shape[1]
        return ok.reshape(bl, hl, c, d), ov.reshape(bl, hl, c, d)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.manual_axes:  # no mesh, or already inside a shard_map
        return mix(k, v, layers, n_valid)
    rows, batch = row_specs(mesh, b, h)
    # Even when nothing divides (rows replicated, every device mixes all of them): a compiled
    # Mosaic call cannot be partitioned by GSPMD, only placed inside a shard_map.
    # check_vma=False: a Pallas call has no replication rule; the conv weights' cotangent is
    # still summed over the shards by shard_map's transpose (they are replicated inputs).
    return jax.shard_map(
        mix,
        mesh=mesh,
        in_specs=(rows, rows, P(), batch),
        out_specs=(rows, rows),
        check_vma=False,
    )(k, v, list(layers), n_valid)
