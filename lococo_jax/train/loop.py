"""The training loop: data, jitted step, progress, metrics, checkpoints, resume, interrupts.

Resume: a checkpoint directory with a saved step restores the train state and the data
position and logs "resumed from step N"; metrics.jsonl keeps no line past that step, so a
resumed run never duplicates steps. A finished run is extended by raising ``steps``.
Interrupts: SIGINT (Ctrl-C) and SIGTERM (a TPU preemption) finish the current step, save a
checkpoint at it and return cleanly (``interrupted``: the signal's name).
Non-finite loss or update: stop with TrainError naming the step; the NaN state is never saved.

Multi-host (``distributed: true``, e.g. a TPU pod with the same command on every host):
``train`` calls jax.distributed.initialize() before any device use; batch_size stays the global
batch. Every process reads the same seeded sample order and keeps only the rows of each global
batch that its own devices hold under the batch sharding (``process_rows``), and the global
batch is assembled with jax.make_array_from_process_local_data. Only process 0 writes metrics
and shows the progress bar.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lococo_jax import data
from lococo_jax.train.config import TrainConfig
from lococo_jax.train.run import Run, build
from lococo_jax.train.step import make_train_step


class TrainError(RuntimeError):
    """Training stopped (e.g. a non-finite loss); the message names the step."""


class _Logger:
    """Metrics to a JSONL file and TensorBoard (tensorboardX) under log_dir (if set).
    ``resume_at``: lines of later steps (from a run that went past its last checkpoint) are
    dropped first, so the file holds each step once."""

    def __init__(self, log_dir: str | None, resume_at: int | None = None):
        self.jsonl = self.tb = None
        if log_dir:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            path = Path(log_dir) / "metrics.jsonl"
            if resume_at is not None and path.exists():
                kept = [
                    line
                    for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_at
                ]
                path.write_text("".join(line + "\n" for line in kept))
            self.jsonl = open(path, "a")  # noqa: SIM115
            from tensorboardX import SummaryWriter

            purge = None if resume_at is None else resume_at + 1
            self.tb = SummaryWriter(log_dir, purge_step=purge)

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


@contextlib.contextmanager
def stop_signals() -> Iterator[dict[str, str | None]]:
    """While active, SIGINT and SIGTERM only set ``flag["signal"]`` (the loop saves and stops
    after the current step); the previous handlers come back on exit. Outside the main thread
    (where Python cannot install handlers) it does nothing."""
    flag: dict[str, str | None] = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, _frame):
        flag["signal"] = signal.Signals(signum).name

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


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


def _nonfinite(run: Run, step: int, loss: float) -> TrainError:
    ck = run.checkpointer
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
    return TrainError(
        f"non-finite loss or update at step {step} (loss={loss}); stopped without saving; {kept}"
    )


def train(tcfg: TrainConfig, devices: list | None = None) -> dict[str, Any]:
    """Run (or resume) training. Returns {"losses": {step: loss}, "state": final train state,
    "run": Run, "tokens_per_s": float, "resumed_from": step or None, "data_position",
    "interrupted": signal name or None}."""
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
    main = jax.process_index() == 0
    resumed_from = None
    ck = run.checkpointer
    if ck is not None and ck.latest_step() is not None:
        ts, pos, resumed_from = ck.restore(run.abstract_ts)
        loader.set_position(pos)
        if main:
            print(f"resumed from step {resumed_from} ({ck.directory})", file=sys.stderr)
    else:
        ts = run.init_ts()
    start = int(ts["step"])
    end = tcfg.stop_after or tcfg.steps
    step_fn = make_train_step(run)
    saved_cfg = {**tcfg.to_dict(), "base_model": run.base_fingerprint}
    logger = _Logger(tcfg.log_dir if main else None, resumed_from)
    losses: dict[int, float] = {}
    tokens_per_step = tcfg.batch_size * tcfg.sample_len
    bar = tqdm(total=end, initial=start, disable=not (tcfg.progress and main), unit="step")
    t0, timed_steps, t_first = time.perf_counter(), 0, None
    step = start
    try:
        with stop_signals() as stop:
            for step in range(start + 1, end + 1):
                batch = global_batch(run, loader.next())
                new_ts, m = step_fn(ts, run.base, batch)
                loss, finite = float(m["loss"]), bool(m["finite"])
                if not finite:
                    raise _nonfinite(run, step, loss)
                ts = new_ts
                losses[step] = loss
                if t_first is None:  # exclude the compile from the speed
                    t_first = time.perf_counter()
                else:
                    timed_steps += 1
                tps = tokens_per_step * timed_steps / max(time.perf_counter() - t_first, 1e-9)
                if step % tcfg.log_every == 0 or step == end or stop["signal"]:
                    metrics = {"loss": loss, "grad_norm": float(m["grad_norm"])}
                    logger.log(step, metrics | {"tokens_per_s": tps})
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:.0f}")
                bar.update(1)
                save_now = step % tcfg.checkpoint_every == 0 or step == end or stop["signal"]
                if ck is not None and save_now:
                    ck.save(step, ts, loader.position, saved_cfg)
                if stop["signal"]:
                    if main:
                        where = f"saved step {step}" if ck is not None else "no checkpoint_dir"
                        msg = f"{stop['signal']}: stopped after step {step}; {where}"
                        print(msg, file=sys.stderr)
                    break
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
        "interrupted": stop["signal"],
        "last_step": step,
    }
