"""The LoCoCo policy against a plain loop implementation of DESIGN.md's steps 1-7, and the
gradients that train it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lococo_jax import longctx, policies
from lococo_jax.config import CompressionConfig, LlamaConfig
from lococo_jax.kv_state import init_state
from lococo_jax.policies import lococo
from lococo_jax.policies.base import Entries


def np_fusion(K, V, s, convs, a, M, r, local, ksize):
    """One (batch, head): K, V [S, d]; s [S]; convs [(w [k, in, out], b [out])]. Loops."""
    S, d = K.shape
    C = int(M * (1 - r))
    keep = M - C
    loc = list(range(S - local, S))
    others = [i for i in range(S) if i not in loc]
    by_score = sorted(others, key=lambda i: (-s[i], i))[: keep - local]
    heavy = sorted(loc + by_score)
    rest = [i for i in range(S) if i not in heavy]
    N = len(rest)
    s_rest = [s[i] for i in rest]
    anchors = sorted(sorted(range(N), key=lambda j: (-s_rest[j], j))[:C])
    R = np.zeros((C, N))
    for j, n in enumerate(anchors):
        R[j, n] = 1.0
    x = np.concatenate([K[rest], V[rest]], axis=1).T  # [2d, N]
    pad = (ksize - 1) // 2
    for w, b in convs:
        cin, cout = w.shape[1], w.shape[2]
        y = np.zeros((cout, N))
        for o in range(cout):
            for n in range(N):
                acc = b[o]
                for t in range(ksize):
                    src = n + t - pad
                    if 0 <= src < N:
                        acc += sum(w[t, c, o] * x[c, src] for c in range(cin))
                y[o, n] = max(acc, 0.0)  # relu after every layer
        x = y
    A = np.exp(x - x.max(axis=1, keepdims=True))
    A /= A.sum(axis=1, keepdims=True)
    W = a * A + (1 - a) * R
    return np.concatenate([K[heavy], W @ K[rest]]), np.concatenate([V[heavy], W @ V[rest]]), W


def _cfg(d):
    return LlamaConfig(
        vocab_size=11,
        hidden_size=2 * d,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=d,
    )


def all_valid_entries(K, V, chunk, acc) -> Entries:
    """Entries with every one of the S positions valid: K, V [b, h, S, d]; scores [b, h, S]."""
    b, h, S = chunk.shape
    return Entries(
        k=jnp.asarray(K),
        v=jnp.asarray(V),
        pos=jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (b, h, S)),
        valid=jnp.ones((b, h, S), bool),
        acc=jnp.asarray(acc),
        chunk=jnp.asarray(chunk),
        last=jnp.zeros((b, S)),
        n_valid=jnp.full((b,), S, jnp.int32),
    )


@pytest.mark.parametrize(
    "r, local, n_conv, expand",
    [
        (0.5, 0, 1, 1),
        (0.25, 0, 1, 1),
        (0.5, 4, 1, 1),
        (0.25, 4, 2, 2),
        (0.5, 0, 2, 1),
        (0.5, 4, 2, 2),
    ],
)
def test_fused_slots_equal_loop_implementation(r, local, n_conv, expand):
    d, M, B, ksize, b, h = 4, 16, 8, 3, 2, 2
    S = M + B
    ccfg = CompressionConfig(
        policy="lococo",
        cache_size=M,
        chunk_size=B,
        hh_keep_rate=r,
        local_len=local,
        kernel_size=ksize,
        n_convlayer=n_conv,
        expand=expand,
        normalizer_init=0.3,
        fusion_impl="reference",
    )
    cfg = _cfg(d)
    rng = np.random.RandomState(0)
    K = rng.randn(b, h, S, d).astype(np.float32) * 0.3
    V = rng.randn(b, h, S, d).astype(np.float32)
    s = rng.rand(b, h, S).astype(np.float32)
    # History-accumulated scores that disagree with this chunk's: the fusion must rank by s.
    acc = rng.rand(b, h, S).astype(np.float32)
    params = lococo.init_params(jax.random.PRNGKey(1), cfg, ccfg)
    layer = jax.tree.map(lambda x: x[0], params)
    e = all_valid_entries(K, V, s, acc)
    out = lococo.compress(ccfg, layer, e)
    convs = [
        (np.asarray(c["w"], np.float64), np.asarray(c["b"], np.float64)) for c in layer["convs"]
    ]
    keep = ccfg.num_heavy
    for bi in range(b):
        for hi in range(h):
            fk, fv, _ = np_fusion(
                K[bi, hi].astype(np.float64),
                V[bi, hi].astype(np.float64),
                s[bi, hi],
                convs,
                0.3,
                M,
                r,
                local,
                ksize,
            )
            np.testing.assert_allclose(np.asarray(out.k[bi, hi]), fk, atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(np.asarray(out.v[bi, hi]), fv, atol=1e-5, rtol=1e-5)
            # Heavy hitters are copied unchanged (bit-exact).
            heavy_pos = np.asarray(out.pos[bi, hi, :keep])
            np.testing.assert_array_equal(np.asarray(out.k[bi, hi, :keep]), K[bi, hi][heavy_pos])
    # Mixing rows sum to 1: values of all ones fuse to exactly ones.
    ones = e._replace(v=jnp.ones_like(e.v))
    np.testing.assert_allclose(np.asarray(lococo.compress(ccfg, layer, ones).v), 1.0, atol=1e-6)


def chunked_nll_sum(params, cfg, ccfg, toks, targets, truncate: bool = False) -> jax.Array:
    """Summed NLL of toks [n, 1, B] read chunk by chunk (batch 1, remat) from an empty state."""
    n, b, B = toks.shape
    _, _, nll = longctx.scan_chunks(
        params,
        init_state(cfg, ccfg, b),
        toks,
        jnp.full((n, b), B),
        cfg,
        ccfg,
        targets=targets,
        output="nll",
        remat=True,
        truncate=truncate,
    )
    return nll.sum()


def test_gradients_reach_compressors_through_compressing_chunks(tiny_cfg, tiny_params):
    ccfg = CompressionConfig(policy="lococo", cache_size=16, chunk_size=8, kernel_size=3)
    params = dict(tiny_params, lococo=policies.init_params(jax.random.PRNGKey(2), tiny_cfg, ccfg))
    n = 6  # 48 tokens through a 16-slot cache: four compressing chunks
    toks = jnp.asarray(np.random.RandomState(0).randint(0, tiny_cfg.vocab_size, (n, 1, 8)))
    tgt = jnp.concatenate([toks.reshape(1, -1)[:, 1:], -jnp.ones((1, 1), jnp.int32)], 1)

    def loss(lococo_params):
        p = dict(params, lococo=lococo_params)
        return chunked_nll_sum(p, tiny_cfg, ccfg, toks, tgt.reshape(n, 1, 8)) / (n * 8 - 1)

    grads = jax.grad(loss)(params["lococo"])
    for leaf in jax.tree.leaves(grads):
        assert np.isfinite(np.asarray(leaf)).all()
    for li in range(tiny_cfg.num_hidden_layers):
        assert np.abs(np.asarray(grads["convs"][0]["w"][li])).max() > 0
        assert np.abs(np.asarray(grads["normalizer"][li])) > 0


def test_model_with_pallas_fusion_equals_reference(tiny_cfg, tiny_params):
    """The whole model on a compressing input: Pallas kernel (interpret mode on CPU) vs jnp."""
    toks = np.random.RandomState(9).randint(0, tiny_cfg.vocab_size, (2, 56))
    out = {}
    for impl in ("pallas", "reference"):
        ccfg = CompressionConfig(
            policy="lococo", cache_size=16, chunk_size=8, kernel_size=5, fusion_impl=impl
        )
        params = dict(
            tiny_params, lococo=policies.init_params(jax.random.PRNGKey(3), tiny_cfg, ccfg)
        )
        res = longctx.run_long(
            params, toks, tiny_cfg, ccfg, lengths=np.array([56, 41]), output="logits"
        )
        out[impl] = (res.out, np.asarray(res.state.k))
    np.testing.assert_allclose(out["pallas"][0], out["reference"][0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["pallas"][1], out["reference"][1], atol=1e-5, rtol=0)


def test_truncation_trains_compressors_but_cuts_earlier_chunks(tiny_cfg, tiny_params):
    """truncate=True: the last chunk's loss reaches the compressors, but no embedding row of a
    token that only earlier chunks hold (tiny_cfg's head is untied, so the embedding rows get
    gradient only through the model's inputs)."""
    assert not tiny_cfg.tie_word_embeddings
    ccfg = CompressionConfig(policy="lococo", cache_size=16, chunk_size=8, kernel_size=3)
    params = dict(tiny_params, lococo=policies.init_params(jax.random.PRNGKey(2), tiny_cfg, ccfg))
    n, rng = 5, np.random.RandomState(1)
    early = rng.randint(0, 40, (n - 1, 1, 8))
    last = rng.randint(50, tiny_cfg.vocab_size, (1, 1, 8))
    toks = jnp.asarray(np.concatenate([early, last]))
    tgt = np.full((n, 1, 8), -1, np.int32)
    tgt[-1, 0, :-1] = last[0, 0, 1:]

    def grads(truncate: bool):
        def loss(p):
            return chunked_nll_sum(p, tiny_cfg, ccfg, toks, jnp.asarray(tgt), truncate=truncate)

        return jax.grad(loss)(params)

    cut, full = grads(True), grads(False)
    assert np.abs(np.asarray(full["embed"][:40])).max() > 1e-6
    np.testing.assert_array_equal(np.asarray(cut["embed"][:40]), 0.0)
    assert np.abs(np.asarray(cut["embed"][50:])).max() > 1e-6
    for leaf in jax.tree.leaves(cut["lococo"]):
        assert np.isfinite(np.asarray(leaf)).all()
    w = np.asarray(cut["lococo"]["convs"][0]["w"])
    assert all(np.abs(w[li]).max() > 0 for li in range(tiny_cfg.num_hidden_layers))


def test_normalizer_is_clipped_to_a_convex_mixture():
    """a < 0 acts as a = 0 (anchors only) when clipped; unclipped, fused values overshoot the
    range of the values they mix (rows of W with negative weights)."""
    d, M, B, b, h = 4, 16, 8, 1, 2
    S = M + B
    rng = np.random.RandomState(5)
    V = rng.rand(b, h, S, d).astype(np.float32)  # values in [0, 1)
    s = rng.rand(b, h, S).astype(np.float32)
    e = all_valid_entries(rng.randn(b, h, S, d).astype(np.float32), V, s, s)
    out = {}
    for clip in (True, False):
        ccfg = CompressionConfig(
            policy="lococo",
            cache_size=M,
            chunk_size=B,
            kernel_size=3,
            normalizer="clip" if clip else "official",
        )
        layer = jax.tree.map(
            lambda x: x[0], lococo.init_params(jax.random.PRNGKey(1), _cfg(d), ccfg)
        )
        for a in (-3.0, 0.0):
            out[clip, a] = np.asarray(lococo.compress(ccfg, dict(layer, normalizer=a), e).v)
    np.testing.assert_array_equal(out[True, -3.0], out[True, 0.0])
    assert out[True, -3.0].min() >= 0.0 and out[True, -3.0].max() < 1.0
    assert out[False, -3.0].min() < 0.0 or out[False, -3.0].max() > 1.0


def test_local_entries_are_the_most_recent_by_position():
    """Slots are stored as [heavy ; fused], not by position: after a flush or a short last
    chunk (fewer window entries than local_len) the local_len kept entries are still the most
    recent tokens, wherever they sit."""
    d, M, B, b, h = 4, 16, 8, 1, 2
    ccfg = CompressionConfig(
        policy="lococo",
        cache_size=M,
        chunk_size=B,
        local_len=4,
        kernel_size=3,
        fusion_impl="reference",
    )
    rng = np.random.RandomState(3)
    S = M + B
    n_valid = M + 2  # a short window: 2 entries < local_len
    pos = np.full((b, h, S), -1)
    pos[..., :n_valid] = rng.permutation(100)[:n_valid]  # slot order is not position order
    valid = np.arange(S) < n_valid
    e = Entries(
        k=jnp.asarray(rng.randn(b, h, S, d) * valid[:, None], jnp.float32),
        v=jnp.asarray(rng.randn(b, h, S, d) * valid[:, None], jnp.float32),
        pos=jnp.asarray(pos, jnp.int32),
        valid=jnp.broadcast_to(jnp.asarray(valid), (b, h, S)),
        acc=jnp.zeros((b, h, S)),
        chunk=jnp.asarray(rng.rand(b, h, S) * valid, jnp.float32),
        last=jnp.zeros((b, S)),
        n_valid=jnp.full((b,), n_valid, jnp.int32),
    )
    layer = jax.tree.map(lambda x: x[0], lococo.init_params(jax.random.PRNGKey(0), _cfg(d), ccfg))
    out = lococo.compress(ccfg, layer, e)
    for hi in range(h):
        newest = set(np.sort(pos[0, hi, :n_valid])[-4:].tolist())
        heavy = set(np.asarray(out.pos[0, hi, : ccfg.num_heavy]).tolist())
        assert newest <= heavy, (newest, heavy)
