"""Passkey retrieval: a 5-digit key hidden at a random depth in filler text, asked for at the
end; greedy decoding; accuracy over --trials prompts per (policy, M, length) cell, at fixed
cache sizes and at kept fractions (--fractions: M = fraction * length).

Every cell is keyed by everything that determines it (lococo_jax.results: length, trials, seed,
model and weights hash, compressor hash, every config field): another seed or trial count is a
new cell, never an old number under a new header. Results go to a new run folder unless --out
names a file (resumed) or --write updates experiments/results/passkey.*.

    python experiments/eval_passkey.py                                   # 1K..8K, M=128
    python experiments/eval_passkey.py --lengths 1024 --trials 20 --policies full lococo
    python experiments/eval_passkey.py --lengths 2048 --cache-sizes --fractions 1/8 1/4
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from fractions import Fraction
from pathlib import Path

import _policy_args

from lococo_jax import compressors, evaluate, results
from lococo_jax.models import load_model


def _label(c: dict) -> str:
    name = _policy_args.describe(c["key_fields"]["config"])
    return name + (" (untrained)" if c.get("trained") is False else "")


def plot(cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))

    def col(c):
        return (
            "all"
            if c["policy"] == "full"
            else c["cache_size"]
            if c["fraction"] is None
            else (f"{Fraction(c['fraction']).limit_denominator(1024)} L")
        )

    names = sorted({(_label(c), str(col(c))) for c in cells})
    for pol, M in names:
        rs = sorted(
            (c for c in cells if (_label(c), str(col(c))) == (pol, M)),
            key=lambda c: c["length"],
        )
        label = pol if M == "all" else f"{pol} M={M}"
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
    ap.add_argument("--policies", nargs="+", default=_policy_args.POLICIES)
    ap.add_argument("--cache-sizes", type=int, nargs="*", default=[128])
    ap.add_argument("--fractions", type=Fraction, nargs="*", default=[], help="e.g. 1/8 1/4")
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", default=None, help="result JSON (resumed); default: a new run folder")
    ap.add_argument("--write", action="store_true", help="write experiments/results/passkey.*")
    _policy_args.add(ap)
    args = ap.parse_args()

    cfg, params, tok = load_model(args.model)
    model_fp = results.model_fingerprint(cfg, params, args.model)
    store = results.ResultStore(results.output_path("passkey.json", args.out, args.write))
    print(f"results -> {store.path}", flush=True)
    B = args.chunk_size
    for L in args.lengths:
        for policy in args.policies:
            if policy == "full":
                sizes = [(L + 16, None)]
            else:
                sizes = [(M, None) for M in args.cache_sizes]
                sizes += [(int(f * L), float(f)) for f in args.fractions]
            runs = [(m, f, c) for m, f in sizes for c in _policy_args.configs(args, policy, m, B)]
            for M, frac, ccfg in runs:
                p, ccfg, trained = compressors.with_policy_params(params, cfg, ccfg)
                key = {
                    "benchmark": "passkey",
                    "length": L,
                    "trials": args.trials,
                    "seed": args.seed,
                    "model": model_fp,
                    "compressors": compressors.provenance(policy, M, B) if trained else None,
                    "config": dataclasses.asdict(ccfg),
                }
                if store.get(key) is not None:
                    continue
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
                store.put(
                    key,
                    dict(
                        policy=policy,
                        cache_size=M,
                        fraction=frac,
                        length=L,
                        trained=trained,
                        seconds=time.perf_counter() - t0,
                        **res,
                    ),
                )
                name = _policy_args.describe(ccfg)
                print(f"{name} M={M} L={L}: {res['accuracy']:.2f}", flush=True)

    md = report(store)
    print("\n" + md)
    store.path.with_suffix(".md").write_text(md)
    plot([c for c in store.cells if "key" in c], store.path.with_suffix(".png"))
    print(f"wrote {store.path}, {store.path.with_suffix('.md')}, {store.path.with_suffix('.png')}")


def report(store: results.ResultStore) -> str:
    """One table per (trials, seed): the header comes from the cells' own key fields."""
    cells = [c for c in store.cells if "key" in c]
    out = []
    groups = sorted({(c["key_fields"]["trials"], c["key_fields"]["seed"]) for c in cells})
    for trials, seed in groups:
        here = [
            c
            for c in cells
            if (c["key_fields"]["trials"], c["key_fields"]["seed"]) == (trials, seed)
        ]
        lengths = sorted({c["length"] for c in here})

        def col(c):
            if c["policy"] == "full":
                return "all"
            if c["fraction"] is None:
                return str(c["cache_size"])
            return f"{Fraction(c['fraction']).limit_denominator(1024)} L"

        out.append(f"### Passkey accuracy, {trials} trials per cell, seed {seed}\n")
        out.append("| policy | M | " + " | ".join(f"{L // 1024}K" for L in lengths) + " |")
        out.append("|---" * (2 + len(lengths)) + "|")
        for name, M in sorted({(_label(c), col(c)) for c in here}):
            acc = {c["length"]: c["accuracy"] for c in here if (_label(c), col(c)) == (name, M)}
            vals = " | ".join(f"{acc[L]:.2f}" if L in acc else "-" for L in lengths)
            out.append(f"| {name} | {M} | {vals} |")
        out.append("")
    prov = sorted({(c["provenance"]["command"], c["provenance"]["device"]) for c in cells})
    out.append("Commands and devices:\n" + "\n".join(f"- `{a}` on {d}" for a, d in prov))
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
