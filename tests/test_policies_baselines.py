"""SnapKV and KeyDiff against plain numpy loops: the policies on hand-made entries (ragged rows,
slots holding older positions), and SnapKV end to end through the chunked forward (its
observation window is computed inside the attention), against a float64 model written here."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from lococo_jax import longctx
from lococo_jax.config import CompressionConfig, ConfigError
from lococo_jax.kv_state import init_state
from lococo_jax.policies import keydiff, snapkv
from lococo_jax.policies.base import Entries


def ragged_entries(rng, b, h, S, d, n_valid):
    """Random entries whose first n_valid[row] are valid (the rest zero, as longctx builds)."""
    valid = np.arange(S)[None, None, :] < np.asarray(n_valid)[:, None, None]
    valid = np.broadcast_to(valid, (b, h, S))
    k = rng.randn(b, h, S, d).astype(np.float32) * valid[..., None]
    v = rng.randn(b, h, S, d).astype(np.float32) * valid[..., None]
    pos = np.where(valid, np.cumsum(rng.randint(1, 4, (b, h, S)), axis=-1), -1).astype(np.int32)
    obs = (rng.rand(b, h, S) * valid).astype(np.float32)
    acc = rng.rand(b, h, S).astype(np.float32)
    e = Entries(
        k=jax.numpy.asarray(k),
        v=jax.numpy.asarray(v),
        pos=jax.numpy.asarray(pos),
        valid=jax.numpy.asarray(valid),
        acc=jax.numpy.asarray(acc),
        chunk=jax.numpy.asarray(rng.rand(b, h, S).astype(np.float32)),
        last=jax.numpy.asarray(rng.rand(b, S).astype(np.float32)),
        n_valid=jax.numpy.asarray(np.asarray(n_valid, np.int32)),
        obs=jax.numpy.asarray(obs),
    )
    return e, k, pos, obs


def np_snapkv_keep(obs, n, M, w, kernel, how):
    """One row and head: obs [S] scores, n valid. SnapKV's selection as written in its paper's
    code: pool the scores of the n - w older entries (padding kernel // 2; avg counts the
    padding, max ignores it), top M - w of them, plus the last w; sorted indices."""
    m = n - w
    pad = kernel // 2
    pooled = []
    for i in range(m):
        vals = [obs[j] if 0 <= j < m else None for j in range(i - pad, i + pad + 1)]
        if how == "avg":
            pooled.append(sum(x for x in vals if x is not None) / kernel)
        else:
            pooled.append(max(x for x in vals if x is not None))
    top = sorted(range(m), key=lambda i: (-pooled[i], i))[: M - w]
    return sorted(top + list(range(m, n)))


@pytest.mark.parametrize("how, kernel, w", [("avg", 5, 4), ("max", 7, 3), ("avg", 1, 1)])
def test_snapkv_keeps_what_a_loop_keeps(how, kernel, w):
    rng = np.random.RandomState(0)
    b, h, S, d, M = 3, 2, 24, 4, 12
    n_valid = [24, 17, 13]  # ragged rows, all above M (the policy only runs then)
    e, k, pos, obs = ragged_entries(rng, b, h, S, d, n_valid)
    ccfg = CompressionConfig(
        policy="snapkv",
        cache_size=M,
        chunk_size=12,
        snapkv_window=w,
        snapkv_kernel=kernel,
        snapkv_pooling=how,
    )
    out = snapkv.compress(ccfg, None, e)
    for bi in range(b):
        for hi in range(h):
            keep = np_snapkv_keep(obs[bi, hi], n_valid[bi], M, w, kernel, how)
            np.testing.assert_array_equal(np.asarray(out.pos[bi, hi]), pos[bi, hi][keep])
            np.testing.assert_array_equal(np.asarray(out.k[bi, hi]), k[bi, hi][keep])


def test_snapkv_pooling_changes_the_choice():
    """A lone peak loses to a broad plateau once pooled (the point of SnapKV's pooling)."""
    S, M, w = 12, 5, 1
    obs = np.zeros(S, np.float32)
    obs[1] = 1.0  # lone peak
    obs[5:8] = 0.6  # plateau
    got_avg = np_snapkv_keep(obs, S, M, w, 5, "avg")
    got_raw = np_snapkv_keep(obs, S, M, w, 1, "avg")
    assert 1 in got_raw and got_avg != got_raw


def np_keydiff_keep(k, n, M):
    """One row and head: k [S, d], n valid -> the M entries least cosine-similar to the mean
    unit key (as kvpress's KeyDiffPress), sorted indices."""
    keys = k[:n].astype(np.float64)
    unit = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    anchor = unit.mean(0)
    cos = [keys[i] @ anchor / (np.linalg.norm(keys[i]) * np.linalg.norm(anchor)) for i in range(n)]
    return sorted(sorted(range(n), key=lambda i: (cos[i], i))[:M])


def test_keydiff_keeps_what_a_loop_keeps():
    rng = np.random.RandomState(1)
    b, h, S, d, M = 3, 2, 24, 8, 10
    n_valid = [24, 15, 11]
    e, k, pos, _ = ragged_entries(rng, b, h, S, d, n_valid)
    # Keys sharing a direction are the redundant ones KeyDiff drops.
    out = keydiff.compress(CompressionConfig(policy="keydiff", cache_size=M), None, e)
    for bi in range(b):
        for hi in range(h):
            keep = np_keydiff_keep(k[bi, hi], n_valid[bi], M)
            np.testing.assert_array_equal(np.asarray(out.pos[bi, hi]), pos[bi, hi][keep])
            np.testing.assert_array_equal(np.asarray(out.v[bi, hi]), e.v[bi, hi][np.array(keep)])


def test_snapkv_config_checks():
    with pytest.raises(ConfigError, match="snapkv_window"):
        CompressionConfig(policy="snapkv", cache_size=32, snapkv_window=32)
    with pytest.raises(ConfigError, match="snapkv_kernel"):
        CompressionConfig(policy="snapkv", snapkv_kernel=4)
    with pytest.raises(ConfigError, match="snapkv_pooling"):
        CompressionConfig(policy="snapkv", snapkv_pooling="median")


# ------------------------------------------------- SnapKV end to end, float64 model in numpy


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x, pos, theta):  # x [T, H, d], HF split-half layout
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = pos[:, None] * inv[None]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def np_snapkv_positions(params, cfg, tokens, M, B, w, kernel, how):
    """Kept positions [chunk][layer][kv head] of a float64 SnapKV reading tokens in chunks."""
    P = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    G = H // KV
    cache = [
        [dict(k=np.zeros((0, hd)), v=np.zeros((0, hd)), pos=np.zeros(0, int)) for _ in range(KV)]
        for _ in range(cfg.num_hidden_layers)
    ]
    history = []
    for start in range(0, len(tokens), B):
        tok = tokens[start : start + B]
        T = len(tok)
        pos = np.arange(start, start + T)
        x = P["embed"][tok]
        for li in range(cfg.num_hidden_layers):
            lp = {n: a[li] for n, a in P["layers"].items()}
            hdn = _rms(x, lp["attn_norm"], cfg.rms_norm_eps)
            q = _rope((hdn @ lp["wq"]).reshape(T, H, hd), pos, cfg.rope_theta)
            k = _rope((hdn @ lp["wk"]).reshape(T, KV, hd), pos, cfg.rope_theta)
            v = (hdn @ lp["wv"]).reshape(T, KV, hd)
            out = np.zeros((T, H, hd))
            for j in range(KV):
                c = cache[li][j]
                keys, vals = np.concatenate([c["k"], k[:, j]]), np.concatenate([c["v"], v[:, j]])
                n_old, n = len(c["k"]), len(c["k"]) + T
                obs = np.zeros(n)
                for gi in range(G):
                    logits = q[:, j * G + gi] @ keys.T / np.sqrt(hd)
                    for t in range(T):
                        logits[t, n_old + t + 1 :] = -np.inf
                    p = np.exp(logits - logits.max(-1, keepdims=True))
                    p /= p.sum(-1, keepdims=True)
                    out[:, j * G + gi] = p @ vals
                    obs += p[max(T - w, 0) :].sum(0)  # the chunk's last w queries
                keep = np.arange(n) if n <= M else np_snapkv_keep(obs, n, M, w, kernel, how)
                ent_pos = np.concatenate([c["pos"], pos])
                cache[li][j] = dict(k=keys[keep], v=vals[keep], pos=ent_pos[keep])
            x = x + out.reshape(T, H * hd) @ lp["wo"]
            hdn = _rms(x, lp["mlp_norm"], cfg.rms_norm_eps)
            gate = hdn @ lp["w_gate"]
            x = x + (gate / (1 + np.exp(-gate)) * (hdn @ lp["w_up"])) @ lp["w_down"]
        history.append([[c["pos"].copy() for c in layer] for layer in cache])
    return history


@pytest.mark.parametrize("how, kernel, w", [("avg", 5, 4), ("max", 3, 6)])
def test_snapkv_end_to_end_keeps_what_numpy_keeps(tiny_cfg, peaky_params, how, kernel, w):
    M, B, L = 16, 8, 61  # several compressions, ragged last chunk
    toks = np.random.RandomState(3).randint(0, tiny_cfg.vocab_size, (L,))
    ccfg = CompressionConfig(
        policy="snapkv",
        cache_size=M,
        chunk_size=B,
        snapkv_window=w,
        snapkv_kernel=kernel,
        snapkv_pooling=how,
    )
    want = np_snapkv_positions(peaky_params, tiny_cfg, toks, M, B, w, kernel, how)
    state = init_state(tiny_cfg, ccfg, 1)
    for c, start in enumerate(range(0, L, B)):
        state = longctx.run_long(
            peaky_params,
            toks[None, start : start + B],
            tiny_cfg,
            ccfg,
            output="last",
            state=state,
            segment_chunks=1,
        ).state
        pos = np.asarray(state.pos)
        filled = int(state.filled[0])
        for li in range(tiny_cfg.num_hidden_layers):
            for j in range(tiny_cfg.num_key_value_heads):
                np.testing.assert_array_equal(
                    pos[li, 0, j, :filled], want[c][li][j], err_msg=f"chunk {c} layer {li} head {j}"
                )
