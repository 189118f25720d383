"""The fast paths give what the general ones give.

- llama.forward's blocked (flash) causal attention against the explicit [T, T] softmax, jax.nn's
  dot_product_attention and transformers' LlamaForCausalLM, over several blocks with a ragged
  last one, and its gradient against the explicit one's.
- longctx's steady state: the entries without the compaction sort equal the sorted ones, and
  _compress (which runs only the branch that applies) equals the append, the policy and the
  per-row select computed in full, for every policy and for rows that fit, do not, or differ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lococo_jax import llama, longctx, policies
from lococo_jax.config import CompressionConfig, LlamaConfig
from lococo_jax.kv_state import init_state
from lococo_jax.policies.base import Slots

CFG = LlamaConfig(
    vocab_size=97,
    hidden_size=96,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=16,
    rope_theta=10000.0,
    max_position_embeddings=1024,
)


@pytest.fixture(scope="module")
def params():
    return llama.init_params(CFG, jax.random.PRNGKey(0), jnp.float32, std=0.1)


def _qkv(t: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    h, kv, d = CFG.num_attention_heads, CFG.num_key_value_heads, CFG.head_dim
    q = rng.standard_normal((2, t, h, d), np.float32) * 2  # peaked rows, not uniform ones
    k = rng.standard_normal((2, t, kv, d), np.float32)
    v = rng.standard_normal((2, t, kv, d), np.float32)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


@pytest.mark.parametrize("t,block", [(1, 16), (16, 16), (50, 16), (37, 64)])
def test_blocked_attention_equals_the_explicit_softmax(t, block):
    q, k, v = _qkv(t)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (2, t, t))
    want, _ = llama.attend(CFG, q, k, v, mask)
    got = llama.causal_attention(CFG, q, k, v, block=block)
    xla = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-6)
    np.testing.assert_allclose(np.asarray(xla), np.asarray(want), rtol=0, atol=2e-6)


def test_blocked_attention_gradient_equals_the_explicit_one():
    t = 40
    q, k, v = _qkv(t, seed=1)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (2, t, t))
    w = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape, np.float32))

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v) * w).sum()

    want = jax.grad(loss(lambda q, k, v: llama.attend(CFG, q, k, v, mask)[0]), (0, 1, 2))(q, k, v)
    got = jax.grad(loss(lambda q, k, v: llama.causal_attention(CFG, q, k, v, block=16)), (0, 1, 2))(
        q, k, v
    )
    for g, r in zip(got, want, strict=True):
        assert np.abs(np.asarray(r)).max() > 0.1
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=0, atol=1e-5)


def test_forward_attention_implementations_agree(params):
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 600)), jnp.int32)
    ref = np.asarray(llama.forward(params, tokens, CFG, attention="explicit"))
    assert np.abs(ref).max() > 1.0
    for attention in ("flash", "dot_product_attention"):
        got = np.asarray(llama.forward(params, tokens, CFG, attention=attention))
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="attention must be one of"):
        llama.forward(params, tokens, CFG, attention="sdpa")


def test_flash_forward_matches_transformers_over_several_blocks(params):
    """600 tokens = two 512-token blocks, the second ragged: transformers (eager attention)
    on the same weights."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from conftest import torch_llama

    model = torch_llama(CFG, params)
    tokens = np.random.default_rng(4).integers(0, CFG.vocab_size, (1, 600))
    with torch.no_grad():
        ref = model(torch.as_tensor(tokens)).logits.numpy()
    got = np.asarray(jax.jit(llama.forward, static_argnums=2)(params, jnp.asarray(tokens), CFG))
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)


# The steady state of the compressed path.

M, W = 12, 8
POLICIES = sorted(policies.REGISTRY)


def _layer_state(filled, seed=0):
    """One layer's fields (random contents) and the StepInfo of a full chunk read on top of
    slots holding ``filled`` [b] entries: the window is then full in every row."""
    ccfg = CompressionConfig(policy="h2o", cache_size=M, chunk_size=W)
    b = len(filled)
    st = init_state(CFG, ccfg, b)
    st = st.replace(filled=jnp.asarray(filled, jnp.int32), seen=jnp.asarray(filled, jnp.int32))
    g = longctx._step_info(st, jnp.full((b,), W, jnp.int32), W)
    rng = np.random.default_rng(seed)
    kv, d = CFG.num_key_value_heads, CFG.head_dim
    slot_ok = np.arange(M)[None, :] < np.asarray(filled)[:, None]  # [b, M]

    def rand(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    ls = {
        "k": rand(b, kv, M, d) * slot_ok[:, None, :, None],
        "v": rand(b, kv, M, d) * slot_ok[:, None, :, None],
        "pos": np.where(slot_ok[:, None], np.arange(M)[None, None], -1).repeat(kv, 1),
        "score": np.abs(rand(b, kv, M)) * slot_ok[:, None],
        "win_k": rand(b, kv, W, d),
        "win_v": rand(b, kv, W, d),
        "win_score": np.abs(rand(b, kv, M + W)),
        "last_score": np.abs(rand(b, M + W)),
    }
    ls = {k: jnp.asarray(v.astype(np.int32) if k == "pos" else v) for k, v in ls.items()}
    obs = jnp.asarray(np.abs(rand(b, kv, M + W)))
    return ls, g, obs


def _assert_same(got, want, atol=1e-6):
    for name, a, b in zip(got._fields, got, want, strict=True):
        if a is None:
            assert b is None, name
            continue
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if np.issubdtype(a.dtype, np.floating):
            np.testing.assert_allclose(a, b, rtol=0, atol=atol, err_msg=name)
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_steady_state_entries_skip_the_sort_and_equal_it():
    ls, g, obs = _layer_state([M, M])
    fast = longctx._entries_full(ls, g, obs)
    general = longctx._entries_compacted(ls, g, obs)
    _assert_same(fast, general, atol=0)
    _assert_same(longctx._entries(ls, g, obs), general, atol=0)
    # Not steady: a row with room takes the sorted path, which moves its window forward.
    ls, g, obs = _layer_state([M, M - 3])
    e = longctx._entries(ls, g, obs)
    _assert_same(e, longctx._entries_compacted(ls, g, obs), atol=0)
    assert not np.asarray(e.valid[1, 0, -3:]).any()


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("filled", [[M, M], [0, 3], [M, M - W], [M - W + 1, 2]])
def test_compress_runs_one_branch_and_equals_all_of_them(policy, filled):
    """Every row full (the policy alone), every row fitting (the append alone), and mixed rows
    (both, then a per-row select) against that select computed in full."""
    if policy == "full" and max(filled) + W > M:
        pytest.skip("full never compresses (drivers refuse inputs that do not fit)")
    ccfg = CompressionConfig(
        policy=policy, cache_size=M, chunk_size=W, snapkv_window=4, kernel_size=5
    )
    cp = policies.init_params(jax.random.PRNGKey(5), CFG, ccfg)
    cp = None if cp is None else jax.tree.map(lambda x: x[0], cp)
    ls, g, obs = _layer_state(filled, seed=len(policy))
    obs = obs if policy == "snapkv" else None
    got = jax.jit(lambda ls, cp: longctx._compress(ccfg, cp, ls, g, obs))(ls, cp)

    fill = longctx._append(ls, g)
    out = policies.get(policy)(ccfg, cp, longctx._entries_compacted(ls, g, obs))
    fits = np.asarray(g.filled + g.win_valid) <= M
    want = Slots(
        *(
            np.where(fits.reshape((-1,) + (1,) * (f.ndim - 1)), np.asarray(f), np.asarray(o))
            for f, o in zip(fill, out, strict=True)
        )
    )
    _assert_same(got, want)
    if fits.all():  # the append really ran: the window follows the filled slots
        np.testing.assert_array_equal(
            np.asarray(got.k[0, :, filled[0] : filled[0] + W]), ls["win_k"][0]
        )
