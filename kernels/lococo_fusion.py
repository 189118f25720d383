"""LoCoCo's convolutional fusion (DESIGN.md step 5 and the products A K, A V) as one Pallas kernel.

Per row r (a batch element and KV head, flattened), over the N non-heavy-hitter entries:

    x = concat(k, v, axis=-1)                                   [N, 2d]
    S[n, c] = b[c] + sum_t sum_ch w[t, ch, c] x[n + t - h, ch]   h = (ksize - 1) // 2, 'same' zero
                                                                padding, cross-correlation (torch
                                                                Conv1d(padding=h))
    A = softmax over n of act(S), positions n >= valid_len[r] excluded      [C, N]
    out_k = A k, out_v = A v                                    [C, d] each

Positions n >= valid_len[r] are treated as absent: their k, v are read as zeros (also as conv
inputs) and they get no softmax weight, so their gradients are zero.

The kernel (`impl="pallas"`) never writes A: a grid over (row, channel tile) runs an online
softmax (running max / running sum) over position tiles, computing each tile's conv logits from a
haloed window of x and accumulating A k and A v in the same pass. With ``splits`` > 1 the
position tiles are shared among that many programs per (row, channel tile), each keeping its own
(max, sum, A k, A v), which XLA then combines (as flash-decoding does): a small grid (batch 1,
few KV heads) then still has enough programs to fill a GPU. Its backward recomputes the
logits per tile from the saved logsumexp. `conv_softmax_mix_reference` is the jnp ground truth.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "identity")
IMPLS = ("pallas", "reference", "auto")
BACKWARDS = ("pallas", "xla")
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
# The Pallas kernel unrolls the ksize taps (2 * ksize matmuls per tile); compile time grows with it.
MAX_PALLAS_KERNEL_SIZE = 63
# Programs the GPU forward aims for when splits is None: about two per SM of an H100 (132).
MIN_GPU_PROGRAMS = 256

_NEG = -0.7 * float(np.finfo(np.float32).max)  # finite "-inf": exp(_NEG - m) == 0 without NaNs
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b
_TN = (((0,), (0,)), ((), ()))  # a.T @ b
_GELU_C = math.sqrt(2.0 / math.pi)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the kernel.

    block_n: positions per tile in the forward (the online-softmax reduction axis). Clamped to
        the next power of two >= N (min 16) for short inputs. On TPU keep it a multiple of 128
        when N > block_n (Mosaic's lane tiling of the backward's [C, block_n] output).
    block_c: output channels (fused slots) per program (at least 16); C is zero-padded to a
        multiple of it.
        Bounds the fp32 accumulators [block_c, d] x 2 and logits [block_c, block_n] per program.
    block_n_bwd: positions per tile in the backward (None: block_n).
    splits: programs that share one (row, channel tile)'s position tiles in the forward, their
        partial softmaxes combined after the kernel. None: 1, except on GPU, where it is raised
        until the grid has about MIN_GPU_PROGRAMS programs (at most one tile per program).
    window_loads: how a tile's haloed input is read. True: one aligned load of
        [block_n + halo] rows, then static slices per tap (what Mosaic/TPU lowers well). False:
        one load per tap at offset start + t (Triton has no value slicing). None: True on TPU,
        False elsewhere. Both give the same numbers; the tests run both in interpret mode.
    """

    block_n: int = 128
    block_c: int = 64
    block_n_bwd: int | None = None
    window_loads: bool | None = None
    splits: int | None = None

    @classmethod
    def for_backend(cls, backend: str | None = None) -> BlockSizes:
        """Defaults per platform: GPU keeps per-program register tiles small (Triton holds the
        accumulators in registers); TPU uses MXU-sized tiles (VMEM holds them)."""
        backend = backend or jax.default_backend()
        if backend == "tpu":
            return cls(block_n=128, block_c=128, block_n_bwd=128)
        if backend in ("gpu", "cuda", "rocm"):
            return cls(block_n=64, block_c=64, block_n_bwd=32)
        return cls()


# ----------------------------------------------------------------------------------------------
# Activations (shared by kernel and reference, so their gradients agree exactly).


def _act(name: str, s: jax.Array) -> jax.Array:
    if name == "relu":
        return jnp.where(s > 0, s, 0.0)  # grad 0 at 0, like jax.nn.relu
    if name == "gelu":
        # tanh approximation == jax.nn.gelu(approximate=True), jax's default. (torch.nn.GELU's
        # default is the exact erf form; the official LoCoCo default activation is relu.)
        return 0.5 * s * (1.0 + jnp.tanh(_GELU_C * (s + 0.044715 * s * s * s)))
    if name == "silu":
        return s * lax.logistic(s)
    if name == "tanh":
        return jnp.tanh(s)
    if name == "identity":
        return s
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def _act_grad(name: str, s: jax.Array) -> jax.Array:
    """d act / d s, elementwise."""
    if name == "relu":
        return jnp.where(s > 0, 1.0, 0.0)
    if name == "gelu":
        th = jnp.tanh(_GELU_C * (s + 0.044715 * s * s * s))
        return 0.5 * (1.0 + th) + 0.5 * s * (1.0 - th * th) * _GELU_C * (1.0 + 3 * 0.044715 * s * s)
    if name == "silu":
        sg = lax.logistic(s)
        return sg * (1.0 + s * (1.0 - sg))
    if name == "tanh":
        th = jnp.tanh(s)
        return 1.0 - th * th
    if name == "identity":
        return jnp.ones_like(s)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


# ----------------------------------------------------------------------------------------------
# Reference.


def _conv_same(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [R, N, cin], w [ksize, cin, cout] -> [R, N, cout]; 'same' zero padding, no flip."""
    h = (w.shape[0] - 1) // 2
    return lax.conv_general_dilated(
        x,
        w,
        window_strides=(1,),
        padding=[(h, h)],
        dimension_numbers=("NWC", "WIO", "NWC"),
        precision=lax.Precision.HIGHEST,
    )


@functools.partial(jax.jit, static_argnames=("activation",))
def _reference(
    k: jax.Array,
    v: jax.Array,
    layers: tuple[tuple[jax.Array, jax.Array], ...],
    valid_len: jax.Array,
    activation: str,
) -> tuple[jax.Array, jax.Array]:
    n = k.shape[1]
    valid = (jnp.arange(n)[None, :] < valid_len[:, None])[..., None]  # [R, N, 1]
    k32 = jnp.where(valid, k.astype(jnp.float32), 0.0)
    v32 = jnp.where(valid, v.astype(jnp.float32), 0.0)
    x = jnp.concatenate([k32, v32], axis=-1)
    for w, b in layers:
        x = jnp.where(valid, x, 0.0)  # absent positions are zeros for every layer's input
        x = _act(activation, _conv_same(x, w.astype(jnp.float32)) + b.astype(jnp.float32))
    logits = jnp.where(valid, x, -jnp.inf)  # [R, N, C]
    a = jax.nn.softmax(logits, axis=1)
    hi = lax.Precision.HIGHEST
    out_k = jnp.einsum("rnc,rnd->rcd", a, k32, precision=hi)
    out_v = jnp.einsum("rnc,rnd->rcd", a, v32, precision=hi)
    return out_k.astype(k.dtype), out_v.astype(v.dtype)


def conv_softmax_mix_reference(
    k: jax.Array,
    v: jax.Array,
    layers: Sequence[tuple[jax.Array, jax.Array]],
    valid_len: jax.Array,
    *,
    activation: str = "relu",
) -> tuple[jax.Array, jax.Array]:
    """Plain jnp (jitted), materialises A; the ground truth. Any number of conv layers.

    k, v: [R, N, d]; layers: [(w [ksize, cin, cout], b [cout])], cin of the first = 2d, cout of
    the last = C, the activation after every layer (including the last); valid_len: [R] int.
    Computes in fp32. Returns (out_k, out_v), each [R, C, d] in k's dtype.
    """
    _validate(k, v, layers, valid_len, activation, "reference", "xla")
    layers = tuple((w, b) for w, b in layers)
    return _reference(k, v, layers, valid_len.astype(jnp.int32), activation)


# ----------------------------------------------------------------------------------------------
# Kernels.


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything static about one call (hashable: nondiff argument of the custom_vjp)."""

    activation: str
    ksize: int
    block_n: int
    block_c: int
    block_n_bwd: int
    window: bool
    splits: int  # programs per (row, channel tile) in the forward; their tiles: tiles_per_split
    tiles_per_split: int
    interpret: Any
    backward: str
    platform: str  # "cpu" | "gpu" | "tpu": which compiler params the kernel is lowered with


def _dot(a: jax.Array, b: jax.Array, dims: Any) -> jax.Array:
    # bf16 operands: an explicit DEFAULT, so a global jax_default_matmul_precision="highest"
    # (the tests set it) does not ask Mosaic for an fp32 contraction of bf16 ("Bad lhs type").
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def _tile_logits(
    kp_ref: Any,
    vp_ref: Any,
    wk_at: Callable[[int], jax.Array],
    wv_at: Callable[[int], jax.Array],
    start: jax.Array,
    *,
    ksize: int,
    bn: int,
    bc: int,
    window: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Conv (pre-bias) logits of positions [start, start + bn) -> ([bc, bn] fp32, k tile
    [bn, d], v tile [bn, d]). kp/vp rows are left-padded by h, so position n + t - h of x is
    padded row n + t and the tile's own k, v are the tap t = h."""
    h = (ksize - 1) // 2
    if window:
        # Taps unrolled: static value slices of one aligned window load.
        wlen = bn + _halo_pad(ksize)
        kw = kp_ref[pl.ds(start, wlen), :]
        vw = vp_ref[pl.ds(start, wlen), :]
        s = None
        for t in range(ksize):
            kt = lax.slice_in_dim(kw, t, t + bn, axis=0)
            vt = lax.slice_in_dim(vw, t, t + bn, axis=0)
            st = _dot(wk_at(t), kt, _NT) + _dot(wv_at(t), vt, _NT)
            s = st if s is None else s + st
        k_tile = lax.slice_in_dim(kw, h, h + bn, axis=0)
        v_tile = lax.slice_in_dim(vw, h, h + bn, axis=0)
    else:
        # Taps in a loop (a dynamic tap index is free in a load offset): one load per tap.
        def tap(t, s):
            kt = kp_ref[pl.ds(start + t, bn), :]
            vt = vp_ref[pl.ds(start + t, bn), :]
            return s + _dot(wk_at(t), kt, _NT) + _dot(wv_at(t), vt, _NT)

        s = lax.fori_loop(0, ksize, tap, jnp.zeros((bc, bn), jnp.float32))
        k_tile = kp_ref[pl.ds(start + h, bn), :]
        v_tile = vp_ref[pl.ds(start + h, bn), :]
    return s, k_tile, v_tile


def _fwd_kernel(kp_ref, vp_ref, wk_ref, wv_ref, b_ref, mask_ref, *out_refs, st: _Static):
    """One (row, channel tile[, split]): online softmax over its position tiles.
    kp/vp [L, d], wk/wv [ksize, bc, d], b [bc, 1], mask [1, Lm] -> with one split: out_k, out_v
    [bc, d], lse [bc, 1]; with more: this split's unnormalised A k, A v [bc, d] (fp32) and its
    running max and sum [bc, 1] (_combine_splits finishes them)."""
    bn = st.block_n
    n_tiles = st.tiles_per_split
    bc, d = out_refs[0].shape
    bias = b_ref[...].astype(jnp.float32)
    first = 0 if st.splits == 1 else pl.program_id(2) * n_tiles
    # One tile in all: a static 0. Mosaic must prove a dynamic lane offset (the mask's last
    # axis) a multiple of 128, which i * bn with bn < 128 is not.
    one = n_tiles == 1 and st.splits == 1

    def body(i, carry):
        m, l, acc_k, acc_v = carry
        start = 0 if one else pl.multiple_of((first + i) * bn, bn)
        s, k_t, v_t = _tile_logits(
            kp_ref,
            vp_ref,
            lambda t: wk_ref[t],
            lambda t: wv_ref[t],
            start,
            ksize=st.ksize,
            bn=bn,
            bc=bc,
            window=st.window,
        )
        valid = mask_ref[:, pl.ds(start, bn)] > 0.5  # [1, bn]
        z = jnp.where(valid, _act(st.activation, s + bias), _NEG)
        m_new = jnp.maximum(m, jnp.max(z, axis=1, keepdims=True))
        corr = jnp.exp(m - m_new)
        p = jnp.where(valid, jnp.exp(z - m_new), 0.0)
        l = corr * l + jnp.sum(p, axis=1, keepdims=True)
        pc = p.astype(k_t.dtype)
        acc_k = corr * acc_k + _dot(pc, k_t, _NN)
        acc_v = corr * acc_v + _dot(pc, v_t, _NN)
        return m_new, l, acc_k, acc_v

    # The reduction runs in-kernel: position tiles overlap by the conv halo, so they cannot be
    # non-overlapping BlockSpec blocks of a grid axis; the whole padded row is one block
    # (VMEM on TPU, a global-memory pointer on GPU) and tiles are read from it.
    init = (
        jnp.full((bc, 1), _NEG, jnp.float32),
        jnp.zeros((bc, 1), jnp.float32),
        jnp.zeros((bc, d), jnp.float32),
        jnp.zeros((bc, d), jnp.float32),
    )
    if n_tiles == 1:
        m, l, acc_k, acc_v = body(0, init)
    else:
        m, l, acc_k, acc_v = lax.fori_loop(0, n_tiles, body, init)
    if st.splits > 1:
        for ref, val in zip(out_refs, (acc_k, acc_v, m, l), strict=True):
            ref[...] = val
        return
    ok_ref, ov_ref, lse_ref = out_refs
    ok_ref[...] = (acc_k / l).astype(ok_ref.dtype)
    ov_ref[...] = (acc_v / l).astype(ov_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _bwd_kernel(
    kp_ref,
    vp_ref,
    wk_ref,
    wv_ref,
    b_ref,
    mask_ref,
    dok_ref,
    dov_ref,
    lse_ref,
    delta_ref,
    ds_ref,
    dkd_ref,
    dvd_ref,
    *,
    st: _Static,
):
    """One (row, position tile), looping over channel tiles: recompute P from the logsumexp,
    dS = act'(S) * P * (dP - delta) with dP = dO_k k^T + dO_v v^T, and the direct value
    gradients P^T dO. kp/vp [L, d], wk/wv [ksize, Cp, d], b/lse/delta [Cp, 1], dok/dov [Cp, d],
    mask [1, Lm] -> ds [Cp, bn], dkd/dvd [bn, d] (fp32)."""
    bn = st.block_n_bwd
    bc = st.block_c
    n_ctiles = ds_ref.shape[0] // bc
    d = dkd_ref.shape[-1]
    one_tile = mask_ref.shape[-1] == bn  # static 0 (see _fwd_kernel)
    start = 0 if one_tile else pl.multiple_of(pl.program_id(1) * bn, bn)
    valid = mask_ref[:, pl.ds(start, bn)] > 0.5  # [1, bn]

    def body(j, carry):
        dk_acc, dv_acc = carry
        c0 = pl.multiple_of(j * bc, bc)
        cs = pl.ds(c0, bc)
        s, k_t, v_t = _tile_logits(
            kp_ref,
            vp_ref,
            lambda t: wk_ref[t, cs, :],
            lambda t: wv_ref[t, cs, :],
            start,
            ksize=st.ksize,
            bn=bn,
            bc=bc,
            window=st.window,
        )
        s = s + b_ref[cs, :].astype(jnp.float32)
        z = _act(st.activation, s)
        p = jnp.where(valid, jnp.exp(z - lse_ref[cs, :]), 0.0)  # [bc, bn]
        dok = dok_ref[cs, :]
        dov = dov_ref[cs, :]
        dp = _dot(dok, k_t, _NT) + _dot(dov, v_t, _NT)
        ds = p * (dp - delta_ref[cs, :]) * _act_grad(st.activation, s)
        ds_ref[cs, :] = ds.astype(ds_ref.dtype)
        pc = p.astype(dok.dtype)
        return dk_acc + _dot(pc, dok, _TN), dv_acc + _dot(pc, dov, _TN)

    init = (jnp.zeros((bn, d), jnp.float32), jnp.zeros((bn, d), jnp.float32))
    dk_acc, dv_acc = lax.fori_loop(0, n_ctiles, body, init)
    dkd_ref[...] = dk_acc
    dvd_ref[...] = dv_acc


# ----------------------------------------------------------------------------------------------
# Host-side layout and pallas_call plumbing.


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _halo_pad(ksize: int) -> int:
    """Extra padded rows after the last tile: >= ksize - 1, sublane-aligned (16 covers bf16)."""
    return _round_up(ksize - 1, 16)


def _tile(block: int, n: int, minimum: int) -> int:
    """The block used for an axis of length n: at most the requested one, at most the next
    power of two >= n (short inputs get one tile), at least `minimum`."""
    return max(minimum, min(block, pl.next_power_of_2(max(n, 1))))


def _compiler_params(interpret: Any, d: int, platform: str, grid_axes: int = 2) -> Any:
    if interpret is not False:
        return None
    if platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=("parallel",) * grid_axes)
    if platform == "gpu":
        # Triton, named explicitly: with no params, Pallas picks Mosaic GPU on this jax.
        from jax.experimental.pallas import triton as plgpu

        return plgpu.CompilerParams(num_warps=4 if d <= 64 else 8, num_stages=2)
    return None


def _padded_inputs(
    k: jax.Array, v: jax.Array, valid_len: jax.Array, bn: int, ksize: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """-> kp, vp [R, Lm + halo, d] (absent positions zeroed, h zero rows in front), mask
    [R, 1, Lm] fp32 (1 = present), Lm = N rounded up to bn (a multiple of the tile)."""
    _, n, _ = k.shape
    h = (ksize - 1) // 2
    lm = _round_up(n, bn)
    total = lm + _halo_pad(ksize)
    valid = (jnp.arange(n)[None, :] < valid_len[:, None])[..., None]
    pad = ((0, 0), (h, total - h - n), (0, 0))
    kp = jnp.pad(jnp.where(valid, k, jnp.zeros((), k.dtype)), pad)
    vp = jnp.pad(jnp.where(valid, v, jnp.zeros((), v.dtype)), pad)
    mask = (jnp.arange(lm)[None, :] < valid_len[:, None]).astype(jnp.float32)[:, None, :]
    return kp, vp, mask


def _padded_weights(
    w: jax.Array, b: jax.Array, d: int, bc: int, dtype: Any
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """w [ksize, 2d, C], b [C] -> wk, wv [ksize, Cp, d] (channel-major, in the compute dtype),
    b [Cp, 1] fp32; Cp = C rounded up to bc, padded channels are zero (finite, then dropped)."""
    c = w.shape[2]
    cp = _round_up(c, bc)
    wt = jnp.pad(jnp.transpose(w, (0, 2, 1)), ((0, 0), (0, cp - c), (0, 0))).astype(dtype)
    bp = jnp.pad(b.astype(jnp.float32), (0, cp - c))[:, None]
    return wt[..., :d], wt[..., d:], bp


def _forward(k, v, w, b, valid_len, st: _Static):
    """-> out_k, out_v [R, C, d] (k's dtype), lse [R, Cp, 1] fp32."""
    r, n, d = k.shape
    c = w.shape[2]
    bn, bc, ksize, sp = st.block_n, st.block_c, st.ksize, st.splits
    kp, vp, mask = _padded_inputs(k, v, valid_len, bn * st.tiles_per_split, ksize)
    wk, wv, bp = _padded_weights(w, b, d, bc, k.dtype)
    total, lm, cp = kp.shape[1], mask.shape[-1], wk.shape[1]
    row = lambda i, j, *_: (i, 0, 0)
    chan = lambda i, j, *_: (0, j, 0)
    if sp == 1:
        out = lambda i, j: (i, j, 0)
        out_specs = [pl.BlockSpec((None, bc, w_), out) for w_ in (d, d, 1)]
        out_shape = [
            jax.ShapeDtypeStruct((r, cp, w_), dt)
            for w_, dt in ((d, k.dtype), (d, k.dtype), (1, jnp.float32))
        ]
    else:  # each split's partial (A k, A v, max, sum) in fp32, combined below
        out = lambda i, j, s: (i, s, j, 0)
        out_specs = [pl.BlockSpec((None, None, bc, w_), out) for w_ in (d, d, 1, 1)]
        out_shape = [jax.ShapeDtypeStruct((r, sp, cp, w_), jnp.float32) for w_ in (d, d, 1, 1)]
    grid = (r, cp // bc) + ((sp,) if sp > 1 else ())
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, st=st),
        grid=grid,  # channel tiles (and splits) innermost: the row's k, v block is reused
        in_specs=[
            pl.BlockSpec((None, total, d), row),
            pl.BlockSpec((None, total, d), row),
            pl.BlockSpec((ksize, bc, d), chan),
            pl.BlockSpec((ksize, bc, d), chan),
            pl.BlockSpec((bc, 1), lambda i, j, *_: (j, 0)),
            pl.BlockSpec((None, 1, lm), row),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=st.interpret,
        compiler_params=_compiler_params(st.interpret, d, st.platform, len(grid)),
        name="lococo_fusion_fwd",
    )(kp, vp, wk, wv, bp, mask)
    ok, ov, lse = outs if sp == 1 else _combine_splits(*outs, k.dtype)
    return ok[:, :c], ov[:, :c], lse


def _combine_splits(acc_k, acc_v, m, l, dtype):
    """Partial softmaxes [R, splits, Cp, .] -> out_k, out_v [R, Cp, d] (dtype), lse [R, Cp, 1].
    A split with no present position has max _NEG and sum 0, so its weight exp(_NEG - max) is
    0; position 0 is always present, so the first split never is empty."""
    top = jnp.max(m, axis=1, keepdims=True)
    wgt = jnp.exp(m - top)  # [R, S, Cp, 1]
    total = jnp.sum(wgt * l, axis=1)
    ok = jnp.sum(wgt * acc_k, axis=1) / total
    ov = jnp.sum(wgt * acc_v, axis=1) / total
    return ok.astype(dtype), ov.astype(dtype), top[:, 0] + jnp.log(total)


def _backward_pallas(st: _Static, k, v, w, b, valid_len, ok, ov, lse, dok, dov):
    """Pallas: dS [R, C, N] and the direct value gradients P^T dO, recomputing P per tile.
    XLA: delta (a [R, C] reduction) and the conv's own backward from dS (dW, db and the conv's
    contribution to dk, dv). The conv backward is two reductions that a (row, position tile)
    grid cannot own: dW sums over all rows and positions, and dx of a position gathers dS from
    the neighbouring tiles' halo; XLA's convolution-backprop ops do both at full speed from the
    one [R, C, N] fp32 array dS (the size of A, written once and read twice)."""
    r, n, d = k.shape
    c = w.shape[2]
    bn, bc, ksize = st.block_n_bwd, st.block_c, st.ksize
    kp, vp, mask = _padded_inputs(k, v, valid_len, bn, ksize)
    wk, wv, bp = _padded_weights(w, b, d, bc, k.dtype)
    total, lm, cp = kp.shape[1], mask.shape[-1], wk.shape[1]
    f32 = jnp.float32
    delta = jnp.sum(dok.astype(f32) * ok.astype(f32) + dov.astype(f32) * ov.astype(f32), -1)
    delta = jnp.pad(delta, ((0, 0), (0, cp - c)))[..., None]  # [R, Cp, 1]
    pad_c = ((0, 0), (0, cp - c), (0, 0))
    dokp, dovp = jnp.pad(dok.astype(k.dtype), pad_c), jnp.pad(dov.astype(k.dtype), pad_c)
    row = lambda i, j: (i, 0, 0)
    whole = lambda i, j: (0, 0, 0)
    ds, dkd, dvd = pl.pallas_call(
        functools.partial(_bwd_kernel, st=st),
        grid=(r, lm // bn),
        in_specs=[
            pl.BlockSpec((None, total, d), row),
            pl.BlockSpec((None, total, d), row),
            pl.BlockSpec((ksize, cp, d), whole),
            pl.BlockSpec((ksize, cp, d), whole),
            pl.BlockSpec((cp, 1), lambda i, j: (0, 0)),
            pl.BlockSpec((None, 1, lm), row),
            pl.BlockSpec((None, cp, d), row),
            pl.BlockSpec((None, cp, d), row),
            pl.BlockSpec((None, cp, 1), row),
            pl.BlockSpec((None, cp, 1), row),
        ],
        out_specs=[
            pl.BlockSpec((None, cp, bn), lambda i, j: (i, 0, j)),
            pl.BlockSpec((None, bn, d), lambda i, j: (i, j, 0)),
            pl.BlockSpec((None, bn, d), lambda i, j: (i, j, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((r, cp, lm), f32),
            jax.ShapeDtypeStruct((r, lm, d), f32),
            jax.ShapeDtypeStruct((r, lm, d), f32),
        ],
        interpret=st.interpret,
        compiler_params=_compiler_params(st.interpret, d, st.platform),
        name="lococo_fusion_bwd",
    )(kp, vp, wk, wv, bp, mask, dokp, dovp, lse, delta)

    ds = jnp.transpose(ds[:, :c, :n], (0, 2, 1))  # [R, N, C]
    valid = (jnp.arange(n)[None, :] < valid_len[:, None])[..., None]
    x = jnp.concatenate(
        [jnp.where(valid, k.astype(f32), 0.0), jnp.where(valid, v.astype(f32), 0.0)], axis=-1
    )
    _, conv_vjp = jax.vjp(_conv_same, x, w.astype(f32))
    dx, dw = conv_vjp(ds)
    db = jnp.sum(ds, axis=(0, 1))
    dk = jnp.where(valid, dkd[:, :n] + dx[..., :d], 0.0)
    dv = jnp.where(valid, dvd[:, :n] + dx[..., d:], 0.0)
    return dk.astype(k.dtype), dv.astype(v.dtype), dw.astype(w.dtype), db.astype(b.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _fused(k, v, w, b, valid_len, st: _Static):
    ok, ov, _ = _forward(k, v, w, b, valid_len, st)
    return ok, ov


def _fused_fwd(k, v, w, b, valid_len, st: _Static):
    ok, ov, lse = _forward(k, v, w, b, valid_len, st)
    return (ok, ov), (k, v, w, b, valid_len, ok, ov, lse)


def _fused_bwd(st: _Static, res, g):
    k, v, w, b, valid_len, ok, ov, lse = res
    dok, dov = g
    if st.backward == "xla":
        # Recompute with the reference and differentiate it (materialises A).
        ref = lambda k, v, w, b: _reference(k, v, ((w, b),), valid_len, st.activation)
        _, ref_vjp = jax.vjp(ref, k, v, w, b)
        dk, dv, dw, db = ref_vjp((dok, dov))
    else:
        dk, dv, dw, db = _backward_pallas(st, k, v, w, b, valid_len, ok, ov, lse, dok, dov)
    return dk, dv, dw, db, None


_fused.defvjp(_fused_fwd, _fused_bwd)


@functools.partial(jax.jit, static_argnames=("st",))
def _fused_jit(k, v, w, b, valid_len, st: _Static):
    return _fused(k, v, w, b, valid_len, st)


# ----------------------------------------------------------------------------------------------
# Public API.


def conv_softmax_mix(
    k: jax.Array,
    v: jax.Array,
    layers: Sequence[tuple[jax.Array, jax.Array]],
    valid_len: jax.Array,
    *,
    activation: str = "relu",
    impl: str = "pallas",
    block_sizes: BlockSizes | None = None,
    interpret: Any = None,
    backward: str = "pallas",
    platform: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """A = softmax_N(act(conv(concat(k, v)))); returns (A k, A v). Differentiable in k, v, w, b.

    Args:
      k, v: [R, N, d] float32 or bfloat16, R = batch * KV heads, the N entries in original
        order. Positions n >= valid_len[r] are treated as absent (read as zero, no weight).
      layers: [(w [ksize, cin, cout], b [cout]), ...] float32 or bfloat16; cin of the first
        layer = 2d (k channels first, then v), cout of the last = C; the activation follows
        every layer. ksize odd.
      valid_len: [R] integer, 1 <= valid_len[r] (a row with none present gives NaN).
      activation: one of ACTIVATIONS ("gelu" is the tanh approximation, jax.nn.gelu's default).
      impl: "pallas": the fused kernel; one conv layer only (NotImplementedError otherwise).
        "reference": conv_softmax_mix_reference. "auto": the kernel if there is exactly one
        layer, ``platform`` (the target's, not the host's) is not CPU and, on a GPU, head_dim
        is a power of two >= 16 (Triton's block shapes), else the reference (an explicit rule
        on len(layers), the platform and d, decided before anything runs).
      block_sizes: tiles; None -> BlockSizes.for_backend().
      interpret: run the kernel in Pallas interpret mode. None -> True when ``platform`` is
        CPU, False for GPU and TPU; a pltpu.InterpretParams is passed through (strict
        TPU-semantics interpreter).
      backward: "pallas": Pallas kernel for dS and P^T dO, XLA for the conv's backward from dS
        (see _backward_pallas). "xla": jax.vjp of the reference (materialises A).
      platform: "cpu" | "gpu" | "tpu" (also "cuda", "rocm"): the platform of the devices the
        computation is compiled for; it decides ``impl="auto"``, ``interpret=None``, the tiles
        and the Triton or Mosaic compiler params. None -> jax.default_backend(), which is wrong
        when a CPU host compiles for a TPU or GPU ahead of time: pass the target's platform
        (lococo_jax.platforms.platform_of(mesh)); lococo_jax.fusion does.

    Returns:
      (out_k, out_v), each [R, C, d] in k's dtype; matmuls take k's dtype (w is cast to it) and
      accumulate in fp32; the reference computes in fp32 throughout.
    """
    _validate(k, v, layers, valid_len, activation, impl, backward)
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise TypeError(f"block_sizes must be a BlockSizes or None, got {type(block_sizes)}")
    layers = list(layers)
    platform = platform or jax.default_backend()
    platform = "gpu" if platform in ("cuda", "rocm") else platform
    if platform not in ("cpu", "gpu", "tpu"):
        raise ValueError(f"platform must be cpu, gpu or tpu (or cuda, rocm), got {platform!r}")
    if impl == "auto":
        d = k.shape[-1]
        triton_ok = platform != "gpu" or (d >= 16 and not d & (d - 1))
        impl = "pallas" if len(layers) == 1 and platform != "cpu" and triton_ok else "reference"
    if impl == "reference":
        return conv_softmax_mix_reference(k, v, layers, valid_len, activation=activation)
    if len(layers) != 1:
        raise NotImplementedError(
            f"impl='pallas' fuses one conv layer (n_convlayer == 1); got {len(layers)} layers. "
            "Use impl='reference' or impl='auto' (which picks the reference for > 1 layers)."
        )
    (w, b) = layers[0]
    ksize = int(w.shape[0])
    if ksize > MAX_PALLAS_KERNEL_SIZE:
        raise ValueError(
            f"layers[0] w kernel size {ksize} exceeds the Pallas kernel's limit "
            f"{MAX_PALLAS_KERNEL_SIZE} (taps are unrolled); use impl='reference'"
        )
    bs = block_sizes or BlockSizes.for_backend(platform)
    for name in ("block_n", "block_c"):
        val = getattr(bs, name)
        if not isinstance(val, int) or val < 8 or val % 8:
            raise ValueError(f"block_sizes.{name} must be a positive multiple of 8, got {val}")
    if bs.block_n_bwd is not None and (bs.block_n_bwd < 8 or bs.block_n_bwd % 8):
        raise ValueError(f"block_sizes.block_n_bwd must be a multiple of 8, got {bs.block_n_bwd}")
    if bs.splits is not None and (not isinstance(bs.splits, int) or bs.splits < 1):
        raise ValueError(f"block_sizes.splits must be a positive int or None, got {bs.splits}")
    if interpret is None:
        interpret = platform == "cpu"
    d = k.shape[-1]
    if interpret is False and platform == "gpu":
        if d < 16 or d & (d - 1):
            raise ValueError(
                f"k head_dim {d}: the GPU (Triton) kernel needs a power of two >= 16; "
                "use impl='reference'"
            )
    n, c = k.shape[1], w.shape[2]
    window = bs.window_loads if bs.window_loads is not None else platform == "tpu"
    block_n, block_c, splits, per_split = forward_tiles(bs, k.shape[0], n, c, platform)
    st = _Static(
        activation=activation,
        ksize=ksize,
        block_n=block_n,
        block_c=block_c,
        block_n_bwd=_tile(bs.block_n_bwd or bs.block_n, n, 16),
        window=bool(window),
        splits=splits,
        tiles_per_split=per_split,
        interpret=interpret,
        backward=backward,
        platform=platform,
    )
    if platform == "tpu" and interpret is False:
        for name, blk in (("block_n", st.block_n), ("block_n_bwd", st.block_n_bwd)):
            if blk < n and blk % 128:
                raise ValueError(
                    f"block_sizes.{name} {blk} < N = {n}: on TPU a tile of positions that is "
                    "not the whole row must be a multiple of 128 (Mosaic's lane alignment)"
                )
    return _fused_jit(k, v, w, b, valid_len.astype(jnp.int32), st)


def forward_tiles(
    bs: BlockSizes, r: int, n: int, c: int, platform: str
) -> tuple[int, int, int, int]:
    """The forward's tiling for R = r rows, N = n positions, C = c channels on ``platform``:
    (block_n, block_c, splits, position tiles per split)."""
    block_n = _tile(bs.block_n, n, 16)
    block_c = _tile(bs.block_c, c, 16)  # >= 16: Triton's dot minimum, bf16 sublane tile
    splits, per_split = _splits(
        bs.splits, r=r, c_tiles=-(-c // block_c), n_tiles=-(-n // block_n), platform=platform
    )
    return block_n, block_c, splits, per_split


def _splits(
    requested: int | None, *, r: int, c_tiles: int, n_tiles: int, platform: str
) -> tuple[int, int]:
    """-> (splits, position tiles per split): at most one split per tile, and as few tiles per
    split as the requested number allows (the last splits may be partly padding)."""
    if requested is None:
        requested = -(-MIN_GPU_PROGRAMS // (r * c_tiles)) if platform == "gpu" else 1
    per_split = -(-n_tiles // min(requested, n_tiles))
    return -(-n_tiles // per_split), per_split


def _validate(k, v, layers, valid_len, activation, impl, backward) -> None:
    """Raise TypeError/ValueError naming the argument, what it is and what was expected."""
    for name, x in (("k", k), ("v", v), ("valid_len", valid_len)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if k.ndim != 3:
        raise ValueError(f"k must be [rows, positions, head_dim], got shape {k.shape}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {k.shape}, got {v.shape}")
    if jnp.dtype(k.dtype) not in DTYPES:
        raise TypeError(f"k dtype must be float32 or bfloat16, got {k.dtype}")
    if v.dtype != k.dtype:
        raise TypeError(f"v dtype must equal k dtype {k.dtype}, got {v.dtype}")
    r, n, d = k.shape
    if n < 1:
        raise ValueError(f"k must have at least one position, got shape {k.shape}")
    if valid_len.shape != (r,):
        raise ValueError(f"valid_len must have shape ({r},) (k's rows), got {valid_len.shape}")
    if not jnp.issubdtype(valid_len.dtype, jnp.integer):
        raise TypeError(f"valid_len dtype must be an integer type, got {valid_len.dtype}")
    if not isinstance(valid_len, jax.core.Tracer):
        lo = int(np.min(np.asarray(valid_len)))
        if lo < 1:
            raise ValueError(f"valid_len must be >= 1 for every row, got min {lo}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
        raise TypeError(f"layers must be a non-empty sequence of (w, b), got {type(layers)}")
    cin = 2 * d
    for i, layer in enumerate(layers):
        if not isinstance(layer, (tuple, list)) or len(layer) != 2:
            raise TypeError(f"layers[{i}] must be a (w, b) pair, got {type(layer).__name__}")
        w, b = layer
        if not hasattr(w, "shape") or w.ndim != 3:
            raise ValueError(
                f"layers[{i}] w must be [ksize, cin, cout], got {getattr(w, 'shape', w)}"
            )
        if w.shape[1] != cin:
            what = "2 * head_dim" if i == 0 else f"layers[{i - 1}] cout"
            raise ValueError(f"layers[{i}] w shape {w.shape}: cin must be {cin} ({what})")
        if w.shape[0] % 2 == 0:
            raise ValueError(
                f"layers[{i}] w kernel size must be odd ('same' padding), got {w.shape[0]}"
            )
        if not hasattr(b, "shape") or b.shape != (w.shape[2],):
            raise ValueError(
                f"layers[{i}] b must have shape ({w.shape[2]},), got {getattr(b, 'shape', b)}"
            )
        for name, x in (("w", w), ("b", b)):
            if jnp.dtype(x.dtype) not in DTYPES:
                raise TypeError(
                    f"layers[{i}] {name} dtype must be float32 or bfloat16, got {x.dtype}"
                )
        cin = w.shape[2]
