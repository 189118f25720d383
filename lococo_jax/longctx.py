"""Reading inputs of any length through a fixed-size compressed KV cache.

``apply`` runs the model over T new tokens (a chunk of B = chunk_size tokens, or one decode
token) given the state; every layer attends over [M cache slots ; raw window] and, when the
window is full, its policy compresses the M + B entries into the next M slots. ``scan_chunks``
is the ``lax.scan`` of ``apply`` over chunks (pure, differentiable: the training loss uses it);
``run_long`` drives it over an input of any length in fixed-size segments, so one compiled
program serves every length.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from lococo_jax import llama, policies
from lococo_jax.config import CompressionConfig, LlamaConfig
from lococo_jax.kv_state import KVState, check_state, init_state
from lococo_jax.policies.base import Entries, Slots, take

OUTPUTS = ("logits", "nll", "last")


class StepInfo(NamedTuple):
    """What every layer of one ``apply`` shares.

    positions [b, T] int32; mask [b, T, M + W] bool; qvalid [b, T] bool; n_new, filled,
    win_start (valid window entries before this step: where each row writes its tokens),
    win_valid (after this step's tokens), seen (after) [b] int32; win_len [] int32 (before).
    Each row's window stays compacted: its valid entries are [0, win_valid), whatever the
    other rows' n_new."""

    positions: jax.Array
    mask: jax.Array
    qvalid: jax.Array
    n_new: jax.Array
    filled: jax.Array
    win_start: jax.Array
    win_valid: jax.Array
    win_len: jax.Array
    seen: jax.Array


def _step_info(state: KVState, n_new: jax.Array, T: int) -> StepInfo:
    M, W = state.cache_size, state.window_size
    t = jnp.arange(T, dtype=jnp.int32)
    positions = state.seen[:, None] + t[None, :]
    win_valid = state.win_valid + n_new
    slot_ok = jnp.arange(M)[None, :] < state.filled[:, None]  # [b, M]
    w = jnp.arange(W)
    win_ok = (w[None, None, :] < win_valid[:, None, None]) & (
        w[None, None, :] <= state.win_valid[:, None, None] + t[None, :, None]
    )  # [b, T, W]: causal inside the window, each row from its own start
    slot_ok = jnp.broadcast_to(slot_ok[:, None, :], (slot_ok.shape[0], T, M))
    return StepInfo(
        positions=positions,
        mask=jnp.concatenate([slot_ok, win_ok], axis=-1),
        qvalid=t[None, :] < n_new[:, None],
        n_new=n_new,
        filled=state.filled,
        win_start=state.win_valid,
        win_valid=win_valid,
        win_len=state.win_len,
        seen=state.seen + n_new,
    )


def _entries(ls: dict[str, jax.Array], g: StepInfo, obs: jax.Array | None = None) -> Entries:
    """Slots + window of one layer, compacted so the valid entries come first (in order).

    In the steady state (every row's slots and window full: every entry valid) compaction is
    the identity, so a lax.cond skips its sort and gathers there; both branches give the
    same entries."""
    M, W = ls["k"].shape[2], ls["win_k"].shape[2]
    all_full = jnp.all((g.filled == M) & (g.win_valid == W))
    return jax.lax.cond(all_full, _entries_full, _entries_compacted, ls, g, obs)


def _entries_full(ls: dict[str, jax.Array], g: StepInfo, obs: jax.Array | None) -> Entries:
    """_entries when every entry of every row is valid: slots then window, as they are."""
    M, W = ls["k"].shape[2], ls["win_k"].shape[2]
    b, kv = ls["k"].shape[:2]
    win_pos = (g.seen - g.win_valid)[:, None] + jnp.arange(W, dtype=jnp.int32)[None]
    pos = jnp.concatenate([ls["pos"], jnp.broadcast_to(win_pos[:, None], (b, kv, W))], axis=2)
    acc = jnp.concatenate([ls["score"], jnp.zeros((b, kv, W), jnp.float32)], axis=2)
    return Entries(
        k=jnp.concatenate([ls["k"], ls["win_k"]], axis=2),
        v=jnp.concatenate([ls["v"], ls["win_v"]], axis=2),
        pos=pos,
        valid=jnp.ones((b, kv, M + W), bool),
        acc=acc + ls["win_score"],
        chunk=ls["win_score"],
        last=ls["last_score"],
        n_valid=g.filled + g.win_valid,
        obs=obs,
    )


def _entries_compacted(ls: dict[str, jax.Array], g: StepInfo, obs: jax.Array | None) -> Entries:
    """_entries in general: a stable sort moves each row's valid entries to the front."""
    M, W = ls["k"].shape[2], ls["win_k"].shape[2]
    b, kv = ls["k"].shape[:2]
    valid = jnp.concatenate(
        [jnp.arange(M)[None] < g.filled[:, None], jnp.arange(W)[None] < g.win_valid[:, None]],
        axis=-1,
    )  # [b, S]
    win_pos = (g.seen - g.win_valid)[:, None] + jnp.arange(W, dtype=jnp.int32)[None]
    pos = jnp.concatenate([ls["pos"], jnp.broadcast_to(win_pos[:, None], (b, kv, W))], axis=2)
    acc = jnp.concatenate([ls["score"], jnp.zeros((b, kv, W), jnp.float32)], axis=2)
    order = jnp.argsort(~valid, axis=-1, stable=True).astype(jnp.int32)  # [b, S]
    horder = jnp.broadcast_to(order[:, None], (b, kv, M + W))
    n_valid = g.filled + g.win_valid
    compacted_valid = jnp.arange(M + W)[None] < n_valid[:, None]
    hvalid = jnp.broadcast_to(compacted_valid[:, None], (b, kv, M + W))
    k = jnp.concatenate([ls["k"], ls["win_k"]], axis=2)
    v = jnp.concatenate([ls["v"], ls["win_v"]], axis=2)
    zero = jnp.zeros((), k.dtype)
    return Entries(
        k=jnp.where(hvalid[..., None], take(k, horder), zero),
        v=jnp.where(hvalid[..., None], take(v, horder), zero),
        pos=jnp.where(hvalid, take(pos, horder), -1),
        valid=hvalid,
        acc=take(acc + ls["win_score"], horder),
        chunk=take(ls["win_score"], horder),
        last=jnp.take_along_axis(ls["last_score"], order, axis=-1),
        n_valid=n_valid,
        obs=None if obs is None else take(obs, horder),
    )


def _append(ls: dict[str, jax.Array], g: StepInfo) -> Slots:
    """The slots with the valid window entries written after the filled ones (rows that fit).

    A scatter of the W window entries (O(W) work) instead of compacting all M + W entries, so
    the uncompressed path (the full policy, the first chunks) costs no more than attention."""
    M, W = ls["k"].shape[2], ls["win_k"].shape[2]
    w = jnp.arange(W, dtype=jnp.int32)
    dest = jnp.where(w[None] < g.win_valid[:, None], g.filled[:, None] + w[None], M)  # M: drop
    win_pos = (g.seen - g.win_valid)[:, None] + w[None]
    win_pos = jnp.broadcast_to(win_pos[:, None], ls["win_score"].shape[:2] + (W,))
    score = ls["score"] + ls["win_score"][:, :, :M]

    def put(slots, new, idx):  # one row: slots [kv, M, ...], new [kv, W, ...], idx [W]
        return slots.at[:, idx].set(new, mode="drop")

    put = jax.vmap(put)
    return Slots(
        k=put(ls["k"], ls["win_k"], dest),
        v=put(ls["v"], ls["win_v"], dest),
        pos=put(ls["pos"], win_pos, dest),
        score=put(score, ls["win_score"][:, :, M:], dest),
    )


def _compress(ccfg: CompressionConfig, cp: Any, ls, g: StepInfo, obs=None) -> Slots:
    """The next M slots: the valid entries while they fit, else the policy's choice (per row).

    Only what applies runs (lax.cond): the append alone while every row fits (the first
    chunks); otherwise the policy, with a per-row select of the append for rows that still
    fit. The policy (with lococo, the fusion kernel) has one call site in the program, so it
    is compiled once; the append it carries in the steady state is an O(W) scatter."""
    if ccfg.policy == "full":
        return _append(ls, g)
    fits = g.filled + g.win_valid <= ccfg.cache_size  # [b]

    def compressed():
        fill = _append(ls, g)
        out = policies.get(ccfg.policy)(ccfg, cp, _entries(ls, g, obs))
        b = fits.shape[0]

        def pick(f, o):
            return jnp.where(fits.reshape((b,) + (1,) * (f.ndim - 1)), f, o)

        return Slots(*(pick(f, o) for f, o in zip(fill, out, strict=True)))

    return jax.lax.cond(jnp.all(fits), lambda: _append(ls, g), compressed)


def _write_window(win: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """win [b, kv, W, hd] with new [b, T, kv, hd] written at each row's own start [b].

    A full chunk (T == W) starts from an empty window (apply checks it), so it replaces the
    window without a scatter."""
    new = new.transpose(0, 2, 1, 3).astype(win.dtype)
    if new.shape[2] == win.shape[2]:
        return new

    def row(w, n, s):  # w [kv, W, hd], n [kv, T, hd], s []
        return jax.lax.dynamic_update_slice_in_dim(w, n, s, axis=1)

    return jax.vmap(row)(win, new, start)


def _snapkv_obs(ccfg: CompressionConfig, probs: jax.Array, g: StepInfo) -> jax.Array:
    """SnapKV's observation window: attention of the last snapkv_window valid queries of this
    call, summed over them and the group heads. probs [b, kv, group, T, S] -> [b, kv, S].
    A prefill chunk holds all of them; a decode call that compresses holds only its own query."""
    t = jnp.arange(probs.shape[3])[None, :]
    in_win = (t < g.n_new[:, None]) & (t >= g.n_new[:, None] - ccfg.snapkv_window)  # [b, T]
    return jnp.where(in_win[:, None, None, :, None], probs, 0.0).sum(axis=(2, 3))


def _layer(
    cfg: LlamaConfig,
    ccfg: CompressionConfig,
    compress: bool,
    lora_scale: float,
    truncate: bool,
    g: StepInfo,
    x: jax.Array,
    lp: Any,
    ll: Any,
    cp: Any,
    ls: dict[str, jax.Array],
):
    """One decoder layer over T new tokens. x [b, T, hidden] -> (x, this layer's new state);
    without compression only what changed: new_k, new_v [b, T, kv, hd], win_score, last_score.

    truncate: the entries going into compression carry no gradient, so later chunks train the
    compressor (cp) but send nothing back into this or earlier chunks' activations."""
    q, k, v = llama.qkv(cfg, lp, x, g.positions, ll, lora_scale)
    win_k = _write_window(ls["win_k"], k, g.win_start)
    win_v = _write_window(ls["win_v"], v, g.win_start)
    out, probs = llama.attend_parts(cfg, q, [ls["k"], win_k], [ls["v"], win_v], g.mask)
    # probs [b, kv, group, T, S]: scores summed over this step's valid queries and group heads.
    probs = jnp.where(g.qvalid[:, None, None, :, None], probs, 0.0)
    win_score = ls["win_score"] + probs.sum(axis=(2, 3))
    last_t = jnp.maximum(g.n_new - 1, 0)
    last = jnp.take_along_axis(probs.mean(axis=(1, 2)), last_t[:, None, None], axis=1)[:, 0]
    last_score = jnp.where(g.n_new[:, None] > 0, last, ls["last_score"])
    obs = _snapkv_obs(ccfg, probs, g) if ccfg.policy == "snapkv" else None
    x = llama.attn_out_and_mlp(cfg, lp, x, out, ll, lora_scale)

    if not compress:  # the slots are unchanged; _run_layers writes k, v into the window
        return x, dict(new_k=k, new_v=v, win_score=win_score, last_score=last_score)
    new = dict(ls, win_k=win_k, win_v=win_v, win_score=win_score, last_score=last_score)
    slots = _compress(ccfg, cp, jax.lax.stop_gradient(new) if truncate else new, g, obs)
    new.update(
        k=slots.k,
        v=slots.v,
        pos=slots.pos,
        score=slots.score,
        win_score=jnp.zeros_like(win_score),
        last_score=jnp.zeros_like(last_score),
    )
    return x, new


def _run_layers(
    params, tokens, state, g, cfg, ccfg, compress: bool, lora_scale: float, truncate: bool = False
):
    def body(x, xs):
        lp, ll, cp, ls = xs
        return _layer(cfg, ccfg, compress, lora_scale, truncate, g, x, lp, ll, cp, ls)

    xs = (params["layers"], params.get("lora"), params.get("lococo"), state.layer_fields())
    x, new = jax.lax.scan(body, llama.embed(params, tokens), xs)
    M, T = state.cache_size, tokens.shape[1]
    if compress:
        glob = dict(
            filled=jnp.minimum(g.filled + g.win_valid, M),
            win_valid=jnp.zeros_like(g.win_valid),
            win_len=jnp.zeros_like(g.win_len),
        )
        return x, state.replace(**new, **glob, seen=g.seen)
    # Only the T new entries of every layer's window are written, in place in the (donated)
    # state: the slots and the rest of the window are not copied through the layer scan.
    write = jax.vmap(_write_window, in_axes=(0, 0, None))
    return x, state.replace(
        win_k=write(state.win_k, new.pop("new_k"), g.win_start),
        win_v=write(state.win_v, new.pop("new_v"), g.win_start),
        **new,
        filled=g.filled,
        win_valid=g.win_valid,
        win_len=g.win_len + T,
        seen=g.seen,
    )


def apply(
    params: dict[str, Any],
    tokens: jax.Array,
    state: KVState,
    cfg: LlamaConfig,
    ccfg: CompressionConfig,
    *,
    n_new: jax.Array | None = None,
    lora_scale: float = 1.0,
    truncate: bool = False,
) -> tuple[jax.Array, KVState]:
    """Run T new tokens through the model with the compressed cache.

    tokens [b, T] with T <= chunk_size; n_new [b] int32 in [0, T]: how many of each row's T
    tokens are real (the rest is padding; default all); rows may differ, each row's real
    tokens follow its own earlier ones. A full chunk (T == chunk_size) needs an empty raw
    window (true after every chunk and every compression) and always ends compressed; shorter
    calls (decoding) append to the window and compress when it becomes full, so the window
    must have room for them: win_len + T <= chunk_size (call ``flush`` first otherwise).
    These are checked on the host when the state is concrete; under a trace (jit, scan) a
    call that breaks them fails a ``checkify.debug_check`` and returns NaN logits (and an
    unusable state) instead of a silently wrong result. truncate: the compression's inputs
    carry no gradient (see scan_chunks).
    Returns logits [b, T, vocab] fp32 and the new state.
    """
    x, state = apply_hidden(
        params, tokens, state, cfg, ccfg, n_new=n_new, lora_scale=lora_scale, truncate=truncate
    )
    return llama.lm_head(cfg, params, x), state


def apply_hidden(
    params: dict[str, Any],
    tokens: jax.Array,
    state: KVState,
    cfg: LlamaConfig,
    ccfg: CompressionConfig,
    *,
    n_new: jax.Array | None = None,
    lora_scale: float = 1.0,
    truncate: bool = False,
) -> tuple[jax.Array, KVState]:
    """``apply`` without the vocabulary projection: the last layer's output x [b, T, hidden]
    (before the final norm; llama.lm_head(cfg, params, x) gives apply's logits) and the new
    state. For callers that need logits at a few positions only (a prefill's last token)."""
    b, T = tokens.shape
    W = ccfg.chunk_size
    _check_call(params, state, cfg, ccfg, b)
    if T > W:
        raise ValueError(f"apply takes at most chunk_size={W} tokens per call, got {T}")
    if n_new is None:
        n_new = jnp.full((b,), T, jnp.int32)
    n_new = jnp.asarray(n_new).astype(jnp.int32)
    if n_new.shape != (b,):
        raise ValueError(f"n_new must have shape [batch] = ({b},), got {n_new.shape}")
    bad = _check_room(state.win_len, n_new, T, W)
    g = _step_info(state, n_new, T)
    run = functools.partial(_run_layers, params, tokens, state, g, cfg, ccfg)
    if T == W:
        x, new = run(True, lora_scale, truncate)
    else:
        x, new = jax.lax.cond(
            state.win_len + T >= W,
            lambda: run(True, lora_scale, truncate),
            lambda: run(False, lora_scale, truncate),
        )
    if bad is not None:
        x = jnp.where(bad, jnp.nan, x)
    return x, new


def _concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_call(params, state: KVState, cfg: LlamaConfig, ccfg: CompressionConfig, b: int):
    check_state(state, cfg, ccfg, b)
    if ccfg.policy == "lococo" and "lococo" not in params:
        raise ValueError("policy 'lococo' needs params['lococo'] (see policies.init_params)")


def _check_room(win_len: jax.Array, n_new: jax.Array, T: int, W: int) -> jax.Array | None:
    """Raise when T tokens (n_new [b] of them real) do not fit the raw window; under a trace,
    -> a traced bool that is True when they do not (None when nothing is traced)."""
    if _concrete(win_len) and _concrete(n_new):
        held = int(win_len)
        if T == W and held:
            raise ValueError(
                f"a full chunk of {T} tokens needs an empty raw window, but it holds {held} "
                "entries; call longctx.flush first"
            )
        if held + T > W:
            raise ValueError(
                f"the raw window holds {held} of chunk_size={W} entries: {T} more tokens would "
                f"overflow it; pass at most {W - held} tokens or call longctx.flush first"
            )
        nn = np.asarray(n_new)
        if (nn < 0).any() or (nn > T).any():
            raise ValueError(f"n_new must be in [0, {T}] (the tokens passed), got {nn.tolist()}")
        return None
    bad = (win_len + T > W) | ((T == W) & (win_len > 0)) | jnp.any((n_new < 0) | (n_new > T))
    checkify.debug_check(
        ~bad,
        "apply: tokens do not fit the raw window (win_len={w} + T > chunk_size) or n_new is "
        "outside [0, T]",
        w=win_len,
    )
    return bad


def flush(
    params: dict[str, Any], state: KVState, cfg: LlamaConfig, ccfg: CompressionConfig
) -> KVState:
    """Compress whatever the raw window holds into the slots (no new tokens); afterwards the
    window is empty, so full chunks (``run_long``, ``scan_chunks``) can follow decoding."""
    b = state.batch
    _check_call(params, state, cfg, ccfg, b)
    g = _step_info(state, jnp.zeros((b,), jnp.int32), 1)
    dummy = jnp.zeros((b, 1), jnp.int32)
    _, new = _run_layers(params, dummy, state, g, cfg, ccfg, True, 1.0)
    return new


def scan_chunks(
    params: dict[str, Any],
    state: KVState,
    tokens: jax.Array,
    n_new: jax.Array,
    cfg: LlamaConfig,
    ccfg: CompressionConfig,
    *,
    targets: jax.Array | None = None,
    output: str = "nll",
    last_logits: jax.Array | None = None,
    remat: bool = False,
    truncate: bool = False,
    skip_empty: bool = False,
    lora_scale: float = 1.0,
):
    """``lax.scan`` of ``apply`` over chunks. Pure and differentiable.

    tokens [n, b, B]; n_new [n, b] valid tokens per chunk and row; targets [n, b, B] (next
    token ids, -1 = no target) for output="nll". Returns (state, last_logits [b, vocab], ys)
    with ys = logits [n, b, B, vocab] ("logits"), per-token NLL [n, b, B] fp32, 0 where there
    is no target ("nll"), or None ("last"). last_logits: each row's logits at its last valid
    token. remat recomputes each chunk in the backward pass; truncate cuts the gradient at
    each compression's inputs (per-chunk truncation): a chunk's loss still trains the
    compressors that built its cache, but reaches no earlier chunk's activations; skip_empty
    skips all-padding chunks.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    n, b, B = tokens.shape
    if B != ccfg.chunk_size:
        raise ValueError(f"tokens chunk axis is {B}, config chunk_size is {ccfg.chunk_size}")
    if output == "nll" and targets is None:
        raise ValueError("output='nll' needs targets")
    if jnp.shape(n_new) != (n, b):
        raise ValueError(f"n_new must have shape [chunks, batch] = ({n}, {b}), got {n_new.shape}")
    if _concrete(state.win_len) and int(state.win_len) != 0:
        raise ValueError(
            f"scan_chunks reads full chunks, but the raw window holds {int(state.win_len)} "
            "entries; call longctx.flush first"
        )
    if _concrete(n_new):
        nn = np.asarray(n_new)
        if (nn < 0).any() or (nn > B).any():
            raise ValueError(f"n_new must be in [0, chunk_size={B}], got {nn.min()}..{nn.max()}")
    if targets is None:
        targets = jnp.full(tokens.shape, -1, jnp.int32)
    if last_logits is None:
        last_logits = jnp.zeros((b, cfg.vocab_size), jnp.float32)

    def chunk(carry, xs):
        st, last = carry
        tok, nn, tgt = xs
        x, st = apply_hidden(
            params, tok, st, cfg, ccfg, n_new=nn, lora_scale=lora_scale, truncate=truncate
        )
        # The vocabulary projection of the last valid token alone (a [b, 1] slice of x), and
        # of every token only where the output needs them.
        x_last = jnp.take_along_axis(x, jnp.maximum(nn - 1, 0)[:, None, None], axis=1)
        at_last = llama.lm_head(cfg, params, x_last)[:, 0]
        last = jnp.where(nn[:, None] > 0, at_last, last)
        logits = llama.lm_head(cfg, params, x) if output != "last" else None
        if output == "logits":
            y = logits
        elif output == "nll":
            logp = jax.nn.log_softmax(logits, axis=-1)
            picked = jnp.take_along_axis(logp, jnp.maximum(tgt, 0)[..., None], axis=-1)[..., 0]
            y = jnp.where(tgt >= 0, -picked, 0.0)
        else:
            y = None
        return (st, last), y

    def empty(carry, xs):
        tok = xs[0]
        if output == "logits":
            return carry, jnp.zeros(tok.shape + (cfg.vocab_size,), jnp.float32)
        return carry, (jnp.zeros(tok.shape, jnp.float32) if output == "nll" else None)

    body = jax.checkpoint(chunk) if remat else chunk
    if skip_empty:
        inner = body

        def body(carry, xs):
            return jax.lax.cond(jnp.any(xs[1] > 0), inner, empty, carry, xs)

    (state, last_logits), ys = jax.lax.scan(
        body, (state, last_logits), (tokens, n_new.astype(jnp.int32), targets)
    )
    return state, last_logits, ys


@functools.partial(
    jax.jit, static_argnames=("cfg", "ccfg", "output", "lora_scale"), donate_argnums=(1,)
)
def _segment(params, state, tokens, n_new, targets, last_logits, cfg, ccfg, output, lora_scale):
    return scan_chunks(
        params,
        state,
        tokens,
        n_new,
        cfg,
        ccfg,
        targets=targets,
        output=output,
        last_logits=last_logits,
        skip_empty=True,
        lora_scale=lora_scale,
    )


class LongResult(NamedTuple):
    """out: logits [b, L, vocab] / NLL [b, L] (position i scores token i + 1) / None;
    last_logits [b, vocab] at each row's last token; the final state."""

    out: np.ndarray | None
    last_logits: jax.Array
    state: KVState


def check_fits_full(ccfg: CompressionConfig, total: int) -> None:
    if ccfg.policy == "full" and total > ccfg.cache_size:
        raise ValueError(
            f"policy 'full' keeps every token: cache_size={ccfg.cache_size} is smaller than the "
            f"{total} tokens it must hold; raise cache_size or pick a compressing policy"
        )


def iter_segments(
    tokens: np.ndarray, lengths: np.ndarray, B: int, seg_chunks: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Split [b, L] tokens into padded segments of seg_chunks chunks of B tokens.

    Yields (start, tokens [n, b, B], n_new [n, b], targets [n, b, B]) with next-token targets
    (-1 past each row's length)."""
    b, L = tokens.shape
    span = seg_chunks * B
    padded = -(-max(L, 1) // span) * span
    tok = np.zeros((b, padded + 1), np.int32)
    tok[:, :L] = tokens
    idx = np.arange(padded + 1)
    tgt = np.where(idx[None, 1:] < lengths[:, None], tok[:, 1:], -1).astype(np.int32)
    for start in range(0, padded, span):
        seg = tok[:, start : start + span].reshape(b, seg_chunks, B).transpose(1, 0, 2)
        seg_tgt = tgt[:, start : start + span].reshape(b, seg_chunks, B).transpose(1, 0, 2)
        chunk_start = start + B * np.arange(seg_chunks)
        n_new = np.clip(lengths[None, :] - chunk_start[:, None], 0, B).astype(np.int32)
        yield start, seg, n_new, seg_tgt


def on_params_device(tree: Any, params: dict[str, Any]) -> Any:
    """``tree`` committed to the one device the parameters are on (unchanged when they span
    several). jit compiles separate programs for uncommitted and committed arguments, and
    every segment after the first gets the previous one's committed outputs: a fresh state
    left uncommitted made the first segment compile _segment a second time."""
    devices = jax.tree.leaves(params)[0].devices()
    return jax.device_put(tree, next(iter(devices))) if len(devices) == 1 else tree


def run_long(
    params: dict[str, Any],
    tokens: np.ndarray,
    cfg: LlamaConfig,
    ccfg: CompressionConfig,
    *,
    lengths: np.ndarray | None = None,
    output: str = "nll",
    state: KVState | None = None,
    segment_chunks: int = 8,
    lora_scale: float = 1.0,
    progress: Any = None,
) -> LongResult:
    """Read tokens [b, L] (any L; rows may have their own ``lengths`` [b]) chunk by chunk.

    The input is fed in segments of ``segment_chunks`` chunks, each one call of the same
    compiled ``lax.scan`` (padding chunks are skipped), so every length reuses one program and
    device memory does not grow with L. ``progress``: an optional tqdm bar updated in tokens.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
    llama.check_tokens(tokens, cfg)
    b, L = tokens.shape
    lengths = np.full((b,), L) if lengths is None else np.asarray(lengths)
    if lengths.shape != (b,) or (lengths < 0).any() or (lengths > L).any():
        raise ValueError(f"lengths must be [batch] in [0, {L}], got {lengths}")
    if state is None:
        dtype = params["embed"].dtype
        state = on_params_device(init_state(cfg, ccfg, b, dtype), params)
    else:
        check_state(state, cfg, ccfg, b)
        if int(state.win_len) != 0:
            raise ValueError("run_long needs an empty raw window; call longctx.flush first")
    check_fits_full(ccfg, int(lengths.max(initial=0)) + int(np.max(state.seen)))
    last = on_params_device(jnp.zeros((b, cfg.vocab_size), jnp.float32), params)
    outs = []
    for _, seg, n_new, tgt in iter_segments(tokens, lengths, ccfg.chunk_size, segment_chunks):
        state, last, ys = _segment(
            params,
            state,
            jnp.asarray(seg),
            jnp.asarray(n_new),
            jnp.asarray(tgt),
            last,
            cfg,
            ccfg,
            output,
            lora_scale,
        )
        if ys is not None:
            ys = np.asarray(ys)  # [n, b, B(, V)] -> [b, n*B(, V)]
            outs.append(np.moveaxis(ys, 0, 1).reshape((b, -1) + ys.shape[3:]))
        if progress is not None:
            progress.update(int(n_new.sum()))
    out = np.concatenate(outs, axis=1)[:, :L] if outs else None
    return LongResult(out, last, state)
