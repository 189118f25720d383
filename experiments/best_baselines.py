"""The best baseline per task at one kept fraction (default 1/4), from the committed sweep files:
perplexity_fractions.json, passkey_fractions.json, ruler.json (niah tasks, RULER's plain
template) and ruler_tasks.json (RULER's other tasks, the model's chat template) in
experiments/results/.

Only the baselines at their validation-chosen settings are candidates (streaming sink 16, h2o
recent M/4, tova, snapkv w32 k5 max, keydiff); full attention is the reference; lococo is not
a candidate (it is what has to beat this bar). Nothing is computed here: the rows come from the
eval scripts' own best_rows(), so this table and theirs cannot disagree. Where a RULER task
was run with several sample counts, the largest one is shown.

    python experiments/best_baselines.py                 # print
    python experiments/best_baselines.py --write         # experiments/results/best_baseline.md
"""

from __future__ import annotations

import argparse
from fractions import Fraction

import eval_passkey
import eval_perplexity
import eval_ruler

from lococo_jax import results

FILES = ("perplexity_fractions.json", "passkey_fractions.json", "ruler.json", "ruler_tasks.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--fraction", type=Fraction, default=Fraction(1, 4))
    ap.add_argument(
        "--write", action="store_true", help="write experiments/results/best_baseline.md"
    )
    args = ap.parse_args()
    f = float(args.fraction)
    ppl = results.ResultStore(results.COMMITTED / FILES[0])
    pk = results.ResultStore(results.COMMITTED / FILES[1])
    ruler_cells = [
        c
        for name in FILES[2:]
        for c in results.ResultStore(results.COMMITTED / name).cells
        if "key" in c
    ]
    most: dict[tuple, int] = {}
    for c in ruler_cells:
        k = (c["task"], c["length"])
        most[k] = max(most.get(k, 0), c["key_fields"]["samples"])
    ruler_cells = [
        c for c in ruler_cells if c["key_fields"]["samples"] == most[(c["task"], c["length"])]
    ]
    md = [
        f"## Best baseline at kept fraction {args.fraction} (the bar for calibrated LoCoCo)",
        "",
        "Mean ± standard error (perplexity: over blocks of 128 predictions; passkey: over trials;",
        "RULER: over samples, 0-100). Candidates: the baselines at the settings chosen on the",
        "validation text. Ties are all named. Written by `python experiments/best_baselines.py",
        f"--write` from {', '.join(FILES)}.",
        "",
        "### Perplexity (lower is better)",
        "",
        *results.best_table(eval_perplexity.best_rows(ppl, f), "{:.2f} ± {:.2f}"),
        "",
        "### Passkey accuracy",
        "",
        *results.best_table(eval_passkey.best_rows(pk, f), "{:.2f} ± {:.2f}"),
        "",
        "### RULER",
        "",
        *results.best_table(eval_ruler.best_rows(ruler_cells, f), "{:.1f} ± {:.1f}"),
        "",
    ]
    text = "\n".join(md)
    print(text)
    if args.write:
        path = results.COMMITTED / "best_baseline.md"
        path.write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
