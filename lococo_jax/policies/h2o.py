"""Heavy-Hitter Oracle: the recent ``h2o_recent`` entries plus the entries with the most
attention accumulated over all chunks so far, kept in original order."""

from __future__ import annotations

from lococo_jax.config import CompressionConfig
from lococo_jax.policies.base import (
    Entries,
    Slots,
    gather,
    mask_to_sorted_idx,
    recent_mask,
    top_mask,
)


def compress(ccfg: CompressionConfig, params, e: Entries) -> Slots:
    del params
    M, recent = ccfg.cache_size, ccfg.recent
    local = recent_mask(e, recent)
    heavy = top_mask(e.acc, e.valid & ~local, M - recent)
    return gather(e, mask_to_sorted_idx(local | heavy, M))
