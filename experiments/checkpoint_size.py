"""Checkpoint bytes of the paper's Llama-2-7B runs, from shapes alone (jax.eval_shape, no weights).

    python experiments/checkpoint_size.py [--write]

For each config it builds the run on an abstract Llama-2-7B and compares what a checkpoint now
holds (the train state: fp32 trainable leaves, their Adam moments, step, rng) with the frozen
base it leaves out and with what a checkpoint held before the split (every base param in
param_dtype plus the train state). Prints a table; --write puts JSON and markdown in
experiments/results/ (otherwise experiments/runs/<stamp>/).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lococo_jax import llama, results, train  # noqa: E402
from lococo_jax.models import ARCHITECTURES  # noqa: E402

LLAMA2_7B = ARCHITECTURES["llama2-7b"]
CONFIGS = ("llama2_7b_inference.yaml", "llama2_7b_post_training_32k.yaml")


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def measure(name: str) -> dict:
    # The bytes do not depend on the mesh: lay the state out on this host's one device.
    one = ["mesh_data=1", "mesh_fsdp=1", "mesh_tensor=1"]
    tcfg = train.TrainConfig.from_yaml(ROOT / "experiments" / "configs" / name, one)
    dtype = jax.numpy.dtype(tcfg.param_dtype)
    base = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, dtype),
        llama.param_shapes(LLAMA2_7B),
        is_leaf=lambda s: isinstance(s, tuple),
    )
    run = train.build(
        tcfg,
        jax.devices()[:1],
        with_checkpointer=False,
        model=(LLAMA2_7B, base, None),
        check_data=False,
    )
    state = nbytes(run.abstract_ts)
    base_b = nbytes(base)
    return {
        "config": name,
        "mode": tcfg.mode,
        "param_dtype": tcfg.param_dtype,
        "trainable_params": sum(x.size for x in jax.tree.leaves(run.abstract_ts["trainable"])),
        "checkpoint_bytes": state,
        "base_bytes": base_b,
        "before_split_bytes": base_b + state,
        "ratio": state / (base_b + state),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write", action="store_true", help="write the committed results")
    args = ap.parse_args()
    rows = [measure(c) for c in CONFIGS]
    gb = lambda b: b / 2**30  # noqa: E731
    lines = [
        "| config | mode | trainable params | checkpoint (GiB) | frozen base (GiB) | "
        "before the split (GiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['mode']} | {r['trainable_params'] / 1e6:.1f}M | "
            f"{gb(r['checkpoint_bytes']):.2f} | {gb(r['base_bytes']):.2f} | "
            f"{gb(r['before_split_bytes']):.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    out = results.output_path("checkpoint_size.json", None, args.write)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"rows": rows, "provenance": results.provenance_now(), "model": "Llama-2-7B (shapes)"}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    out.with_suffix(".md").write_text(
        "# Checkpoint size of the Llama-2-7B runs (shapes only, jax.eval_shape)\n\n"
        f"`python experiments/checkpoint_size.py`\n\n{table}\n"
    )
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
