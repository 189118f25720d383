"""A run's life: config values checked before anything is written, SIGTERM saves the current
step, resume equals an uninterrupted run, metrics hold each step once, a finished run extends,
a checkpoint holds only the train state and is bound to its base model."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from conftest import tiny_run_fields

from lococo_jax import checkpoint, data, models, train
from lococo_jax.config import ConfigError
from lococo_jax.train import run as train_run

HERE = Path(__file__).resolve().parent


def _script():
    spec = importlib.util.spec_from_file_location(
        "train_script", HERE.parent / "experiments/train.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _yaml(tmp_path: Path, **kw) -> Path:
    ck, logs = str(tmp_path / "ck"), str(tmp_path / "logs")
    fields = tiny_run_fields(tmp_path, checkpoint_dir=ck, log_dir=logs, **kw)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(fields))
    return path


BAD_SETS = [
    ("truncate=perhaps", r"'truncate': expected true or false, got 'perhaps'"),
    ("truncate=1", r"'truncate': expected true or false, got 1 \(int\)"),
    ("cache_size=big", r"'cache_size': expected an integer, got 'big'"),
    ("steps=2.5", r"'steps': expected an integer, got 2.5"),
    ("lr=fast", r"'lr': expected a number, got 'fast'"),
    ("lr=true", r"'lr': expected a number, got True"),
    ("mesh_data=[1, 2]", r"'mesh_data': expected an integer, got \[1, 2\]"),
    ("lora_targets=wq", r"'lora_targets': expected a list of strings, got 'wq'"),
    ("model=3", r"'model': expected a string, got 3"),
    ("stop_after=soon", r"'stop_after': expected an integer or null, got 'soon'"),
    ("policy=lococco", r"'policy': 'lococco' not in"),
    ("stepz=3", r"unknown config field\(s\) \['stepz'\]"),
    ("steps", r"--set 'steps': expected key=value"),
]


def test_set_values_parse_as_people_write_them(tmp_path):
    cfg = train.TrainConfig.from_yaml(
        _yaml(tmp_path), ["lr=1e-5", "memory_lr_scale=1000", "truncate=true", "stop_after=null"]
    )
    assert cfg.lr == 1e-5 and cfg.memory_lr_scale == 1000.0 and cfg.truncate is True
    assert cfg.stop_after is None and isinstance(cfg.data_files, tuple)


@pytest.mark.parametrize("override,message", BAD_SETS)
def test_bad_set_values_name_the_field_and_write_nothing(tmp_path, override, message):
    path = _yaml(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ConfigError, match=message):
        train.TrainConfig.from_yaml(path, [override])
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_train_script_prints_one_line_and_exits_2(tmp_path, capsys):
    path = _yaml(tmp_path)
    assert _script().main(["--config", str(path), "--set", "truncate=perhaps"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'truncate'" in err[0] and "perhaps" in err[0], err
    assert not (tmp_path / "ck").exists() and not (tmp_path / "logs").exists()


def _metric_steps(tmp_path: Path) -> list[int]:
    lines = (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["step"] for x in lines]


def test_sigterm_saves_the_step_and_resume_equals_uninterrupted(tmp_path, monkeypatch, capsys):
    (tmp_path / "a").mkdir()
    straight = train.train(train.TrainConfig.from_yaml(_yaml(tmp_path / "a")))
    path = _yaml(tmp_path, checkpoint_every=100)
    cfg = train.TrainConfig.from_yaml(path)
    orig_next = data.Loader.next

    def next_batch(self):
        if self.index == 2:  # while fetching step 3's batch: a preemption
            os.kill(os.getpid(), signal.SIGTERM)
        return orig_next(self)

    monkeypatch.setattr(data.Loader, "next", next_batch)
    first = train.train(cfg)
    monkeypatch.setattr(data.Loader, "next", orig_next)
    assert first["interrupted"] == "SIGTERM" and sorted(first["losses"]) == [1, 2, 3]
    assert checkpoint.Checkpointer(tmp_path / "ck").manager.all_steps() == [3]
    assert "SIGTERM: stopped after step 3; saved step 3" in capsys.readouterr().err

    second = train.train(cfg)
    assert second["resumed_from"] == 3 and sorted(second["losses"]) == [4, 5, 6]
    assert "resumed from step 3" in capsys.readouterr().err
    for s in (4, 5, 6):
        assert second["losses"][s] == straight["losses"][s]
    for a, b in zip(
        jax.tree.leaves(straight["state"]["trainable"]),
        jax.tree.leaves(second["state"]["trainable"]),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert _metric_steps(tmp_path) == [1, 2, 3, 4, 5, 6]

    # A crash after step 6 was logged but before its checkpoint: the resume from step 3
    # redoes 4-6 and the log still holds each step once.
    ck = checkpoint.Checkpointer(tmp_path / "ck")
    ck.manager.delete(6)
    third = train.train(cfg)
    assert third["resumed_from"] == 3 and _metric_steps(tmp_path) == [1, 2, 3, 4, 5, 6]

    # A finished run is extended by raising steps.
    fourth = train.train(train.TrainConfig.from_yaml(path, ["steps=8"]))
    assert fourth["resumed_from"] == 6 and sorted(fourth["losses"]) == [7, 8]
    assert _metric_steps(tmp_path) == list(range(1, 9))


def test_checkpoint_holds_only_the_train_state_and_its_base(tmp_path, monkeypatch):
    cfg = train.TrainConfig.from_yaml(_yaml(tmp_path, steps=1))
    out = train.train(cfg)
    ck = checkpoint.Checkpointer(tmp_path / "ck")
    tree = json.loads((tmp_path / "ck" / "1" / "state" / "_METADATA").read_text())
    paths = list(tree["tree_metadata"])
    assert {p.split("'")[1] for p in paths} == {"trainable", "opt_state", "step", "rng"}
    assert any("'lococo'" in p for p in paths)
    assert not any("'wq'" in p or "'w_gate'" in p or "'lm_head'" in p for p in paths), paths
    saved = ck.saved_config()["base_model"]
    assert saved == out["run"].base_fingerprint and set(saved) >= {"architecture", "weights"}
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(out["state"]))
    base_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(out["run"].base))
    disk = sum(f.stat().st_size for f in (tmp_path / "ck").rglob("*") if f.is_file())
    assert disk < state_bytes + base_bytes / 2  # the base (wq, w_gate, ...) is not in it

    # The same config on a different base (a converted checkpoint that changed under it):
    # a clear error before any compute.
    def other_base(tcfg):
        c, p, tok = models.load_model("tiny", seed=tcfg.seed)
        p = dict(p, final_norm=p["final_norm"] * 1.01)
        return c, p, tok

    monkeypatch.setattr(train_run, "load_model", other_base)
    with pytest.raises(train.BaseMismatchError, match=r"trained on base model .*weights"):
        train.build(cfg)
