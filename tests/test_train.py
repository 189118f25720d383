"""Training: sharded == single-device step, frozen params untouched, resume, loss goes down,
clear errors. Tiny random model, byte tokenizer, real text from tests/data."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from lococo_jax import checkpoint, optim, sharding, train
from lococo_jax.config import ConfigError

HERE = Path(__file__).resolve().parent
TEXT = str(HERE / "data" / "austen_sample.txt")


def tiny(tmp_path, **kw) -> train.TrainConfig:
    base = dict(
        data_files=(TEXT,),
        data_dir=str(tmp_path / "tfds"),
        batch_size=4,
        clean_period=4,
        steps=6,
        lr=1e-3,
        memory_lr_scale=10.0,
        progress=False,
        mesh_data=1,
    )
    return train.TrainConfig(**{**base, **kw})


@pytest.mark.slow
def test_sharded_step_matches_single_device(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent)] + sys.path))
    proc = subprocess.run(
        [sys.executable, str(HERE / "_mesh_worker.py"), TEXT, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    res = json.loads(line[0][len("RESULT ") :])
    for mesh in ("8x1x1", "2x2x2", "1x4x2"):
        r = res[mesh]
        assert r["loss_rel"] < 1e-5, (mesh, r)
        # Relative to each leaf's scale. Adam's m / sqrt(v) turns float-order gradient noise
        # into lr-sized steps where a gradient is ~0 (measured: <= 1.6e-4 of a leaf's scale,
        # <= 1.4e-5 abs after two steps), so params are compared looser than the loss.
        assert r["param_rel"] < 1e-3 and r["max_abs"] < 1e-4, (mesh, r)
    assert res["2x2x2"]["wq_spec"] == "P(None, 'fsdp', 'tensor')"


@pytest.mark.parametrize("mode", ["inference", "post_training"])
def test_only_intended_params_change(tmp_path, mode):
    run = train.build(tiny(tmp_path, mode=mode), with_checkpointer=False)
    ts = run.init_ts()
    before = jax.tree.map(np.array, ts["params"])
    from lococo_jax import data

    loader = data.make_loader(run.tcfg.data(), run.tokenizer, run.tcfg.sample_len, 4, 0)
    new, m = train.make_train_step(run)(ts, loader.next())
    assert np.isfinite(float(m["loss"]))
    labels = run.labels
    flat_l = jax.tree_util.tree_leaves_with_path(labels)
    groups_seen = set()
    for (path, lab), b, a in zip(
        flat_l, jax.tree.leaves(before), jax.tree.leaves(new["params"]), strict=True
    ):
        name = jax.tree_util.keystr(path)
        if lab == "frozen":
            assert np.array_equal(b.view(np.uint8), np.asarray(a).view(np.uint8)), name
        # lora a has zero grad while b = 0; a conv bias shifts every softmax logit of a
        # channel alike, so its grad is ~0 too.
        elif not (
            (name.startswith("['lora']") and name.endswith("['a']"))
            or (name.startswith("['lococo']") and name.endswith("['b']"))
        ):
            assert not np.array_equal(b, np.asarray(a)), name
        groups_seen.add(lab)
    expect = {"lococo", "norms_embed", "frozen"} | ({"lora"} if mode == "post_training" else set())
    assert groups_seen == expect
    if mode == "inference":
        assert optim.label_of(["lora", "wq", "a"], mode) == "frozen"
    # Frozen params have no optimiser state: every non-scalar state leaf maps to a trainable param.
    params_by_path = {
        tuple(sharding._keys(p)): lab for p, lab in jax.tree_util.tree_leaves_with_path(labels)
    }
    n_state = 0
    for path, x in jax.tree_util.tree_leaves_with_path(new["opt_state"]):
        if x.ndim == 0:
            continue
        keys = tuple(sharding._keys(path))
        match = [params_by_path[keys[i:]] for i in range(len(keys)) if keys[i:] in params_by_path]
        assert match and match[0] != "frozen", keys
        n_state += 1
    n_trainable = sum(lab != "frozen" for lab in jax.tree.leaves(labels))
    assert n_state == 2 * n_trainable  # adam mu and nu only


def test_resume_equals_uninterrupted(tmp_path):
    straight = train.train(tiny(tmp_path, checkpoint_dir=str(tmp_path / "a")))
    cfg_b = tiny(tmp_path, checkpoint_dir=str(tmp_path / "b"), checkpoint_every=100)
    first = train.train(dataclasses.replace(cfg_b, stop_after=3))
    assert sorted(first["losses"]) == [1, 2, 3]
    p_straight = jax.tree.map(np.asarray, straight["state"]["params"])
    p_half = jax.tree.map(np.asarray, first["state"]["params"])
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(p_straight), jax.tree.leaves(p_half), strict=True)
    )
    second = train.train(cfg_b)  # a fresh build from the config: resumes at step 3
    assert second["resumed_from"] == 3 and sorted(second["losses"]) == [4, 5, 6]
    for s in (4, 5, 6):
        assert second["losses"][s] == straight["losses"][s]
    for a, b in zip(
        jax.tree.leaves(p_straight), jax.tree.leaves(second["state"]["params"]), strict=True
    ):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert second["data_position"] == straight["data_position"]


@pytest.mark.slow
def test_loss_goes_down(tmp_path):
    out = train.train(
        tiny(tmp_path, steps=30, batch_size=8, clean_period=4, lr=3e-3, log_dir=str(tmp_path))
    )
    losses = [out["losses"][s] for s in sorted(out["losses"])]
    assert np.mean(losses[-5:]) < losses[0] - 0.5, losses
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 30 and "tokens_per_s" in json.loads(lines[-1])


def test_nan_loss_stops_with_step_and_saves_nothing(tmp_path):
    cfg = tiny(tmp_path, lr=float("inf"), decay="constant", checkpoint_dir=str(tmp_path / "c"))
    with pytest.raises(train.TrainError, match="step 1"):
        train.train(cfg)
    assert checkpoint.Checkpointer(tmp_path / "c").latest_step() is None


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
