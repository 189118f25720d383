"""Training LoCoCo compressors (inference mode) or compressors + LoRA (post_training mode).

One file, one job:
    config.py  TrainConfig (YAML / --set, type-checked field by field)
    state.py   what trains (fp32 pytree) split from the frozen base by structure; merge
    run.py     build: checks, model, mesh, shardings, optimiser, checkpointer (abstract too)
    step.py    the loss and the jitted sharded step(train_state, base, tokens)
    loop.py    the loop: progress, metrics, checkpoints, resume, SIGINT/SIGTERM
    export.py  compressors, the merged model (--model), a Hugging Face folder
"""

from lococo_jax.models import TINY
from lococo_jax.train.config import RESUMABLE_FIELDS, TrainConfig
from lococo_jax.train.loop import TrainError, global_batch, init_distributed, process_rows, train
from lococo_jax.train.run import (
    BaseMismatchError,
    Run,
    build,
    check_against_devices,
    load_model,
    rope_factor,
)
from lococo_jax.train.step import loss_fn, make_train_step

__all__ = [
    "RESUMABLE_FIELDS",
    "TINY",
    "BaseMismatchError",
    "Run",
    "TrainConfig",
    "TrainError",
    "build",
    "check_against_devices",
    "global_batch",
    "init_distributed",
    "load_model",
    "loss_fn",
    "make_train_step",
    "process_rows",
    "rope_factor",
    "train",
]
