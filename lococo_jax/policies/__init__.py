"""One registry of compression policies: name -> compress(ccfg, layer_params, entries) -> slots.

Only lococo has parameters (its compressors, under params["lococo"]); the others are stateless.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from lococo_jax.config import CompressionConfig, LlamaConfig
from lococo_jax.policies import full, h2o, keydiff, lococo, snapkv, streaming, tova
from lococo_jax.policies.base import Entries, Slots

CompressFn = Callable[[CompressionConfig, Any, Entries], Slots]

REGISTRY: dict[str, CompressFn] = {
    "full": full.compress,
    "streaming": streaming.compress,
    "h2o": h2o.compress,
    "tova": tova.compress,
    "snapkv": snapkv.compress,
    "keydiff": keydiff.compress,
    "lococo": lococo.compress,
}


def get(name: str) -> CompressFn:
    if name not in REGISTRY:
        raise ValueError(f"unknown compression policy {name!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[name]


def init_params(key: jax.Array, cfg: LlamaConfig, ccfg: CompressionConfig) -> dict[str, Any] | None:
    """The policy's parameter subtree (params["lococo"] for lococo), or None."""
    if ccfg.policy == "lococo":
        return lococo.init_params(key, cfg, ccfg)
    return None


__all__ = ["REGISTRY", "Entries", "Slots", "get", "init_params"]
