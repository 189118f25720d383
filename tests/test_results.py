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


def test_two_runs_on_one_file_keep_each_others_cells(tmp_path):
    """Two stores opened on the same file before either writes (two runs side by side): every
    cell of both is in the file afterwards, and a re-put replaces only its own key."""
    p = tmp_path / "r.json"
    a, b = results.ResultStore(p), results.ResultStore(p)
    a.put(key(), {"ppl": 1.0})
    b.put(key(seed=7), {"ppl": 2.0})
    a.put(key(length=2048), {"ppl": 3.0})
    b.put(key(seed=7), {"ppl": 4.0})
    reread = results.ResultStore(p)
    got = {c["key"]: c["ppl"] for c in reread.cells}
    want = {results.digest(key()): 1.0, results.digest(key(length=2048)): 3.0}
    assert got == {**want, results.digest(key(seed=7)): 4.0}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["r.json"]


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


def test_mean_se_is_sample_std_over_sqrt_n():
    assert results.mean_se([1.0, 0.0, 1.0, 0.0]) == pytest.approx((0.5, 0.5 / 2 * (4 / 3) ** 0.5))
    assert results.mean_se([100.0] * 8) == (100.0, 0.0)
    assert results.mean_se([3.0]) == (3.0, 0.0)
    with pytest.raises(ValueError):
        results.mean_se([])


def test_block_means_and_perplexity_se():
    import numpy as np

    nll = np.arange(10, dtype=np.float64)  # predictions of an 11-token text
    assert results.block_means(nll, 11, 4) == [1.5, 5.5]  # the short last block is dropped
    assert results.block_means(nll, 5, 4) == [1.5]
    assert results.block_means(nll, 3, 4) == [0.5]  # one short block is kept
    blocks = [2.0, 2.2, 1.8, 2.0]
    m, se = results.mean_se(blocks)
    assert results.perplexity_se(blocks) == pytest.approx(np.exp(m) * se)
    assert results.perplexity_se([2.0, 2.0]) == 0.0


def test_paired_se_uses_the_per_block_differences():
    a = {"ppl": {"1024": 20.0}, "block_nll": {"1024": [1.0, 2.0, 3.0]}}
    b = {"ppl": {"1024": 19.0}, "block_nll": {"1024": [0.5, 1.5, 3.5]}}
    # differences 0.5, 0.5, -0.5: sample std 1 / sqrt(3), over sqrt(3) -> 1/3; times a's ppl
    assert results.paired_se(a, b, 1024) == pytest.approx(20.0 / 3)
    assert results.paired_se(a, a, 1024) is None
    assert results.paired_se(a, None, 1024) is None
    assert results.paired_se(a, {"ppl": {"1024": 1.0}}, 1024) is None  # no blocks: no SE
    short = {"ppl": {"1024": 19.0}, "block_nll": {"1024": [0.5, 1.5]}}
    assert results.paired_se(a, short, 1024) is None  # blocks that do not line up
    assert results.paired_se(a, b, 2048) is None


def test_best_of_keeps_ties_and_direction():
    e = [("a", 50.0, 10.0), ("b", 75.0, 5.0), ("c", 75.0, 8.0), ("d", 20.0, 1.0)]
    assert [x[0] for x in results.best_of(e)] == ["b", "c"]
    assert [x[0] for x in results.best_of(e, higher=False)] == ["d"]
    assert results.best_of([]) == []
    rows = [
        dict(benchmark="t", length=2048, n=8, best=results.best_of(e), candidates=e, full=None),
    ]
    table = results.best_table(rows, "{:.0f} ± {:.0f}")
    assert table[2] == "| t | 2048 | 8 | b = c | 75 ± 5 | a 50 ± 10 | - |"


def test_compressor_note_names_the_files_behind_lococo_cells():
    cells = [
        {"key_fields": {"compressors": None}},
        {"key_fields": {"compressors": {"file": "m128.safetensors", "sha256": "ab"}}},
        {"key_fields": {"compressors": {"file": "m128.safetensors", "sha256": "ab"}}},
    ]
    note = results.compressor_note(cells)
    assert note.count("m128.safetensors (sha256 ab)") == 1
    assert results.compressor_note(cells[:1]) is None


def test_fixed_m_table_shows_the_newest_cell_per_setting():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import eval_perplexity

    def cell(policy, ppl, finished, M=64):
        config = CompressionConfig(policy=policy, cache_size=M).__dict__
        return {
            "policy": policy,
            "cache_size": M,
            "rope": 1.0,
            "ppl": {"1024": ppl},
            "key_fields": {"config": config},
            "provenance": {"finished": f"2026-12-04T{finished}Z"},
        }

    # the same lococo setting measured with an old and a new compressor file: the one finished
    # last shows, wherever it stands in the store
    cells = [
        cell("full", 18.2, "19:00:00"),
        cell("lococo", 18.98, "23:21:49"),
        cell("h2o", 18.98, "19:20:09"),
        cell("lococo", 18.79, "19:18:36"),
    ]
    rows = eval_perplexity.table(cells, [1024]).splitlines()[2:]
    assert [r.split("|")[1].strip().split()[0] for r in rows] == ["full", "h2o", "lococo"]
    assert "| lococo | 64 | 1 | 18.98 |" in rows
    # another M or another set of lengths is another row
    cells.append(cell("lococo", 19.5, "23:30:00", M=128))
    assert len(eval_perplexity.table(cells, [1024]).splitlines()) == 2 + 4


def test_ablation_pools_slices_and_pairs_their_blocks():
    import sys
    from pathlib import Path

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import ablate_lococo

    def row(label, blocks):
        ccfg = CompressionConfig(policy="lococo", cache_size=64).__dict__
        nll = {"1024": blocks}
        return {
            "label": label,
            "file": None,
            "a_mean": 0.0,
            "compression_config": ccfg,
            "ppl": {"1024": float(np.exp(np.mean(blocks)))},
            "block_nll": nll,
        }

    slice_a = [row("lococo", [1.0, 2.0]), row("anchors", [1.5, 2.5])]
    slice_b = [row("lococo", [3.0, 3.0]), row("anchors", [2.5, 3.5])]
    pooled = [ablate_lococo._pool([s[i] for s in (slice_a, slice_b)], [1024]) for i in (0, 1)]
    assert pooled[0]["block_nll"]["1024"] == [1.0, 2.0, 3.0, 3.0]
    assert pooled[1]["ppl"]["1024"] == pytest.approx(np.exp(2.5))
    # differences 0.5, 0.5, -0.5, 0.5: mean 0.25, sample std 0.5, SE 0.25
    assert results.paired_se(pooled[1], pooled[0], 1024) == pytest.approx(np.exp(2.5) * 0.25)
    table = ablate_lococo._table(pooled, [1024])
    gap = np.exp(2.5) - np.exp(2.25)
    assert f"| {np.exp(2.5):.2f} (+{gap:.2f} ± {np.exp(2.5) * 0.25:.2f}) |" in table
