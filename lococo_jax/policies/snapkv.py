"""SnapKV (Li et al. 2024, arXiv 2404.14469): the last ``snapkv_window`` queries of the chunk
(the observation window) score every older entry by the attention they pay it, summed over those
queries and the heads of each KV group; the scores are pooled along the entries (SnapKV's
avg_pool1d / max_pool1d, kernel ``snapkv_kernel``, stride 1, 'same' padding over the scored
entries only) and each KV head keeps its top M - window entries plus the window's own last
``snapkv_window`` entries, in original order.

Read in chunks, this is SnapKV applied at every compression to the entries the cache holds
(slots then the chunk): pooling runs over neighbouring entries, which are neighbouring
positions inside the chunk and the surviving positions among the slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lococo_jax.config import CompressionConfig
from lococo_jax.policies.base import (
    Entries,
    Slots,
    gather,
    mask_to_sorted_idx,
    recent_mask,
    top_mask,
)


def pool(x: jax.Array, kernel: int, how: str) -> jax.Array:
    """Stride-1 'same' pooling along the last axis, padding kernel // 2 on each side: "avg"
    divides by the kernel including the zero padding (torch avg_pool1d's count_include_pad),
    "max" pads with -inf. x [..., S] -> [..., S]."""
    pad = kernel // 2
    fill = 0.0 if how == "avg" else -jnp.inf
    xp = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], constant_values=fill)
    S = x.shape[-1]
    windows = jnp.stack([xp[..., i : i + S] for i in range(kernel)])
    return windows.sum(0) / kernel if how == "avg" else windows.max(0)


def compress(ccfg: CompressionConfig, params, e: Entries) -> Slots:
    del params
    if e.obs is None:
        raise ValueError("snapkv needs Entries.obs (the observation window's attention)")
    M, w = ccfg.cache_size, ccfg.snapkv_window
    window = recent_mask(e, w)
    scored = e.valid & ~window
    fill = 0.0 if ccfg.snapkv_pooling == "avg" else -jnp.inf
    pooled = pool(jnp.where(scored, e.obs, fill), ccfg.snapkv_kernel, ccfg.snapkv_pooling)
    keep = window | top_mask(pooled, scored, M - w)
    return gather(e, mask_to_sorted_idx(keep, M))
