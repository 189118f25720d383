"""Logits parity with transformers' LlamaForCausalLM on the same (converted) weights, fp32."""

from __future__ import annotations

import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from lococo_jax import llama  # noqa: E402
from lococo_jax.convert import load_hf_checkpoint  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

SEQ_LEN = 80
BASE = dict(
    vocab_size=131,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=10000.0,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
CASES = {
    "mha": dict(num_key_value_heads=4),
    "gqa_untied": dict(),
    "gqa_tied": dict(tie_word_embeddings=True),
    "mqa_bias": dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True),
    "head_dim_not_hidden_over_heads": dict(head_dim=16, rope_theta=500.0),
    "linear_rope": dict(rope_scaling={"rope_type": "linear", "factor": 2.5}),
    "llama3_rope": dict(
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            # small, so the scaled bands matter within SEQ_LEN positions
            "original_max_position_embeddings": 32,
        },
    ),
}


def make_hf_model(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    """A tiny random HF Llama whose weights are large enough to make the logits discriminative."""
    torch.manual_seed(seed)
    # deepcopy: transformers writes rope_theta into the rope_scaling dict it is given
    hf_cfg = transformers.LlamaConfig(**copy.deepcopy({**BASE, **overrides}))
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


def hf_logits(model: transformers.LlamaForCausalLM, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def assert_parity(model, folder, seed: int = 1) -> None:
    cfg, params = load_hf_checkpoint(folder)
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, SEQ_LEN), dtype=np.int32)
    llama.check_tokens(tokens, cfg)
    ours = np.asarray(jax.jit(llama.forward, static_argnums=2)(params, jnp.asarray(tokens), cfg))
    ref = hf_logits(model, tokens)
    assert ours.shape == ref.shape
    assert np.abs(ref).max() > 1.0  # the comparison below is not vacuous
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers_safetensors(case, tmp_path):
    model = make_hf_model(**CASES[case])
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    cfg, _ = load_hf_checkpoint(tmp_path)
    assert cfg.tie_word_embeddings == model.config.tie_word_embeddings
    expected = CASES[case].get("rope_scaling")
    assert (cfg.rope_scaling and cfg.rope_scaling.to_hf()) == (expected and dict(expected))
    assert cfg.rope_theta == CASES[case].get("rope_theta", BASE["rope_theta"])
    assert_parity(model, tmp_path)


def test_logits_match_sharded_safetensors(tmp_path):
    model = make_hf_model(**CASES["gqa_untied"])
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    assert_parity(model, tmp_path)


def _save_torch_bin(model, folder, shards: int = 1) -> None:
    """transformers 5 only writes safetensors: write the legacy pytorch_model.bin format by hand."""
    model.config.save_pretrained(folder)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return
    keys = sorted(state)
    weight_map = {}
    for s in range(shards):
        name = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[s::shards]}
        torch.save(part, folder / name)
        weight_map.update({k: name for k in part})
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("shards", [1, 3])
def test_logits_match_pytorch_bin(shards, tmp_path):
    model = make_hf_model(**CASES["gqa_tied"])
    _save_torch_bin(model, tmp_path, shards)
    assert_parity(model, tmp_path)


def test_bf16_weights_convert(tmp_path):
    """bf16 checkpoints read through safetensors' numpy path (ml_dtypes) and cast exactly."""
    model = make_hf_model(**CASES["gqa_untied"]).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    _, params = load_hf_checkpoint(tmp_path, dtype=jnp.bfloat16)
    ref = model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy().T
    assert params["layers"]["wq"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(params["layers"]["wq"][1], np.float32), ref)


def test_bf16_compute_is_as_close_to_fp32_as_transformers_bf16(tmp_path):
    """bf16 weights and compute: our logits (one forward, and the chunked cache path) are no
    farther from transformers' fp32 logits than transformers' own bf16 logits are (up to 1.5x:
    op order differs, so rounding does too)."""
    from lococo_jax import longctx
    from lococo_jax.config import CompressionConfig

    model = make_hf_model(**CASES["gqa_untied"])
    model.save_pretrained(tmp_path)
    tokens = np.random.default_rng(3).integers(0, BASE["vocab_size"], (2, 64), dtype=np.int32)
    truth = hf_logits(model, tokens)
    hf_err = np.abs(hf_logits(model.to(torch.bfloat16), tokens) - truth).max()
    cfg, params = load_hf_checkpoint(tmp_path, dtype=jnp.bfloat16)
    assert params["embed"].dtype == jnp.bfloat16
    ours = jax.jit(llama.forward, static_argnums=2)(params, jnp.asarray(tokens), cfg)
    ccfg = CompressionConfig(policy="full", cache_size=64, chunk_size=16)
    chunked = longctx.run_long(params, tokens, cfg, ccfg, output="logits").out
    assert 0 < hf_err < 0.05 * np.abs(truth).max()  # bf16 rounding shows, and is small
    for got in (np.asarray(ours, np.float32), np.asarray(chunked, np.float32)):
        assert np.abs(got - truth).max() <= 1.5 * hf_err
