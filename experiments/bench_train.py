"""Tokens/s of the jitted train step: the tiny config and the embedded SmolLM2 (M=128, B=128).

    python experiments/bench_train.py [--steps 5]
Prints a table and writes experiments/results/bench_train_<platform>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lococo_jax import train  # noqa: E402

CASES = {
    "tiny": dict(
        model="tiny", cache_size=16, block_size=8, kernel_size=3, clean_period=4, batch_size=8
    ),
    "smollm2_M128_B128": dict(
        model="smollm2",
        cache_size=128,
        block_size=128,
        kernel_size=21,
        clean_period=4,
        batch_size=1,
        replicate_indivisible=True,
    ),
}


def bench(name: str, kw: dict, steps: int) -> dict:
    tcfg = train.TrainConfig(
        data_files=(str(ROOT / "tests/data/austen_sample.txt"),), progress=False, mesh_data=-1, **kw
    )
    run = train.build(tcfg, with_checkpointer=False)
    step = train.make_train_step(run)
    ts = run.init_ts()
    rng = np.random.default_rng(0)
    vocab = min(run.cfg.vocab_size, 256)
    batch = rng.integers(0, vocab, (tcfg.batch_size, tcfg.sample_len + 1)).astype(np.int32)
    batch = jax.device_put(batch, run.batch_sharding)
    t0 = time.perf_counter()
    ts, m = step(ts, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        ts, m = step(ts, batch)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / steps
    tokens = tcfg.batch_size * tcfg.sample_len
    return {
        "case": name,
        "tokens_per_step": tokens,
        "step_s": dt,
        "tokens_per_s": tokens / dt,
        "first_step_s": compile_s,
        "loss": float(m["loss"]),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--only", choices=sorted(CASES))
    args = ap.parse_args()
    rows = []
    for name, kw in CASES.items():
        if args.only and name != args.only:
            continue
        rows.append(bench(name, kw, args.steps))
    print(f"{'case':22} {'tokens/step':>11} {'step s':>8} {'tokens/s':>10}")
    for r in rows:
        print(
            f"{r['case']:22} {r['tokens_per_step']:11d} {r['step_s']:8.3f} "
            f"{r['tokens_per_s']:10.0f}"
        )
    out = ROOT / "experiments" / "results" / f"bench_train_{jax.default_backend()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": str(jax.devices()[0]), "rows": rows}, indent=2))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
