"""LoRA adapters on the attention projections: init (as peft does), merge, export.

Layout (layers stacked on L, as the base params): params["lora"][name] = {"a": [L, in, r],
"b": [L, r, out]} for name in targets (a subset of wq, wk, wv, wo); the projection becomes
x @ W + scale * (x @ a) @ b with scale = alpha / r (passed to longctx as ``lora_scale``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from lococo_jax.config import ConfigError, LlamaConfig
from lococo_jax.llama import LORA_TARGETS

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (scale = alpha / r), and which projections get adapters."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo")

    def __post_init__(self):
        if not (isinstance(self.rank, int) and self.rank > 0):
            raise ConfigError(f"config field 'lora_rank': must be a positive int, got {self.rank}")
        if not self.targets or any(t not in LORA_TARGETS for t in self.targets):
            raise ConfigError(
                f"config field 'lora_targets': {self.targets} must be a non-empty subset of "
                f"{LORA_TARGETS}"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def projection_shape(cfg: LlamaConfig, name: str) -> tuple[int, int]:
    """(in, out) features of one attention projection."""
    qd, kvd = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return {
        "wq": (cfg.hidden_size, qd),
        "wk": (cfg.hidden_size, kvd),
        "wv": (cfg.hidden_size, kvd),
        "wo": (qd, cfg.hidden_size),
    }[name]


def init_lora(key: jax.Array, cfg: LlamaConfig, lcfg: LoraConfig, dtype=jnp.float32) -> Params:
    """a ~ U(-1/sqrt(in), 1/sqrt(in)) (peft's kaiming_uniform(a=sqrt(5))), b = 0, so the
    adapted model starts equal to the base model."""
    L, out = cfg.num_hidden_layers, {}
    for name, k in zip(lcfg.targets, jax.random.split(key, len(lcfg.targets)), strict=True):
        fin, fout = projection_shape(cfg, name)
        bound = 1.0 / math.sqrt(fin)
        out[name] = {
            "a": jax.random.uniform(k, (L, fin, lcfg.rank), jnp.float32, -bound, bound).astype(
                dtype
            ),
            "b": jnp.zeros((L, lcfg.rank, fout), dtype),
        }
    return out


def merge_lora(params: Params, scale: float) -> Params:
    """Base params with W += scale * a @ b folded in and the ``lora`` subtree dropped.

    The merged model computes the same function (up to float rounding) with no adapter cost."""
    if "lora" not in params:
        return params
    layers = dict(params["layers"])
    for name, ab in params["lora"].items():
        delta = jnp.einsum("lir,lro->lio", ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32))
        w = layers[name]
        layers[name] = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
    return {k: v for k, v in params.items() if k != "lora"} | {"layers": layers}


def lora_params(params: Params) -> Params:
    """The adapters alone (export them with lococo_jax.checkpoint.save_pytree)."""
    if "lora" not in params:
        raise ValueError("params have no 'lora' subtree (was the run in post_training mode?)")
    return params["lora"]
