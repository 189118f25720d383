"""KeyDiff (Park et al. 2025, arXiv 2504.15364): keep the entries whose keys are least similar
to the anchor, the mean of the unit-normalised valid keys of each KV head (score = -cosine
similarity to it, as kvpress's KeyDiffPress).

Why this second baseline: it was designed for block-wise (chunked) prompt processing under a
fixed cache, which is exactly how this project reads, and it needs no attention scores, so it
is the strongest training-free method here that does not depend on which queries a chunk holds
(expected attention, the other strong kvpress press, needs query statistics the cache does not
carry). It has no hyper-parameter.
"""

from __future__ import annotations

import jax.numpy as jnp

from lococo_jax.config import CompressionConfig
from lococo_jax.policies.base import Entries, Slots, gather, mask_to_sorted_idx, top_mask

EPS = 1e-8  # torch cosine_similarity's eps


def scores(e: Entries) -> jnp.ndarray:
    """-cos(k, anchor) per entry: [b, h, S] (invalid entries get -inf)."""
    k = e.k.astype(jnp.float32)
    norm = jnp.linalg.norm(k, axis=-1, keepdims=True)
    unit = jnp.where(e.valid[..., None], k / jnp.maximum(norm, 1e-12), 0.0)
    n = jnp.maximum(e.n_valid, 1).astype(jnp.float32)[:, None, None, None]
    anchor = unit.sum(axis=2, keepdims=True) / n  # [b, h, 1, d]
    cos = (k * anchor).sum(-1) / jnp.maximum(norm[..., 0] * jnp.linalg.norm(anchor, axis=-1), EPS)
    return jnp.where(e.valid, -cos, -jnp.inf)


def compress(ccfg: CompressionConfig, params, e: Entries) -> Slots:
    del params
    keep = top_mask(scores(e), e.valid, ccfg.cache_size)
    return gather(e, mask_to_sorted_idx(keep, ccfg.cache_size))
