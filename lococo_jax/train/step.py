"""The loss and the jitted, sharded train step.

``step(train_state, base, tokens) -> (train_state, metrics)``: the gradient is taken with
respect to ``train_state["trainable"]`` (float32) only; the frozen ``base`` (param_dtype) is a
separate, non-donated argument that is read, never updated. One step is one micro-batch;
with grad_accum = k the trainable leaves change every k steps (optax.MultiSteps).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax

from lococo_jax import kv_state, longctx
from lococo_jax.config import CompressionConfig, LlamaConfig
from lococo_jax.train import state as train_state

if TYPE_CHECKING:
    from lococo_jax.train.run import Run

METRICS = ("loss", "grad_norm", "finite")


def loss_fn(
    params: dict[str, Any],
    tokens: jax.Array,
    cfg: LlamaConfig,
    ccfg: CompressionConfig,
    *,
    clean_period: int,
    remat: bool,
    truncate: bool,
    lora_scale: float,
    state_shardings: Any = None,
) -> jax.Array:
    """Mean next-token NLL over a batch. tokens [b, clean_period * B + 1] (-1 = no target);
    params: the merged model params (train_state.merge)."""
    b = tokens.shape[0]
    B = ccfg.chunk_size
    chunks = lambda x: x.reshape(b, clean_period, B).transpose(1, 0, 2)  # -> [n, b, B]
    inp, tgt = chunks(tokens[:, :-1]), chunks(tokens[:, 1:])
    state = kv_state.init_state(cfg, ccfg, b, params["embed"].dtype)
    if state_shardings is not None:
        state = jax.lax.with_sharding_constraint(state, state_shardings)
    n_new = jnp.full((clean_period, b), B, jnp.int32)
    _, _, nll = longctx.scan_chunks(
        params,
        state,
        jnp.maximum(inp, 0),
        n_new,
        cfg,
        ccfg,
        targets=tgt,
        output="nll",
        remat=remat,
        truncate=truncate,
        lora_scale=lora_scale,
    )
    return nll.sum() / jnp.maximum((tgt >= 0).sum(), 1)


def make_train_step(run: Run, jit: bool = True):
    """step(train_state, base, tokens) -> (train_state, {loss, grad_norm, finite}).

    With jit, the step is jax.jit with the run's shardings (train state donated; base and
    batch not). ``step.lower(run.abstract_ts, run.abstract_base, abstract_batch)`` compiles it
    ahead of time from abstract values (see Run.abstract_batch)."""
    tcfg, tx = run.tcfg, run.tx

    def step(ts, base, tokens):
        def f(trainable):
            return loss_fn(
                train_state.merge(base, trainable),
                tokens,
                run.cfg,
                run.ccfg,
                clean_period=tcfg.clean_period,
                remat=tcfg.remat,
                truncate=tcfg.truncate,
                lora_scale=tcfg.lora_scale,
                state_shardings=run.state_shardings,
            )

        loss, grads = jax.value_and_grad(f)(ts["trainable"])
        updates, opt_state = tx.update(grads, ts["opt_state"], ts["trainable"])
        trainable = optax.apply_updates(ts["trainable"], updates)
        finite = jnp.isfinite(loss) & jnp.all(
            jnp.stack([jnp.all(jnp.isfinite(u)) for u in jax.tree.leaves(updates)])
        )
        new = dict(trainable=trainable, opt_state=opt_state, step=ts["step"] + 1, rng=ts["rng"])
        return new, {"loss": loss, "grad_norm": optax.global_norm(grads), "finite": finite}

    if not jit:
        return step
    metric_sh = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec())
    jitted = jax.jit(
        step,
        in_shardings=(run.ts_shardings, run.base_shardings, run.batch_sharding),
        out_shardings=(run.ts_shardings, {k: metric_sh for k in METRICS}),
        donate_argnums=(0,),
    )
    return MeshStep(jitted, run.mesh)


class MeshStep:
    """A jitted step traced, lowered and run with its mesh set (jax.set_mesh), so that the
    fusion kernel runs per shard inside a shard_map (lococo_jax.fusion.fuse_rest)."""

    def __init__(self, jitted: Any, mesh: jax.sharding.Mesh):
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args: Any) -> Any:
        with jax.set_mesh(self.mesh):
            return self.jitted(*args)

    def lower(self, *args: Any) -> Any:
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args)
