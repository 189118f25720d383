"""Memory and speed of reading long inputs: full attention vs the compressed cache.

Each (policy, length) runs in its own subprocess so its peak RSS is its own. Reports peak
process RSS, the KV state's bytes, the compiled segment program's temp bytes, and tokens/s
(timed after a warm-up call that compiles). Prints a table, writes JSON and a PNG plot.

    python experiments/bench_longctx.py                       # SmolLM2, M=B=128, 1K..16K
    python experiments/bench_longctx.py --lengths 1024 2048 --policies lococo
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def worker(args: argparse.Namespace) -> dict:
    import jax
    import numpy as np

    from lococo_jax import longctx, policies
    from lococo_jax.config import CompressionConfig
    from lococo_jax.models import load_model

    cfg, params, tok = load_model("smollm2")
    text = (Path(args.text)).read_text(encoding="utf-8")
    ids = np.asarray(tok.encode(text, add_special_tokens=False), np.int32)
    L = args.length
    if len(ids) < L:
        ids = np.tile(ids, -(-L // len(ids)))
    ids = ids[None, :L]
    M = L if args.policy == "full" else args.cache_size
    ccfg = CompressionConfig(policy=args.policy, cache_size=M, chunk_size=args.chunk_size)
    sub = policies.init_params(jax.random.PRNGKey(0), cfg, ccfg)
    if sub is not None:
        params = dict(params, lococo=sub)
    seg = args.segment_chunks
    # Warm-up: compile the segment program on one segment's worth of tokens.
    warm = ids[:, : min(L, seg * args.chunk_size)]
    longctx.run_long(params, warm, cfg, ccfg, output="nll", segment_chunks=seg)
    t0 = time.perf_counter()
    res = longctx.run_long(params, ids, cfg, ccfg, output="nll", segment_chunks=seg)
    jax.block_until_ready(res.state)
    dt = time.perf_counter() - t0
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(res.state))
    lowered = longctx._segment.lower(
        params,
        res.state,
        np.zeros((seg, 1, args.chunk_size), np.int32),
        np.zeros((seg, 1), np.int32),
        np.zeros((seg, 1, args.chunk_size), np.int32),
        res.last_logits,
        cfg,
        ccfg,
        "nll",
        1.0,
    )
    mem = lowered.compile().memory_analysis()
    return {
        "policy": args.policy,
        "length": L,
        "cache_size": M,
        "chunk_size": args.chunk_size,
        "seconds": dt,
        "tokens_per_s": L / dt,
        "ms_per_token": 1000 * dt / L,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "kv_state_mb": state_bytes / 2**20,
        "compiled_temp_mb": (mem.temp_size_in_bytes if mem else 0) / 2**20,
        "nll": float(res.out.sum() / (L - 1)),
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for pol in sorted({r["policy"] for r in rows}):
        rs = sorted((r for r in rows if r["policy"] == pol), key=lambda r: r["length"])
        x = [r["length"] for r in rs]
        axes[0].plot(x, [r["peak_rss_mb"] for r in rs], "o-", label=pol)
        axes[1].plot(x, [r["kv_state_mb"] + r["compiled_temp_mb"] for r in rs], "o-", label=pol)
        axes[2].plot(x, [r["ms_per_token"] for r in rs], "o-", label=pol)
    titles = ["peak process RSS (MB)", "KV state + compiled temp (MB)", "ms per token"]
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("input tokens")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--policies", nargs="+", default=["full", "lococo"])
    ap.add_argument("--cache-size", type=int, default=128)
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--segment-chunks", type=int, default=8)
    ap.add_argument(
        "--text",
        default=str(Path(__file__).resolve().parents[1] / "data/austen/prideprejudice.txt"),
    )
    ap.add_argument(
        "--out", default=None, help="JSON path (default results/bench_longctx_<platform>.json)"
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--policy", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    import jax

    device = jax.devices()[0]
    out = Path(args.out or RESULTS / f"bench_longctx_{device.platform}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": device.device_kind,
        "platform": device.platform,
        "host": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "command": " ".join(sys.argv),
    }
    # Rows already measured (same device) are kept, so the grid can be filled in over runs.
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    have = {(r["policy"], r["length"]) for r in rows}
    for pol in args.policies:
        for L in args.lengths:
            if (pol, L) in have:
                continue
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                "--policy",
                pol,
                "--length",
                str(L),
                "--cache-size",
                str(args.cache_size),
                "--chunk-size",
                str(args.chunk_size),
                "--segment-chunks",
                str(args.segment_chunks),
                "--text",
                args.text,
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                sys.stderr.write(proc.stderr[-3000:])
                raise SystemExit(f"worker failed for policy={pol} length={L}")
            row = json.loads(lines[-1][7:])
            rows.append(row)
            out.write_text(json.dumps(dict(meta, rows=rows), indent=1))  # partial, resumable
            print(
                f"{pol:>8} L={L:>6}: {row['tokens_per_s']:8.1f} tok/s  "
                f"rss {row['peak_rss_mb']:8.1f} MB  kv {row['kv_state_mb']:7.1f} MB",
                flush=True,
            )

    hdr = "| policy | length | M | tok/s | ms/tok | peak RSS MB | KV state MB | temp MB |"
    print("\n" + hdr + "\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['policy']} | {r['length']} | {r['cache_size']} | {r['tokens_per_s']:.1f} | "
            f"{r['ms_per_token']:.2f} | {r['peak_rss_mb']:.1f} | {r['kv_state_mb']:.1f} | "
            f"{r['compiled_temp_mb']:.1f} |"
        )
    summary = {}
    for pol in sorted({r["policy"] for r in rows}):
        rs = sorted((r for r in rows if r["policy"] == pol), key=lambda r: r["length"])
        if len(rs) >= 2:
            summary[pol] = {
                "rss_ratio_longest_vs_shortest": rs[-1]["peak_rss_mb"] / rs[0]["peak_rss_mb"],
                "ms_per_token_ratio_longest_vs_shortest": rs[-1]["ms_per_token"]
                / rs[0]["ms_per_token"],
            }
    print("\nsummary:", json.dumps(summary, indent=1))
    out.write_text(json.dumps(dict(meta, rows=rows, summary=summary), indent=1))
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
