"""The result cache: a cell is reused only when every key field matches, and the committed
results are never written unless asked."""

from __future__ import annotations

import json

import jax.numpy as jnp
import pytest

from lococo_jax import results
from lococo_jax.config import CompressionConfig


def key(**over):
    k = {
        "text": {"name": "a.txt", "sha256": "00"},
        "length": 1024,
        "seed": 0,
        "trials": 20,
        "model": {"name": "m", "config": "c", "weights": "w"},
        "compressors": None,
        "config": results.config_fields(CompressionConfig(policy="h2o", cache_size=64)),
    }
    k.update(over)
    return k


@pytest.mark.parametrize(
    "change",
    [
        {"text": {"name": "b.txt", "sha256": "00"}},
        {"text": {"name": "a.txt", "sha256": "01"}},  # same name, other content
        {"length": 2048},
        {"seed": 7},
        {"trials": 2},
        {"model": {"name": "m", "config": "c", "weights": "w2"}},
        {"compressors": {"file": "x", "sha256": "1"}},
        {"config": results.config_fields(CompressionConfig(policy="h2o", cache_size=64, sink=2))},
    ],
)
def test_any_key_change_misses_the_cache(tmp_path, change):
    store = results.ResultStore(tmp_path / "r.json")
    store.put(key(), {"ppl": 1.0})
    assert results.ResultStore(tmp_path / "r.json").get(key())["ppl"] == 1.0
    assert store.get(key(**change)) is None
    store.put(key(**change), {"ppl": 2.0})
    reread = results.ResultStore(tmp_path / "r.json")
    assert reread.get(key())["ppl"] == 1.0 and reread.get(key(**change))["ppl"] == 2.0
    assert "command" in reread.get(key())["provenance"]


def test_legacy_cells_are_kept_but_never_reused(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"cells": [{"policy": "h2o", "cache_size": 64, "ppl": 18.79}]}))
    store = results.ResultStore(p)
    assert store.get(key()) is None
    store.put(key(), {"ppl": 3.0})
    assert len(results.ResultStore(p).cells) == 2


def test_committed_results_untouched_by_default(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "COMMITTED", tmp_path / "committed")
    monkeypatch.setattr(results, "RUNS", tmp_path / "runs")
    p = results.output_path("perplexity.json", None, False, stamp="s1")
    assert p == tmp_path / "runs" / "s1" / "perplexity.json"
    assert results.output_path("perplexity.json", None, True) == (
        tmp_path / "committed" / "perplexity.json"
    )
    assert results.output_path("x.json", str(tmp_path / "o.json"), False) == tmp_path / "o.json"
    with pytest.raises(ValueError):
        results.output_path("x.json", "o.json", True)


def test_weights_hash_sees_one_changed_weight():
    a = {"embed": jnp.zeros((3, 2)), "layers": {"w": jnp.ones((2, 2))}}
    b = {"embed": jnp.zeros((3, 2)), "layers": {"w": jnp.ones((2, 2)).at[1, 1].set(1.0001)}}
    assert results.weights_hash(a) == results.weights_hash(dict(a))
    assert results.weights_hash(a) != results.weights_hash(b)
