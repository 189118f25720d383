"""Generation after a long prompt with the same fixed-size compressed state.

The prompt is read chunk by chunk (longctx.run_long); then each new token is appended to the
raw window of at most chunk_size entries, which is compressed into the M slots when full.
The decode step is jitted once: its shapes never change.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lococo_jax import longctx
from lococo_jax.config import CompressionConfig, LlamaConfig
from lococo_jax.kv_state import KVState


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 is greedy; top_p < 1 samples from the smallest nucleus of that mass."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """logits [b, vocab] -> token ids [b] int32."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Smallest prefix whose mass reaches top_p; its last logit is the cut-off.
        n_keep = jnp.sum(cum < top_p, axis=-1, keepdims=True) + 1
        cutoff = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit, static_argnames=("cfg", "ccfg", "temperature", "top_p"), donate_argnums=(1,)
)
def decode_step(
    params: dict[str, Any],
    state: KVState,
    token: jax.Array,
    key: jax.Array,
    cfg: LlamaConfig,
    ccfg: CompressionConfig,
    temperature: float,
    top_p: float,
) -> tuple[jax.Array, jax.Array, KVState]:
    """token [b] -> (next token [b], logits [b, vocab], state)."""
    logits, state = longctx.apply(params, token[:, None], state, cfg, ccfg)
    return sample(logits[:, 0], key, temperature, top_p), logits[:, 0], state


class Generation(NamedTuple):
    tokens: np.ndarray  # [b, n_generated]
    prefill_seconds: float
    decode_seconds: float
    state: KVState

    @property
    def decode_tokens_per_s(self) -> float:
        return self.tokens.size / max(self.decode_seconds, 1e-9)


def generate(
    params: dict[str, Any],
    prompt: np.ndarray,
    cfg: LlamaConfig,
    ccfg: CompressionConfig,
    sampling: SamplingConfig = SamplingConfig(),
    *,
    lengths: np.ndarray | None = None,
    eos_id: int | None = None,
    progress: bool = False,
    on_token: Callable[[np.ndarray], None] | None = None,
) -> Generation:
    """Continue prompt [b, L] (rows may have their own ``lengths``) by up to max_new_tokens.

    on_token(ids [b]) is called with every new token as soon as it is sampled (streaming
    output: text printed from it survives an interrupted run)."""
    prompt = np.asarray(prompt)
    if prompt.ndim == 1:
        prompt = prompt[None]
    b, L = prompt.shape
    lengths = np.full((b,), L) if lengths is None else np.asarray(lengths)
    if lengths.shape != (b,) or (lengths < 1).any() or (lengths > L).any():
        raise ValueError(
            f"every prompt needs at least one token (lengths in [1, {L}]), got {lengths}"
        )
    longctx.check_fits_full(ccfg, int(lengths.max()) + sampling.max_new_tokens)
    t0 = time.perf_counter()
    bar = tqdm(total=int(lengths.sum()), desc="prefill", unit="tok", disable=not progress)
    res = longctx.run_long(params, prompt, cfg, ccfg, lengths=lengths, output="last", progress=bar)
    bar.close()
    key = jax.random.PRNGKey(sampling.seed)
    key, sub = jax.random.split(key)
    token = sample(res.last_logits, sub, sampling.temperature, sampling.top_p)
    token.block_until_ready()
    t1 = time.perf_counter()
    state, out = res.state, []
    done = np.zeros((b,), bool)
    quiet = not progress or on_token is not None  # a bar would cut into streamed text
    for _ in tqdm(range(sampling.max_new_tokens), desc="decode", disable=quiet):
        out.append(np.asarray(token))
        if on_token is not None:
            on_token(out[-1])
        if eos_id is not None:
            done |= out[-1] == eos_id
            if done.all():
                break
        if len(out) == sampling.max_new_tokens:
            break
        key, sub = jax.random.split(key)
        token, _, state = decode_step(
            params, state, token, sub, cfg, ccfg, sampling.temperature, sampling.top_p
        )
    tokens = np.stack(out, axis=1) if out else np.zeros((b, 0), np.int32)
    return Generation(tokens, t1 - t0, time.perf_counter() - t1, state)
