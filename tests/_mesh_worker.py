"""Subprocess helper: the sharded train step vs the single-device step on 8 fake CPU devices.

Run as ``python tests/_mesh_worker.py DATA_FILE WORK_DIR``; prints one JSON line with, per mesh,
the max relative difference of the loss and of the params after two steps.

``python tests/_mesh_worker.py --process ID PORT DATA_FILE WORK_DIR``: process ID of 2 (4 fake
CPU devices each, gloo collectives) of one multi-host train.train run with distributed=true on
a 2x2x2 mesh; prints its losses; process 0 saves the final params to WORK_DIR/params.npz.
"""

import os
import sys

from _fake_cpu import use_fake_cpu_devices

MULTI = len(sys.argv) > 1 and sys.argv[1] == "--process"
N_LOCAL = 4 if MULTI else 8
use_fake_cpu_devices(N_LOCAL)  # before jax is imported

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from lococo_jax import data, train  # noqa: E402
from lococo_jax.tokenizer import ByteTokenizer  # noqa: E402

# (data, fsdp, tensor, fusion_impl): the last runs the Pallas kernel (interpret mode) per shard.
MESHES = [
    (8, 1, 1, "reference"),
    (2, 2, 2, "reference"),
    (1, 4, 2, "reference"),
    (2, 2, 2, "pallas"),
]


def run(tcfg: train.TrainConfig, devices, batches):
    r = train.build(tcfg, devices, with_checkpointer=False)
    ts, step = r.init_ts(), train.make_train_step(r)
    losses = []
    for b in batches:
        ts, m = step(ts, r.base, jax.device_put(b, r.batch_sharding))
        losses.append(float(m["loss"]))
    return losses, jax.tree.map(np.asarray, ts["trainable"]), r


def main() -> None:
    data_file, work = sys.argv[1], sys.argv[2]
    assert jax.device_count() == 8, jax.devices()
    base = config(data_file, work, steps=4)
    loader = data.make_loader(base.data(), ByteTokenizer(), base.sample_len, 8, 0)
    batches = [loader.next(), loader.next()]
    devs = jax.devices()
    ref_losses, ref_params, _ = run(
        base.__class__(**{**base.__dict__, "mesh_data": 1}), devs[:1], batches
    )
    out = {}
    for d, f, t, impl in MESHES:
        mesh = {"mesh_data": d, "mesh_fsdp": f, "mesh_tensor": t, "fusion_impl": impl}
        tcfg = base.__class__(**{**base.__dict__, **mesh})
        losses, params, r = run(tcfg, devs, batches)
        wq = r.base_shardings["layers"]["wq"].spec
        loss_rel = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True))
        p_rel = max(
            float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))
            for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True)
        )
        changed = max(
            float(np.max(np.abs(a - b)))
            for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True)
        )
        out[f"{d}x{f}x{t}" + ("-pallas" if impl == "pallas" else "")] = {
            "loss_rel": loss_rel,
            "param_rel": p_rel,
            "max_abs": changed,
            "wq_spec": str(wq),
            "losses": losses,
        }
    out["ref_losses"] = ref_losses
    print("RESULT " + json.dumps(out))


def config(data_file: str, data_dir: str, **kw) -> train.TrainConfig:
    """The post_training run every mesh / process layout is compared on (batch 8)."""
    base = dict(
        mode="post_training",
        data_files=(data_file,),
        data_dir=data_dir,
        batch_size=8,
        clean_period=4,
        lr=1e-3,
        memory_lr_scale=10.0,
        progress=False,
        fusion_impl="reference",
    )
    return train.TrainConfig(**{**base, **kw})


def multi_config(data_file: str, data_dir: str) -> train.TrainConfig:
    return config(
        data_file, data_dir, steps=2, mesh_data=2, mesh_fsdp=2, mesh_tensor=2, distributed=True
    )


def multi_main() -> None:
    from jax.experimental import multihost_utils

    pid, port, data_file, work = int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    # train.train's own jax.distributed.initialize() finds no cluster here, so give the
    # coordinator explicitly; train.init_distributed then sees it initialised.
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    tcfg = multi_config(data_file, os.path.join(work, f"tfds{pid}"))  # no shared build dir
    out = train.train(tcfg)
    assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
    rows = train.process_rows(out["run"].batch_sharding, (8, tcfg.sample_len + 1))
    params = multihost_utils.process_allgather(out["state"]["trainable"], tiled=True)
    if pid == 0:
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        np.savez(
            os.path.join(work, "params.npz"),
            **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat},
        )
    res = {"losses": out["losses"], "rows": rows.tolist(), "config": tcfg.to_dict()}
    multihost_utils.sync_global_devices("saved")
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    multi_main() if MULTI else main()
