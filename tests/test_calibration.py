"""Calibration objectives: the layer-local loss (train.layerwise) against numpy attention over the
inference path's own caches, the distillation KL against numpy, the spread conv init, and
the config checks that guard them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_run_fields

from lococo_jax import kv_state, llama, longctx, policies, train
from lococo_jax.config import CompressionConfig, ConfigError
from lococo_jax.policies import lococo
from lococo_jax.train import layerwise
from lococo_jax.train.step import loss_fn

M, B, N_CHUNKS = 16, 8, 5


def _ccfg(**kw) -> CompressionConfig:
    base = dict(policy="lococo", cache_size=M, chunk_size=B, kernel_size=3, local_len=2)
    return CompressionConfig(**{**base, "fusion_impl": "reference", **kw})


def _with_compressors(params, cfg, ccfg, seed=3):
    return dict(params, lococo=policies.init_params(jax.random.PRNGKey(seed), cfg, ccfg))


def _tokens(cfg, n=N_CHUNKS * B, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(0, cfg.vocab_size, (1, n)), jnp.int32)


def _np_attention(q, k, v, visible):
    """q [T, H, d], k, v [S, KV, d], visible [T, S] -> [T, H, d] (GQA, numpy, float64)."""
    T, H, d = q.shape
    g = H // k.shape[1]
    out = np.zeros((T, H, d))
    for h in range(H):
        s = q[:, h] @ k[:, h // g].T / np.sqrt(d)
        s = np.where(visible, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[:, h] = (p / p.sum(-1, keepdims=True)) @ v[:, h // g]
    return out


def test_layerwise_loss_matches_numpy_over_the_inference_caches(tiny_cfg, peaky_params):
    """Layer 0 sees the same queries, keys and values with or without compression (its input
    is the embedding), so its replay must compress exactly as longctx does: the loss equals
    numpy attention over longctx's own slots, chunk by chunk, against full causal attention."""
    cfg, ccfg = tiny_cfg, _ccfg()
    params = _with_compressors(peaky_params, cfg, ccfg)
    tokens = _tokens(cfg)
    acts = layerwise.teacher(params, tokens, cfg)
    q, k, v, o = (np.asarray(x[0, 0], np.float64) for x in acts)  # layer 0, row 0
    wo = np.asarray(params["layers"]["wo"][0], np.float64)
    T = tokens.shape[1]

    full = _np_attention(q, k, v, np.tril(np.ones((T, T), bool)))
    np.testing.assert_allclose(o, full, atol=1e-5)

    # Chunk by chunk through the inference path; keep layer 0's slots before each chunk.
    state = kv_state.init_state(cfg, ccfg, 1)
    num = den = 0.0
    compressed = False
    for c in range(N_CHUNKS):
        sl = slice(c * B, (c + 1) * B)
        if compressed:  # the loss counts the chunks that read a compressed cache
            ks = np.asarray(state.k[0, 0]).transpose(1, 0, 2)  # [M, kv, d]
            vs = np.asarray(state.v[0, 0]).transpose(1, 0, 2)
            keys, vals = np.concatenate([ks, k[sl]]), np.concatenate([vs, v[sl]])
            vis = np.concatenate([np.ones((B, M), bool), np.tril(np.ones((B, B), bool))], 1)
            oc = _np_attention(q[sl], keys, vals, vis)
            num += np.sum(((oc - full[sl]).reshape(B, -1) @ wo) ** 2)
            den += np.sum((full[sl].reshape(B, -1) @ wo) ** 2)
        compressed = compressed or int(state.filled[0]) + B > M
        _, state = longctx.apply(params, tokens[:, sl], state, cfg, ccfg)
    assert num > 0  # compression changed something, so the comparison means something

    cp0 = jax.tree.map(lambda x: x[0], params["lococo"])
    got_num, got_den, (sk, sv, spos) = layerwise.replay(
        cfg, ccfg, cp0, *(x[0] for x in acts), params["layers"]["wo"][0]
    )
    np.testing.assert_allclose(float(got_num), num, rtol=1e-4)
    np.testing.assert_allclose(float(got_den), den, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(spos), np.asarray(state.pos[0]))
    np.testing.assert_allclose(np.asarray(sk), np.asarray(state.k[0]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(sv), np.asarray(state.v[0]), atol=1e-5)

    loss, per_layer = layerwise.loss(params, tokens, cfg, ccfg)
    np.testing.assert_allclose(float(per_layer[0]), num / den, rtol=1e-4)
    np.testing.assert_allclose(float(loss), float(per_layer.mean()), rtol=1e-6)


def test_layerwise_gradient_reaches_only_each_layers_own_compressor(tiny_cfg, peaky_params):
    cfg, ccfg = tiny_cfg, _ccfg(conv_init="spread")
    params = _with_compressors(peaky_params, cfg, ccfg)
    tokens = _tokens(cfg)

    def per_layer(lc):
        return layerwise.loss(dict(params, lococo=lc), tokens, cfg, ccfg)[1]

    jac = jax.jacrev(per_layer)(params["lococo"])  # d err_l / d compressor leaves [L, L, ...]
    for leaf in jax.tree.leaves(jac):
        for l_out in range(cfg.num_hidden_layers):
            for l_in in range(cfg.num_hidden_layers):
                g = np.abs(np.asarray(leaf[l_out, l_in])).max()
                assert (g > 0) == (l_out == l_in), (l_out, l_in, g)


def test_layerwise_needs_a_sample_that_reads_a_compressed_cache(tiny_cfg, tiny_params):
    cfg, ccfg = tiny_cfg, _ccfg()
    params = _with_compressors(tiny_params, cfg, ccfg)
    with pytest.raises(ValueError, match="never reads a compressed cache"):
        layerwise.loss(params, _tokens(cfg, n=2 * B), cfg, ccfg)


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_distillation_kl_matches_numpy(tiny_cfg, peaky_params):
    cfg, ccfg = tiny_cfg, _ccfg()
    params = _with_compressors(peaky_params, cfg, ccfg)
    tokens = _tokens(cfg, n=N_CHUNKS * B + 1)
    inp = tokens[:, :-1]
    teacher = llama.forward(params, inp, cfg)
    kw = dict(clean_period=N_CHUNKS, remat=False, truncate=False, lora_scale=1.0)
    got = loss_fn(params, tokens, cfg, ccfg, teacher_logits=teacher, lm_weight=0.0,
                  distill_weight=1.0, **kw)  # fmt: skip

    state = kv_state.init_state(cfg, ccfg, 1)
    n_new = jnp.full((N_CHUNKS, 1), B, jnp.int32)
    _, _, student = longctx.scan_chunks(
        params, state, inp.reshape(1, N_CHUNKS, B).transpose(1, 0, 2), n_new, cfg, ccfg,
        output="logits",
    )  # fmt: skip
    s = np.asarray(student, np.float64).transpose(1, 0, 2, 3).reshape(-1, cfg.vocab_size)
    t = np.asarray(teacher, np.float64).reshape(-1, cfg.vocab_size)
    lt, ls = _np_log_softmax(t), _np_log_softmax(s)
    kl = (np.exp(lt) * (lt - ls)).sum(-1)
    assert kl[: 3 * B].max() < 1e-6  # before the first compression the caches are exact
    assert kl.mean() > 1e-4
    np.testing.assert_allclose(float(got), kl.mean(), rtol=1e-4)

    nll = loss_fn(params, tokens, cfg, ccfg, **kw)
    both = loss_fn(params, tokens, cfg, ccfg, teacher_logits=teacher, distill_weight=0.5, **kw)
    np.testing.assert_allclose(float(both), float(nll) + 0.5 * kl.mean(), rtol=1e-4)


def _softmax_max(conv_init: str, cfg) -> float:
    """Mean over fused slots of the largest weight of A (the conv softmax over positions)."""
    ccfg = _ccfg(conv_init=conv_init, cache_size=64, chunk_size=64, kernel_size=21)
    layer = jax.tree.map(lambda x: x[0], lococo.init_params(jax.random.PRNGKey(0), cfg, ccfg))
    rng = np.random.RandomState(0)
    n, d = 96, cfg.head_dim
    k = jnp.asarray(rng.randn(3, n, d) * 2, jnp.float32)
    v = jnp.asarray(rng.randn(3, n, d), jnp.float32)
    (w, b) = layer["convs"][0]["w"], layer["convs"][0]["b"]
    x = jnp.concatenate([k, v], -1)
    s = jax.lax.conv_general_dilated(
        x, w, (1,), [(10, 10)], dimension_numbers=("NWC", "WIO", "NWC")
    )
    a = jax.nn.softmax(jax.nn.relu(s + b), axis=1)  # [3, n, C]
    return float(a.max(axis=1).mean())


def test_spread_init_starts_the_softmax_spread_not_one_hot(tiny_cfg):
    n = 96
    assert _softmax_max("normal", tiny_cfg) > 0.5  # the official init: nearly a pointer
    assert _softmax_max("spread", tiny_cfg) < 1.5 / n  # within 1.5x of uniform


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (dict(objective="layerwise"), "objective"),  # train_norms_embed defaults to true
        (dict(objective="layerwise", train_norms_embed=False, policy="h2o"), "objective"),
        (dict(objective="distill", distill_weight=0.0), "distill_weight"),
        (dict(objective="kl"), "objective"),
    ],
)
def test_objective_config_errors_name_the_field(tmp_path, fields, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        train.TrainConfig(**tiny_run_fields(tmp_path, **fields))


@pytest.mark.parametrize("objective", ["layerwise", "lm+distill"])
def test_objectives_train_the_compressors_only(tmp_path, objective):
    fields = tiny_run_fields(
        tmp_path, objective=objective, train_norms_embed=False, conv_init="spread", steps=2
    )
    out = train.train(train.TrainConfig(**fields))
    assert all(np.isfinite(v) for v in out["losses"].values())
    run, tr = out["run"], out["state"]["trainable"]
    assert set(tr) == {"lococo"}
    init = run.init_ts()["trainable"]["lococo"]
    for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(tr["lococo"]), strict=True):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() > 0
