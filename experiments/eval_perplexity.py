"""Perplexity vs input length for every policy and cache size on held-out text.

Reading is causal and front to back, so one pass over the longest length gives the perplexity
of every prefix: ppl(L) = exp(mean NLL of the first L - 1 next-token predictions). Each
(policy, M, RoPE factor) cell is one pass; results are appended to the JSON as they finish, so
an interrupted run resumes where it stopped.

    python experiments/eval_perplexity.py                      # the full grid (slow on CPU)
    python experiments/eval_perplexity.py --lengths 1024 4096 --policies full lococo
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np

from lococo_jax import compressors, evaluate
from lococo_jax.config import CompressionConfig
from lococo_jax.models import load_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"


def cell_key(policy: str, M: int, rope: float) -> str:
    return f"{policy}|M={M}|rope={rope:g}"


def table(cells: list[dict], lengths: list[int]) -> str:
    lines = ["| policy | M | RoPE x | " + " | ".join(f"{L // 1024}K" for L in lengths) + " |"]
    lines.append("|---" * (3 + len(lengths)) + "|")
    for c in sorted(
        cells, key=lambda c: (c["rope"], c["policy"] != "full", c["cache_size"], c["policy"])
    ):
        name = c["policy"] + ("" if c.get("trained", True) is not False else " (untrained)")
        M = "all" if c["policy"] == "full" else str(c["cache_size"])
        vals = " | ".join(f"{c['ppl'].get(str(L), float('nan')):.2f}" for L in lengths)
        lines.append(f"| {name} | {M} | {c['rope']:g} | {vals} |")
    return "\n".join(lines)


def plot(cells: list[dict], lengths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({c["cache_size"] for c in cells if c["policy"] != "full"})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, M in zip(axes[0], sizes, strict=True):
        for c in cells:
            if c["rope"] != 1.0 or (c["policy"] != "full" and c["cache_size"] != M):
                continue
            xs = [L for L in lengths if str(L) in c["ppl"]]
            style = "k--" if c["policy"] == "full" else "o-"
            ax.plot(xs, [c["ppl"][str(L)] for L in xs], style, label=c["policy"])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("input tokens")
        ax.set_ylabel("perplexity")
        ax.set_title(f"M = {M} slots, B = 128")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--text", default=str(ROOT / "data/austen/prideprejudice.txt"))
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--policies", nargs="+", default=["full", "streaming", "h2o", "tova", "lococo"])
    ap.add_argument("--cache-sizes", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument(
        "--rope-factors",
        type=float,
        nargs="+",
        default=[1.0, 2.0],
        help="linear RoPE scaling factors; factors != 1 run at the longest length",
    )
    ap.add_argument("--out", default=str(RESULTS / "perplexity.json"))
    args = ap.parse_args()

    cfg0, params, tok = load_model("smollm2")
    ids = np.asarray(
        tok.encode(Path(args.text).read_text(encoding="utf-8"), add_special_tokens=False), np.int32
    )
    Lmax = max(args.lengths)
    if len(ids) < Lmax:
        raise SystemExit(f"{args.text} has {len(ids)} tokens < {Lmax}")
    ids = ids[:Lmax]
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.exists() else {"cells": []}
    B = args.chunk_size
    done["cells"] = [c for c in done["cells"] if compressors.is_current(c, B)]
    have = {cell_key(c["policy"], c["cache_size"], c["rope"]) for c in done["cells"]}
    done.update(
        text=Path(args.text).name,
        lengths=args.lengths,
        chunk_size=args.chunk_size,
        device=jax.devices()[0].device_kind,
        model="SmolLM2-135M-Instruct (GGUF Q4_1)",
    )

    for rope in args.rope_factors:
        cfg = cfg0.with_linear_rope_scaling(rope)
        for policy in args.policies:
            sizes = [Lmax] if policy == "full" else args.cache_sizes
            for M in sizes:
                key = cell_key(policy, M, rope)
                if key in have:
                    continue
                # Untrained lococo (no committed weights for this M) keeps a recent window of
                # M/4 like the calibrated ones; trained weights bring their own config.
                local = M // 4 if policy == "lococo" else 0
                ccfg = CompressionConfig(
                    policy=policy, cache_size=M, chunk_size=args.chunk_size, local_len=local
                )
                p, ccfg, trained = compressors.with_policy_params(params, cfg, ccfg)
                t0 = time.perf_counter()
                res = evaluate.nll_per_token(p, ids, cfg, ccfg, progress=True, desc=key)
                cell = {
                    "policy": policy,
                    "cache_size": M,
                    "rope": rope,
                    "trained": trained,
                    "compressors": compressors.provenance(policy, M, B),
                    "compression_config": dataclasses.asdict(ccfg),
                    "seconds": time.perf_counter() - t0,
                    "tokens_per_s": Lmax / (time.perf_counter() - t0),
                    "ppl": evaluate.prefix_perplexities(res, args.lengths),
                }
                done["cells"].append(cell)
                have.add(key)
                print(key, {k: round(v, 3) for k, v in cell["ppl"].items()}, flush=True)
                out.write_text(json.dumps(done, indent=1))

    md = table(done["cells"], args.lengths)
    print("\n" + md)
    out.with_suffix(".md").write_text(
        f"Perplexity of the first L tokens of {done['text']} (held out), B = "
        f"{args.chunk_size}, device {done['device']}.\n\n{md}\n"
    )
    plot(done["cells"], args.lengths, out.with_suffix(".png"))
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
