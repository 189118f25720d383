"""The fused conv-softmax-mix kernel (kernels/lococo_fusion.py) against its jnp reference, and the
reference against explicit numpy loops. On CPU the kernel runs in Pallas interpret mode; with an
accelerator present the same tests run it compiled."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import lococo_fusion as lf
from kernels.lococo_fusion import BlockSizes, conv_softmax_mix, conv_softmax_mix_reference

ON_CPU = jax.default_backend() == "cpu"
# Max abs error of the forward vs the fp32 reference (outputs are averages of O(1) values).
# bf16: operands of every matmul (k, v, w, the softmax weights) are rounded to 8 bits of mantissa.
# fp32 compiled: Triton sums the conv's 2 d ksize products per logit in tiles, another order
# than XLA's (measured on an H200: 1.3e-5 at d 128, ksize 21; the interpreter: < 1e-5).
FWD_TOL = {jnp.float32: 1e-5 if ON_CPU else 3e-5, jnp.bfloat16: 3e-2}
GRAD_RTOL = 1e-4  # fp32, max abs error / max abs value, per gradient


def _np_act(name: str, x: float) -> float:
    if name == "relu":
        return max(x, 0.0)
    if name == "gelu":
        return 0.5 * x * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    if name == "silu":
        return x / (1 + math.exp(-x))
    if name == "tanh":
        return math.tanh(x)
    return x


def np_conv_softmax_mix(k, v, layers, valid_len, activation="relu"):
    """Loops over rows, positions, output channels, taps and input channels; float64."""
    k, v = np.asarray(k, np.float64), np.asarray(v, np.float64)
    R, N, d = k.shape
    C = np.asarray(layers[-1][0]).shape[2]
    out_k, out_v = np.zeros((R, C, d)), np.zeros((R, C, d))
    for r in range(R):
        n_valid = int(valid_len[r])
        x = np.concatenate([k[r], v[r]], axis=1)  # [N, 2d]
        x[n_valid:] = 0.0
        for w, b in layers:
            w, b = np.asarray(w, np.float64), np.asarray(b, np.float64)
            ksize, cin, cout = w.shape
            pad = (ksize - 1) // 2
            y = np.zeros((N, cout))
            for n in range(N):
                for c in range(cout):
                    acc = b[c]
                    for t in range(ksize):
                        src = n + t - pad
                        if 0 <= src < N:
                            for ch in range(cin):
                                acc += w[t, ch, c] * x[src, ch]
                    y[n, c] = _np_act(activation, acc)
            y[n_valid:] = 0.0
            x = y
        logits = x[:n_valid]  # [n_valid, C]
        a = np.exp(logits - logits.max(axis=0, keepdims=True))
        a /= a.sum(axis=0, keepdims=True)
        out_k[r] = a.T @ k[r, :n_valid]
        out_v[r] = a.T @ v[r, :n_valid]
    return out_k, out_v


def make_inputs(seed, R, N, d, C, ksize, valid_len=None, dtype=jnp.float32, n_layers=1):
    """Conv weights scaled so logits are O(1): a softmax that is neither uniform nor one-hot."""
    rng = np.random.default_rng(seed)
    k = jnp.asarray(rng.standard_normal((R, N, d), np.float32)).astype(dtype)
    v = jnp.asarray(rng.standard_normal((R, N, d), np.float32)).astype(dtype)
    layers, cin = [], 2 * d
    for i in range(n_layers):
        cout = C if i == n_layers - 1 else 2 * C
        w = rng.standard_normal((ksize, cin, cout), np.float32) * (2.0 / math.sqrt(cin * ksize))
        b = rng.standard_normal((cout,), np.float32) * 0.5
        layers.append((jnp.asarray(w), jnp.asarray(b)))
        cin = cout
    if valid_len is None:
        valid_len = [N] * R
    return k, v, layers, jnp.asarray(valid_len, jnp.int32)


def max_err(a, b) -> float:
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def rel_err(a, b) -> float:
    return max_err(a, b) / max(float(jnp.max(jnp.abs(b))), 1e-30)


# (R, N, d, C, ksize, valid_len, BlockSizes): N not a multiple of block_n, C not a multiple of
# block_c, rows with valid_len < N (one shorter than a tile, one ending inside the last tile).
FWD_CASES = {
    "ragged-k3": (4, 40, 64, 20, 3, [40, 17, 33, 1], BlockSizes(block_n=16, block_c=16)),
    "d128-k21": (3, 200, 128, 32, 21, [200, 150, 7], BlockSizes(block_n=64, block_c=16)),
    "c-pad-k21": (2, 75, 64, 24, 21, [75, 60], BlockSizes(block_n=32, block_c=16)),
    "one-tile": (2, 45, 64, 8, 21, [45, 20], BlockSizes()),
}


@pytest.mark.parametrize("interpret", [ON_CPU], ids=["interpret" if ON_CPU else "compiled"])
class TestConvSoftmaxMix:
    @pytest.mark.parametrize("activation", lf.ACTIVATIONS)
    def test_reference_matches_numpy_loops(self, interpret, activation):
        k, v, layers, vl = make_inputs(0, 2, 9, 3, 4, 5, valid_len=[9, 6])
        want = np_conv_softmax_mix(k, v, layers, vl, activation)
        got = conv_softmax_mix_reference(k, v, layers, vl, activation=activation)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(g), w, atol=1e-5, rtol=1e-5)

    def test_multilayer_reference_matches_numpy_loops(self, interpret):
        k, v, layers, vl = make_inputs(1, 2, 8, 2, 3, 3, valid_len=[8, 5], n_layers=3)
        want = np_conv_softmax_mix(k, v, layers, vl)
        got = conv_softmax_mix_reference(k, v, layers, vl)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(g), w, atol=1e-5, rtol=1e-5)

    def test_kernel_matches_numpy_loops(self, interpret):
        k, v, layers, vl = make_inputs(2, 2, 20, 16, 6, 3, valid_len=[20, 11])
        want = np_conv_softmax_mix(k, v, layers, vl)
        got = conv_softmax_mix(
            k, v, layers, vl, interpret=interpret, block_sizes=BlockSizes(block_n=16, block_c=16)
        )
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(g), w, atol=1e-5, rtol=1e-5)

    @pytest.mark.parametrize("case", list(FWD_CASES))
    def test_forward_matches_reference(self, interpret, case):
        R, N, d, C, ksize, vl, bs = FWD_CASES[case]
        k, v, layers, vl = make_inputs(3, R, N, d, C, ksize, valid_len=vl)
        want = conv_softmax_mix_reference(k, v, layers, vl)
        got = conv_softmax_mix(k, v, layers, vl, interpret=interpret, block_sizes=bs)
        for g, w in zip(got, want, strict=True):
            assert g.shape == (R, C, d) and g.dtype == jnp.float32
            assert max_err(g, w) <= FWD_TOL[jnp.float32]

    @pytest.mark.parametrize("splits", [2, 3, 8])
    @pytest.mark.parametrize("case", ["ragged-k3", "d128-k21"])
    def test_split_positions_match_reference(self, interpret, case, splits):
        # The position tiles shared among programs (flash-decoding) and combined after: ragged-k3
        # has 3 tiles (2 splits: one padded tile; 8: clamped to 3) and rows with valid_len 1 and
        # 17 (later splits without a present position); d128-k21 has 4 tiles.
        R, N, d, C, ksize, vl, bs = FWD_CASES[case]
        k, v, layers, vl = make_inputs(3, R, N, d, C, ksize, valid_len=vl)
        want = conv_softmax_mix_reference(k, v, layers, vl)
        bs = dataclasses.replace(bs, splits=splits)
        got = conv_softmax_mix(k, v, layers, vl, interpret=interpret, block_sizes=bs)
        for g, w in zip(got, want, strict=True):
            assert g.shape == (R, C, d) and g.dtype == jnp.float32
            assert max_err(g, w) <= FWD_TOL[jnp.float32]
        (w, b) = layers[0]
        loss = lambda fn: jax.grad(
            lambda k, v, w, b: sum(jnp.sum(o * o) for o in fn(k, v, [(w, b)], vl)), (0, 1, 2, 3)
        )
        kern = lambda k, v, lay, vl: conv_softmax_mix(
            k, v, lay, vl, interpret=interpret, block_sizes=bs
        )
        pairs = zip(
            loss(kern)(k, v, w, b), loss(conv_softmax_mix_reference)(k, v, w, b), strict=True
        )
        for g, wt in pairs:
            assert rel_err(g, wt) <= GRAD_RTOL  # the backward reads the combined logsumexp

    def test_window_tile_loads(self, interpret):
        # The TPU strategy (one aligned window load, static tap slices); the forward cases above
        # run the per-tap loads everywhere except on TPU.
        if not interpret and jax.default_backend() != "tpu":
            pytest.skip("window loads are the TPU strategy; compiled elsewhere they may not lower")
        R, N, d, C, ksize, vl, bs = FWD_CASES["c-pad-k21"]
        k, v, layers, vl = make_inputs(4, R, N, d, C, ksize, valid_len=vl)
        want = conv_softmax_mix_reference(k, v, layers, vl)
        bs = dataclasses.replace(bs, window_loads=True)
        got = conv_softmax_mix(k, v, layers, vl, interpret=interpret, block_sizes=bs)
        for g, w in zip(got, want, strict=True):
            assert max_err(g, w) <= FWD_TOL[jnp.float32]

    def test_bfloat16_forward(self, interpret):
        # As the model calls it: bf16 k, v with fp32 conv weights.
        k, v, layers, vl = make_inputs(5, 2, 70, 64, 16, 21, [70, 40], dtype=jnp.bfloat16)
        want = conv_softmax_mix_reference(k, v, layers, vl)
        got = conv_softmax_mix(
            k, v, layers, vl, interpret=interpret, block_sizes=BlockSizes(block_n=32, block_c=16)
        )
        for g, w in zip(got, want, strict=True):
            assert g.dtype == jnp.bfloat16
            assert max_err(g, w) <= FWD_TOL[jnp.bfloat16]

    def test_softmax_weights_sum_to_one(self, interpret):
        R, N, d, C, ksize, vl, bs = FWD_CASES["ragged-k3"]  # valid_len down to 1
        k, _, layers, vl = make_inputs(6, R, N, d, C, ksize, valid_len=vl)
        v = jnp.ones_like(k)
        _, out_v = conv_softmax_mix(k, v, layers, vl, interpret=interpret, block_sizes=bs)
        assert max_err(out_v, jnp.ones_like(out_v)) <= 1e-6

    def test_absent_positions_are_ignored(self, interpret):
        # Garbage (even NaN) after valid_len changes nothing: read as zero, weight zero.
        R, N, d, C, ksize, vl, bs = FWD_CASES["c-pad-k21"]
        k, v, layers, vl = make_inputs(7, R, N, d, C, ksize, valid_len=vl)
        clean = conv_softmax_mix(k, v, layers, vl, interpret=interpret, block_sizes=bs)
        cut = int(vl[1])
        k2 = k.at[1, cut:].set(jnp.nan)
        v2 = v.at[1, cut:].set(1e4)
        dirty = conv_softmax_mix(k2, v2, layers, vl, interpret=interpret, block_sizes=bs)
        for c, dt in zip(clean, dirty, strict=True):
            np.testing.assert_array_equal(np.asarray(c), np.asarray(dt))

    @pytest.mark.parametrize("backward", lf.BACKWARDS)
    @pytest.mark.parametrize(
        "shape",
        [
            (3, 40, 64, 20, 3, [40, 23, 2], BlockSizes(block_n=16, block_c=16)),
            (2, 50, 64, 24, 21, [50, 31], BlockSizes(block_n=32, block_c=16, block_n_bwd=16)),
        ],
        ids=["k3", "k21"],
    )
    def test_gradients_match_reference(self, interpret, backward, shape):
        R, N, d, C, ksize, vl, bs = shape
        k, v, layers, vl = make_inputs(8, R, N, d, C, ksize, valid_len=vl)
        (w, b) = layers[0]
        ck, cv = jnp.asarray(np.random.default_rng(9).standard_normal((2, R, C, d), np.float32))

        def loss(fn):
            def f(k, v, w, b):
                out_k, out_v = fn(k, v, [(w, b)], vl)
                return jnp.sum(out_k * ck) + jnp.sum(out_v * cv)

            return jax.grad(f, argnums=(0, 1, 2, 3))

        kern = lambda k, v, layers, vl: conv_softmax_mix(
            k, v, layers, vl, interpret=interpret, block_sizes=bs, backward=backward
        )
        got = loss(kern)(k, v, w, b)
        want = loss(conv_softmax_mix_reference)(k, v, w, b)
        for name, g, wt in zip("kvwb", got, want, strict=True):
            assert g.shape == wt.shape and g.dtype == wt.dtype, name
            assert rel_err(g, wt) <= GRAD_RTOL, name
        # Absent positions get exactly zero gradient.
        assert float(jnp.max(jnp.abs(got[0][1, vl[1] :]))) == 0.0

    @pytest.mark.parametrize("activation", lf.ACTIVATIONS)
    def test_activation_derivatives(self, interpret, activation):
        # The backward kernel's hand-written act' against autodiff of the shared act.
        s = jnp.linspace(-4.0, 4.0, 101)
        want = jax.vmap(jax.grad(lambda x: lf._act(activation, x)))(s)
        np.testing.assert_allclose(lf._act_grad(activation, s), want, rtol=1e-5, atol=1e-6)

    def test_gelu_forward_and_backward(self, interpret):
        # A smooth activation end to end (relu everywhere else; act' of all is checked above).
        activation = "gelu"
        k, v, layers, vl = make_inputs(10, 2, 30, 16, 8, 5, valid_len=[30, 19])
        (w, b) = layers[0]
        bs = BlockSizes(block_n=16, block_c=16)

        def f(fn, **kw):
            def loss(k, v, w, b):
                ok, ov = fn(k, v, [(w, b)], vl, activation=activation, **kw)
                return jnp.sum(ok * jnp.cos(ok)) + jnp.sum(ov)

            return loss

        kern = f(conv_softmax_mix, interpret=interpret, block_sizes=bs)
        ref = f(conv_softmax_mix_reference)
        val, got = jax.value_and_grad(kern, argnums=(0, 1, 2, 3))(k, v, w, b)
        val_ref, want = jax.value_and_grad(ref, argnums=(0, 1, 2, 3))(k, v, w, b)
        assert abs(float(val) - float(val_ref)) <= 1e-4
        for name, g, wt in zip("kvwb", got, want, strict=True):
            assert rel_err(g, wt) <= GRAD_RTOL, name

    def test_under_jit_with_traced_valid_len(self, interpret):
        R, N, d, C, ksize, vl, bs = FWD_CASES["ragged-k3"]
        k, v, layers, vl = make_inputs(11, R, N, d, C, ksize, valid_len=vl)
        fn = jax.jit(
            lambda k, v, layers, vl: conv_softmax_mix(
                k, v, layers, vl, interpret=interpret, block_sizes=bs
            )
        )
        want = conv_softmax_mix_reference(k, v, layers, vl)
        for g, w in zip(fn(k, v, layers, vl), want, strict=True):
            assert max_err(g, w) <= FWD_TOL[jnp.float32]

    def test_impl_dispatch(self, interpret):
        k, v, layers, vl = make_inputs(12, 2, 12, 4, 4, 3, valid_len=[12, 5], n_layers=2)
        with pytest.raises(NotImplementedError, match="one conv layer"):
            conv_softmax_mix(k, v, layers, vl, impl="pallas", interpret=interpret)
        want = conv_softmax_mix_reference(k, v, layers, vl)
        for impl in ("auto", "reference"):
            got = conv_softmax_mix(k, v, layers, vl, impl=impl, interpret=interpret)
            for g, w in zip(got, want, strict=True):
                np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        # One layer, head_dim 4 for a GPU target: Triton cannot tile d = 4, so "auto" is the
        # reference (decided before lowering: nothing GPU-specific runs here), "pallas" refuses.
        k1, v1, one, vl1 = make_inputs(12, 2, 12, 4, 4, 3, valid_len=[12, 5])
        want = conv_softmax_mix_reference(k1, v1, one, vl1)
        got = conv_softmax_mix(k1, v1, one, vl1, impl="auto", platform="gpu")
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        with pytest.raises(ValueError, match="head_dim 4: the GPU"):
            conv_softmax_mix(k1, v1, one, vl1, impl="pallas", platform="gpu")

    @pytest.mark.parametrize(
        "change, error, match",
        [
            (dict(v=jnp.zeros((2, 12, 5))), ValueError, r"v must have k's shape"),
            (dict(k=jnp.zeros((12, 4)), v=jnp.zeros((12, 4))), ValueError, r"k must be \[rows"),
            (dict(k=jnp.zeros((2, 12, 4), jnp.float16)), TypeError, r"k dtype .* float16"),
            (dict(v=jnp.zeros((2, 12, 4), jnp.bfloat16)), TypeError, r"v dtype must equal"),
            (dict(k=np.zeros((2, 12, 4)).tolist()), TypeError, r"k must be an array"),
            (dict(w=jnp.zeros((3, 6, 4))), ValueError, r"cin must be 8 \(2 \* head_dim\)"),
            (dict(w=jnp.zeros((4, 8, 4))), ValueError, r"kernel size must be odd .*, got 4"),
            (dict(w=jnp.zeros((65, 8, 4))), ValueError, r"kernel size 65 exceeds"),
            (dict(w=jnp.zeros((3, 8, 4), jnp.int32)), TypeError, r"w dtype"),
            (dict(b=jnp.zeros((5,))), ValueError, r"b must have shape \(4,\)"),
            (dict(layers=[]), TypeError, r"layers must be a non-empty sequence"),
            (dict(vl=jnp.array([12], jnp.int32)), ValueError, r"valid_len must have shape \(2,\)"),
            (dict(vl=jnp.array([12.0, 3.0])), TypeError, r"valid_len dtype .* float32"),
            (dict(vl=jnp.array([12, 0], jnp.int32)), ValueError, r"valid_len must be >= 1"),
            (dict(activation="softplus"), ValueError, r"activation must be one of"),
            (dict(impl="triton"), ValueError, r"impl must be one of"),
            (dict(backward="jax"), ValueError, r"backward must be one of"),
            (dict(block_sizes=BlockSizes(block_n=12)), ValueError, r"block_sizes.block_n"),
            (dict(block_sizes=(16, 8)), TypeError, r"block_sizes must be a BlockSizes"),
        ],
    )
    def test_bad_inputs_raise(self, interpret, change, error, match):
        args = dict(
            k=jnp.zeros((2, 12, 4)),
            v=jnp.zeros((2, 12, 4)),
            w=jnp.zeros((3, 8, 4)),
            b=jnp.zeros((4,)),
            vl=jnp.array([12, 5], jnp.int32),
        )
        args.update(change)
        kw = {
            n: args.pop(n) for n in ("activation", "impl", "backward", "block_sizes") if n in args
        }
        layers = args.pop("layers", [(args["w"], args["b"])])
        with pytest.raises(error, match=match):
            conv_softmax_mix(args["k"], args["v"], layers, args["vl"], interpret=interpret, **kw)


@pytest.mark.skipif(not ON_CPU, reason="the strict TPU-semantics interpreter runs on CPU")
class TestStrictInterpreter:
    """Pallas' TPU interpret mode raises on out-of-bounds reads and fills uninitialised memory
    with NaN: ragged tiles and the halo layout must be exact, not rescued by clamping."""

    @pytest.mark.parametrize("window_loads", [False, True])
    def test_ragged_forward_and_backward(self, window_loads):
        from jax.experimental.pallas import tpu as pltpu

        k, v, layers, vl = make_inputs(13, 2, 20, 16, 12, 5, valid_len=[20, 13])
        (w, b) = layers[0]
        bs = BlockSizes(block_n=16, block_c=16, window_loads=window_loads)
        strict = pltpu.InterpretParams(out_of_bounds_reads="raise", uninitialized_memory="nan")

        def f(fn, **kw):
            return lambda k, v, w, b: sum(jnp.sum(o**2) for o in fn(k, v, [(w, b)], vl, **kw))

        got = jax.value_and_grad(
            f(conv_softmax_mix, interpret=strict, block_sizes=bs), argnums=(0, 1, 2, 3)
        )(k, v, w, b)
        want = jax.value_and_grad(f(conv_softmax_mix_reference), argnums=(0, 1, 2, 3))(k, v, w, b)
        assert abs(float(got[0]) - float(want[0])) <= 1e-4
        for g, wt in zip(got[1], want[1], strict=True):
            assert rel_err(g, wt) <= GRAD_RTOL

    def test_missing_halo_is_caught(self, monkeypatch):
        from jax.experimental.pallas import tpu as pltpu

        monkeypatch.setattr(lf, "_halo_pad", lambda ksize: 0)
        k, v, layers, vl = make_inputs(14, 2, 45, 16, 8, 5)
        bs = BlockSizes(block_n=16, block_c=16, window_loads=False)
        try:
            with pytest.raises(Exception, match="Out-of-bounds read"):
                out = conv_softmax_mix(
                    k, v, layers, vl, interpret=pltpu.InterpretParams(), block_sizes=bs
                )
                jax.block_until_ready(out)
        finally:
            pltpu.reset_tpu_interpret_mode_state()
            jax.clear_caches()  # drop the trace made with the broken layout


# The compiled (non-interpret) kernel lowered for each accelerator from this host: Mosaic for
# TPU, Triton for CUDA, forward and backward. This runs Pallas's real lowering to the kernel IR;
# only the last step (Triton -> PTX, Mosaic -> TPU binary) needs the device.
KERNEL_CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("platform", sorted(KERNEL_CALL))
def test_kernel_lowers_for_accelerators(platform, dtype):
    import re

    k, v, layers, vl = make_inputs(0, 3, 200, 64, 32, 21, dtype=dtype)

    def fwd(k, v, w, b):
        return conv_softmax_mix(k, v, [(w, b)], vl, interpret=False, platform=platform)

    def grad(k, v, w, b):
        loss = lambda *a: sum(o.astype(jnp.float32).sum() for o in fwd(*a))
        return jax.grad(loss, argnums=(0, 1, 2, 3))(k, v, w, b)

    for fn, n_kernels in ((fwd, 1), (grad, 2)):  # backward: the forward kernel + its own
        args = (k, v, *layers[0])
        hlo = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
        calls = re.findall(r"custom_call @([\w$.]+)", hlo)
        assert calls.count(KERNEL_CALL[platform]) == n_kernels, calls


def test_split_count_per_platform():
    # (requested, rows, channel tiles, position tiles, platform) -> (splits, tiles per split)
    assert lf._splits(None, r=3, c_tiles=1, n_tiles=4, platform="cpu") == (1, 4)
    assert lf._splits(None, r=3, c_tiles=1, n_tiles=4, platform="tpu") == (1, 4)
    assert lf._splits(None, r=3, c_tiles=1, n_tiles=4, platform="gpu") == (4, 1)
    assert lf._splits(None, r=3, c_tiles=1, n_tiles=400, platform="gpu") == (80, 5)  # 86 asked
    assert lf._splits(None, r=256, c_tiles=2, n_tiles=40, platform="gpu") == (1, 40)
    assert lf._splits(2, r=1, c_tiles=1, n_tiles=3, platform="cpu") == (2, 2)
    k, v, layers, vl = make_inputs(0, 2, 32, 16, 16, 3)
    with pytest.raises(ValueError, match="block_sizes.splits must be a positive int"):
        conv_softmax_mix(k, v, layers, vl, block_sizes=BlockSizes(splits=0))


def test_unknown_platform_is_named():
    k, v, layers, vl = make_inputs(0, 2, 32, 16, 16, 3)
    with pytest.raises(ValueError, match="platform must be cpu, gpu or tpu.*'metal'"):
        conv_softmax_mix(k, v, layers, vl, platform="metal")


@pytest.mark.slow
def test_fusion_runs_per_shard_on_a_mesh():
    """8 fake CPU devices (subprocess): inside a sharded computation the fusion is a shard_map
    over the rows it mixes. The kernel's compiled HLO has no collective in the forward and
    only the conv weights' all-reduce in the backward, where the plain call under the same
    input shardings gathers its operands; the chunked model's loss and every gradient with
    fusion_impl="pallas" (interpret) on a 2x2x2 mesh equal the single-device ones."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).parent / "_fusion_mesh_worker.py"
    proc = subprocess.run(
        [sys.executable, str(worker)], capture_output=True, text=True, timeout=900
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    res = json.loads(line[len("RESULT ") :])
    f = res["fusion"]
    assert sum(f["per_shard_fwd"].values()) == 0, f
    assert f["per_shard_bwd"] == {**f["per_shard_fwd"], "all-reduce": 1}, f  # dW, db psum
    assert f["plain_fwd"]["all-gather"] > 0 and f["plain_bwd"]["all-gather"] > 0, f
    assert f["values_rel"] < 1e-5, f
    # Heads replicated over tensor (they do not divide it): still no gather, same values and
    # gradients (shard_map's transpose does not count the replicas' cotangents twice).
    r = res["fusion_2x1x4"]
    assert sum(r["per_shard_fwd"].values()) == 0 and r["per_shard_bwd"]["all-gather"] == 0, r
    assert r["values_rel"] < 1e-5, r
    m = res["model"]
    assert m["shard_maps"] > 0, m
    assert m["loss_rel"] < 1e-5, m
    assert max(m["grad_rel"].values()) < 1e-5, m["grad_rel"]
    assert m["grad_rel"].keys() >= {"['lococo']['convs'][0]['w']", "['layers']['wk']"}


def test_tpu_tiles_must_be_lane_aligned():
    """On TPU a position tile shorter than the row must be a multiple of 128 (Mosaic cannot prove
    a dynamic lane offset aligned otherwise): named before lowering. A row that is one tile
    (N <= block_n) may be any size; the kernel then reads it at a static offset."""
    k, v, layers, vl = make_inputs(0, 2, 200, 64, 16, 3)
    with pytest.raises(ValueError, match=r"block_sizes.block_n 64 < N = 200.*multiple of 128"):
        conv_softmax_mix(
            k, v, layers, vl, interpret=False, platform="tpu", block_sizes=BlockSizes(block_n=64)
        )
