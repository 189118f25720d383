"""Passkey retrieval: a 5-digit key hidden at a random depth in filler text, asked for at the
end; greedy decoding; accuracy over --trials prompts per (policy, M, length) cell.

Cells are appended to the JSON as they finish (an interrupted run resumes).

    python experiments/eval_passkey.py                                   # 1K..8K, M=128
    python experiments/eval_passkey.py --lengths 1024 --trials 20 --policies full lococo
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax

from lococo_jax import compressors, evaluate
from lococo_jax.config import CompressionConfig
from lococo_jax.models import load_model

RESULTS = Path(__file__).resolve().parent / "results"


def plot(cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    names = sorted({(c["policy"], c["cache_size"]) for c in cells})
    for pol, M in names:
        rs = sorted(
            (c for c in cells if (c["policy"], c["cache_size"]) == (pol, M)),
            key=lambda c: c["length"],
        )
        label = pol if pol == "full" else f"{pol} M={M}"
        ax.plot([c["length"] for c in rs], [c["accuracy"] for c in rs], "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("passkey accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--policies", nargs="+", default=["full", "streaming", "h2o", "tova", "lococo"])
    ap.add_argument("--cache-sizes", type=int, nargs="+", default=[128])
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "passkey.json"))
    args = ap.parse_args()

    cfg, params, tok = load_model("smollm2")
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.exists() else {"cells": []}
    B = args.chunk_size
    done["cells"] = [c for c in done["cells"] if compressors.is_current(c, B)]
    have = {(c["policy"], c["cache_size"], c["length"]) for c in done["cells"]}
    done.update(
        device=jax.devices()[0].device_kind,
        trials=args.trials,
        seed=args.seed,
        model="SmolLM2-135M-Instruct (GGUF Q4_1)",
    )
    for L in args.lengths:
        for policy in args.policies:
            for M in [0] if policy == "full" else args.cache_sizes:
                if (policy, M, L) in have:
                    continue
                size = L + 16 if policy == "full" else M
                ccfg = CompressionConfig(policy=policy, cache_size=size, chunk_size=args.chunk_size)
                p, ccfg, trained = compressors.with_policy_params(params, cfg, ccfg)
                t0 = time.perf_counter()
                res = evaluate.passkey_accuracy(
                    p,
                    tok,
                    cfg,
                    ccfg,
                    length=L,
                    trials=args.trials,
                    seed=args.seed,
                    batch_size=args.batch_size,
                    progress=True,
                )
                cell = dict(
                    policy=policy,
                    cache_size=M,
                    length=L,
                    trained=trained,
                    compressors=compressors.provenance(policy, M, B),
                    seconds=time.perf_counter() - t0,
                    **res,
                )
                done["cells"].append(cell)
                have.add((policy, M, L))
                print(f"{policy} M={M} L={L}: {res['accuracy']:.2f}", flush=True)
                out.write_text(json.dumps(done, indent=1))

    lengths = sorted({c["length"] for c in done["cells"]})
    lines = [
        "| policy | M | " + " | ".join(f"{L // 1024}K" for L in lengths) + " |",
        "|---" * (2 + len(lengths)) + "|",
    ]
    for pol, M in sorted({(c["policy"], c["cache_size"]) for c in done["cells"]}):
        acc = {
            c["length"]: c["accuracy"]
            for c in done["cells"]
            if (c["policy"], c["cache_size"]) == (pol, M)
        }
        vals = " | ".join(f"{acc[L]:.2f}" if L in acc else "-" for L in lengths)
        lines.append(f"| {pol} | {'all' if pol == 'full' else M} | {vals} |")
    md = "\n".join(lines)
    print("\n" + md)
    out.with_suffix(".md").write_text(
        f"Passkey retrieval accuracy, {args.trials} trials per cell (seed {args.seed}), "
        f"B = {args.chunk_size}, device {done['device']}.\n\n{md}\n"
    )
    plot(done["cells"], out.with_suffix(".png"))
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
