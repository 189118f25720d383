"""LoCoCo ablations on held-out text: one perplexity pass per variant of the compressor set-up.

A variant is comma-separated key=value pairs:
  file=PATH      compressor weights (default: the committed ones for --cache-size; "none": a
                 random init, which only makes sense with a=0)
  a=FLOAT        override the normaliser of every layer (a=0: the residual anchors alone, W = R,
                 so the conv is unused and the variant is a pure eviction policy)
  local_len=INT, hh_keep_rate=FLOAT   override the file's compression config (hh_keep_rate
                 changes the conv's shape: only with file=none)
  label=TEXT     the row's name (default: the pairs themselves)
Ablations are choices, so the default text is the validation text (northangerabbey.txt).
Rows are keyed by everything that determines them (lococo_jax.results: text hash, length, model
and weights hash, compressor file hash, config, the a override), not by label; they go to a new
run folder unless --out names a file (resumed) or --write updates experiments/results/.

    python experiments/ablate_lococo.py --cache-size 128 --length 4096 \\
        --variant "label=committed" --variant "a=0" --variant "a=0,local_len=64"
    python experiments/ablate_lococo.py --cache-size 128 --offsets 0 25000 50000 75000 \\
        --variant "label=committed" --variant "a=0"   # four validation slices, pooled too
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lococo_jax import compressors, evaluate, policies, results
from lococo_jax.config import CompressionConfig
from lococo_jax.models import load_model
from lococo_jax.policies import lococo

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"file", "a", "local_len", "hh_keep_rate", "label"}


def parse_variant(spec: str) -> dict[str, str]:
    out = {}
    for pair in filter(None, spec.split(",")):
        key, sep, val = pair.partition("=")
        if not sep or key not in KEYS:
            raise SystemExit(f"--variant {spec!r}: {pair!r} is not one of {sorted(KEYS)}=VALUE")
        out[key] = val
    out.setdefault("label", spec)
    return out


def build(params, cfg, M: int, B: int, v: dict[str, str]):
    """-> (params with params["lococo"], CompressionConfig, file used or None)."""
    ccfg = CompressionConfig(policy="lococo", cache_size=M, chunk_size=B, local_len=M // 4)
    path = v.get("file", "")
    if path == "none":
        path = None
    elif not path:
        path = compressors.default_compressors(M, B)
        if path is None:
            raise SystemExit(f"no committed compressors for M={M}, B={B}; pass file=none")
    over = {k: type(getattr(ccfg, k))(v[k]) for k in ("local_len", "hh_keep_rate") if k in v}
    if path is None:
        ccfg = dataclasses.replace(ccfg, **over)
        p = dict(params, lococo=policies.init_params(jax.random.PRNGKey(0), cfg, ccfg))
    else:
        p, ccfg, _ = compressors.with_policy_params(params, cfg, ccfg, path)
        if "hh_keep_rate" in over and over["hh_keep_rate"] != ccfg.hh_keep_rate:
            raise SystemExit("hh_keep_rate changes the conv's shape: use it with file=none")
        ccfg = dataclasses.replace(ccfg, **over)
    if "a" in v:
        sub = p["lococo"]
        a = jnp.full_like(sub["normalizer"], float(v["a"]))
        p = dict(p, lococo=dict(sub, normalizer=lococo.normalizer_param(ccfg, a)))
    return p, ccfg, None if path is None else str(Path(path).resolve().relative_to(ROOT))


def _vs_first(r: dict, first: dict, L: int) -> str:
    """r's perplexity at L, and (beside it, unless r is the first row) its paired gap to the
    first row's."""
    v = r["ppl"].get(str(L))
    if v is None:
        return "-"
    se = results.paired_se(r, first, L)
    if se is None:
        return f"{v:.2f}"
    return f"{v:.2f} ({v - first['ppl'][str(L)]:+.2f} ± {se:.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--text", default=str(ROOT / "data/austen/northangerabbey.txt"))
    ap.add_argument("--cache-size", type=int, default=128)
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--length", type=int, default=4096, help="ppl at 1K, 2K, ... up to this")
    ap.add_argument(
        "--offsets",
        type=int,
        nargs="+",
        default=[0],
        help="slices of the text starting this many tokens in (several: a table per slice and "
        "one pooled over them, e.g. 0 25000 50000 75000 for four 4K slices of one book)",
    )
    ap.add_argument("--variant", action="append", required=True, help="see above")
    ap.add_argument("--out", default=None, help="result JSON (resumed); default: a new run folder")
    ap.add_argument(
        "--write", action="store_true", help="write experiments/results/ablation_m{M}.*"
    )
    args = ap.parse_args()
    M, B, Lmax = args.cache_size, args.chunk_size, args.length
    variants = [parse_variant(s) for s in args.variant]
    store = results.ResultStore(results.output_path(f"ablation_m{M}.json", args.out, args.write))
    print(f"results -> {store.path}", flush=True)

    cfg, params, tok = load_model("smollm2")
    model_fp = results.model_fingerprint(cfg, params, "smollm2")
    text = results.text_fingerprint(args.text)
    ids = np.asarray(
        tok.encode(Path(args.text).read_text(encoding="utf-8"), add_special_tokens=False), np.int32
    )
    for off in args.offsets:
        if off < 0 or off + Lmax > len(ids):
            raise SystemExit(
                f"--offsets {off} + --length {Lmax} must lie inside {args.text} ({len(ids)} tokens)"
            )
    lengths = [L for L in (1024, 2048, 4096, 8192, 16384) if L <= Lmax]
    built = [build(params, cfg, M, B, v) for v in variants]
    slices = {}
    for off in args.offsets:
        slices[off] = []
        for v, (p, ccfg, path) in zip(variants, built, strict=True):
            key = {
                "benchmark": "ablation",
                "text": text,
                "length": Lmax,
                "model": model_fp,
                "compressors": path
                and {"file": path, "sha256": compressors.file_sha256(ROOT / path)},
                "config": dataclasses.asdict(ccfg),
                "a": v.get("a"),
            }
            if off:  # absent at 0, so the cells written before --offsets keep their keys
                key["offset"] = off
            row = store.get(key)
            if row is None or "block_nll" not in row:  # rows from before paired SEs: redo
                t0 = time.perf_counter()
                nll = evaluate.nll_per_token(
                    p, ids[off : off + Lmax], cfg, ccfg, progress=True, desc=v["label"]
                )
                a = np.asarray(lococo.mixing_weight(ccfg, p["lococo"]["normalizer"]))
                row = store.put(
                    key,
                    dict(
                        label=v["label"],
                        file=path,
                        offset=off,
                        compression_config=dataclasses.asdict(ccfg),
                        a_mean=float(a.mean()),
                        seconds=time.perf_counter() - t0,
                        ppl=evaluate.prefix_perplexities(nll, lengths),
                        block_nll={str(L): results.block_means(nll, L, B) for L in lengths},
                    ),
                )
                print(row["label"], {k: round(x, 3) for k, x in row["ppl"].items()}, flush=True)
            slices[off].append(row)

    parts = []
    for off, rows in slices.items():
        if len(slices) > 1:
            parts.append(f"### From token {off} on")
        parts.append(_table(rows, lengths))
    if len(slices) > 1:
        pooled = [_pool([rows[i] for rows in slices.values()], lengths) for i in range(len(built))]
        parts.append(f"### Pooled over the {len(slices)} slices")
        parts.append(
            "Perplexity: exp of the mean block NLL over every slice's blocks inside its first L "
            "tokens; the gap's SE is paired over all of them.\n\n" + _table(pooled, lengths)
        )
    md = "\n\n".join(parts)
    print("\n" + md)
    rows = [r for rs in slices.values() for r in rs]
    prov = sorted({(r["provenance"]["command"], r["provenance"]["device"]) for r in rows})
    where = "" if args.offsets == [0] else f" (from the token offsets {args.offsets})"
    store.path.with_suffix(".md").write_text(
        f"LoCoCo ablations at M = {M}, B = {B}: perplexity of the first L tokens of "
        f"{text['name']}{where} ({results.text_split(args.text)}). In brackets: the gap to "
        f"the first row ± its standard error, paired over the same blocks of {B} predictions "
        f"(the blocks inside the first L tokens; ppl * SE of the per-block NLL differences)."
        f"\n\n{md}\n\nCommands and devices:\n"
        + "\n".join(f"- `{a}` on {d}" for a, d in prov)
        + "\n"
    )
    print(f"wrote {store.path}, {store.path.with_suffix('.md')}")


def _table(rows: list[dict], lengths: list[int]) -> str:
    head = "| variant | file | r | local | k | conv layers | mean a | "
    lines = [head + " | ".join(f"{L // 1024}K" for L in lengths) + " |"]
    lines.append("|---" * (7 + len(lengths)) + "|")
    for r in rows:
        c = r["compression_config"]
        name = r["file"] or "random init"
        vals = " | ".join(_vs_first(r, rows[0], L) for L in lengths)
        lines.append(
            f"| {r['label']} | {name} | {c['hh_keep_rate']} | {c['local_len']} | "
            f"{c['kernel_size']} | {c['n_convlayer']} | {r['a_mean']:.3f} | {vals} |"
        )
    return "\n".join(lines)


def _pool(rows: list[dict], lengths: list[int]) -> dict:
    """One variant's rows on several slices -> a row over all their blocks (ppl: exp of the
    mean block NLL; block_nll: the slices' blocks one after another)."""
    blocks = {str(L): [x for r in rows for x in r["block_nll"][str(L)]] for L in lengths}
    ppl = {k: float(np.exp(np.mean(b))) for k, b in blocks.items()}
    return dict(rows[0], ppl=ppl, block_nll=blocks)


if __name__ == "__main__":
    main()
