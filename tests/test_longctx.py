"""The chunked compressed-cache forward: exactness while the input fits, the eviction policies
against a float64 numpy model written here, one compile for every length, and decoding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lococo_jax import evaluate, generate, llama, longctx, policies
from lococo_jax.compile_log import CompileLog
from lococo_jax.config import CompressionConfig
from lococo_jax.kv_state import init_state

POLICIES = sorted(policies.REGISTRY)


def with_policy_params(params, cfg, ccfg, seed=1):
    p = dict(params)
    sub = policies.init_params(jax.random.PRNGKey(seed), cfg, ccfg)
    if sub is not None:
        p["lococo"] = sub
    return p


# ---------------------------------------------------------------- exact while it fits


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("chunk", [8, 16, 7])
def test_equals_full_attention_while_input_fits(tiny_cfg, tiny_params, policy, chunk):
    toks = np.random.RandomState(0).randint(0, tiny_cfg.vocab_size, (2, 48))
    ccfg = CompressionConfig(policy=policy, cache_size=48, chunk_size=chunk, kernel_size=3)
    params = with_policy_params(tiny_params, tiny_cfg, ccfg)
    ref = np.asarray(llama.forward(tiny_params, jnp.asarray(toks), tiny_cfg))
    out = longctx.run_long(params, toks, tiny_cfg, ccfg, output="logits", segment_chunks=2).out
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("policy", POLICIES)
def test_ragged_batch_rows_equal_their_own_full_attention(tiny_cfg, tiny_params, policy):
    rng = np.random.RandomState(1)
    toks = rng.randint(0, tiny_cfg.vocab_size, (3, 40))
    lengths = np.array([40, 17, 1])
    ccfg = CompressionConfig(policy=policy, cache_size=40, chunk_size=8, kernel_size=3)
    params = with_policy_params(tiny_params, tiny_cfg, ccfg)
    res = longctx.run_long(params, toks, tiny_cfg, ccfg, lengths=lengths, output="logits")
    for row, n in enumerate(lengths):
        ref = np.asarray(llama.forward(tiny_params, jnp.asarray(toks[row : row + 1, :n]), tiny_cfg))
        np.testing.assert_allclose(res.out[row, :n], ref[0], atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(res.last_logits[row]), ref[0, -1], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(res.state.seen), lengths)
    np.testing.assert_array_equal(np.asarray(res.state.filled), lengths)


def test_nll_output_matches_logits(tiny_cfg, tiny_params):
    toks = np.random.RandomState(2).randint(0, tiny_cfg.vocab_size, (1, 30))
    ccfg = CompressionConfig(policy="streaming", cache_size=12, chunk_size=8)
    logits = longctx.run_long(tiny_params, toks, tiny_cfg, ccfg, output="logits").out
    nll = longctx.run_long(tiny_params, toks, tiny_cfg, ccfg, output="nll").out
    logp = jax.nn.log_softmax(jnp.asarray(logits[0, :-1]), axis=-1)
    want = -np.take_along_axis(np.asarray(logp), toks[0, 1:, None], axis=-1)[:, 0]
    np.testing.assert_allclose(nll[0, :-1], want, atol=1e-5)
    assert nll[0, -1] == 0.0  # no next token to score


# ---------------------------------------------------------------- numpy reference model


def _np_rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _np_rope(x, pos, theta):
    hd = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    f = pos[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([f, f], -1)), np.sin(np.concatenate([f, f], -1))
    rot = np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
    return x * cos[:, None] + rot * sin[:, None]


def np_kept_positions(params, cfg, tokens, policy, M, B, sink=4, recent=None):
    """A float64 re-implementation: returns, per chunk, kept positions [layer][kv_head]."""
    P = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    Ly = P["layers"]
    H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    G = H // KV
    recent = M // 2 if recent is None else recent
    cache = [
        [
            dict(k=np.zeros((0, hd)), v=np.zeros((0, hd)), pos=np.zeros(0, int), acc=np.zeros(0))
            for _ in range(KV)
        ]
        for _ in range(cfg.num_hidden_layers)
    ]
    history = []
    for start in range(0, len(tokens), B):
        tok = tokens[start : start + B]
        T = len(tok)
        pos = np.arange(start, start + T)
        x = P["embed"][tok]
        for li in range(cfg.num_hidden_layers):
            lp = {k: v[li] for k, v in Ly.items()}
            h = _np_rms(x, lp["attn_norm"], cfg.rms_norm_eps)
            q = _np_rope((h @ lp["wq"]).reshape(T, H, hd), pos, cfg.rope_theta)
            k = _np_rope((h @ lp["wk"]).reshape(T, KV, hd), pos, cfg.rope_theta)
            v = (h @ lp["wv"]).reshape(T, KV, hd)
            out = np.zeros((T, H, hd))
            last_scores = []
            chunk_scores = []
            for j in range(KV):
                c = cache[li][j]
                keys = np.concatenate([c["k"], k[:, j]])
                vals = np.concatenate([c["v"], v[:, j]])
                n_old = len(c["k"])
                score = np.zeros(len(keys))
                for gi in range(G):
                    hh = j * G + gi
                    logits = q[:, hh] @ keys.T / np.sqrt(hd)
                    for t in range(T):
                        logits[t, n_old + t + 1 :] = -np.inf
                    p = np.exp(logits - logits.max(-1, keepdims=True))
                    p /= p.sum(-1, keepdims=True)
                    out[:, hh] = p @ vals
                    score += p.sum(0)
                    last_scores.append(p[-1])
                chunk_scores.append(score)
            last = np.mean(last_scores, axis=0)  # same entry set for every head (tova)
            for j in range(KV):
                c = cache[li][j]
                ent_pos = np.concatenate([c["pos"], pos])
                acc = np.concatenate([c["acc"], np.zeros(T)]) + chunk_scores[j]
                ek = np.concatenate([c["k"], k[:, j]])
                ev = np.concatenate([c["v"], v[:, j]])
                n = len(ent_pos)
                if n <= M:
                    keep = np.arange(n)
                elif policy == "streaming":
                    keep = np.concatenate([np.arange(sink), np.arange(n - (M - sink), n)])
                elif policy == "h2o":
                    rest = np.arange(n - recent)
                    top = rest[np.argsort(-acc[rest], kind="stable")[: M - recent]]
                    keep = np.sort(np.concatenate([top, np.arange(n - recent, n)]))
                elif policy == "tova":
                    keep = np.sort(np.argsort(-last, kind="stable")[:M])
                cache[li][j] = dict(k=ek[keep], v=ev[keep], pos=ent_pos[keep], acc=acc[keep])
            x = x + out.reshape(T, H * hd) @ lp["wo"]
            h = _np_rms(x, lp["mlp_norm"], cfg.rms_norm_eps)
            gate = h @ lp["w_gate"]
            x = x + (gate / (1 + np.exp(-gate)) * (h @ lp["w_up"])) @ lp["w_down"]
        history.append([[c["pos"].copy() for c in layer] for layer in cache])
    return history


@pytest.mark.parametrize("policy", ["streaming", "h2o", "tova"])
def test_eviction_policies_keep_what_numpy_keeps(tiny_cfg, peaky_params, policy):
    M, B, L = 16, 8, 90  # several times M, ragged last chunk
    toks = np.random.RandomState(3).randint(0, tiny_cfg.vocab_size, (L,))
    ccfg = CompressionConfig(policy=policy, cache_size=M, chunk_size=B, sink=4)
    want = np_kept_positions(peaky_params, tiny_cfg, toks, policy, M, B, sink=4)
    state = init_state(tiny_cfg, ccfg, 1)
    for c, start in enumerate(range(0, L, B)):
        chunk = toks[None, start : start + B]
        state = longctx.run_long(
            peaky_params, chunk, tiny_cfg, ccfg, output="last", state=state, segment_chunks=1
        ).state
        filled = int(state.filled[0])
        pos = np.asarray(state.pos)
        for li in range(tiny_cfg.num_hidden_layers):
            for j in range(tiny_cfg.num_key_value_heads):
                got = pos[li, 0, j, :filled]
                np.testing.assert_array_equal(
                    got, want[c][li][j], err_msg=f"chunk {c} layer {li} kv head {j}"
                )
    assert int(state.filled[0]) == M


# ---------------------------------------------------------------- one compile, decoding


def test_one_compile_for_every_length(tiny_cfg, tiny_params):
    B = 8
    ccfg = CompressionConfig(policy="lococo", cache_size=16, chunk_size=B, kernel_size=3)
    # Committed to a device, as load_model's parameters are.
    params = jax.device_put(with_policy_params(tiny_params, tiny_cfg, ccfg), jax.devices()[0])
    before = longctx._segment._cache_size()
    # XLA compiles, not only traces: a first segment whose state is not on the device the
    # later segments' states are (committed) would compile the same trace a second time.
    with CompileLog() as log:
        rng = np.random.RandomState(4)
        for n_chunks in (4, 16, 64):
            toks = rng.randint(0, tiny_cfg.vocab_size, (1, n_chunks * B))
            res = longctx.run_long(params, toks, tiny_cfg, ccfg, output="nll", segment_chunks=4)
            assert res.out.shape == (1, n_chunks * B)
            assert np.isfinite(res.out).all()
    assert longctx._segment._cache_size() - before == 1
    assert len(log.names("_segment")) == 1, log.compiles


@pytest.mark.parametrize("policy", ["lococo", "tova"])
def test_decode_continues_like_full_attention_while_it_fits(tiny_cfg, tiny_params, policy):
    prompt = np.random.RandomState(5).randint(0, tiny_cfg.vocab_size, (1, 13))
    ccfg = CompressionConfig(policy=policy, cache_size=64, chunk_size=8, kernel_size=3)
    params = with_policy_params(tiny_params, tiny_cfg, ccfg)
    out = generate.generate(
        params, prompt, tiny_cfg, ccfg, generate.SamplingConfig(max_new_tokens=20)
    ).tokens
    # Greedy with full attention recomputed over the whole (causal, so right-padded) sequence.
    seq = np.zeros((1, 33), np.int32)
    seq[0, :13] = prompt[0]
    fwd = jax.jit(lambda s: llama.forward(tiny_params, s, tiny_cfg))
    for t in range(13, 33):
        seq[0, t] = int(jnp.argmax(fwd(jnp.asarray(seq))[0, t - 1]))
    np.testing.assert_array_equal(out[0], seq[0, 13:])


def test_decode_logits_match_full_attention(tiny_cfg, tiny_params):
    toks = np.random.RandomState(6).randint(0, tiny_cfg.vocab_size, (2, 30))
    ccfg = CompressionConfig(policy="h2o", cache_size=32, chunk_size=8)
    res = longctx.run_long(tiny_params, toks[:, :11], tiny_cfg, ccfg, output="last")
    ref = np.asarray(llama.forward(tiny_params, jnp.asarray(toks), tiny_cfg))
    state = res.state
    before = generate.decode_step._cache_size()
    for t in range(11, 30):
        _, logits, state = generate.decode_step(
            tiny_params,
            state,
            jnp.asarray(toks[:, t]),
            jax.random.PRNGKey(0),
            tiny_cfg,
            ccfg,
            0.0,
            1.0,
        )
        np.testing.assert_allclose(np.asarray(logits), ref[:, t], atol=1e-5)
    assert generate.decode_step._cache_size() - before == 1


def test_decode_compresses_when_window_fills(tiny_cfg, tiny_params):
    M, B, sink = 12, 4, 2
    ccfg = CompressionConfig(policy="streaming", cache_size=M, chunk_size=B, sink=sink)
    prompt = np.random.RandomState(7).randint(0, tiny_cfg.vocab_size, (1, 10))
    gen = generate.generate(
        tiny_params, prompt, tiny_cfg, ccfg, generate.SamplingConfig(max_new_tokens=27)
    )
    st = gen.state
    seen = 10 + 26  # the last sampled token is not fed back
    assert int(st.seen[0]) == seen
    n_win = int(st.win_valid[0])
    assert int(st.win_len) == n_win < B
    # Slots hold the sinks and the most recent positions before the raw window.
    expect = list(range(sink)) + list(range(seen - n_win - (M - sink), seen - n_win))
    np.testing.assert_array_equal(np.asarray(st.pos[0, 0, 0]), expect)


def test_sampling_top_p_and_temperature():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    draws = np.array([int(generate.sample(logits, k, 1.0, 0.7)[0]) for k in keys])
    assert set(draws) == {0, 1}  # the 0.7 nucleus is {0.5, 0.3}
    assert 0.5 < (draws == 0).mean() < 0.75  # 0.5 / 0.8 = 0.625
    assert int(generate.sample(logits, keys[0], 0.0, 1.0)[0]) == 0


# ---------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors(tiny_cfg, tiny_params):
    from lococo_jax.config import ConfigError

    with pytest.raises(ConfigError, match="cache_size"):
        CompressionConfig(cache_size=0)
    with pytest.raises(ConfigError, match="chunk_size"):
        CompressionConfig(chunk_size=-1)
    with pytest.raises(ConfigError, match="sink"):
        CompressionConfig(policy="streaming", cache_size=4, sink=4)
    with pytest.raises(ConfigError, match="h2o_recent"):
        CompressionConfig(policy="h2o", cache_size=8, h2o_recent=8)
    with pytest.raises(ConfigError, match="local_len"):
        CompressionConfig(policy="lococo", cache_size=8, local_len=5)
    with pytest.raises(ConfigError, match="kernel_size"):
        CompressionConfig(policy="lococo", kernel_size=4)
    with pytest.raises(ConfigError, match="kernel_size"):
        CompressionConfig(policy="lococo", cache_size=4, chunk_size=2, kernel_size=21)
    ccfg = CompressionConfig(policy="streaming", cache_size=16, chunk_size=8)
    other = CompressionConfig(policy="streaming", cache_size=32, chunk_size=8)
    state = init_state(tiny_cfg, other, 1)
    with pytest.raises(ValueError, match="field 'k'.*cache_size=16"):
        longctx.apply(tiny_params, jnp.zeros((1, 8), jnp.int32), state, tiny_cfg, ccfg)
    with pytest.raises(ValueError, match="token ids out of range"):
        longctx.run_long(tiny_params, np.array([[1, 2, 500]]), tiny_cfg, ccfg)
    with pytest.raises(ValueError, match="policy 'full' keeps every token"):
        full = CompressionConfig(policy="full", cache_size=8, chunk_size=8)
        longctx.run_long(tiny_params, np.ones((1, 20), int), tiny_cfg, full)
    with pytest.raises(ValueError, match="params\\['lococo'\\]"):
        lc = CompressionConfig(policy="lococo", cache_size=16, chunk_size=8, kernel_size=3)
        longctx.run_long(tiny_params, np.ones((1, 20), int), tiny_cfg, lc)


def test_prefix_perplexities_match_a_loop():
    nll = np.random.RandomState(0).uniform(0.5, 4.0, 99)  # NLL of tokens 2..100
    got = evaluate.prefix_perplexities(nll, [2, 10, 100])
    want = {str(n): float(np.exp(sum(nll[: n - 1]) / (n - 1))) for n in (2, 10, 100)}
    assert got.keys() == want.keys()
    for n in want:
        assert abs(got[n] - want[n]) < 1e-9 * want[n], n


# ---------------------------------------------------------------- call-by-call loop oracle


class NpCache:
    """One row's compressed cache as a float64 loop: calls append to a raw window, compress()
    turns [slots ; window] into the next slots by the policy (DESIGN.md), lococo included."""

    def __init__(self, params, cfg, ccfg):
        self.P = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
        self.cfg, self.ccfg = cfg, ccfg
        L, KV = cfg.num_hidden_layers, cfg.num_key_value_heads
        hd = cfg.head_dim
        self.seen = 0
        empty = lambda: dict(k=np.zeros((0, hd)), v=np.zeros((0, hd)), pos=np.zeros(0, int))
        # per layer, per kv head: entries [slots ; window] in storage order
        self.ent = [
            [dict(empty(), acc=np.zeros(0), since=np.zeros(0)) for _ in range(KV)] for _ in range(L)
        ]
        self.n_slots = 0
        self.last = [np.zeros(0) for _ in range(L)]

    def feed(self, tok):
        cfg, P = self.cfg, self.P
        H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        G, T = H // KV, len(tok)
        pos = np.arange(self.seen, self.seen + T)
        x = P["embed"][np.asarray(tok)]
        for li in range(cfg.num_hidden_layers):
            lp = {k: v[li] for k, v in P["layers"].items()}
            h = _np_rms(x, lp["attn_norm"], cfg.rms_norm_eps)
            q = _np_rope((h @ lp["wq"]).reshape(T, H, hd), pos, cfg.rope_theta)
            k = _np_rope((h @ lp["wk"]).reshape(T, KV, hd), pos, cfg.rope_theta)
            v = (h @ lp["wv"]).reshape(T, KV, hd)
            out, lasts = np.zeros((T, H, hd)), []
            for j in range(KV):
                c = self.ent[li][j]
                c["k"] = np.concatenate([c["k"], k[:, j]])
                c["v"] = np.concatenate([c["v"], v[:, j]])
                c["pos"] = np.concatenate([c["pos"], pos])
                c["acc"] = np.concatenate([c["acc"], np.zeros(T)])
                c["since"] = np.concatenate([c["since"], np.zeros(T)])
                n_old = len(c["k"]) - T
                for gi in range(G):
                    logits = q[:, j * G + gi] @ c["k"].T / np.sqrt(hd)
                    for t in range(T):
                        logits[t, n_old + t + 1 :] = -np.inf
                    p = np.exp(logits - logits.max(-1, keepdims=True))
                    p /= p.sum(-1, keepdims=True)
                    out[:, j * G + gi] = p @ c["v"]
                    c["since"] += p.sum(0)
                    c["acc"] += p.sum(0)
                    lasts.append(p[-1])
            self.last[li] = np.mean(lasts, axis=0)
            x = x + out.reshape(T, H * hd) @ lp["wo"]
            h = _np_rms(x, lp["mlp_norm"], cfg.rms_norm_eps)
            gate = h @ lp["w_gate"]
            x = x + (gate / (1 + np.exp(-gate)) * (h @ lp["w_up"])) @ lp["w_down"]
        self.seen += T
        x = _np_rms(x, P["final_norm"], cfg.rms_norm_eps)
        return x @ (P["embed"].T if cfg.tie_word_embeddings else P["lm_head"])

    def compress(self):
        ccfg = self.ccfg
        M = ccfg.cache_size
        for li, layer in enumerate(self.ent):
            for j, c in enumerate(layer):
                n = len(c["pos"])
                if n <= M:
                    keep = np.arange(n)
                elif ccfg.policy == "streaming":
                    keep = np.concatenate([np.arange(ccfg.sink), np.arange(n - (M - ccfg.sink), n)])
                elif ccfg.policy == "h2o":
                    r = ccfg.recent
                    top = np.argsort(-c["acc"][: n - r], kind="stable")[: M - r]
                    keep = np.sort(np.concatenate([top, np.arange(n - r, n)]))
                elif ccfg.policy == "tova":
                    keep = np.sort(np.argsort(-self.last[li][:n], kind="stable")[:M])
                elif ccfg.policy == "lococo":
                    layer[j] = self._lococo(li, c)
                    continue
                layer[j] = {f: a[keep] for f, a in c.items()}
                layer[j]["since"] = np.zeros(len(keep))
            self.last[li] = np.zeros(0)

    def _lococo(self, li, c):
        ccfg = self.ccfg
        C, keep, local = ccfg.num_fused, ccfg.num_heavy, ccfg.local_len
        n = len(c["pos"])
        recent = set(np.argsort(-c["pos"])[:local].tolist())  # most recent by position
        others = [i for i in range(n) if i not in recent]
        by_score = sorted(others, key=lambda i: (-c["since"][i], i))[: keep - local]
        heavy = sorted(recent | set(by_score))
        rest = [i for i in range(n) if i not in heavy]
        N = len(rest)
        anchors = sorted(sorted(range(N), key=lambda m: (-c["since"][rest[m]], m))[:C])
        R = np.zeros((C, N))
        R[np.arange(C), anchors] = 1.0
        x = np.concatenate([c["k"][rest], c["v"][rest]], axis=1).T  # [2d, N]
        pad = (ccfg.kernel_size - 1) // 2
        for conv in self.P["lococo"]["convs"]:
            w, b = conv["w"][li], conv["b"][li]  # [k, in, out], [out]
            xp = np.pad(x, ((0, 0), (pad, pad)))
            y = np.stack(
                [sum(w[t].T @ xp[:, m + t] for t in range(ccfg.kernel_size)) + b for m in range(N)],
                axis=1,
            )
            x = np.maximum(y, 0.0)
        A = np.exp(x - x.max(axis=1, keepdims=True))
        A /= A.sum(axis=1, keepdims=True)
        a = ccfg.normalizer_init  # the stored parameter gives a = normalizer_init
        Wm = a * A + (1 - a) * R
        rest_a = np.asarray(rest)[anchors]
        return dict(
            k=np.concatenate([c["k"][heavy], Wm @ c["k"][rest]]),
            v=np.concatenate([c["v"][heavy], Wm @ c["v"][rest]]),
            pos=np.concatenate([c["pos"][heavy], c["pos"][rest_a]]),
            acc=np.concatenate([c["acc"][heavy], c["acc"][rest_a]]),
            since=np.zeros(keep + C),
        )


# (T, n_new per row) per call; "flush" compresses the window. Batch 2, B = 4, M = 12.
SCHEDULE = [
    (4, [4, 3]),  # ragged full chunks while the cache fills
    (4, [4, 4]),
    (4, [4, 2]),
    (4, [4, 1]),  # transition: row 0 compresses (16 > 12), row 1 still fits (10)
    (1, [1, 0]),  # sub-chunk ragged calls: each row continues its own prefix
    (3, [2, 3]),  # window full: compress
    (3, [3, 3]),
    "flush",  # a short window (3 < local_len 4) compressed
    (1, [1, 1]),  # decoding: one token at a time, compressing when the window fills
    (1, [1, 1]),
    (1, [1, 1]),
    (1, [1, 1]),
    (1, [1, 1]),
    (1, [0, 1]),
    "flush",
    (4, [2, 4]),  # a ragged full chunk after a flush
]


# snapkv and keydiff have their own numpy references (tests/test_policies_snapkv*.py).
@pytest.mark.parametrize("policy", ["full", "streaming", "h2o", "tova", "lococo"])
def test_every_call_pattern_equals_the_loop_oracle(tiny_cfg, peaky_params, policy):
    B = 4
    M = 64 if policy == "full" else 12
    ccfg = CompressionConfig(
        policy=policy,
        cache_size=M,
        chunk_size=B,
        sink=2,
        local_len=4,
        kernel_size=3,
        normalizer_init=0.3,
        fusion_impl="reference",
    )
    params = with_policy_params(peaky_params, tiny_cfg, ccfg)
    rows = [NpCache(params, tiny_cfg, ccfg) for _ in range(2)]
    state = init_state(tiny_cfg, ccfg, 2)
    step = jax.jit(longctx.apply, static_argnames=("cfg", "ccfg"))
    flush = jax.jit(longctx.flush, static_argnames=("cfg", "ccfg"))
    rng = np.random.RandomState(8)
    win_len = 0
    for i, call in enumerate(SCHEDULE):
        if call == "flush":
            state = flush(params, state, tiny_cfg, ccfg)
            for r in rows:
                r.compress()
            win_len = 0
        else:
            T, n_new = call
            toks = rng.randint(0, tiny_cfg.vocab_size, (2, T))
            logits, state = step(
                params, jnp.asarray(toks), state, tiny_cfg, ccfg, n_new=jnp.asarray(n_new)
            )
            for b, r in enumerate(rows):
                if n_new[b]:
                    want = r.feed(toks[b, : n_new[b]])
                    got = np.asarray(logits[b, : n_new[b]])
                    np.testing.assert_allclose(got, want, atol=1e-4, err_msg=f"call {i} row {b}")
            win_len += T
            if win_len >= B:  # rows compress together when the shared window is full
                for r in rows:
                    r.compress()
                win_len = 0
        assert int(state.win_len) == win_len
        for b, r in enumerate(rows):
            assert int(state.seen[b]) == r.seen
            n_slots = int(state.filled[b])
            for li in range(tiny_cfg.num_hidden_layers):
                for j in range(tiny_cfg.num_key_value_heads):
                    c = r.ent[li][j]
                    slots = len(c["pos"]) - int(state.win_valid[b])
                    assert slots == n_slots, f"call {i} row {b}"
                    np.testing.assert_array_equal(
                        np.asarray(state.pos[li, b, j, :n_slots]),
                        c["pos"][:n_slots],
                        err_msg=f"call {i} row {b} layer {li} head {j}",
                    )


def test_window_overflow_is_refused_or_poisoned(tiny_cfg, tiny_params):
    from jax.experimental import checkify

    ccfg = CompressionConfig(policy="streaming", cache_size=16, chunk_size=8)
    toks = jnp.ones((1, 6), jnp.int32)
    # 6 tokens in the raw window (the bookkeeping is all these checks read)
    six = jnp.array([6], jnp.int32)
    state = init_state(tiny_cfg, ccfg, 1).replace(win_len=jnp.int32(6), win_valid=six, seen=six)
    with pytest.raises(ValueError, match="holds 6 of chunk_size=8 entries: 3 more tokens"):
        longctx.apply(tiny_params, toks[:, :3], state, tiny_cfg, ccfg)
    with pytest.raises(ValueError, match="full chunk of 8 tokens needs an empty raw window"):
        longctx.apply(tiny_params, jnp.ones((1, 8), jnp.int32), state, tiny_cfg, ccfg)
    with pytest.raises(ValueError, match=r"n_new must be in \[0, 2\]"):
        longctx.apply(tiny_params, toks[:, :2], state, tiny_cfg, ccfg, n_new=jnp.array([3]))
    # Under jit the window size is a traced value: NaN logits, and checkify names the problem.
    step = jax.jit(longctx.apply, static_argnames=("cfg", "ccfg"))
    logits, _ = step(tiny_params, toks[:, :3], state, tiny_cfg, ccfg)
    assert np.isnan(np.asarray(logits)).all()
    checked = checkify.checkify(step, errors=checkify.user_checks)
    err, _ = checked(tiny_params, toks[:, :3], state, tiny_cfg, ccfg)
    with pytest.raises(checkify.JaxRuntimeError, match="do not fit the raw window"):
        err.throw()
