"""Assembling a run from a TrainConfig: checks, model, mesh, shardings, optimiser, checkpointer.

``build`` does every check that needs no compute first (devices, data source, checkpoint
config, init files), then loads the base model (or takes a given one, possibly abstract: a
tree of jax.ShapeDtypeStruct for ahead-of-time compilation), binds it to the checkpoint
directory by fingerprint, and lays out the train state and the base over the mesh.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from lococo_jax import checkpoint, compressors, data, kv_state, models, optim, platforms, sharding
from lococo_jax.config import CompressionConfig, ConfigError, LlamaConfig
from lococo_jax.tokenizer import ByteTokenizer, load_tokenizer
from lococo_jax.train import state as train_state
from lococo_jax.train.config import RESUMABLE_FIELDS, TrainConfig

P = jax.sharding.PartitionSpec


class BaseMismatchError(ValueError):
    """A checkpoint directory was trained on another base model than the one loaded."""


@dataclasses.dataclass
class Run:
    """Everything a training run needs, built from a TrainConfig (see ``build``).

    base: the frozen base params on the mesh (param_dtype), or ShapeDtypeStructs when built
    abstractly; base_fingerprint: {"model" (the spec), "architecture", "weights"}
    (compressors.model_fingerprint), None for an abstract base."""

    tcfg: TrainConfig
    cfg: LlamaConfig
    ccfg: CompressionConfig
    mesh: jax.sharding.Mesh
    labels: Any
    tx: Any
    ts_shardings: Any
    base_shardings: Any
    state_shardings: Any
    batch_sharding: Any
    abstract_ts: Any
    abstract_base: Any
    base: Any
    base_fingerprint: dict[str, str] | None
    init_ts: Any  # () -> a fresh sharded train state
    tokenizer: Any
    checkpointer: checkpoint.Checkpointer | None

    @property
    def abstract_batch(self) -> jax.ShapeDtypeStruct:
        shape = (self.tcfg.batch_size, self.tcfg.sample_len + 1)
        return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding)


def rope_factor(tcfg: TrainConfig, cfg: LlamaConfig) -> float:
    """post_training: tcfg.rope_factor, else linear RoPE scaling to cover a whole sample (1
    when it already fits)."""
    if tcfg.mode != "post_training":
        return 1.0
    if tcfg.rope_factor is not None:
        return tcfg.rope_factor
    return max(1.0, tcfg.sample_len / cfg.max_position_embeddings)


def load_model(tcfg: TrainConfig) -> tuple[LlamaConfig, dict[str, Any], Any]:
    """(cfg, base params, tokenizer) of tcfg.model (models.load_model), with tcfg.tokenizer."""
    cfg, params, tok = models.load_model(
        tcfg.model, dtype=jnp.dtype(tcfg.param_dtype), seed=tcfg.seed
    )
    if tcfg.tokenizer == "bytes":
        tok = ByteTokenizer()
    elif tcfg.tokenizer != "auto":
        tok = load_tokenizer(tcfg.tokenizer)
    return cfg, params, tok


def check_against_devices(tcfg: TrainConfig, n_devices: int) -> tuple[int, int, int]:
    """Mesh vs device count, batch vs data * fsdp: errors naming the fields, before compute."""
    shape = sharding.resolve_mesh_shape(tcfg.mesh().shape(), n_devices)
    d, f, _ = shape
    if tcfg.batch_size % (d * f):
        raise ConfigError(
            f"config field 'batch_size': {tcfg.batch_size} is not divisible by "
            f"mesh_data * mesh_fsdp = {d} * {f} = {d * f}"
        )
    return shape


def check_base(ckpt: checkpoint.Checkpointer, fingerprint: dict[str, str]) -> None:
    """The base a checkpoint directory was trained on must be the one loaded now."""
    saved = (ckpt.saved_config() or {}).get("base_model")
    if saved is not None and saved != fingerprint:
        raise BaseMismatchError(
            f"checkpoint dir {ckpt.directory} (step {ckpt.latest_step()}) was trained on base "
            f"model {saved}, but the loaded base is {fingerprint}; use the same model and "
            "param_dtype, or another checkpoint_dir"
        )


def build(
    tcfg: TrainConfig,
    devices: list | None = None,
    with_checkpointer: bool = True,
    model: tuple[LlamaConfig, Any, Any] | None = None,
    check_data: bool = True,
) -> Run:
    """Check the config and build the run; no training compute.

    model: (cfg, base params, tokenizer) to use instead of loading tcfg.model; the params may be
    abstract (a tree of jax.ShapeDtypeStruct, e.g. ``llama.param_shapes`` as structs), which
    gives a run for ahead-of-time compilation: ``make_train_step(run).lower(run.abstract_ts,
    run.abstract_base, run.abstract_batch)``. check_data False skips the data-source check
    (compiling for a slice whose data lives elsewhere)."""
    devices = list(jax.devices() if devices is None else devices)
    check_against_devices(tcfg, len(devices))
    if check_data:
        data.check_source(tcfg.data())
    if tcfg.init_compressors is not None and not Path(tcfg.init_compressors).is_file():
        raise ConfigError(f"config field 'init_compressors': no such file: {tcfg.init_compressors}")
    ckpt = None
    if with_checkpointer and tcfg.checkpoint_dir:
        ckpt = checkpoint.Checkpointer(tcfg.checkpoint_dir, tcfg.checkpoint_keep)
        ckpt.check_config(
            {**tcfg.to_dict(), "base_model": None},
            RESUMABLE_FIELDS | {"base_model"},
            TrainConfig.field_defaults(),
        )
    mesh = sharding.make_mesh(tcfg.mesh(), devices)
    cfg, base, tok = load_model(tcfg) if model is None else model
    abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(base))
    fingerprint = None
    if not abstract:
        fingerprint = {"model": tcfg.model} | compressors.model_fingerprint(cfg, base)
        if ckpt is not None:
            check_base(ckpt, fingerprint)
    cfg = cfg.with_linear_rope_scaling(rope_factor(tcfg, cfg))
    # The fusion kernel is built for the mesh's devices, not the host's default backend.
    ccfg = dataclasses.replace(tcfg.compression(), fusion_platform=platforms.platform_of(mesh))
    vocab = getattr(tok, "vocab_size", None)
    if isinstance(vocab, int) and vocab > cfg.vocab_size:
        raise ConfigError(
            f"config field 'tokenizer': its vocab ({vocab}) exceeds the model's ({cfg.vocab_size})"
        )
    init_pol = train_state.load_init_compressors(tcfg, cfg)

    abstract_base = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base)
    abstract_tr = jax.eval_shape(
        lambda b: train_state.init_trainable(tcfg, b, cfg, init_pol), abstract_base
    )
    if not jax.tree.leaves(abstract_tr):
        raise ConfigError(
            f"config field 'policy': {tcfg.policy!r} in {tcfg.mode} mode with "
            "train_norms_embed false leaves nothing to train"
        )
    labels = train_state.labels(abstract_tr)
    tx = optim.make_optimizer(tcfg.optim(), labels)
    rep = tcfg.replicate_indivisible
    base_specs = sharding.param_specs(abstract_base, mesh, rep)
    tr_specs = sharding.param_specs(abstract_tr, mesh, rep)
    abstract_opt = jax.eval_shape(tx.init, abstract_tr)
    ospecs = sharding.opt_state_specs(abstract_opt, abstract_tr, tr_specs)
    ts_specs = dict(trainable=tr_specs, opt_state=ospecs, step=P(), rng=P())
    ts_shardings = sharding.named(mesh, ts_specs)
    base_shardings = sharding.named(mesh, base_specs)
    abstract_state = jax.eval_shape(lambda: kv_state.init_state(cfg, ccfg, tcfg.batch_size))
    state_shardings = sharding.named(mesh, sharding.state_specs(abstract_state, mesh, rep))
    batch_sharding = jax.sharding.NamedSharding(
        mesh, sharding.batch_spec((tcfg.batch_size, tcfg.sample_len + 1), mesh)
    )
    base_on_mesh = None if abstract else jax.device_put(base, base_shardings)

    def init_ts():
        if abstract:
            raise ValueError("a run built on an abstract base has no concrete train state")
        trainable = train_state.init_trainable(tcfg, base, cfg, init_pol)
        return jax.device_put(train_state.init_train_state(tcfg, trainable, tx), ts_shardings)

    abstract_ts = checkpoint.abstract_like(
        dict(
            trainable=abstract_tr,
            opt_state=abstract_opt,
            step=jax.ShapeDtypeStruct((), jnp.int32),
            rng=jax.eval_shape(lambda: jax.random.PRNGKey(0)),
        ),
        ts_shardings,
    )
    return Run(
        tcfg=tcfg,
        cfg=cfg,
        ccfg=ccfg,
        mesh=mesh,
        labels=labels,
        tx=tx,
        ts_shardings=ts_shardings,
        base_shardings=base_shardings,
        state_shardings=state_shardings,
        batch_sharding=batch_sharding,
        abstract_ts=abstract_ts,
        abstract_base=checkpoint.abstract_like(abstract_base, base_shardings),
        base=base_on_mesh,
        base_fingerprint=fingerprint,
        init_ts=init_ts,
        tokenizer=tok,
        checkpointer=ckpt,
    )
