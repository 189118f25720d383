"""A functional Llama: params are a plain pytree, every function is pure and jit-able.

Params layout (layers stacked on a leading axis L so a ``lax.scan`` runs over them):
    embed            [vocab, hidden]
    layers.attn_norm [L, hidden]          layers.mlp_norm [L, hidden]
    layers.wq        [L, hidden, heads*head_dim]      (bq [L, heads*head_dim] if attention_bias)
    layers.wk, wv    [L, hidden, kv_heads*head_dim]   (bk, bv)
    layers.wo        [L, heads*head_dim, hidden]      (bo [L, hidden])
    layers.w_gate, w_up [L, hidden, intermediate]     layers.w_down [L, intermediate, hidden]
    final_norm       [hidden]
    lm_head          [hidden, vocab]   (absent when tie_word_embeddings)
Optional sibling subtrees: ``lora`` (adapters on q/k/v/o, see lococo_jax.lora) and ``lococo``
(the compressors, see lococo_jax.policies.lococo); the base model never reads the latter.

This module holds the layer maths; ``forward`` is full causal attention over the whole input.
The chunked, compressed-cache path is lococo_jax.longctx, built from the same pieces.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lococo_jax.config import LlamaConfig
from lococo_jax.rope import apply_rope, cos_sin

Params = dict[str, Any]
NEG_INF = -1e30  # finite: a fully masked (padding) row stays NaN-free; exp underflows to exactly 0
LORA_TARGETS = ("wq", "wk", "wv", "wo")


def rms_norm(x: jnp.ndarray, weight: jnp.ndarray, eps: float) -> jnp.ndarray:
    """x: [..., hidden]; normalised in fp32, then scaled in the input dtype (as HF does)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def linear(x: jnp.ndarray, lp: Params, name: str, lora: Params | None, lora_scale: float):
    """x @ W (+ b) (+ LoRA: scale * (x @ A) @ B). lp holds one layer's params."""
    y = x @ lp[name]
    bias = "b" + name[1:]
    if bias in lp:
        y = y + lp[bias]
    if lora is not None and name in lora:
        y = y + ((x @ lora[name]["a"]) @ lora[name]["b"]) * lora_scale
    return y


def qkv(
    cfg: LlamaConfig,
    lp: Params,
    x: jnp.ndarray,
    positions: jnp.ndarray,
    lora: Params | None = None,
    lora_scale: float = 1.0,
):
    """Pre-norm x: [batch, T, hidden] -> q [batch, T, heads, hd], k, v [batch, T, kv_heads, hd].

    RoPE is applied to q and k at ``positions`` [batch, T] (keys are cached after RoPE)."""
    b, t, _ = x.shape
    h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
    q = linear(h, lp, "wq", lora, lora_scale).reshape(b, t, cfg.num_attention_heads, cfg.head_dim)
    k = linear(h, lp, "wk", lora, lora_scale).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
    v = linear(h, lp, "wv", lora, lora_scale).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
    cos, sin = cos_sin(cfg, positions)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def attend(
    cfg: LlamaConfig, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Grouped-query attention with explicit probabilities (the policies need them).

    q: [batch, T, heads, hd]; k, v: [batch, S, kv_heads, hd]; mask: [batch, T, S] bool.
    Returns out [batch, T, heads, hd] and probs [batch, kv_heads, group, T, S] (fp32).
    """
    return attend_parts(cfg, q, [k.transpose(0, 2, 1, 3)], [v.transpose(0, 2, 1, 3)], mask)


def attend_parts(
    cfg: LlamaConfig,
    q: jnp.ndarray,
    ks: Sequence[jnp.ndarray],
    vs: Sequence[jnp.ndarray],
    mask: jnp.ndarray,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``attend`` over keys held in consecutive parts in the KV cache's own layout, each
    k_i, v_i [batch, kv_heads, S_i, hd] (cast to q's dtype), so a cache is read where it lies,
    never concatenated or transposed. mask [batch, T, S] with S = sum S_i, the parts in order.
    Returns out [batch, T, heads, hd] and probs [batch, kv_heads, group, T, S] (fp32)."""
    b, t, _, hd = q.shape
    qg = q.reshape(b, t, cfg.num_key_value_heads, cfg.q_per_kv, hd)
    f32 = jnp.float32
    parts = [
        jnp.einsum("btkgd,bksd->bkgts", qg, k.astype(q.dtype), preferred_element_type=f32)
        for k in ks
    ]
    logits = jnp.concatenate(parts, axis=-1)
    logits = logits / jnp.sqrt(jnp.float32(hd))
    logits = jnp.where(mask[:, None, None], logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1)
    ends = np.cumsum([k.shape[2] for k in ks])[:-1].tolist()
    out = sum(
        jnp.einsum("bkgts,bksd->btkgd", p.astype(q.dtype), v.astype(q.dtype))
        for p, v in zip(jnp.split(probs, ends, axis=-1), vs, strict=True)
    )
    return out.reshape(b, t, cfg.num_attention_heads, hd), probs


ATTENTION = ("flash", "explicit", "dot_product_attention")


def causal_attention(
    cfg: LlamaConfig, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, block: int = 512
) -> jnp.ndarray:
    """Causal grouped-query attention in blocks, flash style: no [T, T] probability tensor.

    q: [batch, T, heads, hd]; k, v: [batch, T, kv_heads, hd] -> out [batch, T, heads, hd].
    Query blocks run one at a time (lax.map); each folds in the key blocks up to its diagonal
    with a running max and sum (online softmax), and skips those above it (lax.cond), so work
    and memory are those of the causal half in tiles of [group * block, block]. The loops have
    static trip counts, so the function is reverse-differentiable. The logits are fp32 and
    scaled after the dot, as in ``attend``; T need not divide by block (padded, masked keys)."""
    b, t, h, hd = q.shape
    kv, g = cfg.num_key_value_heads, cfg.q_per_kv
    blk = min(block, t)
    n = -(-t // blk)
    pad = n * blk - t
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    # Rows of a query tile are (group head, position): one batched matmul per (row, kv head).
    qb = q.reshape(b, n, blk, kv, g, hd).transpose(1, 0, 3, 4, 2, 5).reshape(n, b, kv, g * blk, hd)
    kb = k.reshape(b, n, blk, kv, hd).transpose(1, 0, 3, 2, 4)  # [n, b, kv, blk, hd]
    vb = v.reshape(b, n, blk, kv, hd).transpose(1, 0, 3, 2, 4)
    row_t = jnp.tile(jnp.arange(blk, dtype=jnp.int32), g)  # tile row -> position in block
    scale = 1.0 / jnp.sqrt(jnp.float32(hd))

    def q_block(i):
        qi = qb[i]
        qpos = i * blk + row_t

        def fold(j, carry):
            m, s, acc = carry
            logits = jnp.einsum("bkqd,bksd->bkqs", qi, kb[j], preferred_element_type=jnp.float32)
            kpos = j * blk + jnp.arange(blk, dtype=jnp.int32)
            logits = jnp.where(kpos[None, :] <= qpos[:, None], logits * scale, NEG_INF)
            m_new = jnp.maximum(m, logits.max(axis=-1))
            p = jnp.exp(logits - m_new[..., None])
            corr = jnp.exp(m - m_new)
            pv = jnp.einsum(
                "bkqs,bksd->bkqd", p.astype(vb.dtype), vb[j], preferred_element_type=jnp.float32
            )
            return m_new, s * corr + p.sum(axis=-1), acc * corr[..., None] + pv

        def step(j, carry):  # key blocks past the diagonal hold no visible key
            return jax.lax.cond(j <= i, fold, lambda _, c: c, j, carry)

        init = (
            jnp.full((b, kv, g * blk), -jnp.inf, jnp.float32),
            jnp.zeros((b, kv, g * blk), jnp.float32),
            jnp.zeros((b, kv, g * blk, hd), jnp.float32),
        )
        _, s, acc = jax.lax.fori_loop(0, n, step, init)
        return (acc / s[..., None]).astype(q.dtype)

    out = jax.lax.map(q_block, jnp.arange(n))  # [n, b, kv, g * blk, hd]
    out = out.reshape(n, b, kv, g, blk, hd).transpose(1, 0, 4, 2, 3, 5)
    return out.reshape(b, n * blk, h, hd)[:, :t]


def full_causal_attention(
    cfg: LlamaConfig, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, attention: str = "flash"
) -> jnp.ndarray:
    """Causal attention over the whole input by a named implementation (see ATTENTION):
    "flash" (causal_attention), "explicit" (``attend`` with the [T, T] fp32 probabilities),
    "dot_product_attention" (jax.nn.dot_product_attention, XLA). Shapes as causal_attention."""
    if attention == "flash":
        return causal_attention(cfg, q, k, v)
    if attention == "explicit":
        b, t = q.shape[:2]
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), dtype=bool)), (b, t, t))
        return attend(cfg, q, k, v, mask)[0]
    if attention == "dot_product_attention":
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")


def attn_out_and_mlp(
    cfg: LlamaConfig,
    lp: Params,
    x: jnp.ndarray,
    attn: jnp.ndarray,
    lora: Params | None = None,
    lora_scale: float = 1.0,
) -> jnp.ndarray:
    """Residual stream x [batch, T, hidden] + o_proj(attn [batch, T, heads, hd]), then the MLP."""
    b, t = x.shape[:2]
    x = x + linear(attn.reshape(b, t, -1), lp, "wo", lora, lora_scale)
    h = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
    gate = linear(h, lp, "w_gate", None, 0.0)
    up = linear(h, lp, "w_up", None, 0.0)
    return x + linear(jax.nn.silu(gate) * up, lp, "w_down", None, 0.0)


def embed(params: Params, tokens: jnp.ndarray) -> jnp.ndarray:
    """tokens [batch, T] -> [batch, T, hidden]."""
    return jnp.take(params["embed"], tokens, axis=0)


def lm_head(cfg: LlamaConfig, params: Params, x: jnp.ndarray) -> jnp.ndarray:
    """Final norm and vocabulary projection: [batch, T, hidden] -> logits [batch, T, vocab] fp32."""
    x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    w = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return jnp.einsum("bth,hv->btv", x, w, preferred_element_type=jnp.float32)


def hidden_states(
    params: Params,
    tokens: jnp.ndarray,
    cfg: LlamaConfig,
    *,
    positions: jnp.ndarray | None = None,
    lora_scale: float = 1.0,
    attention: str = "flash",
) -> jnp.ndarray:
    """The decoder stack with full causal attention: tokens [batch, T] -> [batch, T, hidden]
    (before the final norm). ``attention`` names the implementation (see ATTENTION)."""
    b, t = tokens.shape
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    lora = params.get("lora")

    def layer(x, xs):
        lp, ll = xs
        q, k, v = qkv(cfg, lp, x, positions, ll, lora_scale)
        out = full_causal_attention(cfg, q, k, v, attention)
        return attn_out_and_mlp(cfg, lp, x, out, ll, lora_scale), None

    x, _ = jax.lax.scan(layer, embed(params, tokens), (params["layers"], lora))
    return x


def forward(
    params: Params,
    tokens: jnp.ndarray,
    cfg: LlamaConfig,
    *,
    positions: jnp.ndarray | None = None,
    lora_scale: float = 1.0,
    attention: str = "flash",
) -> jnp.ndarray:
    """Full causal attention over the whole input. tokens [batch, T] -> logits [batch, T, vocab].

    attention: "flash" (default: blocked, no [T, T] probabilities), "explicit" (the softmax
    of ``attend``) or "dot_product_attention" (jax.nn's XLA path); see full_causal_attention."""
    x = hidden_states(
        params, tokens, cfg, positions=positions, lora_scale=lora_scale, attention=attention
    )
    return lm_head(cfg, params, x)


def param_shapes(cfg: LlamaConfig) -> dict[str, Any]:
    """The expected shape of every base parameter (used to validate converted checkpoints)."""
    L, D, I = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    qd, kvd = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    layers = {
        "attn_norm": (L, D),
        "wq": (L, D, qd),
        "wk": (L, D, kvd),
        "wv": (L, D, kvd),
        "wo": (L, qd, D),
        "mlp_norm": (L, D),
        "w_gate": (L, D, I),
        "w_up": (L, D, I),
        "w_down": (L, I, D),
    }
    if cfg.attention_bias:
        layers.update(bq=(L, qd), bk=(L, kvd), bv=(L, kvd), bo=(L, D))
    if cfg.mlp_bias:
        layers.update(b_gate=(L, I), b_up=(L, I), b_down=(L, D))
    shapes: dict[str, Any] = {
        "embed": (cfg.vocab_size, D),
        "layers": layers,
        "final_norm": (D,),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (D, cfg.vocab_size)
    return shapes


def init_params(cfg: LlamaConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random params (normal(std) matrices, unit norms, zero biases) in the layout above."""
    shapes = param_shapes(cfg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=lambda s: isinstance(s, tuple)
    )
    keys = jax.random.split(key, len(flat))
    leaves = []
    for (path, shape), k in zip(flat, keys, strict=True):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            leaves.append(jnp.ones(shape, dtype))
        elif "['b" in name:
            leaves.append(jnp.zeros(shape, dtype))
        else:
            leaves.append((std * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def check_tokens(tokens, cfg: LlamaConfig) -> None:
    """Host-side check: token ids must lie in [0, vocab_size) (jnp.take would silently clamp)."""
    import numpy as np

    arr = np.asarray(tokens)
    if arr.size and (arr.min() < 0 or arr.max() >= cfg.vocab_size):
        bad = arr[(arr < 0) | (arr >= cfg.vocab_size)]
        raise ValueError(
            f"token ids out of range [0, {cfg.vocab_size}): found {bad[:5].tolist()} "
            f"(config field 'vocab_size' = {cfg.vocab_size})"
        )
