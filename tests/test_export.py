"""Exports of a post-training run: the merged model loads through --model with its RoPE
scaling and gives the in-memory model's numbers; the Hugging Face folder gives transformers
the same logits."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import make_tiny_hf

from lococo_jax import cli, evaluate, llama, models, train
from lococo_jax.config import CompressionConfig, ConfigError, RopeScaling
from lococo_jax.train import export

HERE = Path(__file__).resolve().parent
TEXT = HERE / "data" / "austen_sample.txt"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two post_training steps on a tiny HF Llama whose 16 positions are extended x2 by linear
    RoPE scaling (samples of 32 tokens), exported by experiments/train.py --hf."""
    root = tmp_path_factory.mktemp("export")
    make_tiny_hf(root / "hf_base", max_position_embeddings=16, tie_word_embeddings=False)
    spec = importlib.util.spec_from_file_location(
        "train_script", HERE.parent / "experiments/train.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    sets = dict(
        model=str(root / "hf_base"),
        mode="post_training",
        data_files=[str(TEXT)],
        data_dir=str(root / "tfds"),
        batch_size=2,
        clean_period=4,
        block_size=8,
        cache_size=16,
        steps=2,
        lr=1e-2,
        progress=False,
        mesh_data=1,
        checkpoint_dir=str(root / "ck"),
    )
    cfg_file = root / "run.yaml"
    cfg_file.write_text(json.dumps(sets))  # JSON is YAML
    assert script.main(["--config", str(cfg_file), "--hf"]) == 0
    tcfg = train.TrainConfig.from_yaml(cfg_file)
    out = train.train(tcfg)  # resumes at the end: the final state without training
    merged = export.merged_params(out["run"].base, out["state"]["trainable"], tcfg.lora_scale)
    return root, out["run"], merged, out["state"]["trainable"]


def flat(tree) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_rope_scaled_post_training_moves_lora_and_compressors_and_nothing_frozen(trained):
    root, run, _, tuned = trained
    init = jax.device_get(run.init_ts()["trainable"])  # the same seed: the run's step 0
    before, after = flat(init), flat(jax.device_get(tuned))
    assert before.keys() == after.keys()
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    lora_lococo = {k for k in before if k.startswith(("['lora']", "['lococo']"))}
    assert any(k.startswith("['lora']") for k in lora_lococo)
    assert lora_lococo <= moved, sorted(lora_lococo - moved)
    # The frozen base is the file on disk, bit for bit, after training.
    _, fresh, _ = models.load_model(str(root / "hf_base"))
    for k, v in flat(fresh).items():
        np.testing.assert_array_equal(flat(run.base)[k], v, err_msg=k)


def test_merged_model_loads_with_its_rope_scaling(trained):
    root, run, merged, _ = trained
    assert run.cfg.rope_scaling is not None and run.cfg.rope_scaling.factor == 2.0
    cfg, params, tok = models.load_model(str(root / "ck" / "model"))
    assert cfg == run.cfg
    for k in ("embed", "final_norm", "lm_head"):
        np.testing.assert_array_equal(np.asarray(params[k]), np.asarray(merged[k]))
    for k, v in merged["layers"].items():
        np.testing.assert_array_equal(np.asarray(params["layers"][k]), np.asarray(v))
    assert tok.encode("abc") == [66, 67, 68]
    # LoRA moved the projections (b left 0 at step 1), so the merge is not the base.
    assert not np.array_equal(
        np.asarray(merged["layers"]["wq"]), np.asarray(run.base["layers"]["wq"])
    )


def test_perplexity_command_on_the_export_equals_the_in_memory_model(trained, tmp_path, capsys):
    root, run, merged, _ = trained
    text = tmp_path / "t.txt"
    text.write_text(TEXT.read_text()[:200])
    cli.main(
        ["perplexity", "--model", str(root / "ck" / "model"), "--policy", "full",
         "--chunk-size", "8", "--text-file", str(text)]
    )  # fmt: skip
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ids = np.asarray(run.tokenizer.encode(text.read_text()), np.int32)
    ccfg = CompressionConfig(policy="full", cache_size=len(ids), chunk_size=8)
    ref = evaluate.perplexity(merged, ids, run.cfg, ccfg)
    assert row["tokens"] == len(ids)
    assert row["perplexity"] == pytest.approx(ref.perplexity, rel=1e-5)


def test_hf_export_gives_transformers_our_logits(trained):
    root, run, merged, _ = trained
    hf = transformers.LlamaForCausalLM.from_pretrained(
        root / "ck" / "hf", torch_dtype=torch.float32
    )
    assert hf.config.rope_scaling["rope_type"] == "linear" and hf.config.rope_scaling["factor"] == 2
    ids = np.asarray(run.tokenizer.encode(TEXT.read_text()[:32]), np.int64)[None]
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits.numpy()
    ours = np.asarray(llama.forward(merged, jnp.asarray(ids, jnp.int32), run.cfg))
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_hf_export_refuses_what_transformers_cannot_express(tmp_path):
    cfg, params, tok = models.load_model("tiny")
    llama3 = dataclasses.replace(cfg, rope_scaling=RopeScaling("llama3", 8.0))
    llama3 = llama3.with_linear_rope_scaling(2.0)
    with pytest.raises(ConfigError, match=r"llama3 .* composed with linear x2.0"):
        export.export_hf(tmp_path / "hf", llama3, params, tok)
    assert not any(tmp_path.iterdir())  # nothing left behind


def test_context_extension_report_reads_the_export_with_its_scaling(trained, tmp_path, monkeypatch):
    """experiments/eval_context_extension.py: the tuned rows are the exported model (its own
    RoPE x2, no more), the untuned rows the base with and without x2, every number equal to
    evaluate.perplexity on the same tokens; the report measures the issue's goals."""
    root, run, merged, _ = trained
    spec = importlib.util.spec_from_file_location(
        "ext_script", HERE.parent / "experiments/eval_context_extension.py"
    )
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)  # its dataclass looks itself up there
    spec.loader.exec_module(script)
    text = tmp_path / "t.txt"
    text.write_text(TEXT.read_text()[:300])
    out = tmp_path / "ext.json"
    script.main(
        ["--model", str(root / "hf_base"), "--tuned", str(root / "ck"), "--text", str(text),
         "--lengths", "24", "40", "--cache-size", "16", "--chunk-size", "8", "--out", str(out)]
    )  # fmt: skip
    cells = {(c["label"], c["policy"]): c for c in json.loads(out.read_text())["cells"]}
    assert set(cells) == {
        (f"{w}, RoPE x{f}", p) for w in ["untuned"] for f in (1, 2) for p in ("full", "lococo")
    } | {("tuned with lococo", "full"), ("tuned with lococo", "lococo")}
    ids = np.asarray(run.tokenizer.encode(text.read_text()), np.int32)[:40]
    _, base, _ = models.load_model(str(root / "hf_base"))
    full = CompressionConfig(policy="full", cache_size=40, chunk_size=8)
    plain = dataclasses.replace(run.cfg, rope_scaling=None)
    for label, params, cfg in [
        ("tuned with lococo", merged, run.cfg),  # the export carries x2 itself
        ("untuned, RoPE x2", base, plain.with_linear_rope_scaling(2.0)),
        ("untuned, RoPE x1", base, plain),
    ]:
        ref = evaluate.perplexity(params, ids, cfg, full).perplexity
        assert cells[(label, "full")]["ppl"]["40"] == pytest.approx(ref, rel=1e-5), label
        want = 1.0 if cfg.rope_scaling is None else cfg.rope_scaling.factor
        assert cells[(label, "full")]["rope_total"] == want, label
    assert cells[("tuned with lococo", "lococo")]["trained_compressors"] is True
    md = out.with_suffix(".md").read_text()
    assert "recovers" in md and "5% goal is not measured" in md  # no --full-tuned row
    assert out.with_suffix(".png").stat().st_size > 0
