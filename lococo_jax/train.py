"""Training LoCoCo compressors (inference mode) or compressors + LoRA (post_training mode).

``TrainConfig`` is one flat frozen dataclass (YAML: one key per field). ``build`` turns it into
a ``Run`` (model, optimiser, mesh, shardings, data, checkpointer) after checking everything
that can be checked before compute; ``train`` runs the loop: jitted sharded step, tqdm bar,
JSONL + TensorBoard metrics, checkpoints every N steps and at the end, automatic resume,
and a stop with an error on a non-finite loss or update (the NaN state is never saved).

One step = one micro-batch [batch_size, block_size * clean_period + 1] tokens; with
grad_accum = k the params change every k steps (optax.MultiSteps).

Multi-host (``distributed: true``, e.g. a TPU pod with the same command on every host):
``train`` calls jax.distributed.initialize() before any device use; batch_size stays the global
batch. Every process reads the same seeded sample order and keeps only the rows of each global
batch that its own devices hold under the batch sharding (``process_rows``: a contiguous block
per process for the usual process-major device order), and the global batch is assembled with
jax.make_array_from_process_local_data. One process reads the whole batch, exactly as before.
Only process 0 writes metrics and shows the progress bar.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from lococo_jax import (
    checkpoint,
    compressors,
    data,
    kv_state,
    longctx,
    lora,
    models,
    optim,
    policies,
    sharding,
)
from lococo_jax.config import CompressionConfig, ConfigError, LlamaConfig
from lococo_jax.tokenizer import ByteTokenizer, load_tokenizer

TINY = models.TINY
# Fields that may change between a checkpoint and its resume (they do not change the maths).
RESUMABLE_FIELDS = frozenset(
    {
        "stop_after",
        "checkpoint_every",
        "checkpoint_keep",
        "log_dir",
        "log_every",
        "progress",
        "distributed",
    }
)


class TrainError(RuntimeError):
    """Training stopped (e.g. a non-finite loss); the message names the step."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # Model: "tiny" (random), "smollm2" (the embedded default), or a converted checkpoint path.
    model: str = "tiny"
    tokenizer: str = "auto"  # "auto": the model's ("bytes" for tiny); "bytes"; or a path
    param_dtype: str = "float32"
    # Compression (CompressionConfig); block_size is its chunk_size B.
    policy: str = "lococo"
    cache_size: int = 16
    block_size: int = 8
    hh_keep_rate: float = 0.5
    local_len: int = 0
    kernel_size: int = 3
    n_convlayer: int = 1
    expand: int = 1
    activation: str = "relu"
    normalizer_init: float = 0.5
    conv_init: str = "normal"
    fusion_impl: str = "auto"
    # Start the compressors from this safetensors file (compressors.save_compressors format)
    # instead of a random init: continued calibration with a fresh schedule. A fresh run only;
    # a resume restores its checkpoint.
    init_compressors: str | None = None
    # Training.
    mode: str = "inference"
    clean_period: int = 4
    batch_size: int = 8
    steps: int = 20
    stop_after: int | None = None  # stop early at this step (a planned preemption)
    lr: float = 1e-3
    memory_lr_scale: float = 1000.0
    norm_lr_scale: float = 5.0
    train_norms_embed: bool = True
    warmup_steps: int = 0
    decay: str = "cosine"
    end_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    grad_accum: int = 1
    remat: bool = True
    truncate: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("wq", "wk", "wv", "wo")
    # Mesh (-1: auto-fill with the remaining devices).
    mesh_data: int = -1
    mesh_fsdp: int = 1
    mesh_tensor: int = 1
    replicate_indivisible: bool = False
    # Multi-host: call jax.distributed.initialize() first, with no arguments: jax detects
    # Cloud TPU pods, SLURM, Open MPI and Kubernetes; elsewhere call it yourself with the
    # coordinator, process count and id before train() (train then skips it).
    distributed: bool = False
    # Checkpoints and logs.
    checkpoint_dir: str | None = None
    checkpoint_every: int = 100
    checkpoint_keep: int = 3
    log_dir: str | None = None
    log_every: int = 1
    progress: bool = True
    # Data.
    data_source: str = "local"
    data_files: tuple[str, ...] = ()
    tfds_name: str = "pg19"
    data_dir: str = "~/tensorflow_datasets"
    data_split: str = "train"
    text_key: str = "text"  # the examples' text feature (pg19: "book_text")
    max_documents: int | None = None
    seed: int = 0

    def __post_init__(self):
        for name in ("lora_targets", "data_files"):  # YAML gives lists
            object.__setattr__(self, name, tuple(getattr(self, name)))

        def check(ok: bool, field: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"config field '{field}': {msg}")

        for name in ("clean_period", "batch_size", "steps", "checkpoint_every", "log_every"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 1, name, f"must be an int >= 1, got {v!r}")
        check(self.checkpoint_keep >= 1, "checkpoint_keep", "must be >= 1")
        check(self.param_dtype in ("float32", "bfloat16"), "param_dtype", "float32 | bfloat16")
        check(
            self.steps % self.grad_accum == 0,
            "steps",
            f"{self.steps} must be a multiple of grad_accum ({self.grad_accum})",
        )
        check(
            self.stop_after is None or 1 <= self.stop_after <= self.steps,
            "stop_after",
            f"must be in [1, steps={self.steps}] or null, got {self.stop_after}",
        )
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        self.compression()  # its own checks name its fields
        check(
            self.policy != "lococo" or (self.clean_period - 1) * self.block_size > self.cache_size,
            "clean_period",
            f"{self.clean_period} chunks of {self.block_size} never read a compressed cache of "
            f"{self.cache_size} slots, so the compressors get no gradient; need "
            "(clean_period - 1) * block_size > cache_size",
        )
        self.optim()
        if self.mode == "post_training":
            self.lora()
        self.data()

    # Sub-configs.
    def compression(self) -> CompressionConfig:
        names = [f.name for f in dataclasses.fields(CompressionConfig)]
        kw = {n: getattr(self, n) for n in names if hasattr(self, n)}
        return CompressionConfig(chunk_size=self.block_size, **kw)

    def optim(self) -> optim.OptimConfig:
        return optim.OptimConfig(
            mode=self.mode,
            lr=self.lr,
            memory_lr_scale=self.memory_lr_scale,
            norm_lr_scale=self.norm_lr_scale,
            train_norms_embed=self.train_norms_embed,
            warmup_steps=self.warmup_steps,
            decay=self.decay,
            decay_steps=max(self.steps // self.grad_accum, 1),
            end_lr_ratio=self.end_lr_ratio,
            weight_decay=self.weight_decay,
            clip_norm=self.clip_norm,
            grad_accum=self.grad_accum,
        )

    def lora(self) -> lora.LoraConfig:
        return lora.LoraConfig(self.lora_rank, self.lora_alpha, self.lora_targets)

    def mesh(self) -> sharding.MeshConfig:
        return sharding.MeshConfig(
            self.mesh_data, self.mesh_fsdp, self.mesh_tensor, self.replicate_indivisible
        )

    def data(self) -> data.DataConfig:
        return data.DataConfig(
            source=self.data_source,
            files=self.data_files,
            tfds_name=self.tfds_name,
            data_dir=self.data_dir,
            split=self.data_split,
            text_key=self.text_key,
            max_documents=self.max_documents,
        )

    @property
    def sample_len(self) -> int:
        return self.block_size * self.clean_period

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def field_defaults(cls) -> dict[str, Any]:
        """Each field's default as in to_dict (tuples as lists)."""
        return {
            f.name: list(f.default) if isinstance(f.default, tuple) else f.default
            for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | None = None) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            where = f" in {source}" if source else ""
            raise ConfigError(f"unknown config field(s) {unknown}{where}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] = ()) -> TrainConfig:
        """Load a YAML file; overrides are 'key=value' with YAML-parsed values."""
        path = Path(path)
        d = yaml.safe_load(path.read_text()) or {}
        for o in overrides:
            if "=" not in o:
                raise ConfigError(f"--set {o!r}: expected key=value")
            k, v = o.split("=", 1)
            d[k.strip()] = yaml.safe_load(v)
        return cls.from_dict(d, source=str(path))


# ---------------------------------------------------------------------------------------------
# Model and loss.


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


def rope_factor(tcfg: TrainConfig, cfg: LlamaConfig) -> float:
    """post_training: linear RoPE scaling to cover a whole sample (1 when it already fits)."""
    if tcfg.mode != "post_training":
        return 1.0
    return max(1.0, tcfg.sample_len / cfg.max_position_embeddings)


def load_init_compressors(tcfg: TrainConfig, cfg: LlamaConfig) -> dict[str, Any] | None:
    """The compressors named by ``init_compressors`` (None if unset), checked against the run's
    compression config: the fields that shape the conv, and its activation, must match."""
    if tcfg.init_compressors is None:
        return None
    path = tcfg.init_compressors
    if tcfg.policy != "lococo":
        raise ConfigError(f"config field 'init_compressors': policy {tcfg.policy!r} has none")
    params, saved, _ = compressors.load_compressors(path, cfg)
    ccfg = tcfg.compression()
    fields = "cache_size chunk_size hh_keep_rate kernel_size n_convlayer expand activation"
    diff = [
        f"{f}: {getattr(saved, f)} in the file, {getattr(ccfg, f)} in the config"
        for f in fields.split()
        if getattr(saved, f) != getattr(ccfg, f)
    ]
    if diff:
        raise ConfigError(f"config field 'init_compressors': {path} differs: {'; '.join(diff)}")
    return params


def init_train_params(
    tcfg: TrainConfig,
    base: dict[str, Any],
    cfg: LlamaConfig,
    init_pol: dict[str, Any] | None = None,
):
    """Base params + params["lococo"] (``init_pol`` if given, else a random init) (+
    params["lora"] in post_training mode)."""
    k_pol, k_lora = jax.random.split(jax.random.PRNGKey(tcfg.seed), 2)
    params = dict(base)
    pol = policies.init_params(k_pol, cfg, tcfg.compression())
    if pol is not None:
        params["lococo"] = pol if init_pol is None else init_pol
    if tcfg.mode == "post_training":
        params["lora"] = lora.init_lora(k_lora, cfg, tcfg.lora(), base["embed"].dtype)
    return params


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
    """Mean next-token NLL over a batch. tokens [b, clean_period * B + 1] (-1 = no target)."""
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
    """step(train_state, tokens) -> (train_state, metrics). train_state = {params, opt_state,
    step, rng}; metrics = {loss, grad_norm, finite}. Frozen params pass through untouched."""
    tcfg, labels, tx = run.tcfg, run.labels, run.tx
    mask = optim.trainable_mask(labels)
    lscale = tcfg.lora().scale if tcfg.mode == "post_training" else 1.0

    def split(params):
        return jax.tree.map(lambda p, m: p if m else None, params, mask)

    def step(ts, tokens):
        params = ts["params"]
        trainable = split(params)

        def f(tr):
            full = jax.tree.map(
                lambda t, p: p if t is None else t, tr, params, is_leaf=lambda x: x is None
            )
            return loss_fn(
                full,
                tokens,
                run.cfg,
                run.ccfg,
                clean_period=tcfg.clean_period,
                remat=tcfg.remat,
                truncate=tcfg.truncate,
                lora_scale=lscale,
                state_shardings=run.state_shardings,
            )

        loss, g_tr = jax.value_and_grad(f)(trainable)
        grads = jax.tree.map(
            lambda g, p: jnp.zeros_like(p) if g is None else g,
            g_tr,
            params,
            is_leaf=lambda x: x is None,
        )
        updates, opt_state = tx.update(grads, ts["opt_state"], params)
        # Frozen leaves keep their exact bits (p + 0 would turn -0.0 into +0.0).
        new_params = jax.tree.map(
            lambda p, u, m: (p + u.astype(p.dtype)) if m else p, params, updates, mask
        )
        tr_upd = [
            u for u, m in zip(jax.tree.leaves(updates), jax.tree.leaves(mask), strict=True) if m
        ]
        finite = jnp.isfinite(loss) & jnp.all(
            jnp.stack([jnp.all(jnp.isfinite(u)) for u in tr_upd] or [jnp.bool_(True)])
        )
        gnorm = optax_global_norm([g for g in jax.tree.leaves(g_tr) if g is not None])
        new = dict(params=new_params, opt_state=opt_state, step=ts["step"] + 1, rng=ts["rng"])
        return new, {"loss": loss, "grad_norm": gnorm, "finite": finite}

    if not jit:
        return step
    metric_sh = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(run.ts_shardings, run.batch_sharding),
        out_shardings=(run.ts_shardings, {k: metric_sh for k in ("loss", "grad_norm", "finite")}),
        donate_argnums=(0,),
    )


def optax_global_norm(leaves: list[jax.Array]) -> jax.Array:
    import optax

    return optax.global_norm(leaves)


# ---------------------------------------------------------------------------------------------
# Building a run.


@dataclasses.dataclass
class Run:
    """Everything a training run needs, built from a TrainConfig (see ``build``)."""

    tcfg: TrainConfig
    cfg: LlamaConfig
    ccfg: CompressionConfig
    mesh: jax.sharding.Mesh
    labels: Any
    tx: Any
    ts_shardings: Any
    state_shardings: Any
    batch_sharding: Any
    abstract_ts: Any
    init_ts: Any  # () -> a fresh sharded train state
    tokenizer: Any
    checkpointer: checkpoint.Checkpointer | None


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


def build(tcfg: TrainConfig, devices: list | None = None, with_checkpointer: bool = True) -> Run:
    """Check the config (devices, data source, checkpoint config) and build the run; no
    training compute. The checks come before the model is loaded."""
    devices = list(jax.devices() if devices is None else devices)
    check_against_devices(tcfg, len(devices))
    data.check_source(tcfg.data())
    if tcfg.init_compressors is not None and not Path(tcfg.init_compressors).is_file():
        raise ConfigError(f"config field 'init_compressors': no such file: {tcfg.init_compressors}")
    ckpt = None
    if with_checkpointer and tcfg.checkpoint_dir:
        ckpt = checkpoint.Checkpointer(tcfg.checkpoint_dir, tcfg.checkpoint_keep)
        ckpt.check_config(tcfg.to_dict(), RESUMABLE_FIELDS, TrainConfig.field_defaults())
    mesh = sharding.make_mesh(tcfg.mesh(), devices)
    cfg, base, tok = load_model(tcfg)
    cfg = cfg.with_linear_rope_scaling(rope_factor(tcfg, cfg))
    ccfg = tcfg.compression()
    vocab = getattr(tok, "vocab_size", None)
    if isinstance(vocab, int) and vocab > cfg.vocab_size:
        raise ConfigError(
            f"config field 'tokenizer': its vocab ({vocab}) exceeds the model's ({cfg.vocab_size})"
        )

    init_pol = load_init_compressors(tcfg, cfg)

    def make_params():
        return init_train_params(tcfg, base, cfg, init_pol)

    abstract_params = jax.eval_shape(make_params)
    labels = optim.param_labels(abstract_params, tcfg.mode, tcfg.train_norms_embed)
    tx = optim.make_optimizer(tcfg.optim(), labels)
    rep = tcfg.replicate_indivisible
    pspecs = sharding.param_specs(abstract_params, mesh, rep)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    ospecs = sharding.opt_state_specs(abstract_opt, abstract_params, pspecs)
    P = jax.sharding.PartitionSpec
    ts_specs = dict(params=pspecs, opt_state=ospecs, step=P(), rng=P())
    ts_shardings = sharding.named(mesh, ts_specs)
    abstract_state = jax.eval_shape(lambda: kv_state.init_state(cfg, ccfg, tcfg.batch_size))
    state_shardings = sharding.named(mesh, sharding.state_specs(abstract_state, mesh, rep))
    batch_sharding = jax.sharding.NamedSharding(
        mesh, sharding.batch_spec((tcfg.batch_size, tcfg.sample_len + 1), mesh)
    )

    def init_ts():
        params = make_params()
        ts = dict(
            params=params,
            opt_state=tx.init(params),
            step=jnp.zeros((), jnp.int32),
            rng=jax.random.PRNGKey(tcfg.seed),
        )
        return jax.device_put(ts, ts_shardings)

    abstract_ts = checkpoint.abstract_like(
        dict(
            params=abstract_params,
            opt_state=abstract_opt,
            step=jax.ShapeDtypeStruct((), jnp.int32),
            rng=jax.eval_shape(lambda: jax.random.PRNGKey(0)),
        ),
        ts_shardings,
    )
    return Run(
        tcfg,
        cfg,
        ccfg,
        mesh,
        labels,
        tx,
        ts_shardings,
        state_shardings,
        batch_sharding,
        abstract_ts,
        init_ts,
        tok,
        ckpt,
    )


# ---------------------------------------------------------------------------------------------
# The loop.


class _Logger:
    """Metrics to a JSONL file and TensorBoard (tensorboardX) under log_dir (if set)."""

    def __init__(self, log_dir: str | None):
        self.jsonl = self.tb = None
        if log_dir:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.jsonl = open(Path(log_dir) / "metrics.jsonl", "a")  # noqa: SIM115
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(log_dir)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self.jsonl.flush()
        if self.tb:
            for k, v in metrics.items():
                self.tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


def init_distributed(tcfg: TrainConfig) -> None:
    """jax.distributed.initialize() when tcfg.distributed (once; before any device use)."""
    if tcfg.distributed and not jax.distributed.is_initialized():
        jax.distributed.initialize()


def process_rows(batch_sharding: jax.sharding.Sharding, global_shape: tuple[int, ...]):
    """Sorted indices of the global batch rows held by this process's devices (all rows in a
    single process): the rows jax.make_array_from_process_local_data expects, in its order."""
    n = global_shape[0]
    rows: set[int] = set()
    for idx in batch_sharding.addressable_devices_indices_map(global_shape).values():
        rows.update(range(*idx[0].indices(n)))
    return np.asarray(sorted(rows), np.int64)


def global_batch(run: Run, local_rows: np.ndarray) -> jax.Array:
    """The sharded global batch [batch_size, sample_len + 1] from this process's rows."""
    shape = (run.tcfg.batch_size, run.tcfg.sample_len + 1)
    return jax.make_array_from_process_local_data(run.batch_sharding, local_rows, shape)


def train(tcfg: TrainConfig, devices: list | None = None) -> dict[str, Any]:
    """Run (or resume) training. Returns {"losses": {step: loss}, "state": final train state,
    "run": Run, "tokens_per_s": float, "resumed_from": step or None}."""
    from tqdm.auto import tqdm

    init_distributed(tcfg)
    run = build(tcfg, devices)
    shape = (tcfg.batch_size, tcfg.sample_len + 1)
    rows = process_rows(run.batch_sharding, shape)
    loader = data.make_loader(
        tcfg.data(),
        run.tokenizer,
        tcfg.sample_len,
        tcfg.batch_size,
        tcfg.seed,
        rows=None if len(rows) == tcfg.batch_size else rows,
    )
    resumed_from = None
    ck = run.checkpointer
    if ck is not None and ck.latest_step() is not None:
        ts, pos, resumed_from = ck.restore(run.abstract_ts)
        loader.set_position(pos)
    else:
        ts = run.init_ts()
    start = int(ts["step"])
    end = tcfg.stop_after or tcfg.steps
    step_fn = make_train_step(run)
    cfg_dict = tcfg.to_dict()
    main = jax.process_index() == 0
    logger = _Logger(tcfg.log_dir if main else None)
    losses: dict[int, float] = {}
    tokens_per_step = tcfg.batch_size * tcfg.sample_len
    bar = tqdm(total=end, initial=start, disable=not (tcfg.progress and main), unit="step")
    t0, timed_steps, t_first = time.perf_counter(), 0, None
    try:
        for step in range(start + 1, end + 1):
            batch = global_batch(run, loader.next())
            new_ts, m = step_fn(ts, batch)
            loss, finite = float(m["loss"]), bool(m["finite"])
            if not finite:
                if ck is None:
                    kept = "no checkpoint_dir, nothing saved"
                else:
                    ck.wait()
                    good = ck.latest_step()
                    kept = (
                        f"no checkpoint in {ck.directory} yet"
                        if good is None
                        else f"last good checkpoint: step {good} in {ck.directory}"
                    )
                raise TrainError(
                    f"non-finite loss or update at step {step} (loss={loss}); stopped without "
                    f"saving; {kept}"
                )
            ts = new_ts
            losses[step] = loss
            if t_first is None:  # exclude the compile from the speed
                t_first = time.perf_counter()
            else:
                timed_steps += 1
            tps = tokens_per_step * timed_steps / max(time.perf_counter() - t_first, 1e-9)
            if step % tcfg.log_every == 0 or step == end:
                logger.log(
                    step, {"loss": loss, "grad_norm": float(m["grad_norm"]), "tokens_per_s": tps}
                )
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:.0f}")
            bar.update(1)
            if ck is not None and (step % tcfg.checkpoint_every == 0 or step == end):
                ck.save(step, ts, loader.position, cfg_dict)
        if ck is not None:
            ck.wait()
    finally:
        bar.close()
        logger.close()
    elapsed = time.perf_counter() - (t_first or t0)
    return {
        "losses": losses,
        "state": ts,
        "run": run,
        "tokens_per_s": tokens_per_step * timed_steps / max(elapsed, 1e-9),
        "resumed_from": resumed_from,
        "data_position": loader.position,
    }
