"""The LoCoCo fusion step alone: the Pallas kernel vs the jitted XLA reference.

Forward, and forward + backward (kernel with backward="pallas", and the reference under
jax.grad), at Llama-2-7B-like sizes (32 KV heads, d 128, M 512, B 512, hh_keep_rate 0.5 ->
C 256 fused slots, N = M + B - (M - C) = 768, kernel 21) and SmolLM2 sizes (3 KV heads, d 64,
M 128, B 128 -> C 64, N 192), batch 1..8. For the forward it also prints the time to read k and
v once from HBM at --hbm-gbps and the ratio (the fusion is conv-FLOP bound, not memory bound:
N * ksize * 2d * C multiply-adds per row).

Every run first checks the kernel against the reference (forward and gradients, small sizes,
fp32; and the forward at each benchmark size). On CPU the kernel runs in Pallas interpret mode,
so only the check runs there.

    python experiments/bench_fusion.py                       # GPU/TPU: check + timings
    python experiments/bench_fusion.py --check-only          # any platform, < 1 min on CPU
    python experiments/bench_fusion.py --sizes smollm2 --batches 1 8 --iters 50
    python experiments/bench_fusion.py --splits 1 2 4 8  # also the forward at these splits

The kernel's default forward splits each (row, channel tile)'s positions among several programs
on a GPU (BlockSizes.splits None); --splits times the forward at other counts beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels.lococo_fusion import (  # noqa: E402
    BlockSizes,
    conv_softmax_mix,
    conv_softmax_mix_reference,
    forward_tiles,
)

RESULTS = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass(frozen=True)
class Size:
    kv_heads: int
    head_dim: int
    cache: int  # M
    chunk: int  # B
    hh_keep_rate: float = 0.5
    ksize: int = 21

    @property
    def fused(self) -> int:  # C
        return int(self.cache * (1 - self.hh_keep_rate))

    @property
    def positions(self) -> int:  # N = M + B - (M - C)
        return self.cache + self.chunk - (self.cache - self.fused)


SIZES = {
    "llama2-7b": Size(kv_heads=32, head_dim=128, cache=512, chunk=512),
    "smollm2": Size(kv_heads=3, head_dim=64, cache=128, chunk=128),
}


def make_inputs(seed: int, R: int, N: int, d: int, C: int, ksize: int, dtype, ragged: bool):
    """k, v [R, N, d]; one conv layer scaled to O(1) logits; valid_len [R] (some < N)."""
    rng = np.random.default_rng(seed)
    k = jnp.asarray(rng.standard_normal((R, N, d), np.float32)).astype(dtype)
    v = jnp.asarray(rng.standard_normal((R, N, d), np.float32)).astype(dtype)
    w = rng.standard_normal((ksize, 2 * d, C), np.float32) * (2.0 / math.sqrt(2 * d * ksize))
    b = rng.standard_normal((C,), np.float32) * 0.5
    vl = np.full((R,), N, np.int32)
    if ragged:
        vl[1::2] = rng.integers(1, N, size=vl[1::2].shape)
    return k, v, [(jnp.asarray(w), jnp.asarray(b))], jnp.asarray(vl)


def _loss(fn, ck, cv, vl):
    def f(k, v, w, b):
        out_k, out_v = fn(k, v, [(w, b)], vl)
        return jnp.sum(out_k.astype(jnp.float32) * ck) + jnp.sum(out_v.astype(jnp.float32) * cv)

    return f


def max_err(a, b) -> float:
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def check_small(block_sizes: BlockSizes | None) -> list[dict]:
    """fp32, ragged tiles and rows: forward (max abs err) and gradients (rel err), both
    backward modes."""
    out = []
    for R, N, d, C, ksize in [(4, 40, 64, 16, 3), (2, 75, 128, 24, 21)]:
        k, v, layers, vl = make_inputs(0, R, N, d, C, ksize, jnp.float32, ragged=True)
        (w, b) = layers[0]
        args = (k, v, w, b)
        bs = block_sizes or BlockSizes(block_n=32, block_c=16)
        want = conv_softmax_mix_reference(k, v, layers, vl)
        got = conv_softmax_mix(k, v, layers, vl, block_sizes=bs)
        fwd = max(max_err(g, wt) for g, wt in zip(got, want, strict=True))
        rng = np.random.default_rng(1)
        ck, cv = (jnp.asarray(rng.standard_normal((R, C, d), np.float32)) for _ in range(2))
        g_ref = jax.grad(_loss(conv_softmax_mix_reference, ck, cv, vl), (0, 1, 2, 3))(*args)
        row = dict(shape=dict(R=R, N=N, d=d, C=C, ksize=ksize), fwd_max_abs_err=fwd)
        for bwd in ("pallas", "xla"):
            kern = lambda k, v, layers, vl, bwd=bwd, bs=bs: conv_softmax_mix(
                k, v, layers, vl, block_sizes=bs, backward=bwd
            )
            g = jax.grad(_loss(kern, ck, cv, vl), (0, 1, 2, 3))(*args)
            row[f"grad_rel_err_{bwd}"] = max(
                max_err(x, y) / float(jnp.max(jnp.abs(y))) for x, y in zip(g, g_ref, strict=True)
            )
        fwd_tol = 1e-5 if jax.default_backend() == "cpu" else 3e-5  # as tests/test_kernel_fusion
        row["ok"] = bool(
            fwd <= fwd_tol
            and row["grad_rel_err_pallas"] <= 1e-4
            and row["grad_rel_err_xla"] <= 1e-4
        )
        out.append(row)
    return out


def time_ms(fn, *args, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def bench_size(name: str, size: Size, batch: int, args: argparse.Namespace) -> dict:
    dtype = jnp.dtype(args.dtype)
    R, N, d, C = batch * size.kv_heads, size.positions, size.head_dim, size.fused
    k, v, layers, vl = make_inputs(2, R, N, d, C, size.ksize, dtype, ragged=False)
    (w, b) = layers[0]
    bs = BlockSizes.for_backend()
    if args.block_n is not None or args.block_c is not None:
        bs = dataclasses.replace(
            bs, block_n=args.block_n or bs.block_n, block_c=args.block_c or bs.block_c
        )
    kern = jax.jit(lambda k, v, layers, vl: conv_softmax_mix(k, v, layers, vl, block_sizes=bs))
    ref = jax.jit(conv_softmax_mix_reference)
    err = max(
        max_err(g, wt) for g, wt in zip(kern(k, v, layers, vl), ref(k, v, layers, vl), strict=True)
    )
    row = dict(
        size=name,
        batch=batch,
        R=R,
        N=N,
        d=d,
        C=C,
        ksize=size.ksize,
        dtype=str(dtype),
        fwd_max_abs_err_vs_reference=err,
    )
    if args.check_only:
        return row
    ck = jnp.ones((R, C, d), jnp.float32)
    kern_bwd = lambda bwd: jax.jit(
        jax.grad(
            _loss(
                lambda k, v, layers, vl: conv_softmax_mix(
                    k, v, layers, vl, block_sizes=bs, backward=bwd
                ),
                ck,
                ck,
                vl,
            ),
            (0, 1, 2, 3),
        )
    )
    ref_bwd = jax.jit(jax.grad(_loss(conv_softmax_mix_reference, ck, ck, vl), (0, 1, 2, 3)))
    row["fwd_kernel_ms"] = time_ms(kern, k, v, layers, vl, iters=args.iters)
    row["splits_default"] = _resolved_splits(bs, R, N, C)
    row["fwd_kernel_ms_by_splits"] = {}
    for sp in args.splits:
        bs_sp = dataclasses.replace(bs, splits=sp)
        f = jax.jit(
            lambda k, v, layers, vl, b=bs_sp: conv_softmax_mix(k, v, layers, vl, block_sizes=b)
        )
        key = str(_resolved_splits(bs_sp, R, N, C))
        row["fwd_kernel_ms_by_splits"][key] = time_ms(f, k, v, layers, vl, iters=args.iters)
    row["fwd_reference_ms"] = time_ms(ref, k, v, layers, vl, iters=args.iters)
    row["fwdbwd_kernel_ms"] = time_ms(kern_bwd("pallas"), k, v, w, b, iters=args.iters)
    row["fwdbwd_kernel_xla_bwd_ms"] = time_ms(kern_bwd("xla"), k, v, w, b, iters=args.iters)
    row["fwdbwd_reference_ms"] = time_ms(ref_bwd, k, v, w, b, iters=args.iters)
    kv_bytes = 2 * R * N * d * dtype.itemsize
    row["kv_read_ms_at_hbm"] = kv_bytes / (args.hbm_gbps * 1e9) * 1e3
    row["fwd_kernel_over_kv_read"] = row["fwd_kernel_ms"] / row["kv_read_ms_at_hbm"]
    row["conv_gflop"] = 2 * R * N * size.ksize * 2 * d * C / 1e9
    return row


def _resolved_splits(bs: BlockSizes, r: int, n: int, c: int) -> int:
    """How many programs share a (row, channel tile)'s positions in the forward on this backend."""
    return forward_tiles(bs, r, n, c, jax.default_backend())[2]


def print_table(rows: list[dict]) -> None:
    cols = [
        ("size", "size", "{}"),
        ("batch", "b", "{}"),
        ("fwd_kernel_ms", "fwd kern", "{:.3f}"),
        ("fwd_reference_ms", "fwd ref", "{:.3f}"),
        ("splits_default", "splits", "{}"),
        ("kv_read_ms_at_hbm", "kv read", "{:.4f}"),
        ("fwd_kernel_over_kv_read", "kern/read", "{:.1f}"),
        ("fwdbwd_kernel_ms", "f+b kern", "{:.3f}"),
        ("fwdbwd_kernel_xla_bwd_ms", "f+b kern/xla", "{:.3f}"),
        ("fwdbwd_reference_ms", "f+b ref", "{:.3f}"),
        ("fwd_max_abs_err_vs_reference", "fwd err", "{:.1e}"),
    ]
    cols = [c for c in cols if c[0] in rows[0]]
    print("  ".join(f"{h:>12}" for _, h, _ in cols) + "   (median ms)")
    for r in rows:
        print("  ".join(f"{fmt.format(r[k]):>12}" for k, _, fmt in cols))
        if r.get("fwd_kernel_ms_by_splits"):
            by = ", ".join(f"{k}: {v:.3f}" for k, v in r["fwd_kernel_ms_by_splits"].items())
            print(f"{'':>12}  forward at other splits (ms): {by}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--hbm-gbps", type=float, default=3350.0, help="HBM GB/s (H100 SXM: 3350)")
    p.add_argument(
        "--block-n", type=int, default=None, help="BlockSizes.block_n (default: per backend)"
    )
    p.add_argument(
        "--block-c", type=int, default=None, help="BlockSizes.block_c (default: per backend)"
    )
    p.add_argument(
        "--splits",
        type=int,
        nargs="*",
        default=[1],
        help="also time the forward with these BlockSizes.splits (default: 1, the unsplit grid)",
    )
    p.add_argument("--check-only", action="store_true", help="correctness only, no timings")
    p.add_argument(
        "--out", type=Path, default=None, help="default results/bench_fusion_<platform>.json"
    )
    args = p.parse_args(argv)

    platform = jax.default_backend()
    on_cpu = platform == "cpu"
    if on_cpu and not args.check_only:
        print("CPU: the kernel runs in interpret mode; running the correctness check only.")
        args.check_only = True
    device = jax.devices()[0].device_kind
    print(f"device: {device} ({platform}), jax {jax.__version__}")

    check = check_small(None)
    for row in check:
        print(f"check {row}")
    rows = []
    if not on_cpu:  # interpret mode at full sizes takes minutes; the small check covers CPU
        for name in args.sizes:
            for batch in args.batches:
                rows.append(bench_size(name, SIZES[name], batch, args))
                print(f"  {rows[-1]}", flush=True)
        print_table(rows)

    out = args.out or RESULTS / f"bench_fusion_{platform}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(
        device=device,
        platform=platform,
        jax=jax.__version__,
        dtype=args.dtype,
        hbm_gbps=args.hbm_gbps,
        check=check,
        results=rows,
    )
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0 if all(r["ok"] for r in check) else 1


if __name__ == "__main__":
    sys.exit(main())
