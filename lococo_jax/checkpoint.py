"""Orbax checkpoints of a training run, automatic resume, and exports.

A checkpoint step directory holds three named items:
    state   the train state: trainable (fp32) + opt_state + step + rng, never the frozen base
            (orbax StandardSave; restored into an abstract target of jax.ShapeDtypeStruct
            with shardings, so each device reads its shards)
    data    the data position {"epoch", "index"} (JSON)
    config  the run's TrainConfig as a dict plus "base_model" (the base's fingerprint) (JSON),
            compared with the current one before resume
Orbax writes each step into a temporary directory and renames it once finalised, so the latest
step the manager lists is always complete (a crash mid-save leaves no half checkpoint).
Paths: local ones are expanded (~) and made absolute; URLs (gs://bucket/..., anything with
"://") are kept as they are and handed to orbax as etils.epath.Path (gs:// needs gcsfs).
``save_pytree`` / ``load_pytree``: any params tree as one orbax directory. A run's exports
(compressors, merged model, Hugging Face folder) are lococo_jax.train.export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

ITEMS = ("state", "data", "config")


class CheckpointConfigError(ValueError):
    """The checkpoint directory was written by a run with a different config."""


def normalize_path(path: str | Path) -> epath.Path:
    """A local path expanded (~) and resolved; a URL ("gs://bucket/x", anything with "://")
    unchanged (pathlib would turn it into the local folder <cwd>/gs:/bucket/x)."""
    s = str(path)
    if "://" in s:
        return epath.Path(s)
    return epath.Path(Path(s).expanduser().resolve())


def config_diff(
    saved: dict[str, Any],
    current: dict[str, Any],
    ignore: set[str],
    defaults: dict[str, Any] | None = None,
) -> list[str]:
    """Fields (other than ``ignore``) whose values differ, as 'field: saved -> current'. A field
    absent from ``saved`` (added to the config since) counts as its value in ``defaults``."""
    keys = sorted((set(saved) | set(current)) - ignore)
    missing = object()
    defaults = defaults or {}
    out = []
    for k in keys:
        a, b = saved.get(k, defaults.get(k, missing)), current.get(k, missing)
        if a != b:
            fmt = lambda v: "<absent>" if v is missing else repr(v)  # noqa: E731
            out.append(f"{k}: {fmt(a)} -> {fmt(b)}")
    return out


class Checkpointer:
    """Wraps ocp.CheckpointManager for one run directory (keep the last ``keep`` steps)."""

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = False):
        self.directory = normalize_path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def saved_config(self, step: int | None = None) -> dict[str, Any] | None:
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return dict(out["config"])

    def check_config(
        self,
        current: dict[str, Any],
        ignore: set[str] = frozenset(),
        defaults: dict[str, Any] | None = None,
    ) -> None:
        """Raise CheckpointConfigError naming the differing fields (reads only the JSON)."""
        saved = self.saved_config()
        if saved is None:
            return
        diff = config_diff(saved, current, set(ignore), defaults)
        if diff:
            raise CheckpointConfigError(
                f"checkpoint dir {self.directory} (step {self.latest_step()}) was written by a "
                f"different config; differing fields: {'; '.join(diff)}. Use another "
                "checkpoint_dir or the same config."
            )

    def save(self, step: int, state: Any, data_position: dict, config: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_position),
                config=ocp.args.JsonSave(config),
            ),
            force=True,
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """(state, data position, step) of ``step`` (default: latest), into ``abstract_state``
        (a tree of jax.ShapeDtypeStruct with .sharding)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return out["state"], dict(out["data"]), step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays or ShapeDtypeStructs."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def save_pytree(path: str | Path, tree: Any) -> epath.Path:
    """Any params tree (e.g. lora.merge_lora output) as one orbax checkpoint directory."""
    path = normalize_path(path)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, tree, force=True)
    return path


def load_pytree(path: str | Path, abstract: Any | None = None) -> Any:
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(normalize_path(path), abstract)
