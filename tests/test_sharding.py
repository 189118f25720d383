"""Spec logic without devices: rules, auto-fill, divisibility errors, fallback."""

from __future__ import annotations

import jax
import pytest
from jax.sharding import PartitionSpec as P

from lococo_jax import kv_state, llama, lora, policies, sharding, train
from lococo_jax.config import CompressionConfig, ConfigError, LlamaConfig

MESH = {"data": 2, "fsdp": 2, "tensor": 2}
CFG = train.TINY
CCFG = CompressionConfig(cache_size=16, chunk_size=8, kernel_size=3)


def abstract_params(cfg=CFG):
    def make():
        p = llama.init_params(cfg, jax.random.PRNGKey(0))
        p["lococo"] = policies.init_params(jax.random.PRNGKey(1), cfg, CCFG)
        p["lora"] = lora.init_lora(jax.random.PRNGKey(2), cfg, lora.LoraConfig())
        return p

    return jax.eval_shape(make)


def test_resolve_mesh_shape():
    assert sharding.resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
    assert sharding.resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2)
    with pytest.raises(ConfigError, match="needs 4 devices, but 8"):
        sharding.resolve_mesh_shape((2, 2, 1), 8)
    with pytest.raises(ConfigError, match="at most one may be -1"):
        sharding.resolve_mesh_shape((-1, -1, 1), 8)
    with pytest.raises(ConfigError, match="do not divide"):
        sharding.resolve_mesh_shape((3, -1, 1), 8)


def test_param_specs_follow_rules():
    specs = sharding.param_specs(abstract_params(), MESH)
    assert specs["embed"] == P("tensor", "fsdp")
    assert specs["layers"]["wq"] == P(None, "fsdp", "tensor")
    assert specs["layers"]["wo"] == P(None, "tensor", "fsdp")
    assert specs["layers"]["w_down"] == P(None, "tensor", "fsdp")
    assert specs["layers"]["attn_norm"] == P(None, None)
    assert specs["lm_head"] == P("fsdp", "tensor")
    assert specs["lora"]["wq"]["a"] == P(None, "fsdp", None)
    assert specs["lora"]["wo"]["b"] == P(None, None, "fsdp")
    assert specs["lococo"]["convs"][0]["w"] == P(None, None, None, None)
    # A mesh axis of size 1 is left out of the spec.
    one = sharding.param_specs(abstract_params(), {"data": 8, "fsdp": 1, "tensor": 1})
    assert one["layers"]["wq"] == P(None, None, None)


def test_state_and_batch_specs():
    st = jax.eval_shape(lambda: kv_state.init_state(CFG, CCFG, 4))
    specs = sharding.state_specs(st, MESH)
    assert specs.k == P(None, ("data", "fsdp"), "tensor", None, None)
    assert specs.win_len == P()
    assert sharding.batch_spec((4, 33), MESH) == P(("data", "fsdp"), None)
    with pytest.raises(sharding.ShardingError, match=r"batch.tokens: dim 0 \(batch\) has size 6"):
        sharding.batch_spec((6, 33), MESH)


def test_indivisible_kv_heads_error_or_replicate():
    """SmolLM2-like: 3 KV heads cannot be split over tensor=2."""
    cfg3 = LlamaConfig(
        vocab_size=256,
        hidden_size=96,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=3,
        head_dim=16,
    )
    st = jax.eval_shape(lambda: kv_state.init_state(cfg3, CCFG, 4))
    with pytest.raises(
        sharding.ShardingError,
        match=r"kv_state.k: dim 2 \(kv_heads\) has size 3, not divisible by mesh axes",
    ):
        sharding.state_specs(st, MESH)
    specs = sharding.state_specs(st, MESH, replicate_indivisible=True)
    assert specs.k == P(None, ("data", "fsdp"), None, None, None)  # only that dim replicated
    with pytest.raises(sharding.ShardingError, match=r"embed: dim 0 \(vocab\) has size 255"):
        bad = dict(embed=jax.ShapeDtypeStruct((255, 64), "float32"))
        sharding.param_specs(bad, MESH)


def test_opt_state_specs_follow_params():
    import optax

    params = abstract_params()
    pspecs = sharding.param_specs(params, MESH)
    opt = jax.eval_shape(optax.adam(1e-3).init, params)
    ospecs = sharding.opt_state_specs(opt, params, pspecs)
    assert ospecs[0].mu["layers"]["wq"] == P(None, "fsdp", "tensor")
    assert ospecs[0].count == P()
