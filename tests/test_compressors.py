"""Compressor weight files, and the committed SmolLM2 compressors doing their job on held-out
text: at M = 64, lococo's loss is below h2o's and streaming's."""

from __future__ import annotations

import hashlib
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from lococo_jax import compressors, evaluate, policies
from lococo_jax.config import CompressionConfig

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = ROOT / "data" / "austen" / "persuasion.txt"


def test_round_trip_and_shape_errors(tiny_cfg, tmp_path):
    ccfg = CompressionConfig(policy="lococo", cache_size=16, chunk_size=8, kernel_size=5)
    params = policies.init_params(jax.random.PRNGKey(0), tiny_cfg, ccfg)
    path = compressors.save_compressors(tmp_path / "c.safetensors", params, ccfg, {"note": "x"})
    loaded, ccfg2, meta = compressors.load_compressors(path, tiny_cfg)
    assert ccfg2 == ccfg and meta == {"note": "x"}
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    half = compressors.save_compressors(
        tmp_path / "h.safetensors", params, ccfg, conv_dtype="float16"
    )
    loaded, _, _ = compressors.load_compressors(half, tiny_cfg)
    w, w16 = np.asarray(params["convs"][0]["w"]), loaded["convs"][0]["w"]
    assert w16.dtype == np.float32 and not np.array_equal(w16, w)
    np.testing.assert_allclose(w16, w, rtol=1e-3, atol=1e-4)
    assert half.stat().st_size < 0.6 * path.stat().st_size
    again = compressors.resave(path, tmp_path / "r.safetensors")  # what made the assets
    loaded_again, ccfg3, meta3 = compressors.load_compressors(again, tiny_cfg)
    assert ccfg3 == ccfg and meta3 == {"note": "x", "storage": "conv weights float16"}
    np.testing.assert_array_equal(loaded_again["convs"][0]["w"], w16)
    assert again.stat().st_mode & 0o777 == 0o644
    other = CompressionConfig(policy="lococo", cache_size=32, chunk_size=8, kernel_size=5)
    bad = policies.init_params(jax.random.PRNGKey(0), tiny_cfg, other)
    path = compressors.save_compressors(tmp_path / "bad.safetensors", bad, ccfg)
    with pytest.raises(ValueError, match=r"bad.safetensors: tensor .*convs.*has shape"):
        compressors.load_compressors(path, tiny_cfg)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        compressors.load_compressors(tmp_path / "missing.safetensors", tiny_cfg)
    with pytest.raises(ValueError, match="trained for cache_size=16"):
        compressors.with_policy_params({}, tiny_cfg, other, tmp_path / "c.safetensors")


def test_resize_to_another_cache(tiny_cfg, tmp_path):
    ccfg = CompressionConfig(policy="lococo", cache_size=16, chunk_size=8, kernel_size=5)
    params = policies.init_params(jax.random.PRNGKey(1), tiny_cfg, ccfg)
    src = compressors.save_compressors(tmp_path / "m16.safetensors", params, ccfg, {"step": 9})
    out = compressors.resize(src, tmp_path / "m8.safetensors", cache_size=8, local_len=2)
    loaded, small, meta = compressors.load_compressors(out, tiny_cfg)
    assert (small.cache_size, small.local_len, small.num_fused) == (8, 2, 4)
    assert small.kernel_size == 5 and small.hh_keep_rate == ccfg.hh_keep_rate
    w, b = np.asarray(params["convs"][0]["w"]), np.asarray(params["convs"][0]["b"])
    assert w.shape[-1] == 8 and loaded["convs"][0]["w"].shape[-1] == 4
    np.testing.assert_array_equal(loaded["convs"][0]["w"], w[..., :4])
    np.testing.assert_array_equal(loaded["convs"][0]["b"], b[..., :4])
    np.testing.assert_array_equal(loaded["normalizer"], np.asarray(params["normalizer"]))
    sha = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    assert meta["step"] == 9 and meta["resized_from"]["sha256"] == sha
    big = compressors.resize(src, tmp_path / "m40.safetensors", cache_size=40, local_len=4)
    loaded, grown, _ = compressors.load_compressors(big, tiny_cfg)
    assert grown.num_fused == 20  # slot j takes trained channel floor(j * 8 / 20)
    take = [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4, 5, 5, 6, 6, 6, 7, 7]
    np.testing.assert_array_equal(loaded["convs"][0]["w"], w[..., take])
    np.testing.assert_array_equal(loaded["convs"][0]["b"], b[..., take])
    raw = load_file(str(big))  # the 8 distinct channels are stored once, with the index
    np.testing.assert_array_equal(raw["convs.0.take"], take)
    np.testing.assert_array_equal(raw["convs.0.w"], w)
    assert big.stat().st_size < src.stat().st_size + 1024
    deep = CompressionConfig(
        policy="lococo", cache_size=16, chunk_size=8, kernel_size=5, n_convlayer=2
    )
    two = compressors.save_compressors(
        tmp_path / "two.safetensors",
        policies.init_params(jax.random.PRNGKey(0), tiny_cfg, deep),
        deep,
    )
    with pytest.raises(ValueError, match="n_convlayer=2"):
        compressors.resize(two, tmp_path / "x.safetensors", cache_size=8, local_len=2)
    assert not (tmp_path / "x.safetensors").exists()


def test_repeated_channels_are_stored_once(tiny_cfg, tmp_path):
    ccfg = CompressionConfig(policy="lococo", cache_size=16, chunk_size=8, kernel_size=5)
    params = policies.init_params(jax.random.PRNGKey(2), tiny_cfg, ccfg)
    w, b = np.array(params["convs"][0]["w"]), np.array(params["convs"][0]["b"])
    w[..., 7] = w[..., 1]
    b[0, 7] = b[0, 1] + 0.5  # channels 7 and 1 differ in one bias only
    order = [5, 1, 5, 7, 1, 1, 0, 5]  # the saved set's channel j is channel order[j]
    params["convs"][0] = {"w": w[..., order], "b": b[..., order]}
    path = compressors.save_compressors(tmp_path / "r.safetensors", params, ccfg)
    raw = load_file(str(path))
    np.testing.assert_array_equal(raw["convs.0.take"], [0, 1, 0, 2, 1, 1, 3, 0])
    np.testing.assert_array_equal(raw["convs.0.w"], w[..., [5, 1, 7, 0]])
    loaded, _, _ = compressors.load_compressors(path, tiny_cfg)
    np.testing.assert_array_equal(loaded["convs"][0]["w"], w[..., order])
    np.testing.assert_array_equal(loaded["convs"][0]["b"], b[..., order])
    distinct = compressors.save_compressors(
        tmp_path / "d.safetensors", {**params, "convs": [{"w": w, "b": b}]}, ccfg
    )
    assert "convs.0.take" not in load_file(str(distinct))
    raw["convs.0.take"] = np.array([0, 1, 0, 2, 1, 1, 4, 0], np.int32)
    with safe_open(str(path), framework="numpy") as f:
        save_file(raw, tmp_path / "bad.safetensors", metadata=f.metadata())
    with pytest.raises(ValueError, match=r"convs.0.take indexes 4 stored channels .* 0..4"):
        compressors.load_compressors(tmp_path / "bad.safetensors", tiny_cfg)


def test_provenance_follows_the_committed_file(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(compressors, "ASSETS", tmp_path)
    assert compressors.provenance("lococo", 16, 8) is None  # no file: random init
    ccfg = CompressionConfig(policy="lococo", cache_size=16, chunk_size=8, kernel_size=5)
    params = policies.init_params(jax.random.PRNGKey(0), tiny_cfg, ccfg)
    path = compressors.save_compressors(tmp_path / "smollm2-135m_M16_B8.safetensors", params, ccfg)
    first = compressors.provenance("lococo", 16, 8)
    assert first == {
        "file": path.name,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16],
    }
    assert compressors.provenance("h2o", 16, 8) is None
    result = {"policy": "lococo", "cache_size": 16, "compressors": first}
    assert compressors.is_current(result, 8)
    assert compressors.is_current({"policy": "h2o", "cache_size": 16}, 8)
    params["normalizer"] = params["normalizer"] + 0.1  # new weights: results must be redone
    compressors.save_compressors(path, params, ccfg)
    assert compressors.provenance("lococo", 16, 8)["sha256"] != first["sha256"]
    assert not compressors.is_current(result, 8)


def test_compressors_are_bound_to_their_model(tiny_cfg, tiny_params, tmp_path):
    import dataclasses

    import jax.numpy as jnp

    ccfg = CompressionConfig(policy="lococo", cache_size=16, chunk_size=8, kernel_size=5)
    sub = policies.init_params(jax.random.PRNGKey(0), tiny_cfg, ccfg)
    model = compressors.model_fingerprint(tiny_cfg, tiny_params)
    bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), tiny_params)
    assert compressors.model_fingerprint(tiny_cfg, bf16) == model  # one model, any dtype
    path = compressors.save_compressors(tmp_path / "c.safetensors", sub, ccfg, model=model)
    p, got, trained = compressors.with_policy_params(tiny_params, tiny_cfg, ccfg, path)
    assert trained is True and got == ccfg
    # Same architecture, other weights (a fine-tune): refused, naming both models.
    tuned = dict(tiny_params, embed=tiny_params["embed"] * 1.01)
    with pytest.raises(ValueError, match=r"trained for another model \(llama layers=2.*weights"):
        compressors.with_policy_params(tuned, tiny_cfg, ccfg, path)
    # Another architecture whose compressor shapes still fit (only the layer count and
    # head_dim decide them): refused too, not loaded silently.
    wider = dataclasses.replace(tiny_cfg, intermediate_size=200)
    with pytest.raises(ValueError, match="ffn=96.*not this one.*ffn=200"):
        compressors.load_compressors(path, wider)
    # The committed files (no fingerprint; meta names "smollm2") are for the embedded model.
    asset = compressors.default_compressors(64, 128)
    with pytest.raises(ValueError, match="llama layers=30 hidden=576.*not this one"):
        compressors.load_compressors(asset, tiny_cfg)
    m64 = CompressionConfig(policy="lococo", cache_size=64, chunk_size=128, kernel_size=5)
    _, _, trained = compressors.with_policy_params(tiny_params, tiny_cfg, m64)
    assert trained is False  # another model: an untrained init, not the committed weights
    # Weights for a policy that has none, and a missing path.
    h2o = CompressionConfig(policy="h2o", cache_size=16, chunk_size=8)
    with pytest.raises(ValueError, match="policy 'h2o' has no compressors"):
        compressors.with_policy_params(tiny_params, tiny_cfg, h2o, path)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        compressors.with_policy_params(tiny_params, tiny_cfg, ccfg, tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="junk.safetensors: not a readable compressor file"):
        compressors.load_compressors(tmp_path / "junk.safetensors", tiny_cfg)


@pytest.mark.slow
def test_committed_compressors_beat_eviction_at_m64(smollm2):
    cfg, params, tok, _ = smollm2
    path = compressors.default_compressors(64, 128)
    assert path is not None, "committed compressors for M=64, B=128 are missing"
    ids = np.asarray(
        tok.encode(HELD_OUT.read_text(encoding="utf-8"), add_special_tokens=False)[:1536], np.int32
    )
    nll = {}
    for policy in ("lococo", "h2o", "streaming"):
        ccfg = CompressionConfig(policy=policy, cache_size=64, chunk_size=128)
        p, ccfg, trained = compressors.with_policy_params(params, cfg, ccfg)
        assert trained is (True if policy == "lococo" else None)  # bound to this model
        nll[policy] = evaluate.perplexity(p, ids, cfg, ccfg).nll
    print("held-out NLL at M=64:", nll)
    # Recorded with the committed file (130 CPU steps from the cut M = 128 compressors; fp32 on
    # a CPU). Its own anchors (a = 0) read 3.5865 here: on this test text the M = 64 fusion does
    # not pay (calibration.md), so only the eviction baselines are asserted below it.
    recorded = {"lococo": 3.5925, "h2o": 3.6121, "streaming": 3.6649}
    for name, want in recorded.items():
        assert abs(nll[name] - want) < 2e-3, (name, nll[name], want)
    assert nll["lococo"] < nll["h2o"]
    assert nll["lococo"] < nll["streaming"]
