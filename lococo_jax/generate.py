"""Generation after a long prompt with the same fixed-size compressed state.

The prompt is read chunk by chunk (longctx.run_long); then each new token is appended to the
raw window of at most chunk_size entries, which is compressed into the M slots when full.
Decoding runs on the device a block of tokens at a time (``decode_block``: a while_loop that
carries the state, the RNG key and each row's eos flag), so the host only receives finished
blocks; its shapes never change, so it compiles once per (batch, block).
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


def _next_token(
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


# One token per call (the body of decode_block's loop), for callers that want the logits.
decode_step = jax.jit(
    _next_token, static_argnames=("cfg", "ccfg", "temperature", "top_p"), donate_argnums=(1,)
)


class DecodeCarry(NamedTuple):
    """What the device loop carries from one token to the next (and one block to the next).

    token [b]: the last token handed out, not yet fed to the model; key: the RNG key the next
    draw splits from; done [b] bool: rows that have produced eos (they keep decoding, as they
    did with the per-token loop, until every row is done)."""

    state: KVState
    token: jax.Array
    key: jax.Array
    done: jax.Array


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "ccfg", "temperature", "top_p", "block"),
    donate_argnums=(1,),
)
def decode_block(
    params: dict[str, Any],
    carry: DecodeCarry,
    remaining: jax.Array,
    eos_id: jax.Array,
    cfg: LlamaConfig,
    ccfg: CompressionConfig,
    temperature: float,
    top_p: float,
    block: int,
) -> tuple[jax.Array, jax.Array, DecodeCarry]:
    """Up to min(block, remaining) new tokens in one device loop, stopping early once every
    row is done (eos_id -1: no eos). remaining and eos_id are traced int32 scalars, so one
    program serves every total length: one compile per (batch, block).

    Returns (tokens [b, block] int32, n [] int32: how many columns are real, carry). Nothing
    comes back to the host inside the block; n < min(block, remaining) means every row is
    done, and then the carry's last token is not fed back (as the per-token loop did)."""
    b = carry.token.shape[0]
    n = jnp.minimum(remaining, block)

    def cond(c):
        j, _, st = c
        return (j < n) & ~jnp.all(st.done)

    def body(c):
        j, out, st = c
        key, sub = jax.random.split(st.key)
        token, _, state = _next_token(
            params, st.state, st.token, sub, cfg, ccfg, temperature, top_p
        )
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], j, axis=1)
        return j + 1, out, DecodeCarry(state, token, key, st.done | (token == eos_id))

    init = (jnp.zeros((), jnp.int32), jnp.zeros((b, block), jnp.int32), carry)
    n_out, out, carry = jax.lax.while_loop(cond, body, init)
    return out, n_out, carry


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
    block: int = 16,
) -> Generation:
    """Continue prompt [b, L] (rows may have their own ``lengths``) by up to max_new_tokens.

    Decoding runs on the device ``block`` tokens at a time (``decode_block``); the host sees
    each block once it is finished, and stops when every row has produced eos_id (rows that
    are done keep decoding until then, so tokens [b, n] may hold more after a row's eos).
    on_token(ids [b]) is called with every new token, block by block, as soon as its block
    is back (streaming output: text printed from it survives an interrupted run); the next
    block is already running meanwhile."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
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
    max_new = sampling.max_new_tokens
    if max_new == 0:
        return Generation(np.zeros((b, 0), np.int32), t1 - t0, 0.0, res.state)
    eos = np.int32(-1 if eos_id is None else eos_id)
    # Committed like every later block's carry (a decode_block output): one compile, not two.
    carry = longctx.on_params_device(DecodeCarry(res.state, token, key, token == eos), params)

    def launch(carry: DecodeCarry, remaining: int):
        return decode_block(
            params,
            carry,
            np.int32(remaining),
            eos,
            cfg,
            ccfg,
            sampling.temperature,
            sampling.top_p,
            block,
        )

    quiet = not progress or on_token is not None  # a bar would cut into streamed text
    bar = tqdm(total=max_new, desc="decode", disable=quiet)
    first = np.asarray(token)  # read before launch: the carry (token included) is donated
    queued = 1 + min(block, max_new - 1)  # tokens out once every launched block is full
    pending = (launch(carry, max_new - 1), queued - 1) if max_new > 1 else None
    out = [first[:, None]]
    if on_token is not None:
        on_token(first)
    bar.update(1)
    while pending is not None:
        (toks, n, carry), expect = pending
        # Launch the next block before reading this one, so the device does not wait on the
        # host; if this one stopped short (every row done) the next one runs no step.
        pending = None
        if queued < max_new:
            pending = (launch(carry, max_new - queued), min(block, max_new - queued))
            queued += pending[1]
        toks, n = jax.device_get((toks, n))
        n = int(n)
        if on_token is not None:
            for j in range(n):
                on_token(toks[:, j])
        out.append(toks[:, :n])
        bar.update(n)
        if n < expect:  # every row has produced eos_id
            if pending is not None:
                carry = pending[0][2]
            break
    bar.close()
    jax.block_until_ready(carry.state)
    tokens = np.concatenate(out, axis=1).astype(np.int32)
    return Generation(tokens, t1 - t0, time.perf_counter() - t1, carry.state)
