"""Perplexity vs input length for every policy, at fixed cache sizes and at kept fractions.

Reading is causal and front to back, so one pass over the longest length gives the perplexity
of every prefix: ppl(L) = exp(mean NLL of the first L - 1 next-token predictions). A fixed-M cell
is one pass over max(--lengths); a kept-fraction cell (--fractions, M = fraction * L) is one
pass over the first L tokens per length. Every cell is keyed by everything that determines it
(lococo_jax.results: text hash, lengths, model and weights hash, compressor hash, every config
field), so a changed text, length or setting is recomputed, never relabelled.

Texts (DATA.md): northangerabbey.txt is the validation text, for every choice (baseline
settings, LoCoCo's); prideprejudice.txt and persuasion.txt are test texts, only reported.

    python experiments/eval_perplexity.py --lengths 1024 4096 --policies full lococo
    python experiments/eval_perplexity.py --fractions 1/16 1/8 1/4 1/2 --lengths 2048
    python experiments/eval_perplexity.py ... --write   # update experiments/results/
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from fractions import Fraction
from pathlib import Path

import _policy_args
import numpy as np

from lococo_jax import compressors, evaluate, results
from lococo_jax.models import load_model

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ["full", "streaming", "h2o", "tova", "snapkv", "keydiff", "lococo"]


def _name(c: dict) -> str:
    name = _policy_args.describe(c["key_fields"]["config"])
    return name + (" (untrained)" if c.get("trained") is False else "")


def table(cells: list[dict], lengths: list[int]) -> str:
    lines = ["| policy | M | RoPE x | " + " | ".join(f"{L // 1024}K" for L in lengths) + " |"]
    lines.append("|---" * (3 + len(lengths)) + "|")
    for c in sorted(
        # one row per (setting, M, RoPE factor, lengths): the newest cell
        results.newest(
            cells, lambda c: (_name(c), c["cache_size"], c["rope"], tuple(sorted(c["ppl"])))
        ).values(),
        key=lambda c: (c["rope"], c["policy"] != "full", c["cache_size"], c["policy"]),
    ):
        M = "all" if c["policy"] == "full" else str(c["cache_size"])
        vals = " | ".join(f"{c['ppl'][str(L)]:.2f}" if str(L) in c["ppl"] else "-" for L in lengths)
        lines.append(f"| {_name(c)} | {M} | {c['rope']:g} | {vals} |")
    return "\n".join(lines)


def _fmt(c: dict, L: int, ref: dict | None = None) -> str:
    v = c["ppl"][str(L)]
    se = results.paired_se(c, ref, L)
    return f"{v:.2f}" if se is None else f"{v:.2f} ± {se:.2f}"


def _full_at(cells: list[dict], L: int) -> dict | None:
    """The full-attention cell that reports length L, preferring one with standard errors."""
    full = [c for c in cells if c["policy"] == "full" and c["rope"] == 1.0 and str(L) in c["ppl"]]
    full.sort(key=lambda c: (str(L) in (c.get("ppl_se") or {}), c["provenance"]["finished"]))
    return full[-1] if full else None


def fraction_table(cells: list[dict], fixed: list[dict]) -> str:
    fr = sorted({Fraction(c["fraction"]).limit_denominator(1024) for c in cells})
    lengths = sorted({c["length"] for c in cells})
    lines = ["| policy | L | " + " | ".join(f"kept {f}" for f in fr) + " |"]
    lines.append("|---" * (2 + len(fr)) + "|")
    for L in lengths:
        full = _full_at(fixed, L)
        if full is not None:
            se = (full.get("ppl_se") or {}).get(str(L))
            fs = f"{full['ppl'][str(L)]:.2f}" + (f" (± {se:.2f} over text)" if se else "")
            lines.append(f"| full | {L} | " + " | ".join(fs for _ in fr) + " |")
    for name in sorted({_name(c) for c in cells}):
        for L in lengths:
            ref = _full_at(fixed, L)
            row = {
                Fraction(c["fraction"]).limit_denominator(1024): c
                for c in cells
                if _name(c) == name and c["length"] == L
            }
            if row:
                vals = " | ".join(_fmt(row[f], L, ref) if f in row else "-" for f in fr)
                lines.append(f"| {name} | {L} | {vals} |")
    return "\n".join(lines)


def best_rows(store: results.ResultStore, fraction: float) -> list[dict]:
    """Per (text, length): the lowest-perplexity baseline at its validation-chosen setting at
    this kept fraction (ties all named), beside full attention."""
    cells = [c for c in store.cells if "key" in c]
    rows = []
    for text in sorted({c["key_fields"]["text"]["name"] for c in cells}):
        here = [c for c in cells if c["key_fields"]["text"]["name"] == text]
        frac = [
            c
            for c in here
            if c.get("fraction") is not None
            and abs(c["fraction"] - fraction) < 1e-9
            and c["policy"] in _policy_args.BASELINES
            and _policy_args.chosen(_name(c))
        ]
        for L in sorted({c["length"] for c in frac}):
            full = _full_at([c for c in here if c.get("fraction") is None], L)
            here_L = [c for c in frac if c["length"] == L]
            cand = [(_name(c), c["ppl"][str(L)], results.paired_se(c, full, L)) for c in here_L]
            cand = [(n, m, float("nan") if se is None else se) for n, m, se in cand]
            best = results.best_of(cand, higher=False)
            ranked = sorted(cand, key=lambda e: e[1])
            rest = [e for e in ranked if e not in best]
            note = None
            if rest:
                # the runner-up's gap to the best, paired over the same blocks
                b = next(c for c in here_L if _name(c) == best[0][0])
                r = next(c for c in here_L if _name(c) == rest[0][0])
                se = results.paired_se(r, b, L)
                gap = r["ppl"][str(L)] - b["ppl"][str(L)]
                note = f"+{gap:.2f}" + (f" ± {se:.2f}" if se is not None else "") + " paired"
            rows.append(
                dict(
                    benchmark=f"perplexity {text} ({results.text_split(text)})",
                    length=L,
                    n=f"{L - 1} tokens",
                    best=best,
                    candidates=ranked,
                    full=(full["ppl"][str(L)], float("nan")) if full else None,
                    note=note,
                )
            )
    return rows


SE_NOTE = (
    "In the kept-fraction tables ± is the standard error of a policy's gap to full attention, "
    "paired over consecutive blocks of --chunk-size predictions of the same text (ppl * SE of "
    "the per-block NLL differences): how sure the ordering is on this text. Full attention's "
    "own '± over text' is the unpaired SE of its perplexity over those blocks (how much the "
    "figure would move on other text of the same kind). In the best-baseline tables the "
    "runner-up column adds its gap to the best, paired the same way. Per-block NLLs are stored "
    "in each cell (block_nll); cells written before that show no ±.\n"
)


def report(store: results.ResultStore) -> str:
    """Markdown per text (the header comes from the cells' own key fields)."""
    cells = [c for c in store.cells if "key" in c]
    out = []
    for text in sorted({c["key_fields"]["text"]["name"] for c in cells}):
        here = [c for c in cells if c["key_fields"]["text"]["name"] == text]
        split = results.text_split(text)
        fixed = [c for c in here if c.get("fraction") is None]
        frac = [c for c in here if c.get("fraction") is not None]
        if any(c["policy"] != "full" for c in fixed) or (fixed and not frac):
            lengths = sorted({int(L) for c in fixed for L in c["ppl"]})
            out.append(f"### {text} ({split}): perplexity of the first L tokens, fixed M\n")
            out.append(table(fixed, lengths) + "\n")
        if frac:
            out.append(f"### {text} ({split}): perplexity at L with M = kept fraction * L\n")
            out.append(fraction_table(frac, fixed) + "\n")
    for f in sorted({c["fraction"] for c in cells if c.get("fraction") is not None}):
        rows = best_rows(store, f)
        if rows:
            out.append(f"### Best baseline at kept {Fraction(f).limit_denominator(1024)}\n")
            out.append("\n".join(results.best_table(rows, "{:.2f} ± {:.2f}")) + "\n")
    out.append(SE_NOTE)
    out.append(results.report_footer(cells))
    return "\n".join(out) + "\n"


def plot(store: results.ResultStore, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in store.cells if "key" in c and c["rope"] == 1.0]
    panels = sorted(
        {(c["key_fields"]["text"]["name"], c.get("fraction") is not None) for c in cells}
    )
    # a fixed-M panel holding only full attention (the kept-fraction sweeps' reference) adds
    # nothing: full is drawn in the kept-fraction panel
    panels = [
        (t, f)
        for t, f in panels
        if f
        or any(
            c["policy"] != "full" and c.get("fraction") is None
            for c in cells
            if c["key_fields"]["text"]["name"] == t
        )
        or (t, True) not in panels
    ]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (text, is_frac) in zip(axes[0], panels, strict=True):
        here = [
            c
            for c in cells
            if c["key_fields"]["text"]["name"] == text
            and (c.get("fraction") is not None) == is_frac
        ]
        fixed_here = [
            c
            for c in cells
            if c["key_fields"]["text"]["name"] == text and c.get("fraction") is None
        ]
        if is_frac:
            for L in sorted({c["length"] for c in here}):
                full = _full_at(fixed_here, L)
                if full is not None:
                    ax.axhline(full["ppl"][str(L)], color="k", ls="--", label=f"full, L={L}")
        for c in here:
            if c["policy"] == "full" and not is_frac:
                xs = sorted(int(L) for L in c["ppl"])
                ax.plot(xs, [c["ppl"][str(L)] for L in xs], "k--", label="full")
        for name in sorted({_name(c) for c in here if c["policy"] != "full"}):
            if is_frac:
                pts = sorted(
                    (
                        c["fraction"],
                        c["ppl"][str(c["length"])],
                        results.paired_se(c, _full_at(fixed_here, c["length"]), c["length"]) or 0.0,
                    )
                    for c in here
                    if _name(c) == name
                )
                ax.errorbar(
                    [x for x, _, _ in pts],
                    [y for _, y, _ in pts],
                    yerr=[e for *_, e in pts],
                    fmt="o-",
                    capsize=2,
                    label=name,
                )
            else:
                for c in here:
                    if _name(c) == name:
                        xs = sorted(int(L) for L in c["ppl"])
                        ax.plot(
                            xs,
                            [c["ppl"][str(L)] for L in xs],
                            "o-",
                            label=f"{name} M={c['cache_size']}",
                        )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("kept fraction M / L" if is_frac else "input tokens")
        ax.set_ylabel("perplexity" + (" (± paired SE of the gap to full)" if is_frac else ""))
        ax.set_title(f"{text} ({results.text_split(text)})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--text", default=str(ROOT / "data/austen/prideprejudice.txt"))
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--policies", nargs="+", default=POLICIES)
    ap.add_argument("--cache-sizes", type=int, nargs="*", default=[64, 128, 256])
    ap.add_argument("--fractions", type=Fraction, nargs="*", default=[], help="e.g. 1/16 1/8")
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument(
        "--rope-factors",
        type=float,
        nargs="+",
        default=[1.0, 2.0],
        help="linear RoPE scaling factors (fixed-M cells)",
    )
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", default=None, help="result JSON (resumed); default: a new run folder")
    ap.add_argument("--write", action="store_true", help="write experiments/results/<name>.*")
    ap.add_argument(
        "--name",
        default="perplexity",
        help="stem of the result files (default perplexity; the sweeps: perplexity_fractions)",
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

    cfg0, params, tok = load_model(args.model)
    model_fp = results.model_fingerprint(cfg0, params, args.model)
    text = results.text_fingerprint(args.text)
    ids = np.asarray(
        tok.encode(Path(args.text).read_text(encoding="utf-8"), add_special_tokens=False), np.int32
    )
    Lmax = max(args.lengths)
    if len(ids) < Lmax:
        raise SystemExit(f"{args.text} has {len(ids)} tokens < {Lmax}")
    store = results.ResultStore(results.output_path(f"{args.name}.json", args.out, args.write))
    print(f"results -> {store.path}", flush=True)
    B = args.chunk_size

    # (policy, M, length read, lengths reported, fraction, rope)
    jobs = []
    for rope in args.rope_factors:
        for policy in args.policies:
            for M in [Lmax] if policy == "full" else args.cache_sizes:
                jobs.append((policy, M, Lmax, args.lengths, None, rope))
    for f in args.fractions:
        for L in args.lengths:
            for policy in args.policies:
                if policy != "full":
                    jobs.append((policy, int(f * L), L, [L], float(f), 1.0))
    jobs = [
        (ccfg, L, report_at, frac, rope)
        for policy, M, L, report_at, frac, rope in jobs
        for ccfg in _policy_args.configs(args, policy, M, B)
    ]
    for ccfg, L, report_at, frac, rope in jobs:
        policy, M = ccfg.policy, ccfg.cache_size
        cfg = cfg0.with_linear_rope_scaling(rope)
        p, ccfg, trained = compressors.with_policy_params(params, cfg, ccfg)
        if _policy_args.skip(args, ccfg, trained):
            continue
        key = {
            "benchmark": "perplexity",
            "text": text,
            "length": L,
            "report_at": report_at,
            "rope": rope,
            "model": model_fp,
            "compressors": compressors.provenance(policy, M, B) if trained else None,
            "config": dataclasses.asdict(ccfg),
        }
        if store.get(key) is not None:
            continue
        t0 = time.perf_counter()
        desc = f"{_policy_args.describe(ccfg)} M={M} L={L} rope={rope:g}"
        nll = evaluate.nll_per_token(p, ids[:L], cfg, ccfg, progress=sys.stderr.isatty(), desc=desc)
        cell = store.put(
            key,
            {
                "policy": policy,
                "setting": _policy_args.describe(ccfg),
                "cache_size": M,
                "length": L,
                "fraction": frac,
                "rope": rope,
                "trained": trained,
                "seconds": time.perf_counter() - t0,
                "tokens_per_s": L / (time.perf_counter() - t0),
                "ppl": evaluate.prefix_perplexities(nll, report_at),
                "block_nll": {str(n): results.block_means(nll, n, B) for n in report_at},
                "ppl_se": {
                    str(n): results.perplexity_se(results.block_means(nll, n, B)) for n in report_at
                },
            },
        )
        print(desc, {k: round(v, 3) for k, v in cell["ppl"].items()}, flush=True)

    _write(store)


def _write(store: results.ResultStore) -> None:
    results.write_report(store, report(store), lambda png: plot(store, png))


if __name__ == "__main__":
    main()
