"""What trains, split from the frozen base by structure.

The base model (``llama`` params) is frozen and lives in ``param_dtype`` (bf16 on accelerators);
it is an argument of the step, never donated, never checkpointed. What trains is a pytree of its
own, kept in float32 with its optimiser state:

    trainable = {
        "lococo": compressors (policy lococo),
        "lora": adapters (post_training mode),
        "embed", "final_norm", "layers": {"attn_norm", "mlp_norm"}  (train_norms_embed),
    }

``merge`` overlays it on the base for the forward pass, cast to the base's dtype (the
compressors stay float32: the fusion computes in float32). The train state is
{"trainable", "opt_state", "step", "rng"}; the data position is saved beside it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lococo_jax import compressors, lora, policies
from lococo_jax.config import ConfigError, LlamaConfig
from lococo_jax.train.config import TrainConfig

Params = dict[str, Any]
NORM_LAYER_KEYS = ("attn_norm", "mlp_norm")
GROUPS = ("lococo", "lora", "norms_embed")


def norms_embed(base: Params) -> Params:
    """The embedding and RMSNorm weights of a base params tree (the "norms_embed" group)."""
    return {
        "embed": base["embed"],
        "final_norm": base["final_norm"],
        "layers": {k: base["layers"][k] for k in NORM_LAYER_KEYS},
    }


def group_of(top_key: str) -> str:
    """The optimiser group of a trainable subtree by its top-level key."""
    return top_key if top_key in ("lococo", "lora") else "norms_embed"


def labels(trainable: Params) -> Params:
    """A tree like ``trainable`` whose leaves are group names (GROUPS)."""
    out = {}
    for k, v in trainable.items():
        group = group_of(k)
        out[k] = jax.tree.map(lambda _, g=group: g, v)
    return out


def init_trainable(
    tcfg: TrainConfig, base: Params, cfg: LlamaConfig, init_pol: Params | None = None
) -> Params:
    """The trainable tree in float32: compressors (``init_pol`` or a random init), LoRA
    (post_training; b = 0, so the run starts at the base model) and, with train_norms_embed,
    fp32 copies of the base's embeddings and norms. Works on abstract ``base`` under
    jax.eval_shape."""
    k_pol, k_lora = jax.random.split(jax.random.PRNGKey(tcfg.seed), 2)
    out: Params = {}
    pol = policies.init_params(k_pol, cfg, tcfg.compression())
    if pol is not None:
        out["lococo"] = pol if init_pol is None else init_pol
    if tcfg.mode == "post_training":
        out["lora"] = lora.init_lora(k_lora, cfg, tcfg.lora(), jnp.float32)
    if tcfg.train_norms_embed:
        out |= norms_embed(base)
    # A copy, never a view: an fp32 base would otherwise share its embedding and norm buffers
    # with the donated train state, and a step that also reads the base (the distillation
    # teacher) would use a donated buffer.
    return jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), out)


def merge(base: Params, trainable: Params) -> Params:
    """The params the model reads: ``base`` with the trainable leaves overlaid, cast to the
    base's dtype (compressors stay float32)."""
    dtype = base["embed"].dtype
    cast = lambda t: jax.tree.map(lambda x: x.astype(dtype), t)  # noqa: E731
    out = dict(base)
    for k, v in trainable.items():
        if k == "layers":
            out["layers"] = {**base["layers"], **cast(v)}
        else:
            out[k] = v if k == "lococo" else cast(v)
    return out


def load_init_compressors(tcfg: TrainConfig, cfg: LlamaConfig) -> Params | None:
    """The compressors named by ``init_compressors`` (None if unset), checked against the run's
    compression config: the fields that shape the conv, its activation and the normaliser's
    parametrisation must match."""
    if tcfg.init_compressors is None:
        return None
    path = tcfg.init_compressors
    if tcfg.policy != "lococo":
        raise ConfigError(f"config field 'init_compressors': policy {tcfg.policy!r} has none")
    params, saved, _ = compressors.load_compressors(path, cfg)
    ccfg = tcfg.compression()
    fields = (
        "cache_size chunk_size hh_keep_rate kernel_size n_convlayer expand activation normalizer"
    )
    diff = [
        f"{f}: {getattr(saved, f)} in the file, {getattr(ccfg, f)} in the config"
        for f in fields.split()
        if getattr(saved, f) != getattr(ccfg, f)
    ]
    if diff:
        raise ConfigError(f"config field 'init_compressors': {path} differs: {'; '.join(diff)}")
    return params


def init_train_state(tcfg: TrainConfig, trainable: Params, tx: Any) -> dict[str, Any]:
    return {
        "trainable": trainable,
        "opt_state": tx.init(trainable),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.PRNGKey(tcfg.seed),
    }
