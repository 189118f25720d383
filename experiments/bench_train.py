"""The train step on this machine: tokens/s, compile time, peak RSS and checkpoint bytes, for the
tiny config and the embedded SmolLM2 (M=128, B=128), in the float32 and bfloat16 base.

    python experiments/bench_train.py [--steps 5] [--only CASE] [--write]

Each case runs in its own process (so peak RSS is that case's). Compile time (the first step) is
reported apart and excluded from tokens/s. "checkpoint" is the bytes one saved checkpoint takes
on disk (the train state alone); "base" is the frozen base it no longer holds. Prints a table;
--write puts the JSON in experiments/results/bench_train_<platform>.json (else a run folder).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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
DTYPES = ("float32", "bfloat16")


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bench(name: str, dtype: str, steps: int) -> dict:
    """One case in this process (called in a child by main)."""
    import jax
    import numpy as np
    import psutil

    from lococo_jax import checkpoint, train

    tcfg = train.TrainConfig(
        data_files=(str(ROOT / "tests/data/austen_sample.txt"),),
        progress=False,
        mesh_data=-1,
        param_dtype=dtype,
        **CASES[name],
    )
    run = train.build(tcfg, with_checkpointer=False)
    step = train.make_train_step(run)
    ts = run.init_ts()
    rng = np.random.default_rng(0)
    vocab = min(run.cfg.vocab_size, 256)
    batch = rng.integers(0, vocab, (tcfg.batch_size, tcfg.sample_len + 1)).astype(np.int32)
    batch = jax.device_put(batch, run.batch_sharding)
    t0 = time.perf_counter()
    ts, m = step(ts, run.base, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        ts, m = step(ts, run.base, batch)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / steps
    with tempfile.TemporaryDirectory() as d:
        ck = checkpoint.Checkpointer(Path(d) / "ck")
        ck.save(1, ts, {"epoch": 0, "index": 1}, tcfg.to_dict())
        ck.wait()
        ck_bytes = _dir_bytes(Path(d) / "ck")
    tokens = tcfg.batch_size * tcfg.sample_len
    base_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(run.base))
    return {
        "case": name,
        "param_dtype": dtype,
        "tokens_per_step": tokens,
        "step_s": dt,
        "tokens_per_s": tokens / dt,
        "compile_s": compile_s,
        "rss_mb": psutil.Process().memory_info().rss / 2**20,
        "max_rss_mb": _max_rss_mb(),
        "checkpoint_bytes": ck_bytes,
        "base_bytes": base_bytes,
        "loss": float(m["loss"]),
        "device": str(jax.devices()[0].device_kind),
    }


def _max_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps after the first")
    ap.add_argument("--only", choices=sorted(CASES), help="one case")
    ap.add_argument("--write", action="store_true", help="write the committed JSON")
    ap.add_argument("--child", nargs=2, metavar=("CASE", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("ROW " + json.dumps(bench(*args.child, args.steps)), flush=True)
        return 0
    from lococo_jax import results

    rows = []
    for name in CASES:
        if args.only and name != args.only:
            continue
        for dtype in DTYPES:
            cmd = [sys.executable, __file__, "--steps", str(args.steps), "--child", name, dtype]
            out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            line = [x for x in out.stdout.splitlines() if x.startswith("ROW ")]
            if out.returncode or not line:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"case {name} {dtype} failed (exit {out.returncode})")
            rows.append(json.loads(line[0][4:]))
            r = rows[-1]
            print(
                f"{r['case']:18} {r['param_dtype']:9} {r['tokens_per_s']:9.0f} tok/s "
                f"compile {r['compile_s']:6.1f} s  max RSS {r['max_rss_mb']:7.0f} MB  "
                f"checkpoint {r['checkpoint_bytes'] / 2**20:8.2f} MB  "
                f"base {r['base_bytes'] / 2**20:8.1f} MB",
                flush=True,
            )
    import jax

    out = results.output_path(f"bench_train_{jax.default_backend()}.json", None, args.write)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"rows": rows, "provenance": results.provenance_now()}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
