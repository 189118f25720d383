"""Where a compressed chunk's extra time goes: each policy's compression step alone.

One layer's step in the steady state (M slots and a full window of B entries, all valid), per
policy, jitted and timed after a warm-up call; for lococo also its parts: the fusion call
(kernels.lococo_fusion's XLA reference on a CPU, the kernel elsewhere: conv, softmax over
positions, A K and A V) and the conv alone. Times are per layer and per chunk (x the model's
layers); the conv's FLOPs (2 N ksize 2d C per KV row) give its rate, beside the rate of the
model's largest matmul ([B, hidden] x [hidden, intermediate]) on the same device as a
yardstick. Compare the per-chunk times with bench_e2e's prefill (B / tokens-per-second).

    python experiments/bench_compress.py                     # SmolLM2, M 64..512, B 128
    python experiments/bench_compress.py --cache-sizes 128 --write
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels.lococo_fusion import _conv_same, conv_softmax_mix  # noqa: E402
from lococo_jax import policies, results  # noqa: E402
from lococo_jax.config import CompressionConfig, ConfigError, LlamaConfig  # noqa: E402
from lococo_jax.models import ARCHITECTURES  # noqa: E402
from lococo_jax.policies import lococo  # noqa: E402
from lococo_jax.policies.base import Entries  # noqa: E402

POLICIES = ("streaming", "h2o", "tova", "snapkv", "keydiff", "lococo")


def steady_entries(cfg: LlamaConfig, M: int, B: int, batch: int, seed: int) -> Entries:
    """Random steady-state entries: every one of the S = M + B valid, in position order."""
    rng = np.random.default_rng(seed)
    kv, d, S = cfg.num_key_value_heads, cfg.head_dim, M + B

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    return Entries(
        k=normal(batch, kv, S, d),
        v=normal(batch, kv, S, d),
        pos=jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (batch, kv, S)),
        valid=jnp.ones((batch, kv, S), bool),
        acc=jnp.abs(normal(batch, kv, S)),
        chunk=jnp.abs(normal(batch, kv, S)),
        last=jnp.abs(normal(batch, S)),
        n_valid=jnp.full((batch,), S, jnp.int32),
        obs=jnp.abs(normal(batch, kv, S)),
    )


def best_ms(fn, args: tuple, iters: int, repeats: int) -> float:
    """The best over ``repeats`` of the mean time of ``iters`` calls, in ms (after a warm-up)."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / iters)
    return best * 1e3


def policy_configs(M: int, args: argparse.Namespace) -> list[CompressionConfig]:
    """Each of --policies at cache size M (lococo with local_len M/4, as the committed files)."""
    return [
        CompressionConfig(
            policy=pol,
            cache_size=M,
            chunk_size=args.chunk,
            **({"local_len": M // 4} if pol == "lococo" else {}),
        )
        for pol in args.policies
    ]


def bench(cfg: LlamaConfig, ccfgs: list[CompressionConfig], args: argparse.Namespace) -> list[dict]:
    """Rows for each policy's step at one cache size (every ccfg shares M and B)."""
    M, B, L = ccfgs[0].cache_size, ccfgs[0].chunk_size, cfg.num_hidden_layers
    e = steady_entries(cfg, M, B, args.batch, args.seed)
    rows = []
    for ccfg in ccfgs:
        pol = ccfg.policy
        cp = None
        if pol == "lococo":
            stacked = lococo.init_params(jax.random.key(args.seed), cfg, ccfg)
            cp = jax.tree.map(lambda x: x[0], stacked)
        step = jax.jit(lambda cp, e, ccfg=ccfg, pol=pol: policies.get(pol)(ccfg, cp, e))
        ms = best_ms(step, (cp, e), args.iters, args.repeats)
        rows.append({"M": M, "what": f"{pol}: compression step", "ms_layer": ms})
        if pol == "lococo":
            rows += lococo_parts(cfg, ccfg, cp, args)
    for r in rows:
        r["ms_chunk"] = r["ms_layer"] * L
        if "gflop" in r:
            r["gflops_per_s"] = r["gflop"] / (r["ms_layer"] / 1e3)
    return rows


def lococo_parts(cfg: LlamaConfig, ccfg: CompressionConfig, cp: dict, args) -> list[dict]:
    """The fusion call and the conv alone on the N = M + B - keep rest entries of each KV row."""
    M, C, ksize = ccfg.cache_size, ccfg.num_fused, ccfg.kernel_size
    N, R, d = M + args.chunk - ccfg.num_heavy, args.batch * cfg.num_key_value_heads, cfg.head_dim
    w, b = cp["convs"][0]["w"], cp["convs"][0]["b"]
    rng = np.random.default_rng(args.seed)
    k = jnp.asarray(rng.standard_normal((R, N, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((R, N, d)), jnp.float32)
    n_valid = jnp.full((R,), N, jnp.int32)

    @jax.jit
    def fusion(k, v, w, b):
        return conv_softmax_mix(k, v, [(w, b)], n_valid, impl="auto")

    @jax.jit
    def conv(k, v, w):
        return _conv_same(jnp.concatenate([k, v], -1), w)

    fusion_ms = best_ms(fusion, (k, v, w, b), args.iters, args.repeats)
    conv_ms = best_ms(conv, (k, v, w), args.iters, args.repeats)
    return [
        {"M": M, "what": "lococo: fusion call (conv, softmax, A K, A V)", "ms_layer": fusion_ms},
        {
            "M": M,
            "what": f"lococo: conv alone (N {N}, C {C})",
            "ms_layer": conv_ms,
            "gflop": 2 * R * N * ksize * 2 * d * C / 1e9,
        },
    ]


def matmul_rate(cfg: LlamaConfig, B: int, args: argparse.Namespace) -> float:
    """GFLOP/s of the model's largest per-chunk matmul, [B, hidden] x [hidden, intermediate]."""
    rng = np.random.default_rng(args.seed)
    x = jnp.asarray(rng.standard_normal((args.batch * B, cfg.hidden_size)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((cfg.hidden_size, cfg.intermediate_size)), jnp.float32)
    ms = best_ms(jax.jit(jnp.matmul), (x, w), args.iters, args.repeats)
    return 2 * x.shape[0] * cfg.hidden_size * cfg.intermediate_size / 1e9 / (ms / 1e3)


def markdown(result: dict) -> str:
    p = result["provenance"]
    lines = [
        f"# One layer's compression step per policy ({p['device']})",
        "",
        f"Model {result['model']} ({result['layers']} layers), B = {result['chunk']}, batch "
        f"{result['batch']}, steady state (every entry valid), fp32; the best of "
        f"{result['repeats']} means of {result['iters']} calls. The model's largest matmul "
        f"([B, hidden] x [hidden, intermediate]) runs at {result['matmul_gflops_per_s']:.0f} "
        "GFLOP/s here.",
        "",
        f"Command: `{p['command']}`",
        "",
        "| M | step | ms per layer | ms per chunk | conv GFLOP | GFLOP/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        gf = f"{r['gflop']:.3f}" if "gflop" in r else "-"
        rate = f"{r['gflops_per_s']:.0f}" if "gflops_per_s" in r else "-"
        times = f"{r['ms_layer']:.3f} | {r['ms_chunk']:.1f}"
        lines.append(f"| {r['M']} | {r['what']} | {times} | {gf} | {rate} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=sorted(ARCHITECTURES))
    p.add_argument("--cache-sizes", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--chunk", type=int, default=128, help="B, the window of new entries")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", action="store_true", help="write experiments/results/")
    p.add_argument("--out", default=None, help="the JSON to write (default: a new run folder)")
    args = p.parse_args(argv)
    try:
        name = f"bench_compress_{jax.default_backend()}.json"
        out = results.output_path(name, args.out, args.write)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    for M in args.cache_sizes:
        if M < 8 or M % 4:
            raise SystemExit(f"--cache-sizes: {M} is not a positive multiple of 4 (>= 8)")
    try:  # every configuration is checked before anything is timed
        configs = {M: policy_configs(M, args) for M in args.cache_sizes}
    except ConfigError as err:
        raise SystemExit(f"--cache-sizes / --chunk: {err}") from None
    cfg = ARCHITECTURES[args.model]
    rows = []
    for M, ccfgs in configs.items():
        for r in bench(cfg, ccfgs, args):
            print(f"M = {M}, {r['what']}: {r['ms_chunk']:.1f} ms per chunk", flush=True)
            rows.append(r)
    result = {
        "model": args.model,
        "layers": cfg.num_hidden_layers,
        "chunk": args.chunk,
        "batch": args.batch,
        "iters": args.iters,
        "repeats": args.repeats,
        "matmul_gflops_per_s": matmul_rate(cfg, args.chunk, args),
        "rows": rows,
        "provenance": results.provenance_now(),
    }
    md = markdown(result)
    print("\n" + md)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(md)
    print(f"wrote {out}, {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
