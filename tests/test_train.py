"""Training: sharded == single-device step, frozen params untouched, resume, loss goes down,
clear errors. Tiny random model, byte tokenizer, real text from tests/data."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import tiny_run_fields

from lococo_jax import checkpoint, compressors, data, train
from lococo_jax.config import ConfigError
from lococo_jax.train import run as train_run

HERE = Path(__file__).resolve().parent
TEXT = str(HERE / "data" / "austen_sample.txt")


def tiny(tmp_path, **kw) -> train.TrainConfig:
    return train.TrainConfig(**tiny_run_fields(tmp_path, **kw))


@pytest.mark.slow
def test_sharded_step_matches_single_device(tmp_path):
    """Post-training steps on 8 fake CPU devices in three mesh layouts, and with the Pallas
    fusion (interpret mode, per shard) on 2x2x2, equal the single-device step."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent)] + sys.path))
    proc = subprocess.run(
        [sys.executable, str(HERE / "_mesh_worker.py"), TEXT, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    res = json.loads(line[0][len("RESULT ") :])
    for mesh in ("8x1x1", "2x2x2", "1x4x2", "2x2x2-pallas"):
        r = res[mesh]
        assert r["loss_rel"] < 1e-5, (mesh, r)
        # Relative to each leaf's scale. Adam's m / sqrt(v) turns float-order gradient noise
        # into lr-sized steps where a gradient is ~0 (measured: <= 1.6e-4 of a leaf's scale,
        # <= 1.4e-5 abs after two steps), so params are compared looser than the loss.
        assert r["param_rel"] < 1e-3 and r["max_abs"] < 1e-4, (mesh, r)
    assert res["2x2x2"]["wq_spec"] == "P(None, 'fsdp', 'tensor')"


@pytest.mark.slow
def test_two_processes_match_single_device(tmp_path):
    """distributed=true over 2 processes x 4 CPU devices: each process feeds only its rows of
    the global batch, and the run equals the single-device run."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent)] + sys.path))
    worker = [sys.executable, str(HERE / "_mesh_worker.py"), "--process"]
    procs = [
        subprocess.Popen(
            worker + [str(i), port, TEXT, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in (0, 1)
    ]
    try:
        outs = [p.communicate(timeout=400) for p in procs]
    finally:
        for p in procs:
            p.kill()
    res = []
    for p, (out, err) in zip(procs, outs, strict=True):
        line = [x for x in out.splitlines() if x.startswith("RESULT ")]
        assert p.returncode == 0 and line, err[-3000:]
        res.append(json.loads(line[0][len("RESULT ") :]))
    assert res[0]["rows"] == [0, 1, 2, 3] and res[1]["rows"] == [4, 5, 6, 7]
    assert res[0]["losses"] == res[1]["losses"]
    ref_cfg = dict(res[0]["config"], distributed=False, mesh_data=1, mesh_fsdp=1, mesh_tensor=1)
    ref_cfg["data_dir"] = str(tmp_path / "tfds_ref")
    ref = train.train(train.TrainConfig.from_dict(ref_cfg))
    for step, loss in ref["losses"].items():
        assert abs(res[0]["losses"][str(step)] - loss) < 1e-5 * abs(loss), step
    got = np.load(tmp_path / "params.npz")
    flat = jax.tree_util.tree_flatten_with_path(ref["state"]["trainable"])[0]
    for k, v in flat:
        a, b = got[jax.tree_util.keystr(k)], np.asarray(v)
        # The tolerance of test_sharded_step_matches_single_device (Adam amplifies float-order
        # noise where a gradient is ~0).
        assert np.max(np.abs(a - b)) < 1e-4, jax.tree_util.keystr(k)


def _leaves(tree) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


@pytest.mark.parametrize("mode", ["inference", "post_training"])
def test_bf16_base_step_moves_every_trainable_leaf(tmp_path, mode):
    """The paper's setting: bf16 base, lr 1e-5, two steps. Every trainable leaf moves (bf16 masters
    would round norms, embeddings and LoRA updates of ~1e-5 away), every frozen leaf keeps its
    bits, and the trainable updates match the fp32-base step's to bf16 tolerance."""
    updates, frozen = {}, {}
    for dtype in ("bfloat16", "float32"):
        cfg = tiny(tmp_path, mode=mode, param_dtype=dtype, lr=1e-5, memory_lr_scale=1000.0)
        run = train.build(cfg, with_checkpointer=False)
        ts = run.init_ts()
        before = _leaves(ts["trainable"])
        base_before = _leaves(run.base)
        loader = data.make_loader(cfg.data(), run.tokenizer, cfg.sample_len, 4, 0)
        step = train.make_train_step(run)
        for _ in range(2):  # LoRA a has no gradient until b has left 0
            ts, m = step(ts, run.base, loader.next())
            assert np.isfinite(float(m["loss"]))
        after = _leaves(ts["trainable"])
        assert all(v.dtype == np.float32 for v in after.values())
        updates[dtype] = {k: after[k] - before[k] for k in after}
        frozen[dtype] = (base_before, _leaves(run.base))
    groups = {k.split("'")[1] for k in updates["bfloat16"]}
    assert groups == {"lococo", "embed", "final_norm", "layers"} | (
        {"lora"} if mode == "post_training" else set()
    )
    for name, u in updates["bfloat16"].items():
        if "['embed']" in name:  # only the rows of tokens in the batch get gradient
            assert np.abs(u).max() > 0, name
        else:
            assert np.all(np.abs(u).reshape(u.shape[0], -1).max(-1) > 0), name

    # Two Adam steps are ~lr * sign(g) each: a bf16 forward only flips the sign of near-zero
    # gradients, so the updates point the same way (a conv bias barely moves the position
    # softmax, so its 16 entries get a looser bar).
    def cos(a, b):
        return float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)))

    # Measured: 0.93 (conv w) to 1.0 (norms); conv b 0.86.
    for name, u in updates["bfloat16"].items():
        c = cos(u, updates["float32"][name])
        assert c > (0.9 if u.size >= 64 else 0.5), (name, c)
    for before, after in frozen.values():
        for name, b in before.items():
            assert np.array_equal(b.view(np.uint8), after[name].view(np.uint8)), name


def test_train_state_holds_only_what_trains(tmp_path):
    run = train.build(tiny(tmp_path, mode="post_training"), with_checkpointer=False)
    tr = run.abstract_ts["trainable"]
    assert set(tr) == {"lococo", "lora", "embed", "final_norm", "layers"}
    assert set(tr["layers"]) == {"attn_norm", "mlp_norm"}
    assert set(jax.tree.leaves(run.labels)) == {"lococo", "lora", "norms_embed"}
    # Adam mu and nu for every trainable leaf and nothing else.
    n_tr = len(jax.tree.leaves(tr))
    n_opt = sum(x.ndim > 0 for x in jax.tree.leaves(run.abstract_ts["opt_state"]))
    assert n_opt == 2 * n_tr
    with pytest.raises(ConfigError, match="leaves nothing to train"):
        train.build(tiny(tmp_path, policy="h2o", train_norms_embed=False))


def test_resume_equals_uninterrupted(tmp_path):
    straight = train.train(tiny(tmp_path, checkpoint_dir=str(tmp_path / "a")))
    cfg_b = tiny(tmp_path, checkpoint_dir=str(tmp_path / "b"), checkpoint_every=100)
    first = train.train(dataclasses.replace(cfg_b, stop_after=3))
    assert sorted(first["losses"]) == [1, 2, 3]
    p_straight = jax.tree.map(np.asarray, straight["state"]["trainable"])
    p_half = jax.tree.map(np.asarray, first["state"]["trainable"])
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(p_straight), jax.tree.leaves(p_half), strict=True)
    )
    second = train.train(cfg_b)  # a fresh build from the config: resumes at step 3
    assert second["resumed_from"] == 3 and sorted(second["losses"]) == [4, 5, 6]
    for s in (4, 5, 6):
        assert second["losses"][s] == straight["losses"][s]
    for a, b in zip(
        jax.tree.leaves(p_straight), jax.tree.leaves(second["state"]["trainable"]), strict=True
    ):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert second["data_position"] == straight["data_position"]


def test_init_compressors_starts_from_the_file(tmp_path, monkeypatch):
    first = tiny(tmp_path, steps=2, checkpoint_dir=str(tmp_path / "a"))
    trained = train.train(first)["state"]["trainable"]["lococo"]
    path = tmp_path / "c.safetensors"
    compressors.save_compressors(path, trained, first.compression())
    run = train.build(tiny(tmp_path, init_compressors=str(path)), with_checkpointer=False)
    start = run.init_ts()["trainable"]["lococo"]
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(start), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    fresh = train.build(tiny(tmp_path), with_checkpointer=False).init_ts()["trainable"]["lococo"]
    assert not np.array_equal(np.asarray(fresh["normalizer"]), np.asarray(trained["normalizer"]))

    with pytest.raises(ConfigError, match=r"init_compressors.*kernel_size: 3 in the file, 5"):
        train.build(tiny(tmp_path, init_compressors=str(path), kernel_size=5))
    with pytest.raises(ConfigError, match=r"init_compressors.*policy 'h2o' has none"):
        train.build(tiny(tmp_path, init_compressors=str(path), policy="h2o"))
    monkeypatch.setattr(train_run, "load_model", lambda tcfg: pytest.fail("model loaded first"))
    with pytest.raises(ConfigError, match=r"'init_compressors': no such file: .*nope"):
        train.build(tiny(tmp_path, init_compressors=str(tmp_path / "nope")))


@pytest.mark.slow
def test_loss_goes_down(tmp_path):
    out = train.train(
        tiny(tmp_path, steps=30, batch_size=8, clean_period=4, lr=3e-3, log_dir=str(tmp_path))
    )
    losses = [out["losses"][s] for s in sorted(out["losses"])]
    assert np.mean(losses[-5:]) < losses[0] - 0.5, losses
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 30 and "tokens_per_s" in json.loads(lines[-1])


def test_nan_loss_stops_at_its_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    ck_dir, k = tmp_path / "c", 4
    cfg = tiny(tmp_path, steps=6, checkpoint_every=1, checkpoint_dir=str(ck_dir))
    saved = {}
    orig_save, orig_next = checkpoint.Checkpointer.save, data.Loader.next

    def save(self, step, state, pos, config):
        saved[step] = jax.tree.map(np.array, state["trainable"])
        orig_save(self, step, state, pos, config)

    def next_batch(self):
        b = orig_next(self)
        if self.index == k:  # the batch of step k: a token id past the embedding table,
            b = b.copy()  # which jnp.take turns into a NaN embedding, so a NaN loss
            b[0, 3] = train.TINY.vocab_size + 1000
        return b

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
    monkeypatch.setattr(data.Loader, "next", next_batch)
    with pytest.raises(train.TrainError, match=rf"step {k} \(loss=nan\).*checkpoint: step {k - 1}"):
        train.train(cfg)
    assert sorted(saved) == [1, 2, 3]
    ck = checkpoint.Checkpointer(ck_dir)
    assert ck.latest_step() == k - 1 and ck.manager.all_steps() == [1, 2, 3]
    run = train.build(cfg)  # the same config resumes from it
    ts, pos, step = run.checkpointer.restore(run.abstract_ts)
    assert step == k - 1 and int(ts["step"]) == k - 1 and pos == {"epoch": 0, "index": k - 1}
    for a, b in zip(jax.tree.leaves(saved[k - 1]), jax.tree.leaves(ts["trainable"]), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(saved[1]), jax.tree.leaves(saved[3]), strict=True)
    )


def test_missing_data_errors_before_model_load(tmp_path, monkeypatch):
    def no_load(tcfg):
        raise AssertionError("the model was loaded before the data source was checked")

    monkeypatch.setattr(train_run, "load_model", no_load)
    missing = str(tmp_path / "missing.txt")
    with pytest.raises(data.DataError, match="not found: .*missing.txt"):
        train.train(tiny(tmp_path, data_files=(missing,), checkpoint_dir=str(tmp_path / "c")))
    assert not (tmp_path / "c").exists()
    with pytest.raises(data.DataError, match=r"no feature 'book_text'.*\['name', 'text'\]"):
        train.build(tiny(tmp_path, text_key="book_text"))
    empty = tmp_path / "empty_tfds"
    with pytest.raises(data.DataError, match="'pg19' is not prepared in data_dir.*empty_tfds"):
        train.build(tiny(tmp_path, data_source="tfds", tfds_name="pg19", data_dir=str(empty)))


def test_single_process_batch_is_the_whole_global_batch(tmp_path):
    run = train.build(tiny(tmp_path), with_checkpointer=False)
    shape = (4, run.tcfg.sample_len + 1)
    np.testing.assert_array_equal(train.process_rows(run.batch_sharding, shape), np.arange(4))
    rows = np.arange(np.prod(shape), dtype=np.int32).reshape(shape)
    batch = train.global_batch(run, rows)
    assert batch.sharding == run.batch_sharding
    np.testing.assert_array_equal(np.asarray(batch), rows)


def test_fields_added_since_a_checkpoint_resume_at_their_defaults():
    saved = {"lr": 0.001, "steps": 6}  # written before text_key and distributed existed
    current = {"lr": 0.001, "steps": 6, "text_key": "text", "distributed": False}
    defaults = train.TrainConfig.field_defaults()
    assert checkpoint.config_diff(saved, current, set(), defaults) == []
    diff = checkpoint.config_diff(saved, {**current, "text_key": "book_text"}, set(), defaults)
    assert diff == ["text_key: 'text' -> 'book_text'"]


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="needs 3 devices"):
        train.check_against_devices(tiny(tmp_path, mesh_data=3), 1)
    with pytest.raises(ConfigError, match="do not divide the 8 devices"):
        train.check_against_devices(tiny(tmp_path, mesh_data=-1, mesh_fsdp=3), 8)
    with pytest.raises(ConfigError, match="'batch_size': 6 is not divisible"):
        train.check_against_devices(tiny(tmp_path, batch_size=6, mesh_data=4, mesh_tensor=2), 8)
    with pytest.raises(ConfigError, match="'clean_period'"):
        tiny(tmp_path, clean_period=0)
    with pytest.raises(ConfigError, match="'clean_period'.*no gradient"):
        tiny(tmp_path, clean_period=3)
    with pytest.raises(ConfigError, match="'mode'"):
        tiny(tmp_path, mode="finetune")
    with pytest.raises(ConfigError, match="unknown config field"):
        train.TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ConfigError, match="'rope_factor'.*mode inference"):
        tiny(tmp_path, rope_factor=2.0)
    with pytest.raises(ConfigError, match="'rope_factor'"):
        tiny(tmp_path, mode="post_training", rope_factor=0.5)


def test_rope_factor_explicit_or_just_covering_a_sample(tmp_path):
    """post_training scales RoPE by rope_factor when given (a longer window than the samples
    reach), else by sample_len / max positions; inference never scales."""
    cfg = dataclasses.replace(train_run.load_model(tiny(tmp_path))[0], max_position_embeddings=16)
    post = dict(mode="post_training", block_size=8, clean_period=4)  # samples of 32
    assert train.rope_factor(tiny(tmp_path, **post), cfg) == 2.0
    assert train.rope_factor(tiny(tmp_path, **post, rope_factor=4.0), cfg) == 4.0
    assert train.rope_factor(tiny(tmp_path, **post, rope_factor=1.0), cfg) == 1.0
    assert train.rope_factor(tiny(tmp_path, block_size=8, clean_period=4), cfg) == 1.0
    run = train.build(
        tiny(tmp_path, mode="post_training", rope_factor=3.0), with_checkpointer=False
    )
    assert run.cfg.rope_scaling.rope_type == "linear" and run.cfg.rope_scaling.factor == 3.0


def test_checkpoint_from_other_config_errors_before_compute(tmp_path):
    ck = str(tmp_path / "ck")
    train.train(tiny(tmp_path, steps=1, checkpoint_dir=ck))
    with pytest.raises(checkpoint.CheckpointConfigError, match=r"lr: 0.001 -> 0.002"):
        train.build(tiny(tmp_path, steps=1, lr=2e-3, checkpoint_dir=ck))


def test_committed_configs_load():
    for path in sorted((HERE.parent / "experiments" / "configs").glob("*.yaml")):
        tcfg = train.TrainConfig.from_yaml(path)
        assert tcfg.sample_len == tcfg.block_size * tcfg.clean_period, path
    tcfg = train.TrainConfig.from_yaml(
        HERE.parent / "experiments" / "configs" / "tiny_cpu.yaml", ["steps=4", "lr=0.01"]
    )
    assert tcfg.steps == 4 and tcfg.lr == 0.01
