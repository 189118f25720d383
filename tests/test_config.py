"""Configs: HF round trip (both transformers formats), field-naming errors, every committed
training config loads, and full-size Llama-2-7B shapes checked abstractly on CPU."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lococo_jax import llama, longctx, policies
from lococo_jax.config import CompressionConfig, ConfigError, LlamaConfig, RopeScaling
from lococo_jax.kv_state import init_state
from lococo_jax.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}


def test_hf_round_trip_and_transformers5_rope_parameters():
    cfg = LlamaConfig.from_hf_config(LLAMA2_7B)
    assert cfg.head_dim == 128 and cfg.num_key_value_heads == 32
    assert LlamaConfig.from_hf_config(cfg.to_hf_config()) == cfg
    v5 = {k: v for k, v in LLAMA2_7B.items() if k != "rope_theta"}
    v5["rope_parameters"] = {
        "rope_theta": 500000.0,
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    cfg5 = LlamaConfig.from_hf_config(v5)
    assert cfg5.rope_theta == 500000.0
    assert cfg5.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"num_key_value_heads": 5}, "num_key_value_heads"),
        ({"model_type": "mistral"}, "model_type"),
        ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_scaling.rope_type"),
    ],
)
def test_bad_fields_are_named(change, field):
    with pytest.raises(ConfigError, match=f"'{field}'.*in cfg.json"):
        LlamaConfig.from_hf_config({**LLAMA2_7B, **change}, source="cfg.json")


@pytest.mark.parametrize(
    "path", sorted((ROOT / "experiments" / "configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_committed_training_config_loads(path):
    tcfg = TrainConfig.from_yaml(path, [])
    assert tcfg.compression().chunk_size == tcfg.block_size


def test_llama2_7b_shapes_abstractly():
    """Full-size params, a 512-slot state and a 32K-token read, shapes only (no memory)."""
    cfg = LlamaConfig.from_hf_config(LLAMA2_7B)
    ccfg = CompressionConfig(policy="lococo", cache_size=512, chunk_size=512)
    params = jax.eval_shape(lambda: llama.init_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16))
    n_params = sum(np.prod(x.shape) for x in jax.tree.leaves(params))
    assert 6.7e9 < n_params < 6.8e9
    params["lococo"] = jax.eval_shape(
        lambda: policies.init_params(jax.random.PRNGKey(0), cfg, ccfg)
    )
    assert params["lococo"]["convs"][0]["w"].shape == (32, 21, 256, 256)
    state = jax.eval_shape(lambda: init_state(cfg, ccfg, 1, jnp.bfloat16))
    assert state.k.shape == (32, 1, 32, 512, 128)
    n = 64  # 64 chunks of 512 = 32K tokens
    toks = jax.ShapeDtypeStruct((n, 1, 512), jnp.int32)
    out = jax.eval_shape(
        lambda p, s, t: longctx.scan_chunks(
            p, s, t, jnp.full((n, 1), 512), cfg, ccfg, targets=t, output="nll"
        ),
        params,
        state,
        toks,
    )
    assert out[2].shape == (n, 1, 512)
    assert jax.tree.map(lambda a: a.shape, out[0]) == jax.tree.map(lambda a: a.shape, state)


def test_conv_init_scales_the_conv_weights():
    cfg = LlamaConfig.from_hf_config(LLAMA2_7B)
    std = {}
    for init in ("normal", "fan_in"):
        ccfg = CompressionConfig(policy="lococo", cache_size=64, chunk_size=64, conv_init=init)
        w = policies.init_params(jax.random.PRNGKey(0), cfg, ccfg)["convs"][0]["w"][:1]
        std[init] = float(np.std(np.asarray(w)))
    assert abs(std["normal"] - 1.0) < 0.02
    fan_in = 2 * cfg.head_dim * 21  # in channels (K and V) * kernel_size
    assert abs(std["fan_in"] * np.sqrt(fan_in) - 1.0) < 0.02
    with pytest.raises(ConfigError, match="'conv_init'.*'xavier'"):
        CompressionConfig(policy="lococo", conv_init="xavier")
