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

from typing import Any

import jax
import jax.numpy as jnp

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
    b, t, _, hd = q.shape
    g = cfg.q_per_kv
    qg = q.reshape(b, t, cfg.num_key_value_heads, g, hd)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(hd))
    logits = jnp.where(mask[:, None, None], logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v)
    return out.reshape(b, t, cfg.num_attention_heads, hd), probs


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


def forward(
    params: Params,
    tokens: jnp.ndarray,
    cfg: LlamaConfig,
    *,
    positions: jnp.ndarray | None = None,
    lora_scale: float = 1.0,
) -> jnp.ndarray:
    """Full causal attention over the whole input. tokens [batch, T] -> logits [batch, T, vocab]."""
    b, t = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), dtype=bool)), (b, t, t))
    lora = params.get("lora")

    def layer(x, xs):
        lp, ll = xs
        q, k, v = qkv(cfg, lp, x, positions, ll, lora_scale)
        out, _ = attend(cfg, q, k, v, mask)
        return attn_out_and_mlp(cfg, lp, x, out, ll, lora_scale), None

    x, _ = jax.lax.scan(layer, embed(params, tokens), (params["layers"], lora))
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
