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


def _stats(c: dict) -> tuple[float, float]:
    """Accuracy and its standard error over the trials (sample std of the hits / sqrt(n))."""
    return results.mean_se([float(h) for h in c["hits"]])


def _fmt(c: dict | None) -> str:
    if c is None:
        return "-"
    m, se = _stats(c)
    return f"{m:.2f} ± {se:.2f}"


def plot(cells: list[dict], path: Path) -> None:
    """Accuracy vs length at fixed M (left) and vs kept fraction per length (right), from the
    (trials, seed) group with the most trials."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not cells:
        return
    trials, seed = max({(c["key_fields"]["trials"], c["key_fields"]["seed"]) for c in cells})
    cells = [
        c for c in cells if (c["key_fields"]["trials"], c["key_fields"]["seed"]) == (trials, seed)
    ]
    fixed = [c for c in cells if c["fraction"] is None]
    frac = [c for c in cells if c["fraction"] is not None]
    # a fixed-M panel holding only full attention (the kept-fraction sweep's reference) adds
    # nothing: full is drawn in the kept-fraction panel
    show_fixed = any(c["policy"] != "full" for c in fixed) or not frac
    panels = [p for p, here in (("fixed", fixed if show_fixed else []), ("frac", frac)) if here]
    fig, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "fixed":
            names = sorted(
                {(_label(c), c["cache_size"] if c["policy"] != "full" else "all") for c in fixed}
            )
            for pol, M in names:
                rs = sorted(
                    (
                        c
                        for c in fixed
                        if (_label(c), c["cache_size"] if c["policy"] != "full" else "all")
                        == (pol, M)
                    ),
                    key=lambda c: c["length"],
                )
                label = pol if M == "all" else f"{pol} M={M}"
                st = [_stats(c) for c in rs]
                ax.errorbar(
                    [c["length"] for c in rs],
                    [m for m, _ in st],
                    yerr=[e for _, e in st],
                    fmt="o-",
                    capsize=2,
                    label=label,
                )
            ax.set_xlabel("prompt tokens")
            ax.set_title(f"fixed M, {trials} trials, seed {seed}")
        else:
            lengths = sorted({c["length"] for c in frac})
            labels = sorted({_label(c) for c in frac})
            for i, pol in enumerate(labels):
                for j, L in enumerate(lengths):
                    rs = sorted(
                        (c for c in frac if _label(c) == pol and c["length"] == L),
                        key=lambda c: c["fraction"],
                    )
                    st = [_stats(c) for c in rs]
                    # a small horizontal offset per policy, so equal accuracies stay visible
                    dx = 2 ** (0.04 * (i - len(labels) / 2))
                    ax.errorbar(
                        [c["fraction"] * dx for c in rs],
                        [m for m, _ in st],
                        yerr=[e for _, e in st],
                        fmt="o-" if j == 0 else "s:",
                        capsize=2,
                        color=plt.cm.tab10(i % 10),
                        label=f"{pol}, {L // 1024}K" if len(lengths) > 1 else pol,
                    )
            for j, L in enumerate(lengths):
                full = [c for c in cells if c["policy"] == "full" and c["length"] == L]
                if full:
                    ax.axhline(
                        _stats(full[-1])[0],
                        color="k",
                        ls="--" if j == 0 else ":",
                        label=f"full, {L // 1024}K",
                    )
            ax.set_xlabel("kept fraction M / L")
            ax.set_title(f"kept fraction, {trials} trials, seed {seed}")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel("passkey accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside, not over
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
    ap.add_argument("--write", action="store_true", help="write experiments/results/<name>.*")
    ap.add_argument(
        "--name",
        default="passkey",
        help="stem of the result files (default passkey; the sweeps: passkey_fractions)",
    )
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the markdown and PNG from the cells already in the file; run nothing",
    )
    _policy_args.add(ap)
    args = ap.parse_args()
    if args.report_only:
        _write(results.existing_store(f"{args.name}.json", args.out, args.write))
        return

    cfg, params, tok = load_model(args.model)
    model_fp = results.model_fingerprint(cfg, params, args.model)
    store = results.ResultStore(results.output_path(f"{args.name}.json", args.out, args.write))
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
                if _policy_args.skip(args, ccfg, trained):
                    continue
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

    _write(store)


def _write(store: results.ResultStore) -> None:
    cells = [c for c in store.cells if "key" in c]
    results.write_report(store, report(store), lambda png: plot(cells, png))


def _col(c: dict) -> str:
    if c["policy"] == "full":
        return "all"
    if c["fraction"] is None:
        return str(c["cache_size"])
    return f"{Fraction(c['fraction']).limit_denominator(1024)} L"


def _group(cells: list[dict], trials: int, seed: int) -> list[dict]:
    return [
        c for c in cells if (c["key_fields"]["trials"], c["key_fields"]["seed"]) == (trials, seed)
    ]


def best_rows(store: results.ResultStore, fraction: float) -> list[dict]:
    """Per (trials, seed, length): the most accurate baseline at its validation-chosen setting
    at this kept fraction (ties all named), beside full attention."""
    cells = [c for c in store.cells if "key" in c]
    rows = []
    for trials, seed in sorted(
        {(c["key_fields"]["trials"], c["key_fields"]["seed"]) for c in cells}
    ):
        here = _group(cells, trials, seed)
        for L in sorted({c["length"] for c in here}):
            cand = [
                (_label(c), *_stats(c))
                for c in here
                if c["length"] == L
                and c["fraction"] is not None
                and abs(c["fraction"] - fraction) < 1e-9
                and c["policy"] in _policy_args.BASELINES
                and _policy_args.chosen(_label(c))
            ]
            if not cand:
                continue
            full = [c for c in here if c["length"] == L and c["policy"] == "full"]
            rows.append(
                dict(
                    benchmark=f"passkey (seed {seed})",
                    length=L,
                    n=f"{trials} trials",
                    best=results.best_of(cand, higher=True),
                    candidates=sorted(cand, key=lambda e: -e[1]),
                    full=_stats(full[-1]) if full else None,
                )
            )
    return rows


def report(store: results.ResultStore) -> str:
    """Tables per (trials, seed): the header comes from the cells' own key fields."""
    cells = [c for c in store.cells if "key" in c]
    out = [
        "Passkey accuracy: mean ± standard error over the trials (sample std of the 0/1 hits /",
        "sqrt(n)); ± 0.00 means every trial agreed (all missed: 95% upper bound ~3 / n).",
        "Baselines at the settings chosen on the validation text (validation_tuning.md).",
        "",
    ]
    groups = sorted({(c["key_fields"]["trials"], c["key_fields"]["seed"]) for c in cells})
    for trials, seed in groups:
        here = _group(cells, trials, seed)
        fixed = [c for c in here if c["fraction"] is None]
        frac = [c for c in here if c["fraction"] is not None]
        if any(c["policy"] != "full" for c in fixed) or not frac:
            lengths = sorted({c["length"] for c in fixed})
            out.append(f"### Passkey accuracy, fixed M, {trials} trials per cell, seed {seed}\n")
            out.append("| policy | M | " + " | ".join(f"{L // 1024}K" for L in lengths) + " |")
            out.append("|---" * (2 + len(lengths)) + "|")
            for name, M in sorted({(_label(c), _col(c)) for c in fixed}):
                acc = {c["length"]: c for c in fixed if (_label(c), _col(c)) == (name, M)}
                vals = " | ".join(_fmt(acc.get(L)) for L in lengths)
                out.append(f"| {name} | {M} | {vals} |")
            out.append("")
        if frac:
            fr = sorted({Fraction(c["fraction"]).limit_denominator(1024) for c in frac})
            out.append(
                f"### Passkey accuracy at M = kept fraction * L, {trials} trials per cell, "
                f"seed {seed}\n"
            )
            out.append("| policy | L | " + " | ".join(f"kept {f}" for f in fr) + " |")
            out.append("|---" * (2 + len(fr)) + "|")
            for L in sorted({c["length"] for c in frac}):
                full = [c for c in here if c["policy"] == "full" and c["length"] == L]
                if full:
                    out.append(f"| full | {L} | " + " | ".join(_fmt(full[-1]) for _ in fr) + " |")
                for name in sorted({_label(c) for c in frac if c["length"] == L}):
                    row = {
                        Fraction(c["fraction"]).limit_denominator(1024): c
                        for c in frac
                        if _label(c) == name and c["length"] == L
                    }
                    out.append(
                        f"| {name} | {L} | " + " | ".join(_fmt(row.get(f)) for f in fr) + " |"
                    )
            out.append("")
    for f in sorted({c["fraction"] for c in cells if c["fraction"] is not None}):
        rows = best_rows(store, f)
        if rows:
            out.append(f"### Best baseline at kept {Fraction(f).limit_denominator(1024)}\n")
            out.append("\n".join(results.best_table(rows, "{:.2f} ± {:.2f}")) + "\n")
    out.append(results.report_footer(cells))
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
