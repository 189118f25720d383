"""Peak host memory of tokenising and packing as the corpus grows: the streamed, memory-mapped
token cache (data.TokenCache, what training reads) against the in-memory packer (data.pack).

    python experiments/bench_data.py [--scales 1 10 50] [--write]

The corpus is the six Austen novels copied ``scale`` times (scale 50: ~225 MB of text, ~225M
byte tokens). Each measurement runs in a fresh process: build the corpus's TFDS dataset, then
tokenise + pack it and draw 10 batches of 8 x 4097 tokens; the figure is that process's peak RSS
(ru_maxrss) minus its RSS before packing. The in-memory packer is skipped above --pack-max
(it needs ~36 bytes per token). Prints a table; --write puts JSON + PNG in experiments/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
AUSTEN = ROOT / "data" / "austen"
SAMPLE_LEN, BATCH = 4096, 8


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(method: str, scale: int, work: Path) -> dict:
    import psutil

    from lococo_jax import data
    from lococo_jax.tokenizer import ByteTokenizer

    corpus = work / f"corpus_{scale}"
    if not corpus.exists():
        corpus.mkdir(parents=True)
        for i in range(scale):
            for f in sorted(AUSTEN.glob("*.txt")):
                shutil.copy(f, corpus / f"{i:03d}_{f.name}")
    dcfg = data.DataConfig(
        files=(str(corpus),), data_dir=str(work / f"tfds_{scale}"), token_cache_dir=None
    )
    data.build_local(dcfg.files, dcfg.data_dir)  # the TFDS build is not what is measured
    tok = ByteTokenizer()
    base_rss = psutil.Process().memory_info().rss / 2**20
    t0 = time.perf_counter()
    if method == "token_cache":
        loader = data.make_loader(dcfg, tok, SAMPLE_LEN, BATCH, seed=0)
    else:
        samples = data.pack(data.load_documents(dcfg), tok, SAMPLE_LEN)
        loader = data.Loader(samples, BATCH, seed=0)
    for _ in range(10):
        loader.next()
    return {
        "method": method,
        "scale": scale,
        "samples": len(loader.samples),
        "tokens": len(loader.samples) * SAMPLE_LEN,
        "seconds": time.perf_counter() - t0,
        "peak_rss_mb": _rss_mb(),
        "rss_before_mb": base_rss,
        "added_peak_mb": _rss_mb() - base_rss,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 10, 50])
    ap.add_argument("--pack-max", type=int, default=10, help="largest scale for data.pack")
    ap.add_argument("--write", action="store_true", help="write the committed results")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        m, s, w = args.child
        print("ROW " + json.dumps(child(m, int(s), Path(w))), flush=True)
        return 0
    from lococo_jax import results

    rows = []
    with tempfile.TemporaryDirectory() as work:
        for scale in args.scales:
            for method in ("token_cache", "pack"):
                if method == "pack" and scale > args.pack_max:
                    continue
                cmd = [sys.executable, __file__, "--child", method, str(scale), work]
                out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
                line = [x for x in out.stdout.splitlines() if x.startswith("ROW ")]
                if out.returncode or not line:
                    print(out.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"{method} at scale {scale} failed (exit {out.returncode})")
                r = json.loads(line[0][4:])
                rows.append(r)
                print(
                    f"{method:12} x{scale:<3} {r['tokens'] / 1e6:8.1f}M tokens  "
                    f"added peak RSS {r['added_peak_mb']:8.1f} MB  {r['seconds']:7.1f} s",
                    flush=True,
                )
    out = results.output_path("bench_data.json", None, args.write)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "provenance": results.provenance_now()}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in ("token_cache", "pack"):
        pts = [(r["tokens"] / 1e6, r["added_peak_mb"]) for r in rows if r["method"] == method]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=method)
    ax.set_xlabel("corpus (million tokens)")
    ax.set_ylabel("added peak RSS (MB)")
    ax.set_title("Tokenise + pack: host memory vs corpus size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
