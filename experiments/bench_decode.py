"""Decoding speed: the device loop (generate.decode_block, blocks of tokens) against the former
per-token host loop (one jitted decode_step per token, each token read back on the host and the
RNG key split on the host), after the same prompt on the embedded SmolLM2-135M.

For each policy (full: every token kept; lococo: M slots, raw window B) the prompt is read once,
both paths decode the same number of greedy tokens from the same state, and their tokens must
match. Compile time (lower + compile, ahead of the timed runs) is reported apart from decoding;
tokens/s counts every new token (the first comes from the prompt's logits) over the time from
the first token to the last, the median of --repeats runs. Prints a table and writes JSON.

    python experiments/bench_decode.py                 # new run folder under experiments/runs/
    python experiments/bench_decode.py --write  # experiments/results/bench_decode_<platform>.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def per_token_loop(params, state, last_logits, n_new, cfg, ccfg, key):
    """The former generate loop (greedy, no eos): -> (tokens [b, n_new], seconds)."""
    import jax
    import numpy as np

    from lococo_jax import generate

    key, sub = jax.random.split(key)
    token = generate.sample(last_logits, sub, 0.0, 1.0)
    token.block_until_ready()
    t0 = time.perf_counter()
    out = []
    for _ in range(n_new):
        out.append(np.asarray(token))
        if len(out) == n_new:
            break
        key, sub = jax.random.split(key)
        token, _, state = generate.decode_step(params, state, token, sub, cfg, ccfg, 0.0, 1.0)
    return np.stack(out, axis=1), time.perf_counter() - t0


def bench_policy(args, policy, params, cfg, prompt) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lococo_jax import generate, longctx, policies
    from lococo_jax.config import CompressionConfig

    L, n_new = prompt.shape[1], args.new_tokens
    M = L + n_new if policy == "full" else args.cache_size
    ccfg = CompressionConfig(policy=policy, cache_size=M, chunk_size=args.chunk_size)
    sub = policies.init_params(jax.random.PRNGKey(0), cfg, ccfg)  # random: speed only
    if sub is not None:
        params = dict(params, lococo=sub)
    t = time.perf_counter()
    res = longctx.run_long(params, prompt, cfg, ccfg, output="last")
    jax.block_until_ready(res.state)
    prefill_first_s = time.perf_counter() - t

    def fresh_state():  # decoding donates its state
        return jax.tree.map(jnp.copy, res.state)

    b = prompt.shape[0]
    key = jax.random.PRNGKey(0)
    token = jnp.zeros((b,), jnp.int32)
    # Compile ahead of the timed runs (the jit calls below then reuse these programs).
    t = time.perf_counter()
    generate.decode_step.lower(params, fresh_state(), token, key, cfg, ccfg, 0.0, 1.0).compile()
    compile_step = time.perf_counter() - t
    compile_block = {}
    for blk in args.blocks:
        carry = generate.DecodeCarry(fresh_state(), token, key, token == -1)
        t = time.perf_counter()
        generate.decode_block.lower(
            params, carry, np.int32(n_new), np.int32(-1), cfg, ccfg, 0.0, 1.0, blk
        ).compile()
        compile_block[blk] = time.perf_counter() - t

    common = dict(
        policy=policy,
        cache_size=M,
        chunk_size=args.chunk_size,
        prompt_tokens=L,
        new_tokens=n_new,
        batch=b,
    )
    rows = []
    # Warm-up runs (untimed): the small eager ops around the compiled steps compile here.
    per_token_loop(params, fresh_state(), res.last_logits, 2, cfg, ccfg, key)
    warm = generate.SamplingConfig(max_new_tokens=2)
    generate.generate(params, prompt, cfg, ccfg, warm, block=args.blocks[0])
    times, ref = [], None
    for _ in range(args.repeats):
        toks, dt = per_token_loop(params, fresh_state(), res.last_logits, n_new, cfg, ccfg, key)
        times.append(dt)
        ref = toks
    base = n_new * b / statistics.median(times)
    rows.append(
        dict(
            common,
            path="per-token host loop",
            block=1,
            compile_s=compile_step,
            decode_s=times,
            tokens_per_s=base,
            ms_per_token=1000 * statistics.median(times) / n_new,
            speedup=1.0,
            same_tokens=True,
        )
    )
    print(f"  {policy} per-token: {base:.1f} tok/s", flush=True)
    sampling = generate.SamplingConfig(max_new_tokens=n_new)
    for blk in args.blocks:
        times, same = [], True
        for _ in range(args.repeats):
            gen = generate.generate(params, prompt, cfg, ccfg, sampling, block=blk)
            times.append(gen.decode_seconds)
            same &= bool(np.array_equal(gen.tokens, ref))
        tps = n_new * b / statistics.median(times)
        rows.append(
            dict(
                common,
                path="device loop",
                block=blk,
                compile_s=compile_block[blk],
                decode_s=times,
                tokens_per_s=tps,
                ms_per_token=1000 * statistics.median(times) / n_new,
                speedup=tps / base,
                same_tokens=same,
            )
        )
        print(f"  {policy} device loop block {blk}: {tps:.1f} tok/s", flush=True)
    for r in rows:
        r["prefill_first_call_s"] = prefill_first_s
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| policy | M | path | block | compile s | decode tok/s | ms/token | vs per-token | "
        "same tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['cache_size']} | {r['path']} | {r['block']} | "
            f"{r['compile_s']:.1f} | {r['tokens_per_s']:.1f} | {r['ms_per_token']:.1f} | "
            f"{r['speedup']:.2f}x | {r['same_tokens']} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="load_model spec (tiny: a smoke run)")
    ap.add_argument("--policies", nargs="+", default=["full", "lococo"])
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--cache-size", type=int, default=128, help="M for compressing policies")
    ap.add_argument("--chunk-size", type=int, default=128, help="B: prefill chunk, raw window")
    ap.add_argument("--blocks", type=int, nargs="+", default=[16, 128], help="device loop blocks")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per cell (median)")
    ap.add_argument("--text", default=str(ROOT / "data/austen/northangerabbey.txt"))
    ap.add_argument("--note", default="", help="stored in the JSON (e.g. the machine's load)")
    ap.add_argument("--out", default=None, help="JSON path (default: a new run folder)")
    ap.add_argument("--write", action="store_true", help="write the committed results file")
    args = ap.parse_args()

    import jax
    import numpy as np

    from lococo_jax import results
    from lococo_jax.models import load_model

    platform = jax.devices()[0].platform
    path = results.output_path(f"bench_decode_{platform}.json", args.out, args.write)
    load_before = os.getloadavg()
    cfg, params, tok = load_model(args.model)
    text = Path(args.text).read_text(encoding="utf-8")
    ids = np.asarray(tok.encode(text), np.int32)
    prompt = ids[None, : args.prompt_tokens]
    rows = []
    for policy in args.policies:
        rows.extend(bench_policy(args, policy, params, cfg, prompt))
    print(table(rows))
    out = {
        "what": "decode tokens/s: device loop (generate.decode_block) vs per-token host loop",
        "model": args.model,
        "dtype": str(params["embed"].dtype),
        "text": results.text_fingerprint(args.text),
        "note": args.note,
        "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
        "rows": rows,
        "provenance": results.provenance_now(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
