"""TOVA: keep the M entries the last query attended to most (mean over all heads of the layer),
so every KV head keeps the same positions."""

from __future__ import annotations

import jax.numpy as jnp

from lococo_jax.config import CompressionConfig
from lococo_jax.policies.base import Entries, Slots, gather, mask_to_sorted_idx, top_mask


def compress(ccfg: CompressionConfig, params, e: Entries) -> Slots:
    del params
    last = jnp.broadcast_to(e.last[:, None, :], e.valid.shape)
    keep = top_mask(last, e.valid, ccfg.cache_size)
    return gather(e, mask_to_sorted_idx(keep, ccfg.cache_size))
