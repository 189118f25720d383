"""Linear RoPE scaling composes with the model's own scaling, never replaces it: checked against
transformers' own llama3 model reading positions divided by the factor."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import make_tiny_hf

from lococo_jax import llama, models
from lococo_jax.config import ConfigError, LlamaConfig, RopeScaling

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def test_llama3_plus_linear_equals_transformers_llama3_at_scaled_positions(tmp_path):
    # head_dim 32 with theta 1e4 spans wavelengths on both sides of 64 / 1 and 64 / 4, so all
    # three llama3 bands (kept, smoothed, divided) are exercised.
    make_tiny_hf(tmp_path, hidden_size=128, num_attention_heads=4, rope_scaling=LLAMA3)
    cfg, params, _ = models.load_model(str(tmp_path))
    assert cfg.rope_scaling.rope_type == "llama3"
    scaled = cfg.with_linear_rope_scaling(2.0)
    assert scaled.rope_scaling.rope_type == "llama3" and scaled.rope_scaling.factor == 8.0
    assert scaled.rope_scaling.linear_factor == 2.0
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32)
    ids = np.random.RandomState(0).randint(1, 128, (1, 48))
    with torch.no_grad():
        pos = torch.arange(48, dtype=torch.float32)[None] / 2.0
        ref = hf(torch.from_numpy(ids), position_ids=pos).logits.numpy()
        plain = hf(torch.from_numpy(ids)).logits.numpy()
    ours = np.asarray(llama.forward(params, jnp.asarray(ids, jnp.int32), scaled))
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
    assert np.abs(ours - plain).max() > 1e-2  # the composition changed the logits
    # It survives a config.json round trip (our own key; transformers' export refuses it).
    back = LlamaConfig.from_hf_config(scaled.to_hf_config())
    assert back == scaled
    with pytest.raises(ConfigError, match="no transformers equivalent"):
        scaled.to_hf_config(for_transformers=True)


def test_linear_composes_with_linear_and_none():
    cfg, _, _ = models.load_model("tiny")
    assert cfg.with_linear_rope_scaling(2.0).rope_scaling == RopeScaling("linear", 2.0)
    twice = cfg.with_linear_rope_scaling(2.0).with_linear_rope_scaling(4.0)
    assert twice.rope_scaling == RopeScaling("linear", 8.0)
    assert cfg.with_linear_rope_scaling(1.0) is cfg
    with pytest.raises(ConfigError, match="linear_factor"):
        RopeScaling("linear", 2.0, linear_factor=2.0)
