"""StreamingLLM: keep the first ``sink`` tokens and the most recent M - sink."""

from __future__ import annotations

import jax.numpy as jnp

from lococo_jax.config import CompressionConfig
from lococo_jax.policies.base import Entries, Slots, gather, mask_to_sorted_idx, recent_mask


def compress(ccfg: CompressionConfig, params, e: Entries) -> Slots:
    del params
    M = ccfg.cache_size
    sinks = jnp.arange(e.valid.shape[-1]) < ccfg.sink
    keep = (sinks | recent_mask(e, M - ccfg.sink)) & e.valid
    return gather(e, mask_to_sorted_idx(keep, M))
