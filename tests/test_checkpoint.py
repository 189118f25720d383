"""Orbax checkpoints: round trip into an abstract sharded target, keep-last-N, config check,
exports (compressors, LoRA-merged params)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lococo_jax import checkpoint, llama, lora, policies
from lococo_jax.compressors import load_compressors
from lococo_jax.config import CompressionConfig, LlamaConfig
from lococo_jax.train import export

CFG = LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)


def _state(seed):
    k = jax.random.PRNGKey(seed)
    return {"params": llama.init_params(CFG, k), "step": jnp.int32(seed), "rng": k}


def test_roundtrip_keep_and_config_check(tmp_path):
    ck = checkpoint.Checkpointer(tmp_path / "ck", keep=2)
    cfg = {"lr": 0.001, "steps": 10, "log_dir": "a"}
    for s in (1, 2, 3):
        ck.save(s, _state(s), {"epoch": 0, "index": s}, cfg)
    ck.wait()
    assert ck.manager.all_steps() == [2, 3]  # keep-last-N
    sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = checkpoint.abstract_like(_state(0), jax.tree.map(lambda _: sh, _state(0)))
    fresh = _state(0)
    assert not np.array_equal(fresh["params"]["embed"], _state(3)["params"]["embed"])
    restored, pos, step = checkpoint.Checkpointer(tmp_path / "ck").restore(abstract)
    assert step == 3 and pos == {"epoch": 0, "index": 3}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(_state(3)), strict=True):
        np.testing.assert_array_equal(a, b)
    assert restored["params"]["embed"].sharding == sh
    ck2 = checkpoint.Checkpointer(tmp_path / "ck")
    ck2.check_config({"lr": 0.001, "steps": 10, "log_dir": "b"}, ignore={"log_dir"})
    with pytest.raises(checkpoint.CheckpointConfigError, match=r"lr: 0.001 -> 0.01; steps"):
        ck2.check_config({"lr": 0.01, "steps": 20, "log_dir": "a"})


def test_export_compressors_and_merged_lora(tmp_path):
    ccfg = CompressionConfig(cache_size=16, chunk_size=8, kernel_size=3)
    params = llama.init_params(CFG, jax.random.PRNGKey(0), std=0.1)
    params["lococo"] = policies.init_params(jax.random.PRNGKey(1), CFG, ccfg)
    path = export.export_compressors(tmp_path / "c.safetensors", params, ccfg)
    loaded, ccfg2, _ = load_compressors(path, CFG)
    assert ccfg2 == ccfg
    np.testing.assert_array_equal(loaded["convs"][0]["w"], params["lococo"]["convs"][0]["w"])

    lcfg = lora.LoraConfig(rank=4, alpha=8.0)
    ad = lora.init_lora(jax.random.PRNGKey(2), CFG, lcfg)
    assert ad["wq"]["a"].shape == (2, 32, 4) and ad["wo"]["b"].shape == (2, 4, 32)
    assert not np.any(ad["wk"]["b"])  # b = 0: the adapted model starts equal to the base
    ad = jax.tree.map(lambda x: x + 0.05, ad)
    with_lora = {k: v for k, v in params.items() if k != "lococo"} | {"lora": ad}
    tokens = jnp.arange(12)[None] % CFG.vocab_size
    want = llama.forward(with_lora, tokens, CFG, lora_scale=lcfg.scale)
    merged = lora.merge_lora(with_lora, lcfg.scale)
    assert "lora" not in merged
    np.testing.assert_allclose(llama.forward(merged, tokens, CFG), want, rtol=1e-4, atol=1e-5)
    p = checkpoint.save_pytree(tmp_path / "merged", merged)
    back = checkpoint.load_pytree(p)
    np.testing.assert_array_equal(back["layers"]["wq"], merged["layers"]["wq"])


def test_normalize_path_keeps_urls(tmp_path, monkeypatch):
    for url in ("gs://bucket/x", "gs://bucket/a/../b", "s3://b/k"):
        p = checkpoint.normalize_path(url)
        assert str(p) == url and str(p / "7") == url + "/7"
    root = tmp_path.resolve()
    monkeypatch.chdir(root)
    monkeypatch.setenv("HOME", str(root / "home"))
    assert str(checkpoint.normalize_path("~/ck")) == str(root / "home" / "ck")
    assert str(checkpoint.normalize_path("rel/ck")) == str(root / "rel" / "ck")
    assert str(checkpoint.normalize_path(Path("a/../b"))) == str(root / "b")
