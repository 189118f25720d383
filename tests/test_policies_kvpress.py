"""SnapKV, KeyDiff and TOVA against kvpress's own presses (NVIDIA kvpress 0.5.5, the library
KV-cache compression is compared with): one chunk of a tiny random Llama read through our
chunked forward keeps, in every layer and KV head, exactly the positions kvpress's press keeps
from transformers' eager attention (SnapKV, TOVA) or cached keys (KeyDiff) on the same weights.

kvpress is installed --no-deps into .venv/kvpress-ref by the Makefile (its package __init__
imports its pipeline, which needs datasets and peft, and its metadata pins transformers < 5.3;
the presses themselves need only torch and transformers), so its press modules are loaded here
under a bare package. TOVA differs by design in one place: kvpress's TOVAPress always keeps the
last token, which TOVA itself does not enforce (its docstring says so), and neither do we; the
TOVA test checks equality where both keep it and the one-entry swap elsewhere.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import torch_llama

from lococo_jax import longctx
from lococo_jax.config import CompressionConfig

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

KVPRESS = Path(sys.prefix) / "kvpress-ref" / "kvpress"
T, M = 32, 16  # one chunk of T tokens compressed to M slots: kvpress's compression_ratio 0.5


def _press(name: str):
    if not (KVPRESS / "presses").is_dir():
        pytest.fail(f"kvpress is not installed at {KVPRESS}; run `make venv`")
    for pkg, path in (("kvpress", KVPRESS), ("kvpress.presses", KVPRESS / "presses")):
        if pkg not in sys.modules:
            mod = types.ModuleType(pkg)
            mod.__path__ = [str(path)]
            sys.modules[pkg] = mod
    return importlib.import_module(f"kvpress.presses.{name}")


@pytest.fixture(scope="module")
def hf_run(tiny_cfg, peaky_params):
    """transformers (eager attention) on our weights over T tokens: (tokens, model, output)."""
    model = torch_llama(tiny_cfg, peaky_params)
    model.config._attn_implementation = "eager"  # attentions as probabilities
    toks = np.random.RandomState(5).randint(0, tiny_cfg.vocab_size, (1, T))
    with torch.no_grad():
        out = model(torch.as_tensor(toks), output_attentions=True, use_cache=True)
    assert len(out.attentions) == tiny_cfg.num_hidden_layers
    return toks, model, out


def _kvpress_positions(press, model, cfg, attentions, keys) -> np.ndarray:
    """Kept positions [layers, kv heads, M] (sorted) of ``press`` applied layer by layer."""
    module = types.SimpleNamespace(config=model.config, head_dim=cfg.head_dim)
    kv, hd = cfg.num_key_value_heads, cfg.head_dim
    pos = torch.arange(T, dtype=torch.float32)[None, None, :, None].expand(1, kv, T, hd)
    kept = []
    for li in range(cfg.num_hidden_layers):
        # the positions ride as the values: compress gathers keys and values with one index
        _, v = press.compress(module, torch.zeros(1, T, 1), keys[li], pos, attentions[li], {})
        kept.append(np.sort(v[0, :, :, 0].numpy().astype(int), axis=-1))
    return np.stack(kept)


def _keys(cfg, out) -> list:
    """transformers' cached (rotated) keys per layer, [1, kv heads, T, head_dim]."""
    return [out.past_key_values.layers[li].keys for li in range(cfg.num_hidden_layers)]


def _our_positions(params, cfg, ccfg, toks) -> np.ndarray:
    state = longctx.run_long(params, toks, cfg, ccfg, output="last").state
    assert int(state.filled[0]) == M
    return np.sort(np.asarray(state.pos)[:, 0, :, :M], axis=-1)


@pytest.mark.parametrize("w, kernel", [(4, 5), (8, 3), (3, 1)])
def test_snapkv_keeps_what_kvpress_keeps(tiny_cfg, peaky_params, hf_run, w, kernel):
    toks, model, out = hf_run
    snap = _press("snapkv_press").SnapKVPress(
        compression_ratio=1 - M / T, window_size=w, kernel_size=kernel
    )
    want = _kvpress_positions(snap, model, tiny_cfg, out.attentions, _keys(tiny_cfg, out))
    ccfg = CompressionConfig(
        policy="snapkv",
        cache_size=M,
        chunk_size=T,
        snapkv_window=w,
        snapkv_kernel=kernel,
        snapkv_pooling="avg",  # kvpress pools by average only
    )
    got = _our_positions(peaky_params, tiny_cfg, ccfg, toks)
    assert (want[..., -w:] == np.arange(T - w, T)).all()  # the observation window is kept
    np.testing.assert_array_equal(got, want)


def test_keydiff_keeps_what_kvpress_keeps(tiny_cfg, peaky_params, hf_run):
    toks, model, out = hf_run
    kd = _press("keydiff_press").KeyDiffPress(compression_ratio=1 - M / T)
    attentions = [None] * tiny_cfg.num_hidden_layers  # KeyDiff scores from the keys alone
    want = _kvpress_positions(kd, model, tiny_cfg, attentions, _keys(tiny_cfg, out))
    ccfg = CompressionConfig(policy="keydiff", cache_size=M, chunk_size=T)
    got = _our_positions(peaky_params, tiny_cfg, ccfg, toks)
    assert not (want == np.arange(M)).all()  # not simply the oldest entries
    np.testing.assert_array_equal(got, want)


def test_tova_keeps_what_kvpress_keeps_where_both_keep_the_last_token(
    tiny_cfg, peaky_params, hf_run
):
    """kvpress's TOVAPress always keeps the last token; TOVA (and ours) keeps it only when its
    score is in the top M. Per layer where ours kept it, the kept sets must be equal; elsewhere
    kvpress's set is ours with our lowest-scored entry swapped for the last token, which shows
    as exactly one position of difference."""
    toks, model, out = hf_run
    tova = _press("tova_press").TOVAPress(compression_ratio=1 - M / T)
    want = _kvpress_positions(tova, model, tiny_cfg, out.attentions, _keys(tiny_cfg, out))
    ccfg = CompressionConfig(policy="tova", cache_size=M, chunk_size=T)
    got = _our_positions(peaky_params, tiny_cfg, ccfg, toks)
    kept_last = 0
    for li in range(tiny_cfg.num_hidden_layers):
        for j in range(tiny_cfg.num_key_value_heads):
            if T - 1 in got[li, j]:
                kept_last += 1
                np.testing.assert_array_equal(got[li, j], want[li, j], err_msg=f"layer {li}")
            else:
                assert len(set(got[li, j]) - set(want[li, j])) == 1
                assert set(want[li, j]) - set(got[li, j]) == {T - 1}
    assert 0 < kept_last, kept_last
