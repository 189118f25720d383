"""Layer-local calibration: each layer's compressor learns from the frozen model's own activations.

The frozen model reads a sample once with full attention (``teacher``), which gives every
layer's queries, keys and values (after RoPE) and its attention output over the whole history.
Each layer then replays the chunked reading on its own (``replay``): its cache of M slots is
filled and compressed chunk after chunk by its lococo compressor exactly as longctx does
(entries [slots ; window], scores = the attention this chunk's queries paid), and each chunk's
queries attend over [slots ; window]. The loss is the relative squared error of the
o_proj'd attention output over the compressed cache against the output over the uncompressed
history, summed over the chunks that read a compressed cache:

    err_l = sum_t |(o_t - o*_t) W_o|^2 / sum_t |o*_t W_o|^2,    loss = mean_l err_l.

No MLP, no other layer and no vocabulary projection take part, so one step costs about one
forward pass of the frozen model plus attention over [M + B] entries per chunk; layers are
independent given the teacher, so the gradient of err_l reaches only layer l's compressor.
End-to-end training (the language-model or distillation loss, train.step) then starts from
the layer-local compressors (``init_compressors``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lococo_jax import llama
from lococo_jax.config import CompressionConfig, LlamaConfig
from lococo_jax.policies import lococo
from lococo_jax.policies.base import Entries

# XLA:CPU runs these loops several times slower as lax.scan than unrolled (SmolLM2, 1K tokens,
# loss and gradient: 55 s with scans over layers and chunks, 16 s unrolled), at the price of
# a longer compile (about 15 min on 2 busy cores).
UNROLL = True


class Teacher(NamedTuple):
    """The frozen model's activations over a sample, per layer (stacked on L).

    q, o [L, b, T, heads, hd] (o: attention output over the whole causal history);
    k, v [L, b, T, kv_heads, hd]; k and q after RoPE."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    o: jax.Array


def teacher(params: dict[str, Any], tokens: jax.Array, cfg: LlamaConfig, lora_scale: float = 1.0):
    """Full causal attention over tokens [b, T], keeping each layer's q, k, v and output.
    No gradient flows into the result."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

    def layer(x, xs):
        lp, ll = xs
        q, k, v = llama.qkv(cfg, lp, x, positions, ll, lora_scale)
        out = llama.full_causal_attention(cfg, q, k, v, "flash")  # no [T, T] probabilities
        return llama.attn_out_and_mlp(cfg, lp, x, out, ll, lora_scale), Teacher(q, k, v, out)

    _, acts = jax.lax.scan(
        layer, llama.embed(params, tokens), (params["layers"], params.get("lora"))
    )
    return jax.tree.map(jax.lax.stop_gradient, acts)


class _Cache(NamedTuple):
    """One layer's slots: k, v [b, kv, n, hd]; pos, score [b, kv, n] (n = filled, static)."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    score: jax.Array


def _pad(x: jax.Array, n: int, value: float | int = 0) -> jax.Array:
    """Pad the entry axis (2) of x [b, kv, S, ...] to n entries with ``value``."""
    widths = [(0, 0)] * x.ndim
    widths[2] = (0, n - x.shape[2])
    return jnp.pad(x, widths, constant_values=value)


def _chunk(
    cfg: LlamaConfig,
    ccfg: CompressionConfig,
    cp: Any,
    cache: _Cache,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    start: jax.Array | int,
) -> tuple[jax.Array, _Cache]:
    """One chunk of B queries over [slots ; window], then the next slots.

    q [b, B, heads, hd]; k, v [b, B, kv, hd]; start: the chunk's first position.
    Returns (attention output [b, B, heads, hd], the next cache)."""
    b, B = q.shape[:2]
    M, filled = ccfg.cache_size, cache.k.shape[2]
    kw, vw = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv, B, hd]
    keys = jnp.concatenate([cache.k, kw.astype(cache.k.dtype)], axis=2)
    vals = jnp.concatenate([cache.v, vw.astype(cache.v.dtype)], axis=2)
    causal = jnp.arange(B)[:, None] >= jnp.arange(B)[None, :]
    mask = jnp.concatenate([jnp.ones((B, filled), bool), causal], axis=1)
    out, probs = llama.attend(
        cfg,
        q,
        keys.transpose(0, 2, 1, 3).astype(q.dtype),
        vals.transpose(0, 2, 1, 3).astype(q.dtype),
        jnp.broadcast_to(mask, (b, B, filled + B)),
    )
    chunk_score = probs.sum(axis=(2, 3))  # [b, kv, filled + B]
    kvh = keys.shape[1]
    win_pos = jnp.broadcast_to(start + jnp.arange(B, dtype=jnp.int32), (b, kvh, B))
    pos = jnp.concatenate([cache.pos, win_pos], axis=2)
    acc = jnp.concatenate([cache.score, jnp.zeros((b, kvh, B), jnp.float32)], axis=2) + chunk_score
    n_valid = filled + B
    if n_valid <= M:  # the slots simply fill up (longctx's _append)
        return out, _Cache(keys, vals, pos, acc)
    S = M + B
    e = Entries(
        k=_pad(keys, S),
        v=_pad(vals, S),
        pos=_pad(pos, S, -1),
        valid=jnp.broadcast_to(jnp.arange(S) < n_valid, (b, kvh, S)),
        acc=_pad(acc, S),
        chunk=_pad(chunk_score, S),
        last=jnp.zeros((b, S), jnp.float32),
        n_valid=jnp.full((b,), n_valid, jnp.int32),
    )
    s = lococo.compress(ccfg, cp, e)
    return out, _Cache(s.k, s.v, s.pos, s.score)


def replay(
    cfg: LlamaConfig,
    ccfg: CompressionConfig,
    cp: Any,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    o: jax.Array,
    wo: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """One layer's chunked reading over its teacher activations (see the module docstring).

    q, o [b, T, heads, hd]; k, v [b, T, kv, hd]; wo [heads * hd, hidden]; cp: this layer's
    compressor. T must be a multiple of B = ccfg.chunk_size. Returns (sum over the chunks that
    read a compressed cache of |(o_c - o) W_o|^2, the same sum of |o W_o|^2, the final slots
    k, v [b, kv, M, hd] and pos [b, kv, M], as longctx's state holds them after T tokens)."""
    b, T, H, hd = q.shape
    B = ccfg.chunk_size
    n = T // B
    kvh = k.shape[2]
    cache = _Cache(
        jnp.zeros((b, kvh, 0, hd), k.dtype),
        jnp.zeros((b, kvh, 0, hd), v.dtype),
        jnp.zeros((b, kvh, 0), jnp.int32),
        jnp.zeros((b, kvh, 0), jnp.float32),
    )
    sl = lambda x, c: x[:, c * B : (c + 1) * B]  # noqa: E731

    def err(out, ref):
        d = (out - ref).reshape(b, B, H * hd).astype(jnp.float32) @ wo.astype(jnp.float32)
        r = ref.reshape(b, B, H * hd).astype(jnp.float32) @ wo.astype(jnp.float32)
        return jnp.sum(d * d), jnp.sum(r * r)

    # The cache fills (static shapes differ per chunk) until the first compression ...
    c, compressed = 0, False
    while c < n and not compressed:
        compressed = cache.k.shape[2] + B > ccfg.cache_size
        _, cache = _chunk(cfg, ccfg, cp, cache, sl(q, c), sl(k, c), sl(v, c), c * B)
        c += 1
    if c >= n:
        raise ValueError(
            f"a sample of {T} tokens never reads a compressed cache of {ccfg.cache_size} slots "
            f"in chunks of {B}; use longer samples"
        )

    # ... then every chunk reads M compressed slots: one scan with fixed shapes.
    def body(cache, xs):
        qc, kc, vc, oc, start = xs
        out, cache = _chunk(cfg, ccfg, cp, cache, qc, kc, vc, start)
        return cache, err(out, oc)

    def chunks(x):  # [b, T, ...] -> [n - c, b, B, ...]
        x = x[:, c * B :].reshape((b, n - c, B) + x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    starts = B * jnp.arange(c, n, dtype=jnp.int32)
    xs = (chunks(q), chunks(k), chunks(v), chunks(o), starts)
    cache, (num, den) = jax.lax.scan(body, cache, xs, unroll=UNROLL)
    return num.sum(), den.sum(), (cache.k, cache.v, cache.pos)


def loss(
    params: dict[str, Any],
    tokens: jax.Array,
    cfg: LlamaConfig,
    ccfg: CompressionConfig,
    *,
    lora_scale: float = 1.0,
    remat: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Mean over layers of the relative error above. tokens [b, T] (T a multiple of B; ids
    < 0 read as 0); params: the merged model with params["lococo"]. Returns (loss, the
    per-layer relative errors [L])."""
    acts = teacher(params, jnp.maximum(tokens, 0), cfg, lora_scale)
    fn = lambda cp, q, k, v, o, wo: replay(cfg, ccfg, cp, q, k, v, o, wo)[:2]  # noqa: E731
    if remat:
        fn = jax.checkpoint(fn)

    xs = (params["lococo"], acts.q, acts.k, acts.v, acts.o, params["layers"]["wo"])
    if UNROLL:
        per = [fn(*jax.tree.map(lambda x, i=i: x[i], xs)) for i in range(cfg.num_hidden_layers)]
        num, den = jnp.stack([p[0] for p in per]), jnp.stack([p[1] for p in per])
    else:
        _, (num, den) = jax.lax.scan(lambda _, x: (None, fn(*x)), None, xs)
    per_layer = num / jnp.maximum(den, 1e-30)
    return per_layer.mean(), per_layer
