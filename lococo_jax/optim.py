"""AdamW with per-group learning rates for the two LoCoCo training modes.

Groups (DESIGN.md "Training"): "lococo" (the compressors, lr * memory_lr_scale), "norms_embed"
(token embeddings and RMSNorm weights, lr * norm_lr_scale) and "lora" (adapters, lr, only in
post_training mode). The optimiser sees only the trainable tree (lococo_jax.train.state):
frozen params are not an input, so they have no optimiser state and cannot move. Gradient
clipping is by the global norm of the trainable gradients; gradient accumulation is
optax.MultiSteps.
One call of the returned transformation is one micro-batch; the schedule counts real updates.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

from lococo_jax.config import ConfigError

MODES = ("inference", "post_training")
DECAYS = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    mode: str = "inference"
    lr: float = 1e-4
    memory_lr_scale: float = 1000.0
    norm_lr_scale: float = 5.0
    # False: embeddings and norms stay frozen too (only the compressors / LoRA train), so the
    # base model is exactly the one the eviction baselines run.
    train_norms_embed: bool = True
    warmup_steps: int = 0
    decay: str = "cosine"
    decay_steps: int = 1000  # optimiser updates from the start to the end of decay
    end_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    grad_accum: int = 1

    def __post_init__(self):
        def check(ok: bool, field: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"config field '{field}': {msg}")

        check(self.mode in MODES, "mode", f"{self.mode!r} not in {MODES}")
        check(self.decay in DECAYS, "decay", f"{self.decay!r} not in {DECAYS}")
        check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(self.decay_steps >= 1, "steps", f"must leave >= 1 update, got {self.decay_steps}")
        check(self.grad_accum >= 1, "grad_accum", f"must be >= 1, got {self.grad_accum}")
        check(
            self.clip_norm is None or self.clip_norm > 0,
            "clip_norm",
            f"must be > 0 or null, got {self.clip_norm}",
        )
        check(0 <= self.end_lr_ratio <= 1, "end_lr_ratio", "must be in [0, 1]")


def schedule(ocfg: OptimConfig) -> optax.Schedule:
    """Linear warmup from 0 to lr, then cosine / linear decay to lr * end_lr_ratio (or flat)."""
    end = ocfg.lr * ocfg.end_lr_ratio
    if ocfg.decay == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, ocfg.lr, ocfg.warmup_steps, max(ocfg.decay_steps, ocfg.warmup_steps + 1), end
        )
    warm = optax.linear_schedule(0.0, ocfg.lr, max(ocfg.warmup_steps, 1))
    if ocfg.decay == "linear":
        rest = optax.linear_schedule(ocfg.lr, end, max(ocfg.decay_steps - ocfg.warmup_steps, 1))
    else:
        rest = optax.constant_schedule(ocfg.lr)
    if ocfg.warmup_steps == 0:
        return rest
    return optax.join_schedules([warm, rest], [ocfg.warmup_steps])


def make_optimizer(ocfg: OptimConfig, labels: Any) -> optax.GradientTransformation:
    """The optimiser of the trainable tree whose leaves are labelled with ``labels`` (a tree
    like it of group names: "lococo", "norms_embed", "lora"); frozen params are not in it."""
    base = schedule(ocfg)
    scales = {"lococo": ocfg.memory_lr_scale, "norms_embed": ocfg.norm_lr_scale, "lora": 1.0}
    present = set(jax.tree.leaves(labels))
    if not present or not present <= set(scales):
        raise ValueError(f"labels must be a non-empty subset of {sorted(scales)}, got {present}")

    def adamw(scale: float) -> optax.GradientTransformation:
        return optax.adamw(
            lambda n: base(n) * scale, ocfg.b1, ocfg.b2, ocfg.eps, weight_decay=ocfg.weight_decay
        )

    tx = optax.multi_transform({g: adamw(scales[g]) for g in sorted(present)}, labels)
    if ocfg.clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(ocfg.clip_norm), tx)
    if ocfg.grad_accum > 1:
        tx = optax.MultiSteps(tx, ocfg.grad_accum)
    return tx
