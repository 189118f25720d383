"""The LoCoCo normaliser a (W = a A + (1 - a) R): parametrisations, their gradients at and past
the bounds of [0, 1], and the legacy files that said clip_normalizer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lococo_jax.config import CompressionConfig, ConfigError, LlamaConfig
from lococo_jax.policies import lococo
from lococo_jax.policies.base import Entries

D, M, B = 4, 16, 8


def _setup(normalizer: str):
    cfg = LlamaConfig(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=D,
    )
    ccfg = CompressionConfig(
        policy="lococo",
        cache_size=M,
        chunk_size=B,
        kernel_size=3,
        normalizer=normalizer,
        fusion_impl="reference",
    )
    rng = np.random.RandomState(0)
    S, shape = M + B, (1, 2, M + B)
    s = jnp.asarray(rng.rand(*shape), jnp.float32)
    e = Entries(
        k=jnp.asarray(rng.randn(*shape, D), jnp.float32),
        v=jnp.asarray(rng.randn(*shape, D), jnp.float32),
        pos=jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), shape),
        valid=jnp.ones(shape, bool),
        acc=s,
        chunk=s,
        last=s[:, 0],
        n_valid=jnp.full((1,), S, jnp.int32),
    )
    layer = jax.tree.map(lambda x: x[0], lococo.init_params(jax.random.PRNGKey(1), cfg, ccfg))
    return ccfg, layer, e


def _conv_grad(normalizer: str, param: float) -> tuple[float, float]:
    """(|d loss / d conv w|_max, d loss / d normaliser param) at a given stored parameter."""
    ccfg, layer, e = _setup(normalizer)
    layer = dict(layer, normalizer=jnp.float32(param))

    def loss(p):
        out = lococo.compress(ccfg, p, e)
        return jnp.sum(out.v**2) + jnp.sum(out.k**2)

    g = jax.grad(loss)(layer)
    return float(jnp.abs(g["convs"][0]["w"]).max()), float(g["normalizer"])


@pytest.mark.parametrize("param", [-6.0, -2.0, 0.0, 3.0, 8.0])
def test_sigmoid_normalizer_keeps_gradients_past_every_bound(param):
    """However far Adam pushes the stored parameter, a = sigmoid(param) is inside (0, 1) and
    both the conv and the parameter itself get gradient."""
    conv, norm = _conv_grad("sigmoid", param)
    assert conv > 0 and norm != 0


def test_clip_normalizer_starves_the_conv_below_zero():
    """The defect the sigmoid fixes: clipped at a < 0, neither conv nor a get any gradient."""
    assert _conv_grad("clip", -0.5) == (0.0, 0.0)
    conv, norm = _conv_grad("clip", 0.5)
    assert conv > 0 and norm != 0


def test_sigmoid_init_and_inverse():
    ccfg, layer, _ = _setup("sigmoid")
    assert float(lococo.mixing_weight(ccfg, layer["normalizer"])) == pytest.approx(0.5, abs=1e-7)
    a = jnp.asarray([0.01, 0.1, 0.5, 0.9, 0.99])
    back = lococo.mixing_weight(ccfg, lococo.normalizer_param(ccfg, a))
    np.testing.assert_allclose(np.asarray(back), np.asarray(a), rtol=1e-6)
    with pytest.raises(ConfigError, match="normalizer_init"):
        CompressionConfig(policy="lococo", normalizer_init=0.0)
    CompressionConfig(policy="lococo", normalizer_init=0.0, normalizer="clip")


def test_sigmoid_equals_official_arithmetic_at_the_same_a():
    """Same a, same fused slots: the parametrisation changes the training, not the maths."""
    outs = []
    for normalizer, param in (("sigmoid", np.log(0.3 / 0.7)), ("official", 0.3)):
        ccfg, layer, e = _setup(normalizer)
        outs.append(lococo.compress(ccfg, dict(layer, normalizer=jnp.float32(param)), e).v)
    np.testing.assert_allclose(np.asarray(outs[0]), np.asarray(outs[1]), atol=1e-6)


def test_legacy_clip_normalizer_field():
    d = {"policy": "lococo", "clip_normalizer": True}
    assert CompressionConfig.from_dict(d).normalizer == "clip"
    assert CompressionConfig.from_dict({**d, "clip_normalizer": False}).normalizer == "official"
    with pytest.raises(ConfigError, match=r"\['bogus'\].*in f\.safetensors"):
        CompressionConfig.from_dict({"bogus": 1}, source="f.safetensors")
