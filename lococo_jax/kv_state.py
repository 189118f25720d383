"""The compressed KV state every attention layer carries: fixed shapes for any input length."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from lococo_jax.config import CompressionConfig, LlamaConfig


@struct.dataclass
class KVState:
    """Per-layer fields are stacked on a leading layer axis L (the layer scan's xs).

    M = cache_size slots, W = chunk_size raw-window entries, S = M + W.
        k, v        [L, batch, kv_heads, M, head_dim]  slot keys (after RoPE) and values
        pos         [L, batch, kv_heads, M] int32      original position of each slot (-1: empty)
        score       [L, batch, kv_heads, M] f32        attention each slot received, accumulated
        win_k/win_v [L, batch, kv_heads, W, head_dim]  raw entries not yet compressed
        win_score   [L, batch, kv_heads, S] f32        attention paid since the last compression,
                                                       summed over queries and each group's heads
        last_score  [L, batch, S] f32                  attention of the last query, mean over heads
        filled      [batch] int32   slots in use (same in every layer)
        win_valid   [batch] int32   valid raw-window entries
        win_len     [] int32        window entries written (rows advance together)
        seen        [batch] int32   tokens read so far (the next token's position)
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    score: jax.Array
    win_k: jax.Array
    win_v: jax.Array
    win_score: jax.Array
    last_score: jax.Array
    filled: jax.Array
    win_valid: jax.Array
    win_len: jax.Array
    seen: jax.Array

    @property
    def cache_size(self) -> int:
        return self.k.shape[3]

    @property
    def window_size(self) -> int:
        return self.win_k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def layer_fields(self) -> dict[str, jax.Array]:
        """The per-layer fields, as the layer scan's xs."""
        names = ("k", "v", "pos", "score", "win_k", "win_v", "win_score", "last_score")
        return {n: getattr(self, n) for n in names}


def init_state(cfg: LlamaConfig, ccfg: CompressionConfig, batch: int, dtype=jnp.float32) -> KVState:
    """An empty state; its shapes depend on (cfg, ccfg, batch, dtype) only."""
    if batch <= 0:
        raise ValueError(f"batch must be positive, got {batch}")
    L, kv, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    M, W = ccfg.cache_size, ccfg.chunk_size
    return KVState(
        k=jnp.zeros((L, batch, kv, M, hd), dtype),
        v=jnp.zeros((L, batch, kv, M, hd), dtype),
        pos=jnp.full((L, batch, kv, M), -1, jnp.int32),
        score=jnp.zeros((L, batch, kv, M), jnp.float32),
        win_k=jnp.zeros((L, batch, kv, W, hd), dtype),
        win_v=jnp.zeros((L, batch, kv, W, hd), dtype),
        win_score=jnp.zeros((L, batch, kv, M + W), jnp.float32),
        last_score=jnp.zeros((L, batch, M + W), jnp.float32),
        filled=jnp.zeros((batch,), jnp.int32),
        win_valid=jnp.zeros((batch,), jnp.int32),
        win_len=jnp.zeros((), jnp.int32),
        seen=jnp.zeros((batch,), jnp.int32),
    )


def check_state(state: KVState, cfg: LlamaConfig, ccfg: CompressionConfig, batch: int) -> None:
    """Raise a clear error when ``state`` was built for another config or batch."""
    expected = jax.eval_shape(lambda: init_state(cfg, ccfg, batch, state.k.dtype))
    for name in KVState.__dataclass_fields__:
        got, want = getattr(state, name).shape, getattr(expected, name).shape
        if got != want:
            raise ValueError(
                f"KV state field '{name}' has shape {got}, but this config expects {want} "
                f"(layers={cfg.num_hidden_layers}, kv_heads={cfg.num_key_value_heads}, "
                f"head_dim={cfg.head_dim}, cache_size={ccfg.cache_size}, "
                f"chunk_size={ccfg.chunk_size}, batch={batch}): was the state built for "
                "another config?"
            )
