"""What every compression policy receives and returns, and the selection helpers they share.

A policy maps the S = M + W entries of one layer (M cache slots then W raw-window entries,
compacted so the n_valid valid ones come first, in original order) to the next M slots.
It is only called when n_valid > M; below that the slots simply fill up.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Entries(NamedTuple):
    """One layer's candidate entries; S = M + W.

    k, v     [batch, kv_heads, S, head_dim]   (invalid entries are zero)
    pos      [batch, kv_heads, S] int32       original positions
    valid    [batch, kv_heads, S] bool        exactly the first n_valid entries
    acc      [batch, kv_heads, S] f32         attention received over the whole history (H2O)
    chunk    [batch, kv_heads, S] f32         attention paid by the queries since the last
                                              compression, summed over queries and group heads
    last     [batch, S] f32                   attention of the last query, mean over all heads
    n_valid  [batch] int32
    obs      [batch, kv_heads, S] f32         attention paid by the last ccfg.snapkv_window
                                              valid queries of the call that compresses (all
                                              of them if fewer), summed over queries and group
                                              heads: SnapKV's observation window. None where
                                              the caller does not compute it.
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    valid: jax.Array
    acc: jax.Array
    chunk: jax.Array
    last: jax.Array
    n_valid: jax.Array
    obs: jax.Array | None = None


class Slots(NamedTuple):
    """The next M slots: k, v [batch, kv_heads, M, head_dim]; pos, score [batch, kv_heads, M]."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    score: jax.Array


def take(x: jax.Array, idx: jax.Array) -> jax.Array:
    """Gather along the entry axis (2): x [b, h, S, ...], idx [b, h, n] -> [b, h, n, ...]."""
    if x.ndim == idx.ndim:
        return jnp.take_along_axis(x, idx, axis=2)
    return jnp.take_along_axis(x, idx[..., None], axis=2)


def mask_to_sorted_idx(mask: jax.Array, n: int) -> jax.Array:
    """Indices of the True entries in original order: mask [b, h, S] with n Trues -> [b, h, n]."""
    return jnp.argsort(~mask, axis=-1, stable=True)[..., :n].astype(jnp.int32)


def top_mask(scores: jax.Array, candidates: jax.Array, n: int) -> jax.Array:
    """Mask of the n highest-scoring candidates (ties: lower index first). [b, h, S] -> bool."""
    if n <= 0:
        return jnp.zeros(scores.shape, bool)
    masked = jnp.where(candidates, scores, -jnp.inf)
    _, idx = jax.lax.top_k(masked, n)
    hit = jnp.zeros(scores.shape, bool)
    return jnp.put_along_axis(hit, idx, True, axis=-1, inplace=False)


def recent_mask(e: Entries, n: int) -> jax.Array:
    """The last n valid entries: [b, h, S] bool. The most recent by position only where the
    slots are kept in position order (streaming, h2o); see latest_mask otherwise."""
    i = jnp.arange(e.valid.shape[-1])
    nv = e.n_valid[:, None, None]
    return (i >= nv - n) & (i < nv)


def latest_mask(e: Entries, n: int) -> jax.Array:
    """The n valid entries with the highest positions (the most recent tokens), whatever the
    order the slots are stored in: [b, h, S] bool. Positions are distinct, so no ties."""
    if n <= 0:
        return jnp.zeros(e.valid.shape, bool)
    _, idx = jax.lax.top_k(jnp.where(e.valid, e.pos, -1), n)
    hit = jnp.put_along_axis(jnp.zeros(e.valid.shape, bool), idx, True, axis=-1, inplace=False)
    return hit & e.valid


def gather(e: Entries, idx: jax.Array) -> Slots:
    """The entries at idx [b, h, M] as slots (score = accumulated attention)."""
    return Slots(take(e.k, idx), take(e.v, idx), take(e.pos, idx), take(e.acc, idx))
