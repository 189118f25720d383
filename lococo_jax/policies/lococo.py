"""LoCoCo: heavy hitters plus a learned convolutional fusion of the rest (DESIGN.md steps 1-7).

Per layer, per batch element and KV head, over the S = M + W entries with scores s (the
attention this chunk's queries paid to each entry):
  1. C = floor(M (1 - r)) fused slots, keep = M - C heavy-hitter slots;
  2. heavy hitters: the local_len most recent entries by position (slots are stored as
     [heavy ; fused], not in position order) plus the top (keep - local_len) scores of the
     others, in original order;
  3. the other N = S - keep entries in original order ("rest"), with scores s';
  4. R [C, N]: row j one-hot at the j-th (by position) of the C top-scored rest entries;
  5. A = softmax_N(act(conv(concat(K_rest, V_rest))))  [C, N];
  6. W = a A + (1 - a) R, a = mixing_weight(ccfg, params["normalizer"]) (see
     CompressionConfig.normalizer: sigmoid of a free parameter, clipped, or official);
  7. new slots = [heavy hitters ; W K_rest, W V_rest].
Steps 5 and the products A K, A V are kernels.lococo_fusion.conv_softmax_mix (Pallas or its
jnp reference); the one-hot residual is a gather, never a dense matrix.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from lococo_jax.config import CompressionConfig, LlamaConfig
from lococo_jax.fusion import fuse_rest
from lococo_jax.policies.base import (
    Entries,
    Slots,
    latest_mask,
    mask_to_sorted_idx,
    take,
    top_mask,
)


def conv_channels(cfg: LlamaConfig, ccfg: CompressionConfig) -> list[tuple[int, int]]:
    """(in, out) channels of each conv layer: 2d -> C*expand -> ... -> C."""
    C = ccfg.num_fused
    chans = [2 * cfg.head_dim] + [C * ccfg.expand] * (ccfg.n_convlayer - 1) + [C]
    return list(zip(chans[:-1], chans[1:], strict=True))


def init_params(key: jax.Array, cfg: LlamaConfig, ccfg: CompressionConfig) -> dict[str, Any]:
    """One compressor per layer, stacked on L: convs[i].w [L, k, in, out] ~ N(0, 1) (as the
    official code; N(0, 1/(in*k)) with conv_init "fan_in", N(0, 0.01/(in*k)) with "spread"),
    convs[i].b [L, out] ~ U(+-1/sqrt(in*k)) (torch Conv1d's default; 1 with "spread", so the
    near-equal logits sit in relu's linear part), normalizer [L] = the parameter that gives
    a = normalizer_init (normalizer_param)."""
    L, k = cfg.num_hidden_layers, ccfg.kernel_size
    convs = []
    for cin, cout in conv_channels(cfg, ccfg):
        key, kw, kb = jax.random.split(key, 3)
        bound = 1.0 / math.sqrt(cin * k)
        std = {"normal": 1.0, "fan_in": bound, "spread": 0.1 * bound}[ccfg.conv_init]
        w = jax.random.normal(kw, (L, k, cin, cout), jnp.float32) * std
        if ccfg.conv_init == "spread":
            b = jnp.ones((L, cout), jnp.float32)
        else:
            b = jax.random.uniform(kb, (L, cout), jnp.float32, -bound, bound)
        convs.append({"w": w, "b": b})
    a0 = jnp.full((L,), ccfg.normalizer_init, jnp.float32)
    return {"convs": convs, "normalizer": normalizer_param(ccfg, a0)}


def mixing_weight(ccfg: CompressionConfig, param: jax.Array) -> jax.Array:
    """The a of W = a A + (1 - a) R from its stored parameter (any shape)."""
    if ccfg.normalizer == "sigmoid":
        return jax.nn.sigmoid(param)
    if ccfg.normalizer == "clip":
        return jnp.clip(param, 0.0, 1.0)
    return param


def normalizer_param(ccfg: CompressionConfig, a: jax.Array) -> jax.Array:
    """The stored parameter that gives mixing weight a (the inverse of mixing_weight on [0, 1];
    a is clipped to (1e-6, 1 - 1e-6) for the sigmoid)."""
    if ccfg.normalizer == "sigmoid":
        a = jnp.clip(a, 1e-6, 1.0 - 1e-6)
        return jnp.log(a) - jnp.log1p(-a)
    return a


def compress(ccfg: CompressionConfig, params: dict[str, Any], e: Entries) -> Slots:
    """params: this layer's compressor (convs[i].w [k, in, out], .b [out]; normalizer [])."""
    C, keep, local = ccfg.num_fused, ccfg.num_heavy, ccfg.local_len
    b, h, S, d = e.k.shape
    N = S - keep

    # Steps 1-3: heavy hitters and the rest, both in original order.
    local_mask = latest_mask(e, local)
    heavy_mask = local_mask | top_mask(e.chunk, e.valid & ~local_mask, keep - local)
    heavy_idx = mask_to_sorted_idx(heavy_mask, keep)
    rest_idx = mask_to_sorted_idx(~heavy_mask, N)  # valid rest first, then invalid entries
    k_rest, v_rest = take(e.k, rest_idx), take(e.v, rest_idx)
    rest_valid = take(e.valid, rest_idx)

    # Step 4: residual anchors, the C top-scored rest entries in position order.
    anchor = mask_to_sorted_idx(top_mask(take(e.chunk, rest_idx), rest_valid, C), C)

    # Steps 5-7.
    n_rest = (e.n_valid - keep).astype(jnp.int32)
    layers = [(c["w"].astype(jnp.float32), c["b"].astype(jnp.float32)) for c in params["convs"]]
    ak, av = fuse_rest(ccfg, k_rest, v_rest, layers, n_rest)  # per shard under a mesh
    a = mixing_weight(ccfg, params["normalizer"])
    fused_k = a * ak.reshape(b, h, C, d).astype(jnp.float32) + (1 - a) * take(k_rest, anchor)
    fused_v = a * av.reshape(b, h, C, d).astype(jnp.float32) + (1 - a) * take(v_rest, anchor)

    rest_pos, rest_acc = take(e.pos, rest_idx), take(e.acc, rest_idx)
    return Slots(
        k=jnp.concatenate([take(e.k, heavy_idx), fused_k.astype(e.k.dtype)], axis=2),
        v=jnp.concatenate([take(e.v, heavy_idx), fused_v.astype(e.v.dtype)], axis=2),
        pos=jnp.concatenate([take(e.pos, heavy_idx), take(rest_pos, anchor)], axis=2),
        score=jnp.concatenate([take(e.acc, heavy_idx), take(rest_acc, anchor)], axis=2),
    )
