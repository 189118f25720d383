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

from lococo_jax import kv_state, llama, longctx
from lococo_jax.config import CompressionConfig, LlamaConfig
from lococo_jax.train import layerwise
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
    teacher_logits: jax.Array | None = None,
    lm_weight: float = 1.0,
    distill_weight: float = 0.0,
) -> jax.Array:
    """lm_weight * mean next-token NLL + distill_weight * mean KL(teacher || model) over a batch.

    tokens [b, clean_period * B + 1] (-1 = no target); params: the merged model params
    (train_state.merge); teacher_logits [b, clean_period * B, vocab] (needed when
    distill_weight > 0): the frozen model's logits at the same inputs, full attention."""
    b = tokens.shape[0]
    B = ccfg.chunk_size
    inp, tgt = (to_chunks(x, clean_period, B) for x in (tokens[:, :-1], tokens[:, 1:]))
    state = kv_state.init_state(cfg, ccfg, b, params["embed"].dtype)
    if state_shardings is not None:
        state = jax.lax.with_sharding_constraint(state, state_shardings)
    n_new = jnp.full((clean_period, b), B, jnp.int32)
    distill = distill_weight > 0
    if distill and teacher_logits is None:
        raise ValueError("distill_weight > 0 needs teacher_logits")
    _, _, ys = longctx.scan_chunks(
        params,
        state,
        jnp.maximum(inp, 0),
        n_new,
        cfg,
        ccfg,
        targets=tgt,
        output="logits" if distill else "nll",
        remat=remat,
        truncate=truncate,
        lora_scale=lora_scale,
    )
    has_tgt = tgt >= 0
    count = jnp.maximum(has_tgt.sum(), 1)
    if not distill:
        return lm_weight * ys.sum() / count
    logp = jax.nn.log_softmax(ys, axis=-1)  # [n, b, B, vocab]
    picked = jnp.take_along_axis(logp, jnp.maximum(tgt, 0)[..., None], axis=-1)[..., 0]
    nll = jnp.where(has_tgt, -picked, 0.0).sum() / count
    t_logp = jax.nn.log_softmax(to_chunks(teacher_logits, clean_period, B), axis=-1)
    kl = (jnp.exp(t_logp) * (t_logp - logp)).sum(-1)  # [n, b, B]
    kl = jnp.where(has_tgt, kl, 0.0).sum() / count
    return lm_weight * nll + distill_weight * kl


def to_chunks(x: jax.Array, n: int, B: int) -> jax.Array:
    """[b, n * B, ...] -> [n, b, B, ...]."""
    return jnp.swapaxes(x.reshape((x.shape[0], n, B) + x.shape[2:]), 0, 1)


def objective_loss(run: Run, base: Any, trainable: Any, tokens: jax.Array) -> jax.Array:
    """The run's objective (TrainConfig.objective) for one batch tokens [b, sample_len + 1]."""
    tcfg = run.tcfg
    params = train_state.merge(base, trainable)
    if tcfg.objective == "layerwise":
        value, _ = layerwise.loss(
            params, tokens[:, :-1], run.cfg, run.ccfg, lora_scale=tcfg.lora_scale, remat=tcfg.remat
        )
        return value
    teacher = None
    lm_weight = 0.0 if tcfg.objective == "distill" else 1.0
    distill_weight = tcfg.distill_weight if "distill" in tcfg.objective else 0.0
    if distill_weight > 0:  # the frozen base (no LoRA, no trained norms), full attention
        teacher = jax.lax.stop_gradient(
            llama.forward(base, jnp.maximum(tokens[:, :-1], 0), run.cfg)
        )
    return loss_fn(
        params,
        tokens,
        run.cfg,
        run.ccfg,
        clean_period=tcfg.clean_period,
        remat=tcfg.remat,
        truncate=tcfg.truncate,
        lora_scale=tcfg.lora_scale,
        state_shardings=run.state_shardings,
        teacher_logits=teacher,
        lm_weight=lm_weight,
        distill_weight=distill_weight,
    )


def make_train_step(run: Run, jit: bool = True):
    """step(train_state, base, tokens) -> (train_state, {loss, grad_norm, finite}).

    With jit, the step is jax.jit with the run's shardings (train state donated; base and
    batch not). ``step.lower(run.abstract_ts, run.abstract_base, abstract_batch)`` compiles it
    ahead of time from abstract values (see Run.abstract_batch)."""
    tx = run.tx

    def step(ts, base, tokens):
        def f(trainable):
            return objective_loss(run, base, trainable, tokens)

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
